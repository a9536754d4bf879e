"""Checkpoints: written atomically, loaded with ``weights_only=True``, refused clearly when damaged.

A checkpoint is a dict of tensors and plain values::

    {"format": "compressor-checkpoint", "version": 1, "model": ..., "optimizer": ...,
     "session": ..., "rng": ..., "epoch": int, "recipe_sha256": str, ...}
"""

from __future__ import annotations

import hashlib
import random
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
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


def seed_rngs(seed: int) -> None:
    """Seed the global RNGs that a run's code may draw from: torch's (CPU and CUDA), Python's, NumPy's."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def fork_rank_rngs(rank: int) -> None:
    """Give rank ``rank`` > 0 streams of its own, derived from the current state and the rank (rank 0
    keeps its streams): ranks that start from the same state would otherwise draw the same numbers,
    the same dropout mask on every rank's slice of a batch, where one process draws independent ones."""
    if rank == 0:
        return
    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + rank.to_bytes(8, "little")).digest()
    seed_rngs(int.from_bytes(digest[:8], "little") >> 1)  # 63 bits: any seed torch.manual_seed takes


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch's CPU and, once CUDA is in use, every GPU's; Python's; NumPy's),
    as plain values that load with weights_only=True."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy = [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss], "numpy": numpy}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # dropout on a GPU draws from these
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()`` (a checkpoint from before NumPy's and CUDA's states were saved, or
    CUDA's on a machine without it: those are left as they are; GPUs beyond this machine's: ignored)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda, index)
