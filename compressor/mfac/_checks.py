"""Argument checks shared by the M-FAC classes: each raises a ValueError that says what was wrong."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_damp(damp: float) -> float:
    """Return ``damp`` as a float; it must be a finite number > 0."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    damp = float(damp)
    if not math.isfinite(damp) or damp <= 0.0:
        raise ValueError(f"damp must be a finite number > 0, got {damp}")
    return damp


def check_positive_int(value: int, name: str) -> int:
    """Return ``value``; it must be an int >= 1 (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_grads(grads: torch.Tensor) -> None:
    """``grads`` must be an (m, d) float32/float64 tensor with m >= 1 and d >= 1."""
    if not isinstance(grads, torch.Tensor):
        raise ValueError(f"grads must be a torch.Tensor of shape (m, d), got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads must have shape (m, d), got shape {tuple(grads.shape)}")
    if grads.dtype not in FLOAT_DTYPES:
        raise ValueError(f"grads must be float32 or float64, got {grads.dtype}")
    if grads.is_sparse or grads.layout != torch.strided:
        raise ValueError("grads must be a dense (strided) tensor")
    m, d = grads.shape
    if m == 0:
        raise ValueError("grads has no rows (m = 0): at least one gradient is needed")
    if d == 0:
        raise ValueError("grads has no columns (d = 0)")


def check_vectors(x: torch.Tensor, d: int, what: str = "x") -> None:
    """``x`` must be a floating tensor of shape (d,) or (k, d)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape ({d},) or (k, {d}), got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32 or float64, got {x.dtype}")
    if x.dim() not in (1, 2) or x.shape[-1] != d:
        raise ValueError(f"{what} must have shape ({d},) or (k, {d}), got {tuple(x.shape)}")


def nonfinite_rows(finite: torch.Tensor) -> list[int]:
    """Indices where ``finite`` (m,), a test of the rows' squared norms, is False.

    A NaN or Inf anywhere in a row of G makes that row's squared norm (a diagonal entry of
    G G^T) NaN or Inf, so the m diagonal entries find every bad row without a pass over G.
    """
    return (~finite).nonzero().flatten().tolist()
