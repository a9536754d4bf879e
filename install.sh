#!/usr/bin/env bash
# Set up .venv with compressor (editable) and its test tools. Safe to run again: it only
# installs what is missing. torch: the CPU wheel 2.13.0 when the venv has no torch yet.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
stamp=.venv/.compressor-pyproject
if ! cmp -s pyproject.toml "$stamp" || ! .venv/bin/python -c "import compressor" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet -e ".[test]"
  cp pyproject.toml "$stamp"
fi
