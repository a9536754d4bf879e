"""Checkpoints: written atomically, loaded with ``weights_only=True``, refused clearly when damaged.

A checkpoint is a dict of tensors and plain values::

    {"format": "compressor-checkpoint", "version": 1, "model": ..., "optimizer": ...,
     "session": ..., "rng": ..., "epoch": int, "recipe_sha256": str, ...}
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write

FORMAT = "compressor-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable compressor checkpoint (missing, truncated, tampered, foreign)."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda handle: torch.save(payload, handle), binary=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code runs); CheckpointError when unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, forbidden globals: all mean "unusable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or tampered?): {reason}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a compressor checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')!r}, this compressor reads {VERSION}"
        )
    return state


def rng_state() -> dict[str, Any]:
    """The torch and Python RNG states, as plain values that load with weights_only=True."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
