"""The block-diagonal inverse Fisher accumulated from streamed gradients (memory independent of m).

F = damp * I + (1/m) * sum_i g_i g_i^T, block-diagonal over runs of B coordinates (the last block
may be shorter). Each block only needs its B x B sum S_b = sum_i g_i,b g_i,b^T, so the m gradient
rows need never be held together: ``add(chunk)`` adds a chunk of rows (k, d) to every S_b in
batched matrix-matrix products (``torch.baddbmm`` over the (blocks, B, B) sums), and the first query
factors every F_b = damp * I + S_b / m (batched float64 Cholesky) and replaces S_b by F_b^-1 in
place. Memory: d * B values (the sums, then the inverse) plus one chunk of rows and one page of
temporaries, whatever m is; ``FisherInverse``'s Woodbury form needs m * d. For B < m this is the
smaller form; both give the same F^-1 on the same rows (``FisherInverse`` itself switches to the
same direct B x B form per block when B < m, but needs all m rows at once).
"""

from __future__ import annotations

import math

import torch

from . import _checks, kernels
from ._pages import Segment, locate, segments
from .kernels import reference

#: Bytes of float64 temporaries per page of blocks (the converted rows in ``add``, the Cholesky
#: factor and inverse when factoring): keeps them in cache and bounds the memory beyond d * B.
PAGE_BYTES = reference.PAGE_BYTES

_CHUNK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BlockFisherInverse:
    """F^-1 of the damped block-diagonal empirical Fisher, fed gradient rows chunk by chunk.

    Args:
        dim: d, the number of coordinates (the width of every chunk).
        block_size: B >= 1, the size of the Fisher blocks over consecutive coordinates (the last
            block is shorter when B does not divide d; B > d means one block of d).
        damp: the dampening lambda > 0 added to the diagonal of F. It may be changed (``damp = ...``)
            until the first query factors F, e.g. to a fraction of ``mean_fisher_diagonal()``.
        dtype: the dtype of the results (``diag``; ``mul`` returns x's dtype), float32 or float64.
        device: where the sums live and the arithmetic runs (default: CPU). Chunks on another
            device are copied there.
        accumulate: the dtype of the sums and of the stored inverse (default float64; float32 halves
            the memory and the time of ``add`` at float32 accuracy). The Cholesky is float64 always.

    Memory: ``nblocks * B * B`` values of ``accumulate`` (about d * B), nothing per row.

    Example::

        fi = BlockFisherInverse(d, block_size=32)
        for chunk in chunks:              # (k, d) rows, k may vary
            fi.add(chunk)
        y = fi.mul(x)                     # F^-1 x over the fi.num_grads rows added
    """

    def __init__(
        self,
        dim: int,
        block_size: int,
        damp: float = 1e-5,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        accumulate: torch.dtype = torch.float64,
    ) -> None:
        self.dim = _checks.check_positive_int(dim, "dim")
        if block_size is None:
            raise ValueError(
                "block_size must be an integer >= 1 (BlockFisherInverse is blocked; for one block over "
                "all d coordinates use FisherInverse)"
            )
        self.block_size = _checks.check_positive_int(block_size, "block_size")
        self._damp = _checks.check_damp(damp)
        for name, value in (("dtype", dtype), ("accumulate", accumulate)):
            if value not in _checks.FLOAT_DTYPES:
                raise ValueError(f"{name} must be torch.float32 or torch.float64, got {value!r}")
        self.dtype = dtype
        self.accumulate = accumulate
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_grads = 0
        self._segments: list[Segment] = segments(self.dim, self.block_size)
        # One (blocks, size, size) tensor per segment: the sums S_b, then (factored) F_b^-1.
        self._blocks = [
            torch.zeros(seg.blocks, seg.size, seg.size, dtype=accumulate, device=self.device)
            for seg in self._segments
        ]
        self._trace = 0.0  # trace of sum_i g_i g_i^T (kept through factoring, for the mean diagonal)
        self._state = "accumulating"  # then "factored", or "failed"

    # ------------------------------------------------------------------ accumulation

    @property
    def damp(self) -> float:
        """lambda; settable until the first query factors F."""
        return self._damp

    @damp.setter
    def damp(self, value: float) -> None:
        if self._state != "accumulating":
            raise RuntimeError("damp cannot change after F has been factored (the first mul/diag/entry)")
        self._damp = _checks.check_damp(value)

    @property
    def factored(self) -> bool:
        """True once F has been factored (no more rows can be added)."""
        return self._state == "factored"

    @torch.no_grad()
    def add(self, chunk: torch.Tensor) -> None:
        """Add the gradient rows of ``chunk`` (k, d) to every block's sum; k may be 0. Keeps no row.

        Raises ValueError for a wrong shape or dtype or a row holding NaN/Inf (nothing is added
        then), RuntimeError after F has been factored.
        """
        if self._state != "accumulating":
            raise RuntimeError(
                "add() after F was factored: the sums have been replaced by F^-1 (queries factor it); "
                "add every row before the first mul/diag/entry/submatrices, or start a new BlockFisherInverse"
            )
        self._check_chunk(chunk)
        k = chunk.shape[0]
        if k == 0:
            return
        chunk = chunk.to(self.device)
        # A row sum is NaN/Inf when the row holds a NaN or Inf (or overflows): one cheap pass; the
        # exact test (10x slower on CPU) only then. The sum in the chunk's dtype (a float64 sum of
        # float32 rows is ~10x slower on CPU), float32 for float16 (whose range a sum soon leaves).
        wide = torch.float32 if chunk.dtype == torch.float16 else None
        if not bool(chunk.sum(dim=1, dtype=wide).isfinite().all()):
            bad = [self.num_grads + i for i in _checks.nonfinite_rows(chunk.isfinite().all(dim=1))]
            if bad:
                raise ValueError(
                    f"gradient rows {bad[:10]} (counting from the first added) contain NaN or Inf"
                )
        for seg, sums in zip(self._segments, self._blocks, strict=True):
            # Compiled kernel (kernels/) where it applies: the upper triangles, float64 sums of the
            # exact products of float32 rows, without a float64 copy of them. False: the PyTorch path.
            if not kernels.accumulate_blocks(chunk, seg.start, sums):
                reference.accumulate_blocks(chunk, seg.start, sums, PAGE_BYTES)  # S_b += G_b^T G_b
        trace = float(sum(b.diagonal(dim1=-2, dim2=-1).sum(dtype=torch.float64) for b in self._blocks))
        if not math.isfinite(trace):
            self._state = "failed"
            raise ValueError(
                f"the Fisher sums overflowed {self.accumulate} (gradient values too large to square); this "
                "BlockFisherInverse is unusable, use accumulate=torch.float64 or rescale the gradients"
            )
        self._trace = trace
        self.num_grads += k

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the block sums and row counts over the ranks of ``group`` (torch.distributed, SUM).

        Each rank adds its own rows; after this every rank holds the sums of all ranks' rows, as one
        process adding all of them would (up to the order of the floating-point sums). Collective:
        every rank of the group calls it, before any query. One all-reduce of d * B values.
        """
        import torch.distributed as dist

        if self._state != "accumulating":
            raise RuntimeError("all_reduce() after F was factored: reduce the sums before the first query")
        count = torch.tensor([float(self.num_grads), self._trace], dtype=torch.float64, device=self.device)
        flat = [b.reshape(-1) for b in self._blocks]
        if len(flat) == 1:
            dist.all_reduce(flat[0], group=group)
        else:  # the short tail block: one buffer for both segments would copy d * B values
            for f in flat:
                dist.all_reduce(f, group=group)
        dist.all_reduce(count, group=group)
        self.num_grads = round(float(count[0]))
        self._trace = float(count[1])

    def mean_fisher_diagonal(self) -> float:
        """mean(diag(G^T G / m)) over the rows added so far (0 without rows): for relative damping.

        Equal to ``compressor.mfac.obs.mean_fisher_diagonal`` of the stacked rows.
        """
        return self._trace / (self.num_grads * self.dim) if self.num_grads else 0.0

    # ------------------------------------------------------------------ factoring

    @torch.no_grad()
    def factor(self) -> BlockFisherInverse:
        """Replace every S_b by F_b^-1 = (damp * I + S_b / m)^-1 (float64 Cholesky), in place.

        Called by the first query; calling it again does nothing. Raises ValueError without rows,
        or when a block is not positive definite in float64 (damp too small for the gradients).
        """
        if self._state == "factored":
            return self
        if self._state == "failed":
            raise RuntimeError("this BlockFisherInverse is unusable after an earlier error (see it above)")
        if self.num_grads == 0:
            raise ValueError("no gradient rows were added (num_grads = 0): add(chunk) at least one row first")
        m, damp = self.num_grads, self._damp
        for seg, blocks in zip(self._segments, self._blocks, strict=True):
            per = max(1, PAGE_BYTES // (8 * seg.size * seg.size))
            for b0 in range(0, seg.blocks, per):
                page = blocks[b0 : b0 + per]
                fisher = page.to(torch.float64, copy=True).div_(m)
                fisher.diagonal(dim1=-2, dim2=-1).add_(damp)
                # the upper triangle: all that add()'s compiled kernel keeps (the PyTorch path keeps both)
                chol, info = torch.linalg.cholesky_ex(fisher, upper=True)
                if bool((info != 0).any()):
                    self._state = "failed"
                    raise ValueError(
                        f"damp*I + G^T G / m is not positive definite in float64 (damp={damp:g} is too "
                        "small for the scale of the gradients); increase damp"
                    )
                page.copy_(torch.cholesky_inverse(chol, upper=True))
        self._state = "factored"
        return self

    # ------------------------------------------------------------------ queries

    @torch.no_grad()
    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x of shape (d,) or (k, d); the result has x's shape, dtype and device."""
        self.factor()
        _checks.check_vectors(x, self.dim)
        xs = x.reshape(-1, self.dim).to(device=self.device, dtype=self.accumulate)
        out = torch.empty_like(xs)
        for seg, inv in zip(self._segments, self._blocks, strict=True):
            cols = slice(seg.start, seg.start + seg.blocks * seg.size)
            rows = xs[:, cols].unflatten(1, (seg.blocks, seg.size)).transpose(0, 1)  # (blocks, k, size)
            y = torch.bmm(rows, inv)  # x_b^T F_b^-1 = (F_b^-1 x_b)^T: F_b^-1 is symmetric
            out[:, cols] = y.transpose(0, 1).flatten(1)
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def diag(self) -> torch.Tensor:
        """diag(F^-1), shape (d,), in ``dtype``, on ``device``."""
        self.factor()
        parts = [inv.diagonal(dim1=-2, dim2=-1).flatten() for inv in self._blocks]
        return torch.cat(parts).to(self.dtype)

    def entry(self, i: int, j: int) -> float:
        """[F^-1]_ij as a Python float; zero when i and j fall in different blocks."""
        self.factor()
        (si, bi), ci = self._locate(i, "i")
        (sj, bj), cj = self._locate(j, "j")
        if (si, bi) != (sj, bj):
            return 0.0
        return float(self._blocks[si][bi, ci, cj])

    @torch.no_grad()
    def submatrices(self, index: torch.Tensor) -> torch.Tensor:
        """[F^-1]_QQ for each row Q of ``index`` (g, k) of coordinates: shape (g, k, k), float64.

        As ``FisherInverse.submatrices``: zero between coordinates of different Fisher blocks.
        """
        self.factor()
        if (
            not isinstance(index, torch.Tensor)
            or index.dim() != 2
            or index.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError("index must be an integer tensor of shape (g, k)")
        flat = index.to(device=self.device, dtype=torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.dim):
            raise ValueError(f"index values must be in [0, {self.dim})")
        g, k = flat.shape
        out = torch.zeros(g, k, k, dtype=torch.float64, device=self.device)
        for seg, inv in zip(self._segments, self._blocks, strict=True):
            rel = flat - seg.start
            inside = (rel >= 0) & (rel < seg.blocks * seg.size)
            rel = rel.clamp(0, seg.blocks * seg.size - 1)
            block, col = rel.div(seg.size, rounding_mode="floor"), rel % seg.size
            same = (block.unsqueeze(2) == block.unsqueeze(1)) & inside.unsqueeze(2) & inside.unsqueeze(1)
            values = inv[block.unsqueeze(2), col.unsqueeze(2), col.unsqueeze(1)].to(torch.float64)
            out += values * same
        return out

    def _locate(self, index: int, name: str) -> tuple[tuple[int, int], int]:
        """(segment, block) and column within the block of a flattened coordinate."""
        return locate(self._segments, self.dim, index, name)

    # ------------------------------------------------------------------ checks and sizes

    def _check_chunk(self, chunk: torch.Tensor) -> None:
        if not isinstance(chunk, torch.Tensor):
            raise ValueError(
                f"chunk must be a torch.Tensor of shape (k, {self.dim}), got {type(chunk).__name__}"
            )
        if chunk.dim() != 2 or chunk.shape[1] != self.dim:
            raise ValueError(f"chunk must have shape (k, {self.dim}), got {tuple(chunk.shape)}")
        if chunk.dtype not in _CHUNK_DTYPES:
            raise ValueError(f"chunk must be float16, bfloat16, float32 or float64, got {chunk.dtype}")
        if chunk.is_sparse or chunk.layout != torch.strided:
            raise ValueError("chunk must be a dense (strided) tensor")

    @property
    def nbytes(self) -> int:
        """Bytes held: the block sums (then the inverse), about d * B values of ``accumulate``."""
        return sum(b.numel() * b.element_size() for b in self._blocks)

    @staticmethod
    def bytes_needed(dim: int, block_size: int, accumulate: torch.dtype = torch.float64) -> int:
        """``nbytes`` of a BlockFisherInverse(dim, block_size) before it exists (for the preflight)."""
        full, tail = divmod(dim, min(block_size, dim))
        size = min(block_size, dim)
        return (full * size * size + tail * tail) * torch.empty((), dtype=accumulate).element_size()

    def __repr__(self) -> str:
        return (
            f"BlockFisherInverse(m={self.num_grads}, d={self.dim}, block_size={self.block_size}, "
            f"damp={self._damp:g}, dtype={self.dtype}, accumulate={self.accumulate}, device={self.device}, "
            f"{self._state})"
        )
