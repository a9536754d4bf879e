"""The static M-FAC algorithm (paper section 3.1): F^-1 for a fixed set of m gradients.

F = damp * I + (1/m) * G^T G over the rows g_i of G (m, d), block-diagonal over runs of
``block_size`` coordinates. With K = m*damp*I + G G^T = L L^T and W = L^-1 G (Woodbury):

    F^-1 x        = (x - W^T (W x)) / damp
    diag(F^-1)    = (1 - colsum(W * W)) / damp
    [F^-1]_ij     = (delta_ij - W[:, i] . W[:, j]) / damp

A block narrower than m (B < m) is cheaper and smaller in its direct form: the B x B matrix
P = damp * F_b^-1 = (I + G_b^T G_b / (m damp))^-1 from a float64 Cholesky (B^2 values instead of
the m*B of W; the paper: "as long as m < B" the Woodbury form wins). Both give F^-1 x = P x / damp.

These are the paper's recursion (4)-(5) in matrix form: row i of W is sqrt(damp / q_i) * v_i,
with v_i = F_{i-1}^-1 g_i and q_i = m + g_i . v_i, but W comes from matrix-matrix products
(G G^T, then L^-1 G) instead of 2m matrix-vector passes. K and L^-1 are kept in float64.
"""

from __future__ import annotations

import torch

from . import _checks, kernels
from ._pages import Page, Segment, groups, locate, page_of_factor, page_of_rows, segments
from .kernels import reference

#: Default page size for work on the device that holds the factor: keeps temporaries in cache.
LOCAL_PAGE_BYTES = reference.PAGE_BYTES
#: Default page size when streaming pages from host memory to an accelerator.
STREAM_PAGE_BYTES = 256 << 20


class FisherInverse:
    """Matrix-free inverse of the damped empirical Fisher of a fixed set of gradients.

    Args:
        grads: (m, d) float32 or float64 tensor, one gradient per row, on CPU or CUDA. It is
            read, never modified, and not kept: the object holds its own factor W (m, d).
        damp: the dampening lambda > 0 added to the diagonal of F.
        block_size: None for one block over all d coordinates, or B >= 1 for a block-diagonal F
            over consecutive runs of B coordinates (the last block is shorter when B does not
            divide d).
        device: where the arithmetic runs (default: ``grads.device``).
        storage: where the factor W lives (default: ``device`` when it fits there, else
            ``grads.device``). When ``storage`` differs from ``device``, every pass streams W
            to ``device`` in pages.
        page_bytes: size of a page of columns (default 8 MiB locally, 256 MiB when streaming).
        storage_dtype: the dtype the factor is stored in. None: the gradients' dtype. torch.bfloat16
            or torch.float16 halve the factor's memory (float32 under float64 gradients also works):
            W is computed in float32/float64 (the Gram matrix and L^-1 in float64 as always), then
            rounded row by row, each row scaled by a power of two (exact) so that float16 neither
            overflows nor underflows at any gradient scale. Every product upcasts one page at a time
            and accumulates in the arithmetic dtype; ``diag`` (and ``entry(i, i)``) come from the
            unrounded W, so OBS saliencies are those of the full-precision path.

    ``grads`` may itself be bfloat16 or float16 (a gradient buffer kept in half precision); the
    arithmetic dtype ``dtype`` is then float32, else the gradients' dtype.

    Accuracy with half storage: F^-1 x moves by at most about u * ||W||_F * ||x|| / damp (u = 2^-9
    for bfloat16, 2^-12 for float16; ||W||_F <= sqrt(min(m, B))), which is small against
    ||F^-1 x|| ~ ||x|| / damp for vectors mostly outside the gradients' span (OBS updates), and up
    to u * cond(F) relative for vectors inside it. bench/results/half_precision.md has figures.

    Memory: the factor W (m * d values of ``storage_dtype``; plus m float32 scales per block when
    reduced), the diagonal (d values of ``dtype``) and one page of temporaries. No d x d or d x B
    matrix is ever formed. ``nbytes`` is what is kept.

    Example::

        fi = FisherInverse(grads, damp=1e-5, block_size=128)
        y = fi.mul(x)          # F^-1 x
        scores = w**2 / (2 * fi.diag())
    """

    def __init__(
        self,
        grads: torch.Tensor,
        damp: float = 1e-5,
        block_size: int | None = None,
        *,
        device: torch.device | str | None = None,
        storage: torch.device | str | None = None,
        page_bytes: int | None = None,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        _checks.check_grads(grads, allow_half=True)
        self.damp = _checks.check_damp(damp)
        if block_size is not None:
            block_size = _checks.check_positive_int(block_size, "block_size")
        self.num_grads, self.dim = grads.shape
        self.block_size = block_size
        #: the arithmetic dtype (of ``diag`` and of the products): float32 for half gradients
        self.dtype = grads.dtype if grads.dtype in _checks.FLOAT_DTYPES else torch.float32
        self.storage_dtype = _checks.check_storage_dtype(
            grads.dtype if storage_dtype is None else storage_dtype, self.dtype
        )
        self._reduced = _checks.is_reduced(self.storage_dtype, self.dtype)
        self.device = torch.device(device) if device is not None else grads.device
        self.storage = torch.device(storage) if storage is not None else self._default_storage(grads)
        streaming = self.storage != self.device
        if page_bytes is not None:
            page_bytes = _checks.check_positive_int(page_bytes, "page_bytes")
        self._page_cols = self._columns_per_page(page_bytes, streaming)
        # Passes over the stored factor use whole segments unless pages are needed.
        # Reduced storage: always by pages, so that only one page is ever upcast.
        paged = streaming or page_bytes is not None or self._reduced
        self._pass_cols = self._page_cols if paged else None
        self._segments = segments(self.dim, block_size)
        self._factors: list[torch.Tensor] = []
        #: per segment, reduced storage only: the power-of-two row scales (blocks, rows, 1), in dtype
        self._scales: list[torch.Tensor | None] = []
        self._direct = [seg.size < self.num_grads for seg in self._segments]
        self._diag = torch.empty(self.dim, dtype=self.dtype, device=self.storage)
        for seg, direct in zip(self._segments, self._direct, strict=True):
            make = self._direct_segment if direct else self._factor_segment
            factor, scales = make(grads, seg)
            self._factors.append(factor)
            self._scales.append(scales)

    # ------------------------------------------------------------------ set-up

    def _default_storage(self, grads: torch.Tensor) -> torch.device:
        """Keep W on the compute device when W and a page fit there, else where grads are."""
        if self.device == grads.device or self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        need = grads.numel() * self.storage_dtype.itemsize + STREAM_PAGE_BYTES
        return self.device if need < 0.9 * free else grads.device

    def _columns_per_page(self, page_bytes: int | None, streaming: bool) -> int:
        if page_bytes is None:
            page_bytes = STREAM_PAGE_BYTES if streaming else LOCAL_PAGE_BYTES
        row_bytes = self.num_grads * torch.empty((), dtype=self.dtype).element_size()
        return max(1, page_bytes // row_bytes)

    def _rows(self, grads: torch.Tensor, seg: Segment, page: Page) -> torch.Tensor:
        """The page of the gradients on the compute device, in the arithmetic dtype."""
        return page_of_rows(grads, seg, page).to(device=self.device, dtype=self.dtype)

    def _factor_segment(self, grads: torch.Tensor, seg: Segment) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W = L^-1 G for every block of the segment (and its row scales when reduced), filling the
        diagonal on the way."""
        # Compiled kernel (kernels/) where it applies; None: the PyTorch path below (kernels.reference).
        if self.storage == self.device == grads.device and not self._reduced:
            fused = kernels.factor_blocks(grads, seg.start, seg.blocks, seg.size, self.damp, self._diag)
            if fused is not None:
                return fused, None
        m = self.num_grads
        factor = torch.empty(seg.blocks, m, seg.size, dtype=self.storage_dtype, device=self.storage)
        scales = None
        if self._reduced:
            scales = torch.empty(seg.blocks, m, 1, dtype=self.dtype, device=self.storage)
            if self._fused_pages(grads, seg, factor, scales):
                return factor, scales
        work: torch.Tensor | None = None  # one page of W on the compute device, reused
        for group in groups(seg, self._page_cols):
            pages = [self._rows(grads, seg, p) for p in group] if len(group) == 1 else None
            gram = reference.woodbury_gram(  # G G^T, summed over the group's pages
                pages[k] if pages else self._rows(grads, seg, page) for k, page in enumerate(group)
            )
            self._check_finite(gram, seg, group[0])
            linv64 = reference.inverse_cholesky(gram, self.damp)  # L^-1, K = m*damp*I + G G^T = L L^T
            linv = linv64.to(self.dtype)
            row_scale = None
            if scales is not None:
                # ||W_i||^2 = 1 - m damp ||(L^-1)_i||^2 (from L^-1 K L^-T = I) bounds row i's entries,
                # page by page: one scale per row of each block, also when a block spans pages.
                norm2 = 1.0 - m * self.damp * linv64.square().sum(dim=-1, keepdim=True)
                row_scale = _checks.row_scales(
                    norm2.clamp_(min=0.0).sqrt_().to(self.dtype), self.storage_dtype
                )
                scales[group[0].b0 : group[0].b1] = row_scale.to(self.storage)
            for k, page in enumerate(group):
                g = pages[k] if pages else self._rows(grads, seg, page)
                dest = page_of_factor(factor, page)
                if row_scale is not None:
                    if work is None or work.shape != g.shape:
                        work = torch.empty(g.shape, dtype=self.dtype, device=self.device)
                    w = reference.woodbury_factor(linv, g, out=work)  # W = L^-1 G
                    dest.copy_(w / row_scale)
                elif not dest.is_contiguous() or dest.device != self.device:
                    if work is None or work.shape != g.shape:
                        work = torch.empty(g.shape, dtype=self.dtype, device=self.device)
                    w = reference.woodbury_factor(linv, g, out=work)
                    dest.copy_(w)
                else:
                    w = reference.woodbury_factor(linv, g, out=dest)
                self._diag[page.columns(seg)] = reference.woodbury_diagonal(w, self.damp).to(self._diag)
        return factor, scales

    def _fused_pages(
        self, grads: torch.Tensor, seg: Segment, factor: torch.Tensor, scales: torch.Tensor
    ) -> bool:
        """Reduced storage: W of each page of whole blocks from the compiled kernel, rounded page by
        page (one page of float32 at a time); False (nothing kept) where the kernel does not apply."""
        if not (self.storage == self.device == grads.device) or seg.size > self._page_cols:
            return False
        for (page,) in groups(seg, self._page_cols):
            cols = page.columns(seg)
            g = grads[:, cols].to(self.dtype).contiguous()
            w = kernels.factor_blocks(g, 0, page.b1 - page.b0, seg.size, self.damp, self._diag[cols])
            if w is None:
                return False
            q, row_scale = _checks.quantize_rows(w, self.storage_dtype)
            page_of_factor(factor, page).copy_(q)
            scales[page.b0 : page.b1] = row_scale
        return True

    def _direct_segment(self, grads: torch.Tensor, seg: Segment) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P = damp * F_b^-1 (blocks, size, size) for blocks narrower than m (and its row scales when
        reduced), filling the diagonal."""
        # Compiled kernel (kernels/) where it applies; None: the PyTorch path below (kernels.reference).
        if self.storage == self.device == grads.device and not self._reduced:
            fused = kernels.direct_blocks(grads, seg.start, seg.blocks, seg.size, self.damp, self._diag)
            if fused is not None:
                return fused, None
        factor = torch.empty(seg.blocks, seg.size, seg.size, dtype=self.storage_dtype, device=self.storage)
        scales = None
        if self._reduced:
            scales = torch.empty(seg.blocks, seg.size, 1, dtype=self.dtype, device=self.storage)
        for group in groups(seg, max(self._page_cols, seg.size)):  # whole blocks only
            page = group[0]
            g = self._rows(grads, seg, page)  # (blocks, m, size)
            self._raise_nonfinite(_checks.nonfinite_rows(reference.finite_rows(g)), seg, page)
            p, inverse_diag = reference.direct_factor(g, self.damp)  # P = damp * F_b^-1, diag(F_b^-1)
            if scales is None:
                page_of_factor(factor, page).copy_(p)
            else:
                q, row_scale = _checks.quantize_rows(p.to(self.dtype), self.storage_dtype)
                page_of_factor(factor, page).copy_(q)
                scales[page.b0 : page.b1] = row_scale.to(self.storage)
            self._diag[page.columns(seg)] = inverse_diag.to(self._diag)
        return factor, scales

    def _check_finite(self, gram: torch.Tensor, seg: Segment, page: Page) -> None:
        """Raise if a row of G holds NaN or Inf: its squared norm, on the Gram diagonal, is not finite."""
        self._raise_nonfinite(
            _checks.nonfinite_rows(gram.diagonal(dim1=-2, dim2=-1).isfinite().all(dim=0)), seg, page
        )

    def _raise_nonfinite(self, bad: list[int], seg: Segment, page: Page) -> None:
        if bad:
            raise ValueError(
                f"grads rows {bad[:10]} contain NaN or Inf (or values too large to square in "
                f"{self.dtype}), first seen in columns from {page.columns(seg).start}"
            )

    # ------------------------------------------------------------------ queries

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x of shape (d,) or (k, d); the result has x's shape, dtype and device."""
        _checks.check_vectors(x, self.dim)
        xs = x.reshape(-1, self.dim).to(device=self.device, dtype=self.dtype)
        out = torch.empty_like(xs)
        for s, (seg, factor, direct) in enumerate(
            zip(self._segments, self._factors, self._direct, strict=True)
        ):
            if direct:  # P = damp * F^-1 per block
                pass_cols = None if self._pass_cols is None else max(self._pass_cols, seg.size)
                for (page,) in groups(seg, pass_cols):
                    p = self._load(s, page)
                    y = p @ page_of_rows(xs, seg, page).mT
                    if self._scales[s] is not None:  # row i of P is stored / scale_i
                        y.mul_(self._scale_page(s, page))
                    out[:, page.columns(seg)] = y.permute(2, 0, 1).flatten(1)
                continue
            # Compiled kernel (kernels/) where it applies; False: the PyTorch path below (kernels.reference).
            if (
                self.storage == self.device
                and not self._reduced
                and kernels.blocked_mul(factor, xs, out, seg.start, self.num_grads)
            ):
                continue
            for group in groups(seg, self._pass_cols):
                if self._reduced and len(group) == 1 and self.storage == self.device:
                    # the compiled kernel on one upcast page of whole blocks, where it applies
                    page = group[0]
                    w = self._load(s, page).mul_(self._scale_page(s, page))
                    if kernels.blocked_mul(w, xs, out, page.columns(seg).start, self.num_grads):
                        continue
                ws = [self._load(s, p) for p in group] if len(group) == 1 else None
                coef = None
                for k, page in enumerate(group):
                    w = ws[k] if ws else self._load(s, page)
                    term = reference.woodbury_coefficients(w, page_of_rows(xs, seg, page))  # W x
                    coef = term if coef is None else coef.add_(term)
                if self._scales[s] is not None:  # W = diag(s) W_stored: W^T W x = W_s^T (s^2 (W_s x))
                    coef.mul_(self._scale_page(s, group[0]).square())
                for k, page in enumerate(group):
                    w = ws[k] if ws else self._load(s, page)
                    x_page = page_of_rows(xs, seg, page)
                    out[:, page.columns(seg)] = reference.woodbury_residual(w, x_page, coef)  # x - W^T (W x)
        out.div_(self.damp)
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def _load(self, s: int, page: Page) -> torch.Tensor:
        """A page of segment s's stored factor on the compute device, in the arithmetic dtype, its
        rows not yet multiplied by their scales (``_scale_page``)."""
        return page_of_factor(self._factors[s], page).to(device=self.device, dtype=self.dtype)

    def _scale_page(self, s: int, page: Page) -> torch.Tensor:
        """The row scales (blocks, rows, 1) of a page of segment s, on the compute device."""
        return self._scales[s][page.b0 : page.b1].to(self.device)

    def diag(self) -> torch.Tensor:
        """diag(F^-1), shape (d,), in the arithmetic dtype ``dtype``, on the storage device."""
        return self._diag.clone()

    @property
    def nbytes(self) -> int:
        """Bytes held: the stored factors (and their row scales) plus the diagonal."""
        held = [*self._factors, *(t for t in self._scales if t is not None), self._diag]
        return sum(t.numel() * t.element_size() for t in held)

    def entry(self, i: int, j: int) -> float:
        """[F^-1]_ij as a Python float; zero when i and j fall in different blocks."""
        bi, ci = self._locate(i, "i")
        bj, cj = self._locate(j, "j")
        if bi[:2] != bj[:2]:
            return 0.0
        scales = self._scales[bi[0]]
        if scales is not None and i == j:  # from the unrounded factor, as diag()
            return float(self._diag[i])
        if self._direct[bi[0]]:
            value = float(self._factors[bi[0]][bi[1], ci, cj])
            return value * (1.0 if scales is None else float(scales[bi[1], ci])) / self.damp
        w = self._factors[bi[0]][bi[1]].to(torch.float64)
        if scales is not None:
            w = w * scales[bi[1]].to(torch.float64)
        dot = torch.dot(w[:, ci], w[:, cj]).item()
        return ((1.0 if i == j else 0.0) - dot) / self.damp

    def submatrices(self, index: torch.Tensor) -> torch.Tensor:
        """[F^-1]_QQ for each row Q of ``index`` (g, k) of coordinates: shape (g, k, k), float64.

        For group OBS (blocks, N:M groups): the k x k inverse-Fisher block of each group, zero
        between coordinates of different Fisher blocks. Cost O(g k^2 m).
        """
        if (
            not isinstance(index, torch.Tensor)
            or index.dim() != 2
            or index.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError("index must be an integer tensor of shape (g, k)")
        flat = index.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.dim):
            raise ValueError(f"index values must be in [0, {self.dim})")
        n = flat.numel()
        cols = torch.zeros(n, self.num_grads, dtype=torch.float64, device=self.storage)
        block_id = torch.empty(n, dtype=torch.int64, device=self.storage)
        seg_of = torch.empty(n, dtype=torch.int64, device=self.storage)
        in_block = torch.empty(n, dtype=torch.int64, device=self.storage)
        flat = flat.to(self.storage)
        for s, (seg, factor, direct) in enumerate(
            zip(self._segments, self._factors, self._direct, strict=True)
        ):
            inside = (flat >= seg.start) & (flat < seg.start + seg.blocks * seg.size)
            b = (flat[inside] - seg.start).div(seg.size, rounding_mode="floor")
            c = (flat[inside] - seg.start) % seg.size
            if not direct:
                cols[inside] = factor[b, :, c].to(torch.float64)
                if self._scales[s] is not None:
                    cols[inside] *= self._scales[s][b, :, 0].to(torch.float64)
            block_id[inside] = b + s * (self.dim + 1)
            seg_of[inside], in_block[inside] = s, c
        g, k = index.shape
        cols, block_id, coord = cols.view(g, k, -1), block_id.view(g, k), flat.view(g, k)
        same = block_id.unsqueeze(2) == block_id.unsqueeze(1)
        delta = (coord.unsqueeze(2) == coord.unsqueeze(1)).to(torch.float64)
        out = (delta - cols @ cols.mT) * same
        seg_of, in_block = seg_of.view(g, k), in_block.view(g, k)
        for s, (factor, direct) in enumerate(zip(self._factors, self._direct, strict=True)):
            if direct:
                pairs = same & (seg_of == s).unsqueeze(2)
                rows, a, b = pairs.nonzero(as_tuple=True)
                blk = block_id[rows, a] - s * (self.dim + 1)
                value = factor[blk, in_block[rows, a], in_block[rows, b]].to(torch.float64)
                if self._scales[s] is not None:
                    value = value * self._scales[s][blk, in_block[rows, a], 0].to(torch.float64)
                out[rows, a, b] = value
        if self._reduced:  # the diagonal from the unrounded factor, as diag()
            out.diagonal(dim1=-2, dim2=-1).copy_(self._diag.to(torch.float64)[coord] * self.damp)
        return out / self.damp

    def _locate(self, index: int, name: str) -> tuple[tuple[int, int], int]:
        """(segment, block) and column within the block of a flattened coordinate."""
        return locate(self._segments, self.dim, index, name)

    def __repr__(self) -> str:
        return (
            f"FisherInverse(m={self.num_grads}, d={self.dim}, damp={self.damp:g}, "
            f"block_size={self.block_size}, dtype={self.dtype}, storage_dtype={self.storage_dtype}, "
            f"device={self.device})"
        )
