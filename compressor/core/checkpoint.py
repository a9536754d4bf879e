"""Checkpoints: written atomically, loaded with ``weights_only=True``, refused clearly when damaged.

A checkpoint is a dict of tensors and plain values::

    {"format": "compressor-checkpoint", "version": 1, "model": ..., "optimizer": ...,
     "session": ..., "rng": ..., "epoch": int, "recipe_sha256": str, ...}
"""

from __future__ import annotations

import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from compressor.core.atomic import atomic_write
from compressor.core.errors import CompressorError

FORMAT = "compressor-checkpoint"
VERSION = 1


class CheckpointError(CompressorError, ValueError):
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
    _check_archive(path)
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


def _check_archive(path: Path) -> None:
    """CheckpointError for a truncated zip or a member whose bytes do not match their CRC-32.

    ``torch.load`` does not check the checksums, so a flipped byte inside a tensor would load
    silently as a different weight; ``zipfile.testzip`` reads every member and checks it.
    """
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return  # not a zip: torch.load below names what it is not
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(
            f"{path}: truncated or tampered checkpoint (the archive is incomplete: {exc})"
        ) from exc
    if bad is not None:
        raise CheckpointError(
            f"{path}: truncated or tampered checkpoint: member {bad!r} fails its CRC-32 check"
        )


def rng_state() -> dict[str, Any]:
    """The torch and Python RNG states, as plain values that load with weights_only=True."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
