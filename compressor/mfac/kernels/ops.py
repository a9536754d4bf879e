"""The kernel wrappers: each runs one kernel of the extension where it applies, else returns None / False.

``factor_blocks`` (W = L^-1 G and diag(F^-1) per Woodbury block, by the extension's fused
``factor_blocks`` for m, B <= 128 or its ``factor_wide_blocks`` for wider blocks), ``direct_blocks``
(P = damp * F_b^-1 for blocks narrower than m), ``blocked_mul`` (x - W^T (W x) per block) and
``accumulate_blocks`` (S_b += G_b^T G_b); the package docstring describes the kernels.

"Applies" means the shape, device, dtype and layout suit the kernel, the mode is not off and the
extension is built (``build.module``), and, asked last, ``choose(kernel, t, m, size)`` says to
run it on this shape: the package's names pass the measured dispatch (``dispatch.chosen``),
``dispatch.measure`` passes one that always says yes. Where a wrapper returns None / False the
caller runs the PyTorch path (``reference``), which is always correct.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from . import build

#: ``choose(kernel, t, m, size)``: whether to run ``kernel`` (a name of ``dispatch.KERNEL_NAMES``) on
#: m rows (gradients, or rows of a chunk) and blocks of ``size`` columns of tensor ``t``.
Choose = Callable[[str, torch.Tensor, int, int], bool]

#: The fused set-up does its ~2 m^2 B flops per block in float64; the PyTorch path does them as
#: batched float32 GEMMs, which are slow for small blocks only. The kernel is used where
#: bench/kernel_speed.py measured it >= 1.5x faster (bench/results/kernels.md): m <= 128, B <= 128.
FUSED_MAX_GRADS = 128
FUSED_MAX_BLOCK = 128
#: Wider blocks (m = B = 1024) go to ``factor_wide_blocks``: BLAS/LAPACK calls per block, one block
#: per thread, a blocked float64 Cholesky and one triangular solve L W = G_b (csrc/mfac_cpu_wide.h),
#: where each block's float64 m x B matrices fit in this many bytes and there are at least two blocks
#: per thread. The PyTorch path runs them as batched calls, each split over the threads: LAPACK's
#: Cholesky of one m = 1024 matrix ran at a sixth of the float64 GEMM rate here.
WIDE_MAX_BLOCK_BYTES = 16 << 20
#: ``blocked_mul`` is used when one block of W fits in this many bytes (it stays in L2 between
#: the two products), or when there are at least MUL_MIN_BLOCKS blocks: the kernel's threads split
#: the blocks, and for blocks wider than L2 its two passes cost what two GEMVs do, where PyTorch's
#: batched products with one column do not (m = B = 1024, d = 250,000: 0.6x two GEMVs against
#: 1.7x, bench/results/kernels.md). A few wide blocks (the unblocked case) use PyTorch's GEMVs.
MUL_MAX_BLOCK_BYTES = 1 << 20
MUL_MIN_BLOCKS = 16
#: The direct form's kernel (blocks narrower than m) holds G_b^T and three S x S float64 matrices.
DIRECT_MAX_BLOCK = 256


def _module_for(t: torch.Tensor) -> ModuleType | None:
    """The extension for ``t``'s device (None: off, not built, or a device without kernels)."""
    if t.device.type == "cpu":
        return build.module("cpu")
    if t.device.type == "cuda":
        return build.module("cuda")
    return None


def factor_blocks(
    grads: Tensor, start: int, blocks: int, size: int, damp: float, diag: Tensor, *, choose: Choose
) -> Tensor | None:
    """W (blocks, m, size) for the blocks of ``grads[:, start:start + blocks*size]``, or None.

    ``grads`` (m, d), ``diag`` (d,): writes ``diag[start:start + blocks*size]``. None when the kernel
    does not apply or when some block's m*damp*I + G G^T is not positive definite in float64 or
    holds NaN/Inf: the PyTorch path then runs (and raises its detailed error).
    """
    m = grads.shape[0]
    if size < m:  # a block narrower than m is static.py's direct form, not Woodbury
        return None
    if not _rows_and_diag_fit(grads, diag):
        return None
    if m <= FUSED_MAX_GRADS and size <= FUSED_MAX_BLOCK:
        name = "factor_blocks"
    elif (
        grads.device.type == "cpu"
        and blocks >= 2 * torch.get_num_threads()
        and m * size * 8 <= WIDE_MAX_BLOCK_BYTES
    ):
        name = "factor_wide_blocks"
    else:
        return None
    ext = _module_for(grads)
    if ext is None or not hasattr(ext, name) or not choose(name, grads, m, size):
        return None
    end = start + blocks * size
    factor = torch.empty(blocks, m, size, dtype=grads.dtype, device=grads.device)
    failed = getattr(ext, name)(grads[:, start:end], blocks, size, float(damp), factor, diag[start:end])
    return factor if failed < 0 else None


def _rows_and_diag_fit(grads: torch.Tensor, diag: torch.Tensor) -> bool:
    """Whether the fused block kernels take ``grads`` (m, d) float32/64 with unit column stride and
    write ``diag`` (contiguous, of its dtype and device)."""
    return (
        grads.dtype in (torch.float32, torch.float64)
        and grads.dim() == 2
        and grads.stride(1) == 1
        and diag.dtype == grads.dtype
        and diag.device == grads.device
        and diag.is_contiguous()
    )


def direct_blocks(
    grads: Tensor, start: int, blocks: int, size: int, damp: float, diag: Tensor, *, choose: Choose
) -> Tensor | None:
    """P = damp * F_b^-1 (blocks, size, size) for blocks narrower than m, or None (not run).

    The direct form of static.py for the blocks of ``grads[:, start:start + blocks*size]``; writes
    their ``diag``. None as for ``factor_blocks`` (the PyTorch path then runs and raises its errors).
    """
    m = grads.shape[0]
    if size >= m or size > DIRECT_MAX_BLOCK or not _rows_and_diag_fit(grads, diag):
        return None
    ext = _module_for(grads)
    if ext is None or not hasattr(ext, "direct_blocks") or not choose("direct_blocks", grads, m, size):
        return None
    end = start + blocks * size
    factor = torch.empty(blocks, size, size, dtype=grads.dtype, device=grads.device)
    failed = ext.direct_blocks(grads[:, start:end], blocks, size, float(damp), factor, diag[start:end])
    return factor if failed < 0 else None


def accumulate_blocks(chunk: torch.Tensor, start: int, sums: torch.Tensor, *, choose: Choose) -> bool:
    """Upper triangle of ``sums[b] += G_b^T G_b`` for the blocks of ``chunk[:, start:]``; False: not run.

    ``sums`` (blocks, size, size) float64, contiguous; ``chunk`` (k, >= start + blocks*size) float32 or
    float64 rows with unit column stride (block_fisher.py's ``add``). Only the upper triangle of the
    sums is kept (the entries below it are unspecified): the caller factors with ``upper=True``.
    """
    if sums.dim() != 3:
        return False
    blocks, size, _ = sums.shape
    k = chunk.shape[0]
    if (
        sums.dtype != torch.float64
        or not sums.is_contiguous()
        or chunk.dim() != 2
        or chunk.dtype not in (torch.float32, torch.float64)
        or chunk.stride(1) != 1
        or chunk.device != sums.device
        or k == 0
    ):
        return False
    ext = _module_for(sums)
    if ext is None or not hasattr(ext, "accumulate_blocks"):
        return False
    if not choose("accumulate_blocks", sums, k, size):
        return False
    ext.accumulate_blocks(chunk[:, start : start + blocks * size], blocks, size, sums)
    return True


def blocked_mul(
    factor: torch.Tensor, xs: torch.Tensor, out: torch.Tensor, start: int, num_grads: int, *, choose: Choose
) -> bool:
    """``out[:, cols] = xs[:, cols] - W^T (W xs[:, cols])`` block by block (no 1/damp); False: not run.

    ``factor`` is a segment's Woodbury factor W (blocks, num_grads, size), ``cols`` its columns
    from ``start`` of ``xs`` and ``out`` (k, d). Anything else (a direct-form block narrower than
    num_grads) is refused.
    """
    if factor.dim() != 3:
        return False
    blocks, m, size = factor.shape
    if (
        m != num_grads
        or size < m
        or (m * size * factor.element_size() > MUL_MAX_BLOCK_BYTES and blocks < MUL_MIN_BLOCKS)
        or not factor.is_contiguous()
        or xs.dtype != factor.dtype
        or out.dtype != factor.dtype
        or xs.device != factor.device
        or out.device != factor.device
        or xs.stride(1) != 1
        or out.stride(1) != 1
    ):
        return False
    ext = _module_for(factor)
    if ext is None or not choose("blocked_mul", factor, m, size):
        return False
    end = start + blocks * size
    ext.blocked_mul(factor, xs[:, start:end], out[:, start:end])
    return True
