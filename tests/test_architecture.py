"""The shape of the library: import layers (import-linter), file sizes, loose modules, the docs build.

The import contract is ``[tool.importlinter]`` in pyproject.toml: compressor/ in layers whose imports
point down, compressor never importing modifiers/ or exporters/, those two never importing the run,
the CLI or the integrations, and no import cycle anywhere (imports inside functions count; only
``if TYPE_CHECKING:`` blocks are left out). A broken contract fails here with lint-imports' report,
which names the offending import and its line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("compressor", "modifiers", "exporters")
MAX_LINES = 450  # a file longer than this mixes concerns: split it
MAX_LOOSE_MODULES = 10  # compressor/*.py besides __init__.py: the rest lives in subpackages


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed: run `bash install.sh` (the test extra has it)")
        return found
    return str(path)


def test_import_contracts_hold() -> None:
    done = subprocess.run(
        [_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " 0 broken" in done.stdout, done.stdout[-6000:]


def test_no_library_file_is_longer_than_the_limit() -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for package in LIBRARY
        for path in (ROOT / package).rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these files by concern (at most {MAX_LINES} lines each): {long}"


def test_compressor_keeps_few_loose_modules() -> None:
    loose = sorted(p.name for p in (ROOT / "compressor").glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= MAX_LOOSE_MODULES, loose


def test_every_subpackage_is_placed_in_the_layer_contract() -> None:
    """A new folder of compressor/ must be given a layer (exhaustive = true makes lint-imports say so;
    this names it without running the linter)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    placed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    children = {p.name for p in (ROOT / "compressor").iterdir() if (p / "__init__.py").is_file()}
    children |= {p.stem for p in (ROOT / "compressor").glob("*.py") if p.name != "__init__.py"}
    assert children == placed, f"not placed: {sorted(children - placed)}; gone: {sorted(placed - children)}"


def test_docs_build_in_strict_mode(tmp_path: Path) -> None:
    """mkdocs with mkdocstrings: a broken link, a missing page or a renamed API name fails the build."""
    done = subprocess.run(
        [_tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute reached from the longest importable prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_python_name_the_docs_give_exists() -> None:
    """Names in backticks (``compressor.x.y``, ``modifiers.m.Class``, ``exporters.e.f``) in README.md
    and docs/ import: a rename that forgets the prose fails here."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"`((?:compressor|modifiers|exporters)(?:\.[A-Za-z_]\w*)+)")
    named = {(page.name, m) for page in pages for m in pattern.findall(page.read_text(encoding="utf-8"))}
    entry_point_groups = {"compressor.modifiers", "compressor.exporters", "compressor.optimizers"}
    missing = sorted(
        (page, name) for page, name in named if name not in entry_point_groups and not _resolves(name)
    )
    assert not missing, missing
    assert len(named) > 10  # the pattern still finds the names
