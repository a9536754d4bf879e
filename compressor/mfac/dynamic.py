"""The dynamic M-FAC algorithm (paper section 3.2): F^-1 over a sliding window of m gradients.

F = damp * I + (1/m) * G^T G over the m window slots (rows of G); empty slots are zero rows and
the 1/m stays m (the paper's and the reference's choice), or, with ``count_scaling=True``, 1/n with
n = min(count, m) the gradients in the window, so that the Fisher is not under-scaled while the
window fills (then K = n*damp*I + G G^T below).

The paper keeps the m x m matrices G G^T, D and B and re-runs the recursions
(8)-(10) after each replaced gradient; they amount to a factorisation of
K = m*damp*I + G G^T (D is the U of its LU, B a scaled inverse of its unit-lower factor). Here
K is factored directly by a float64 Cholesky, K = L L^T, so that

    F^-1 x = (x - G^T K^-1 (G x)) / damp        (paper (11)-(13) in matrix form)

Replacing a slot costs one pass over the window (p = G g, a new row and column of G G^T) and an
O(m^3) factorisation of an m x m matrix; a product costs two passes (G x and G^T c).
``update_mul`` shares the first pass: with x = g, G x is the p that updates G G^T.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _checks

#: Reduced storage: the window is upcast this many bytes of temporaries at a time.
PAGE_BYTES = 8 << 20


class SlidingFisherInverse:
    """Inverse of the damped empirical Fisher of the last ``num_grads`` gradients.

    Args:
        dim: d, the length of a gradient.
        num_grads: m, the number of window slots. The slots start as zero rows.
        damp: the dampening lambda > 0.
        device: where the window lives and the arithmetic runs (default: CPU).
        dtype: float32 or float64, the dtype of the window; the m x m algebra is always float64.
        count_scaling: divide G^T G by the number of gradients in the window, min(count, m), instead
            of m (no under-scaled Fisher, so no oversized steps, during the first m updates).
        storage_dtype: the dtype the window is kept in. None: ``dtype``. torch.bfloat16 or
            torch.float16 halve the window's memory (float32 under a float64 ``dtype`` also works):
            each gradient is rounded when it enters its slot, scaled by a power of two (exact, one
            ``dtype`` scale per slot) so that float16 neither overflows nor underflows whatever the
            gradients' scale. Products upcast the window one page at a time and accumulate in
            ``dtype``; G G^T and its Cholesky factor stay float64. The result is, to ``dtype``
            rounding, the exact F^-1 of the rounded window; ``update_mul(g)`` returns F^-1 of the
            rounded g (the one in the window), which keeps it inside the window's span (with g
            itself the rounding residual, outside the span, would be amplified by 1 / damp).

    Memory: the window (m x d values of ``storage_dtype``, plus m scales when it is narrower than
    ``dtype``) plus three m x m float64 matrices; ``nbytes`` is what is kept.

    Example::

        fisher = SlidingFisherInverse(dim=d, num_grads=512, damp=1e-5)
        for g in gradients:
            step = fisher.update_mul(g)   # put g in the window, then return F^-1 g
    """

    def __init__(
        self,
        dim: int,
        num_grads: int,
        damp: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        count_scaling: bool = False,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(count_scaling, bool):
            raise ValueError(f"count_scaling must be True or False, got {count_scaling!r}")
        self.count_scaling = count_scaling
        self.dim = _checks.check_positive_int(dim, "dim")
        self.num_grads = _checks.check_positive_int(num_grads, "num_grads")
        self.damp = _checks.check_damp(damp)
        if dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.storage_dtype = _checks.check_storage_dtype(storage_dtype, dtype)
        self._reduced = _checks.is_reduced(self.storage_dtype, dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.grads = torch.zeros(self.num_grads, self.dim, dtype=self.storage_dtype, device=self.device)
        #: reduced storage only: the power-of-two scale of each slot, (m, 1) in ``dtype``
        self.scales = (
            torch.ones(self.num_grads, 1, dtype=dtype, device=self.device) if self._reduced else None
        )
        self.gram = torch.zeros(self.num_grads, self.num_grads, dtype=torch.float64, device=self.device)
        self.next_slot = 0  # the slot the next gradient replaces (the oldest once the window is full)
        self.count = 0  # gradients put in so far
        self._chol: torch.Tensor | None = None  # Cholesky factor of K, None when stale

    # ------------------------------------------------------------------ window

    def update(self, g: torch.Tensor) -> None:
        """Put gradient ``g`` (d,) in the window, dropping the oldest once m are in. One pass."""
        self._insert(g)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """``update(g)`` then ``mul(g)``, sharing the pass G g. Two passes over the window in all."""
        p = self._insert(g)
        if self._reduced:  # the rounded g, exactly in the window's span
            gs = self._row((self.next_slot - 1) % self.num_grads).reshape(1, -1)
        else:
            gs = g.reshape(1, -1).to(device=self.device, dtype=self.dtype)
        return self._finish_mul(gs, p.unsqueeze(1)).reshape(g.shape).to(device=g.device, dtype=g.dtype)

    def reset(self, grads: torch.Tensor | None = None) -> None:
        """Empty the window, or fill all m slots with the rows of ``grads`` (m, d) in one GEMM."""
        if grads is None:
            self.grads.zero_()
            self.gram.zero_()
            if self.scales is not None:
                self.scales.fill_(1.0)
            self.count = 0
        else:
            _checks.check_grads(grads)
            if tuple(grads.shape) != tuple(self.grads.shape):
                raise ValueError(f"grads must have shape {tuple(self.grads.shape)}, got {tuple(grads.shape)}")
            self._store(grads)
            bad = _checks.nonfinite_rows(self.gram.diagonal().isfinite())
            if bad:
                self.reset()
                raise ValueError(f"grads rows {bad[:10]} contain NaN or Inf; the window was emptied")
            self.count = self.num_grads
        self.next_slot = 0
        self._chol = None

    def _insert(self, g: torch.Tensor) -> torch.Tensor:
        """Write g into the next slot and its products into G G^T; returns p = G g (m,) in float64."""
        self._check_gradient(g, "g")
        slot = self.next_slot
        if self._reduced:
            q, scale = _checks.quantize_rows(
                g.reshape(1, -1).to(device=self.device, dtype=self.dtype), self.storage_dtype
            )
            self.grads[slot].copy_(q[0])
            self.scales[slot] = scale[0]
            p = self._products(self._row(slot).reshape(1, -1))[:, 0]
        else:
            self.grads[slot].copy_(self._local(g))
            p = self.grads @ self.grads[slot]
        p = self._all_reduce(p)
        self.gram[slot, :] = p
        self.gram[:, slot] = p
        self.next_slot = (slot + 1) % self.num_grads
        self.count += 1
        self._chol = None
        return p

    # ------------------------------------------------------------------ products

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x of shape (d,) or (k, d); the result has x's shape, dtype and device."""
        _checks.check_vectors(x, self.dim)
        xs = x.reshape(-1, self.dim).to(device=self.device, dtype=self.dtype)
        p = self._products(xs)  # (m, k), first pass
        return self._finish_mul(xs, p).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def _finish_mul(self, xs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(x - G^T K^-1 p) / damp for xs (k, d) and p = G x^T (m, k); the second pass."""
        coef = torch.cholesky_solve(p, self._factor())  # K^-1 G x, (m, k), float64
        if not self._reduced:
            return torch.addmm(xs, coef.to(self.dtype).T, self.grads, alpha=-1.0).div_(self.damp)
        coef = (coef * self.scales.to(torch.float64)).to(self.dtype).T  # (k, m), the scales folded in
        out = torch.empty_like(xs)
        for cols in self._pages():
            page = self.grads[:, cols].to(self.dtype)
            torch.addmm(xs[:, cols], coef, page, alpha=-1.0, out=out[:, cols])
        return out.div_(self.damp)

    # ------------------------------------------------------------------ reduced storage

    def _pages(self) -> list[slice]:
        """Column pages of the window: PAGE_BYTES of upcast temporaries each (whole when not reduced)."""
        d = self.grads.shape[1]
        if not self._reduced:
            return [slice(0, d)]
        cols = max(1, PAGE_BYTES // (self.num_grads * self.dtype.itemsize))
        return [slice(c, min(c + cols, d)) for c in range(0, d, cols)]

    def _row(self, slot: int) -> torch.Tensor:
        """Slot ``slot`` of the window as stored (rounded), in ``dtype``, shape (d,)."""
        row = self.grads[slot].to(self.dtype)
        return row if self.scales is None else row.mul_(self.scales[slot])

    def _products(self, xs: torch.Tensor) -> torch.Tensor:
        """G x^T (m, k) in float64 for xs (k, d) in ``dtype``: page by page when reduced, the pages'
        partial products summed in float64."""
        if not self._reduced:
            return (self.grads @ xs.T).to(torch.float64)
        p = torch.zeros(self.num_grads, xs.shape[0], dtype=torch.float64, device=self.device)
        for cols in self._pages():
            p += (self.grads[:, cols].to(self.dtype) @ xs[:, cols].T).to(torch.float64)
        return p.mul_(self.scales.to(torch.float64))

    def _store(self, rows: torch.Tensor) -> None:
        """Fill the window with ``rows`` (m, d) (rounded when reduced) and recompute G G^T in float64."""
        if not self._reduced:
            self.grads.copy_(rows)
            self.gram.copy_(self.grads @ self.grads.T)
            return
        for slot in range(self.num_grads):
            q, scale = _checks.quantize_rows(
                rows[slot : slot + 1].to(device=self.device, dtype=self.dtype), self.storage_dtype
            )
            self.grads[slot].copy_(q[0])
            self.scales[slot] = scale[0]
        gram = torch.zeros_like(self.gram)
        for cols in self._pages():
            page = self.grads[:, cols].to(self.dtype)
            gram += (page @ page.T).to(torch.float64)
        s = self.scales.to(torch.float64)
        self.gram.copy_(gram.mul_(s).mul_(s.T))

    @property
    def nbytes(self) -> int:
        """Bytes held: the window (and its slot scales) plus the m x m float64 matrices."""
        held = [self.grads, self.gram] + ([] if self.scales is None else [self.scales])
        chol = 0 if self._chol is None else self._chol.numel() * self._chol.element_size()
        return sum(t.numel() * t.element_size() for t in held) + chol

    def _factor(self) -> torch.Tensor:
        """Cholesky factor of K = n*damp*I + G G^T (n = m, or the gradients in the window with
        count_scaling), float64, recomputed after each update."""
        if self._chol is None:
            n = max(1, min(self.count, self.num_grads)) if self.count_scaling else self.num_grads
            k = self.gram.clone()
            k.diagonal().add_(n * self.damp)
            chol, info = torch.linalg.cholesky_ex(k)
            if int(info) != 0:
                raise ValueError(
                    f"m*damp*I + G G^T is not positive definite in float64 (damp={self.damp:g} is too "
                    "small for the scale of the gradients); increase damp"
                )
            self._chol = chol
        return self._chol

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """The coordinates of x (k, d) this window holds: all of them (a slice when sharded)."""
        return x

    def _all_reduce(self, p: torch.Tensor) -> torch.Tensor:
        """Partial products G x summed over the holders of the coordinates, float64 (here: one)."""
        return p.to(torch.float64)

    def _check_gradient(self, g: torch.Tensor, name: str) -> None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (self.dim,):
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{name} must be a tensor of shape ({self.dim},), got {shape}")
        if g.dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {g.dtype}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{name} contains NaN or Inf; the window was left unchanged")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the window (as stored, with its ``scales`` when
        reduced), G G^T and the slot counters."""
        state = {
            "grads": self.grads.clone(),
            "gram": self.gram.clone(),
            "next_slot": self.next_slot,
            "count": self.count,
        }
        if self.scales is not None:
            state["scales"] = self.scales.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the window shape must match this object's."""
        missing = {"grads", "gram", "next_slot", "count"} - set(state)
        if missing:
            raise ValueError(f"window state is missing {sorted(missing)}")
        grads, gram = state["grads"], state["gram"]
        if tuple(grads.shape) != tuple(self.grads.shape) or tuple(gram.shape) != tuple(self.gram.shape):
            raise ValueError(
                f"window state has shape {tuple(grads.shape)}, this window is {tuple(self.grads.shape)}"
            )
        scales = state.get("scales")
        if grads.dtype == self.storage_dtype and (scales is None) == (self.scales is None):
            self.grads.copy_(grads)
            self.gram.copy_(gram)
            if scales is not None:
                self.scales.copy_(scales)
        else:  # saved with another storage dtype: round (or widen) the rows, G G^T anew
            rows = grads.to(self.dtype)
            self._store(rows if scales is None else rows * scales.to(rows))
        self.next_slot = int(state["next_slot"]) % self.num_grads
        self.count = int(state["count"])
        self._chol = None

    def __repr__(self) -> str:
        return (
            f"SlidingFisherInverse(dim={self.dim}, num_grads={self.num_grads}, damp={self.damp:g}, "
            f"filled={min(self.count, self.num_grads)}, dtype={self.dtype}, "
            f"storage_dtype={self.storage_dtype}, device={self.device})"
        )
