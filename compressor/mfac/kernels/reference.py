"""The plain-PyTorch math of each compiled kernel: the path static.py and block_fisher.py run where
no kernel applies, and what dispatch.py times each kernel against. Imports torch alone.

G (m, d) holds the gradients, one per row; G_b (m, B) is a Fisher block's columns, and
F_b = damp * I + G_b^T G_b / m.

* Woodbury form (B >= m): K = m*damp*I + G_b G_b^T = L L^T and W_b = L^-1 G_b (m, B), so
  F_b^-1 x = (x - W_b^T (W_b x)) / damp and diag(F_b^-1) = (1 - colsum(W_b * W_b)) / damp.
* Direct form (B < m): P_b = damp * F_b^-1 (B, B) from a float64 Cholesky of F_b; F_b^-1 x = P_b x / damp.
* Streamed sums (block_fisher.py): S_b += G_b^T G_b over chunks of rows.

A page of blocks is laid out (blocks, rows, columns): ``rows[b]`` holds block b's columns of every
row (static.py's ``page_of_rows``). The steps (``woodbury_gram``, ``inverse_cholesky``, ...) are
what static.py composes over its pages; the functions named after a kernel take that kernel's
arguments and do its work over pages of whole blocks, as FisherInverse and BlockFisherInverse do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

#: Bytes of temporaries per page of whole blocks: keeps them in cache (static.py's LOCAL_PAGE_BYTES,
#: block_fisher.py's PAGE_BYTES).
PAGE_BYTES = 8 << 20

# ------------------------------------------------------------------------ Woodbury form (B >= m)


def woodbury_gram(pages: Iterable[torch.Tensor], page_bytes: int = PAGE_BYTES) -> torch.Tensor:
    """G_b G_b^T (b, m, m) float64 of each block, from ``pages`` (b, m, c_i) of the blocks' columns.

    Formed in float64 whatever the rows' dtype: float32 rows are widened ``page_bytes`` of float64
    at a time (runs of columns), so every product of two float32 entries is exact and only the
    float64 sums round. A float32 GEMM here (sums rounded to float32) put an error of a few
    eps32 * |g_i| |g_j| on each entry of K = m*damp*I + G_b G_b^T, which the leverages
    colsum(W^2) = diag(G_b^T K^-1 G_b) amplify by up to cond(K): with N(0, 1) rows, m = 64, B = 100,
    damp = 1e-4 (cond(K) ~ 80) diag(F^-1) was off by up to 4.3 eps32 / damp, 1.2 with this sum
    (tests/test_block_fisher.py, whose bound is 2 eps32 / damp).
    """
    gram = None
    for rows in pages:
        b, m, c = rows.shape
        if gram is None:
            gram = torch.zeros(b, m, m, dtype=torch.float64, device=rows.device)
        if rows.dtype == torch.float64:
            gram.baddbmm_(rows, rows.mT)
            continue
        run = max(1, page_bytes // (8 * b * m))  # columns per float64 temporary
        for c0 in range(0, c, run):
            wide = rows[..., c0 : c0 + run].to(torch.float64)
            gram.baddbmm_(wide, wide.mT)
    return gram


def inverse_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """L^-1 (b, m, m) float64 for K = m*damp*I + G G^T = L L^T, from ``gram`` = G G^T (b, m, m) float64.

    Adds m*damp to ``gram``'s diagonal in place. ValueError where K is not positive definite.
    """
    m = gram.shape[-1]
    gram.diagonal(dim1=-2, dim2=-1).add_(m * damp)
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise ValueError(
            f"m*damp*I + G G^T is not positive definite in float64 (damp={damp:g} is too small "
            "for the scale of the gradients); increase damp"
        )
    eye = torch.eye(m, dtype=torch.float64, device=gram.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def woodbury_factor(linv: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W_b = L^-1 G_b: ``linv`` (b, m, m) in the dtype of ``rows`` (b, m, c); (b, m, c), into ``out``."""
    return torch.matmul(linv, rows, out=out)


def woodbury_diagonal(w: torch.Tensor, damp: float) -> torch.Tensor:
    """diag(F^-1) = (1 - colsum(W * W)) / damp over the columns of ``w`` (b, m, c): (b * c,) float64."""
    return ((1.0 - column_sum_of_squares(w)) / damp).flatten()


def column_sum_of_squares(w: torch.Tensor) -> torch.Tensor:
    """sum_i w[..., i, c]^2 over the m rows of w (b, m, c), accumulated in float64, shape (b, c).

    float32 rows are summed in float32 in runs of at most 32, then the partial sums in float64:
    as accurate as a float64 sum for practical purposes, without a float64 copy of the page.
    """
    b, m, c = w.shape
    squares = w.square()
    if w.dtype == torch.float64:
        return squares.sum(dim=-2)
    run = max(r for r in range(1, min(m, 32) + 1) if m % r == 0)
    return squares.view(b, m // run, run, c).sum(dim=-2).to(torch.float64).sum(dim=-2)


def woodbury_coefficients(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W_b x_b per block: ``w`` (b, m, c), ``x`` (b, k, c) the k vectors' columns; (b, m, k)."""
    return w @ x.mT


def woodbury_residual(w: torch.Tensor, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """x_b - W_b^T coef_b per block, for ``w`` (b, m, c), ``x`` (b, k, c), ``coef`` (b, m, k) (= W x):
    (k, b * c), the k vectors' columns in order (no 1/damp)."""
    return torch.baddbmm(x.mT, w.mT, coef, alpha=-1.0).permute(2, 0, 1).flatten(1)


# -------------------------------------------------------------------------- direct form (B < m)


def finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """(m,) bool: whether each gradient row of ``rows`` (b, m, c) is finite in the page (a NaN or Inf
    makes its squared norm NaN or Inf)."""
    return rows.square().sum(dim=-1).isfinite().all(dim=0)


def direct_factor(rows: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_b = damp * F_b^-1 (b, c, c), diag(F_b^-1) (b * c,)), both float64, from ``rows`` (b, m, c).

    F_b = damp*I + G_b^T G_b / m is formed and Cholesky-factored in float64 (for c < m it is the
    small one). ValueError where F_b is not positive definite.
    """
    m = rows.shape[-2]
    g64 = rows.to(torch.float64)  # B < m: the B x B Gram is small, accumulate it in float64
    fisher = (g64.mT @ g64).div_(m)
    fisher.diagonal(dim1=-2, dim2=-1).add_(damp)
    chol, info = torch.linalg.cholesky_ex(fisher)
    if bool((info != 0).any()):
        raise ValueError(f"damp*I + G^T G / m is not positive definite in float64 (damp={damp:g})")
    inverse = torch.cholesky_inverse(chol)
    return inverse * damp, inverse.diagonal(dim1=-2, dim2=-1).flatten()


# ------------------------------------------------------------------- the kernels' work, by pages


def _pages(
    grads: torch.Tensor, start: int, blocks: int, size: int, page_bytes: int
) -> Iterator[tuple[int, int, slice, torch.Tensor]]:
    """(b0, b1, columns, rows (b1 - b0, m, size)) for pages of whole blocks of ``grads[:, start:]``
    (m, d): ``page_bytes`` of rows each, at least one block (static.py's pages of whole blocks)."""
    per = max(1, page_bytes // (grads.shape[0] * grads.element_size()) // size)
    for b0 in range(0, blocks, per):
        b1 = min(b0 + per, blocks)
        cols = slice(start + b0 * size, start + b1 * size)
        yield b0, b1, cols, grads[:, cols].unflatten(1, (b1 - b0, size)).transpose(0, 1)


def factor_blocks(
    grads: Tensor, start: int, blocks: int, size: int, damp: float, diag: Tensor, page_bytes: int = PAGE_BYTES
) -> Tensor:
    """W (blocks, m, size) for the blocks of ``grads[:, start:start + blocks*size]`` (size >= m); writes
    ``diag[start:start + blocks*size]``: the work of the ``factor_blocks`` kernel.

    ``grads`` (m, d) float32/float64, ``diag`` (d,); pages of whole blocks of ``page_bytes`` of rows,
    as FisherInverse's local pages. ValueError for a row holding NaN/Inf or a K that is not positive
    definite.
    """
    m = grads.shape[0]
    factor = torch.empty(blocks, m, size, dtype=grads.dtype, device=grads.device)
    for b0, b1, cols, rows in _pages(grads, start, blocks, size, page_bytes):
        gram = woodbury_gram([rows])
        if not bool(gram.diagonal(dim1=-2, dim2=-1).isfinite().all()):
            raise ValueError("grads rows contain NaN or Inf")
        linv = inverse_cholesky(gram, damp).to(grads.dtype)
        w = woodbury_factor(linv, rows, out=factor[b0:b1])
        diag[cols] = woodbury_diagonal(w, damp).to(diag)
    return factor


def direct_blocks(
    grads: Tensor, start: int, blocks: int, size: int, damp: float, diag: Tensor, page_bytes: int = PAGE_BYTES
) -> Tensor:
    """P = damp * F_b^-1 (blocks, size, size) for the blocks of ``grads[:, start:start + blocks*size]``
    (size < m), in grads' dtype; writes their ``diag``: the work of the ``direct_blocks`` kernel.

    Arguments and errors as for ``factor_blocks``.
    """
    factor = torch.empty(blocks, size, size, dtype=grads.dtype, device=grads.device)
    for b0, b1, cols, rows in _pages(grads, start, blocks, size, page_bytes):
        if not bool(finite_rows(rows).all()):
            raise ValueError("grads rows contain NaN or Inf")
        p, inverse_diag = direct_factor(rows, damp)
        factor[b0:b1].copy_(p)
        diag[cols] = inverse_diag.to(diag)
    return factor


def blocked_mul(factor: torch.Tensor, xs: torch.Tensor, out: torch.Tensor, start: int) -> None:
    """``out[:, cols] = xs[:, cols] - W^T (W xs[:, cols])`` block by block (no 1/damp): the work of
    the ``blocked_mul`` kernel.

    ``factor`` is W (blocks, m, size), ``xs`` and ``out`` (k, d), ``cols`` = start:start + blocks*size.
    """
    blocks, _, size = factor.shape
    cols = slice(start, start + blocks * size)
    x = xs[:, cols].unflatten(1, (blocks, size)).transpose(0, 1)  # (blocks, k, size)
    out[:, cols] = woodbury_residual(factor, x, woodbury_coefficients(factor, x))


def accumulate_blocks(
    chunk: torch.Tensor, start: int, sums: torch.Tensor, page_bytes: int = PAGE_BYTES
) -> None:
    """``sums[b] += G_b^T G_b`` (whole products) for the blocks of ``chunk[:, start:]``: the work of
    the ``accumulate_blocks`` kernel.

    ``chunk`` (k, d) rows, ``sums`` (blocks, size, size) on the chunk's device. Rows of another dtype
    than the sums are converted one page of blocks (``page_bytes`` of them) at a time.
    """
    blocks, size, _ = sums.shape
    k = chunk.shape[0]
    if k == 0:
        return
    # blocks per page: the converted rows are a temporary of one page; without a conversion
    # there is none, and one product over all blocks is the fastest
    per = max(1, page_bytes // (k * size * sums.element_size())) if chunk.dtype != sums.dtype else blocks
    work = None
    for b0 in range(0, blocks, per):
        b1 = min(b0 + per, blocks)
        cols = chunk[:, start + b0 * size : start + b1 * size]
        rows = cols.unflatten(1, (b1 - b0, size)).transpose(0, 1)  # (blocks, k, size) view
        if chunk.dtype != sums.dtype:  # one pass: converts and lays each block's rows out contiguously
            if work is None or work.shape[0] != b1 - b0:
                work = torch.empty(b1 - b0, k, size, dtype=sums.dtype, device=sums.device)
            rows = work.copy_(rows)
        # else the strided view itself: each block's k x size rows have a leading dimension d,
        # which BLAS takes as it is (measured 2x faster than copying them first)
        sums[b0:b1].baddbmm_(rows.mT, rows)  # S_b += G_b^T G_b
