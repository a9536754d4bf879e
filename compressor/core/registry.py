"""Name -> object registries filled from Python entry points, so other packages can add their own.

Groups (declared in a package's pyproject.toml under ``[project.entry-points."GROUP"]``):

    compressor.modifiers    modifier classes (Pydantic models with lifecycle hooks)
    compressor.exporters    export functions
    compressor.optimizers   torch.optim.Optimizer classes usable in a recipe's ``train.optimizer``

``compressor`` never imports ``modifiers`` or ``exporters``: it only loads what the entry points
name. ``register`` adds an object at run time (tests, notebooks) and wins over an entry point.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Any

from compressor.core.errors import CompressorError

KINDS = {
    "modifiers": "compressor.modifiers",
    "exporters": "compressor.exporters",
    "optimizers": "compressor.optimizers",
}

_registered: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_loaded: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


class RegistryError(CompressorError, KeyError):
    """An unknown name; the message lists the closest known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind]


def names(kind: str) -> list[str]:
    """Every name registered for ``kind`` ("modifiers", "exporters" or "optimizers"), sorted."""
    group = _check_kind(kind)
    found = {ep.name for ep in entry_points(group=group)}
    return sorted(found | set(_registered[kind]))


def get(kind: str, name: str) -> Any:
    """The object registered as ``name``; RegistryError naming the closest names if there is none."""
    group = _check_kind(kind)
    if name in _registered[kind]:
        return _registered[kind][name]
    if name in _loaded[kind]:
        return _loaded[kind][name]
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        known = names(kind)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown {kind[:-1]} {name!r}{hint} (known: {', '.join(known) or 'none'})")
    obj = matches[0].load()
    _loaded[kind][name] = obj
    return obj


def register(kind: str, name: str, obj: Any) -> None:
    """Register ``obj`` under ``name`` at run time; it shadows an entry point of the same name."""
    _check_kind(kind)
    _registered[kind][name] = obj


def unregister(kind: str, name: str) -> None:
    """Remove a run-time registration (entry points stay)."""
    _check_kind(kind)
    _registered[kind].pop(name, None)
