"""Does a weight's zero pattern follow the structure its recipe asked for (N:M, blocks, channels)?"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from compressor.mask_patterns import NM, Blocks, as_structure


def describe(spec: Any) -> str:
    """Short text of a structure: ``2:4``, ``blocks 4x4``, ``channels``."""
    structure = as_structure(spec)
    if isinstance(structure, NM):
        return f"{structure.n}:{structure.m}"
    if isinstance(structure, Blocks):
        return "blocks {}x{}".format(*structure.blocks)
    return str(structure)


def violations(array: np.ndarray, spec: Any) -> tuple[int, int]:
    """(groups that break the structure, groups in all), for ``array`` laid out like the parameter.

    N:M: a group of M consecutive weights along input channels with more than N nonzeros breaks it.
    Blocks and channels: a tile (or row) that holds a zero without being entirely zero breaks it.
    """
    structure = as_structure(spec)
    if isinstance(structure, NM):
        moved = np.moveaxis(array, 1, -1) if array.ndim >= 2 else array
        groups = np.ascontiguousarray(moved).reshape(-1, structure.m)
        return int(((groups != 0).sum(axis=1) > structure.n).sum()), len(groups)
    if structure == "unstructured" or array.ndim == 0:
        return 0, 0
    rows, cols = array.shape[0], math.prod(array.shape[1:])
    r, c = structure.blocks if isinstance(structure, Blocks) else (1, cols)
    nr, nc = -(-rows // r), -(-cols // c)
    zero = np.zeros((nr * r, nc * c), dtype=bool)
    zero[:rows, :cols] = array.reshape(rows, cols) == 0
    filled = np.ones_like(zero)
    filled[:rows, :cols] = False  # padding counts as zero for "entirely zero", not as "holds a zero"
    tiles = (zero | filled).reshape(nr, r, nc, c).all(axis=(1, 3))
    any_zero = zero.reshape(nr, r, nc, c).any(axis=(1, 3))
    return int((any_zero & ~tiles).sum()), nr * nc
