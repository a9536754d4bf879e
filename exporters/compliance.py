"""Does a weight's zero pattern follow the structure its recipe asked for (N:M, blocks, channels)?"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressor.sparsity.patterns import NM, Blocks, as_structure, group_layout


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
    if structure == "unstructured" or array.ndim == 0:
        return 0, 0
    layout = group_layout(array.shape, structure).numpy()  # (groups, k), -1 pads edge tiles
    slot = layout >= 0
    nonzero = (np.asarray(array).reshape(-1) != 0)[np.maximum(layout, 0)] & slot
    if isinstance(structure, NM):
        return int((nonzero.sum(axis=1) > structure.n).sum()), len(layout)
    holds_zero = (slot & ~nonzero).any(axis=1)
    return int((holds_zero & nonzero.any(axis=1)).sum()), len(layout)
