"""Argument checks shared by the M-FAC classes: each raises a ValueError that says what was wrong."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)
#: Storage-only dtypes: gradients, factors and windows may be kept in them; arithmetic upcasts.
HALF_DTYPES = (torch.bfloat16, torch.float16)
STORAGE_DTYPES = (*FLOAT_DTYPES, *HALF_DTYPES)
_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


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


def check_grads(grads: torch.Tensor, *, allow_half: bool = False) -> None:
    """``grads`` must be an (m, d) float32/float64 tensor (or bfloat16/float16 with ``allow_half``)
    with m >= 1 and d >= 1."""
    if not isinstance(grads, torch.Tensor):
        raise ValueError(f"grads must be a torch.Tensor of shape (m, d), got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"grads must have shape (m, d), got shape {tuple(grads.shape)}")
    allowed = STORAGE_DTYPES if allow_half else FLOAT_DTYPES
    if grads.dtype not in allowed:
        raise ValueError(f"grads must be {' or '.join(_NAMES[t] for t in allowed)}, got {grads.dtype}")
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


def check_storage_dtype(storage_dtype: torch.dtype | None, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype values are stored in: ``storage_dtype``, or ``compute_dtype`` when None.

    It must be float64, float32, bfloat16 or float16 and no wider than ``compute_dtype`` (the
    float32/float64 dtype all arithmetic is done in): storage never adds precision.
    """
    if storage_dtype is None:
        return compute_dtype
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(
            "storage_dtype must be None, torch.float32, torch.float64, torch.bfloat16 or torch.float16, "
            f"got {storage_dtype!r}"
        )
    if torch.finfo(storage_dtype).bits > torch.finfo(compute_dtype).bits:
        raise ValueError(
            f"storage_dtype {_NAMES[storage_dtype]} is wider than the {_NAMES[compute_dtype]} arithmetic; "
            f"use {_NAMES[compute_dtype]} or a narrower dtype"
        )
    return storage_dtype


def is_reduced(storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """Whether values are stored narrower than they are computed (the rounded, row-scaled form)."""
    return storage_dtype != compute_dtype


#: Power-of-two row scaling puts each stored row's largest magnitude in [2^e, 2^(e+1)): e = 14 for
#: float16 (largest finite 65504 < 2^16, smallest normal 2^-14: 28 binades of full precision below
#: the row maximum instead of float16's fixed window at 6e-5..6.5e4, where gradients of 1e-5 would
#: be subnormal); 0 for the others, whose exponent range is float32's or wider.
_SCALE_EXPONENT = {torch.float16: 14}


def row_scales(amax: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """Powers of two s with amax / s in [2^e, 2^(e+1)) (e: ``_SCALE_EXPONENT``), amax >= 0 a bound on
    the magnitudes of each row; rows with amax = 0 get s = 2^-(e+1). Same shape and dtype as amax."""
    _, exponent = torch.frexp(amax)  # amax in [2^(exponent-1), 2^exponent); 0 -> exponent 0
    target = _SCALE_EXPONENT.get(storage_dtype, 0)
    return torch.ldexp(torch.ones_like(amax), exponent - 1 - target)


def quantize_rows(
    x: torch.Tensor, storage_dtype: torch.dtype, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with x ~= q * s: q = x / s rounded to ``storage_dtype``, s (..., r, 1) a power of two per
    row of x (..., r, c), in x's dtype, from the rows' largest magnitudes (or the bound ``amax``,
    (..., r, 1)). The scaling is exact; the only error is q's rounding (relative <= 2^-9 for
    bfloat16, 2^-12 for float16 down to 2^-14 times the row's bound, subnormal below)."""
    if amax is None:
        amax = x.abs().amax(dim=-1, keepdim=True)
    scale = row_scales(amax.to(x.dtype), storage_dtype)
    return (x / scale).to(storage_dtype), scale
