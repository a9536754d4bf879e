"""Find each checkpoint parameter among an ONNX model's constants by content and shape, never by name.

Exporters rename tensors (``onnx::Conv_25``), may store Linear weights transposed, and fold
batch-norm into the preceding weight (each output channel scaled). Matches, in order of preference:

    exact       same shape, identical values
    transposed  a 2-D weight stored as its transpose, identical values
    scaled      same shape, same zero pattern, each output channel a constant multiple (BN folding)

Each ONNX tensor is matched to at most one parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Relative spread allowed in the per-channel ratios of a "scaled" match.
SCALE_RTOL = 1e-4


@dataclass(frozen=True)
class Match:
    """Where a parameter was found: the ONNX tensor's name and how it relates to the parameter."""

    onnx_name: str
    kind: str  # "exact" | "transposed" | "scaled"

    def in_param_layout(self, array: np.ndarray) -> np.ndarray:
        """The ONNX array laid out like the parameter (transposed back if needed)."""
        return array.T if self.kind == "transposed" else array


def match_tensors(params: dict[str, torch.Tensor], onnx_tensors: dict[str, np.ndarray]) -> dict[str, Match]:
    """Parameter name -> Match, for each parameter found (the others are absent)."""
    arrays = {name: t.detach().cpu().numpy() for name, t in params.items()}
    free = {name: a for name, a in onnx_tensors.items() if a.dtype.kind == "f"}
    found: dict[str, Match] = {}
    for kind, test in (("exact", _exact), ("transposed", _transposed), ("scaled", _scaled)):
        for name, array in arrays.items():
            if name in found:
                continue
            hit = next((o for o, cand in free.items() if test(array, cand)), None)
            if hit is not None:
                found[name] = Match(hit, kind)
                del free[hit]
    return {name: found[name] for name in params if name in found}


def closest_unmatched(
    array: np.ndarray, onnx_tensors: dict[str, np.ndarray], taken: set[str]
) -> tuple[str, np.ndarray] | None:
    """The free ONNX tensor of the same (or transposed) shape whose zero count is closest; for reports."""
    zeros = int((array == 0).sum())
    shapes = {array.shape, array.shape[::-1]}
    cands = [(n, a) for n, a in onnx_tensors.items() if n not in taken and a.shape in shapes]
    return min(cands, key=lambda c: abs(int((c[1] == 0).sum()) - zeros), default=None)


def _exact(param: np.ndarray, cand: np.ndarray) -> bool:
    return cand.shape == param.shape and np.array_equal(cand, param)


def _transposed(param: np.ndarray, cand: np.ndarray) -> bool:
    return param.ndim == 2 and cand.shape == param.shape[::-1] and np.array_equal(cand.T, param)


def _scaled(param: np.ndarray, cand: np.ndarray) -> bool:
    """Same zero pattern, and per output channel (dim 0) the nonzeros share one ratio."""
    if param.ndim < 2 or cand.shape != param.shape:
        return False
    nonzero = param != 0
    if not np.array_equal(nonzero, cand != 0):
        return False
    p = param.reshape(param.shape[0], -1).astype(np.float64)
    c = cand.reshape(cand.shape[0], -1).astype(np.float64)
    keep = nonzero.reshape(p.shape)
    ratio = np.ma.masked_array(np.divide(c, p, out=np.zeros_like(c), where=keep), mask=~keep)
    low, high = ratio.min(axis=1), ratio.max(axis=1)
    close = np.ma.filled(np.abs(high - low) <= SCALE_RTOL * np.abs(low), True)
    return bool(np.all(close))
