"""Load a script of bench/ by its path, under a private module name (``_bench_<stem>``).

bench/ is a folder of scripts, never put on sys.path by the tests: a script named like an installed
distribution (bench/kernels.py beside Hugging Face's ``kernels``) would shadow it for every import
that follows. Loading by path registers the module as ``sys.modules["_bench_<stem>"]``, the same
name bench/quality_minilm.py uses for its sibling, so a test that patches a module patches the one
the script calls.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(stem: str) -> ModuleType:
    """bench/<stem>.py as a module named ``_bench_<stem>`` (loaded once, then taken from sys.modules)."""
    name = f"_bench_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{stem}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no bench script {BENCH / stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
