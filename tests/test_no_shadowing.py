"""No module of this repository hides an installed distribution's top-level name.

A folder on sys.path is searched before site-packages, so a file ``kernels.py`` in it replaces
Hugging Face's ``kernels`` package for every import that follows (transformers 5.25 then fails deep
inside with ``cannot import name 'CUDAProperties' from 'kernels'``). The folders checked are those the
tests or the scripts put on sys.path: the repository root (``python -m pytest``, the bench scripts),
tests/ (pytest's default import mode, test_distributed_run.py), bench/ (``python bench/x.py`` puts it
first), and any other sys.path entry inside the repository at test time.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = "compressor"  # this project's distribution: its own packages may take its names
NOT_IMPORTED = {"conftest", "setup"}  # loaded by pytest / setuptools by path, never by name


def module_names(folder: Path) -> dict[str, Path]:
    """Top-level names importable from ``folder``: ``*.py`` stems and folders with ``__init__.py``.

    A folder without ``__init__.py`` is a namespace portion, which never wins over a regular package
    found later on sys.path, so it is left out.
    """
    names = {p.stem: p for p in folder.glob("*.py") if p.stem not in NOT_IMPORTED}
    names |= {p.name: p for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return names


def folders_on_path() -> list[Path]:
    folders = {ROOT, ROOT / "tests", ROOT / "bench"}
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path.is_dir() and (path == ROOT or ROOT in path.parents) and ".venv" not in path.parts:
            folders.add(path)
    return sorted(folders)


def clashes(folders: list[Path], taken: dict[str, list[str]]) -> list[str]:
    """One line per module whose name an installed distribution other than this project's provides."""
    found = []
    for folder in folders:
        for name, path in sorted(module_names(folder).items()):
            others = sorted(set(taken.get(name, [])) - {OWN})
            if others:
                found.append(
                    f"{path.relative_to(ROOT)} has the top-level name {name!r} of the installed "
                    f"distribution(s) {', '.join(others)}: rename it or load it by path"
                )
    return found


def test_no_module_on_the_test_and_script_paths_shadows_an_installed_distribution() -> None:
    problems = clashes(folders_on_path(), md.packages_distributions())
    assert not problems, "\n".join(problems)


def test_the_check_names_both_the_file_and_the_distribution(tmp_path: Path) -> None:
    folder = ROOT / "bench"
    some_script = sorted(module_names(folder))[0]
    taken = {some_script: ["somebody-else"], "compressor": [OWN, OWN], "unrelated": ["x"]}
    (problem,) = clashes([folder, ROOT], taken)
    assert f"bench/{some_script}.py" in problem and "somebody-else" in problem
    taken["modifiers"] = [OWN, "modifiers"]  # another distribution taking one of ours is a clash too
    assert any(p.startswith("modifiers has") for p in clashes([ROOT], taken))


def test_the_folders_checked_are_the_ones_scripts_and_pytest_put_first() -> None:
    folders = folders_on_path()
    assert {ROOT, ROOT / "tests", ROOT / "bench"} <= set(folders)
    assert "kernel_speed" in module_names(ROOT / "bench") and "compressor" in module_names(ROOT)
