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

    Memory: the window (m x d values of ``dtype``) plus three m x m float64 matrices.

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
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.grads = torch.zeros(self.num_grads, self.dim, dtype=dtype, device=self.device)
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
        gs = g.reshape(1, -1).to(device=self.device, dtype=self.dtype)
        return self._finish_mul(gs, p.unsqueeze(1)).reshape(g.shape).to(device=g.device, dtype=g.dtype)

    def reset(self, grads: torch.Tensor | None = None) -> None:
        """Empty the window, or fill all m slots with the rows of ``grads`` (m, d) in one GEMM."""
        if grads is None:
            self.grads.zero_()
            self.gram.zero_()
            self.count = 0
        else:
            _checks.check_grads(grads)
            if tuple(grads.shape) != tuple(self.grads.shape):
                raise ValueError(f"grads must have shape {tuple(self.grads.shape)}, got {tuple(grads.shape)}")
            self.grads.copy_(grads)
            self.gram.copy_(self.grads @ self.grads.T)
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
        self.grads[slot].copy_(self._local(g))
        p = self._all_reduce(self.grads @ self.grads[slot])
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
        p = (self.grads @ xs.T).to(torch.float64)  # (m, k), first pass
        return self._finish_mul(xs, p).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def _finish_mul(self, xs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(x - G^T K^-1 p) / damp for xs (k, d) and p = G x^T (m, k); the second pass."""
        coef = torch.cholesky_solve(p, self._factor()).to(self.dtype)  # K^-1 G x, (m, k)
        return torch.addmm(xs, coef.T, self.grads, alpha=-1.0).div_(self.damp)

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
        """Everything needed to resume exactly: the window, G G^T and the slot counters."""
        return {
            "grads": self.grads.clone(),
            "gram": self.gram.clone(),
            "next_slot": self.next_slot,
            "count": self.count,
        }

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
        self.grads.copy_(grads)
        self.gram.copy_(gram)
        self.next_slot = int(state["next_slot"]) % self.num_grads
        self.count = int(state["count"])
        self._chol = None

    def __repr__(self) -> str:
        return (
            f"SlidingFisherInverse(dim={self.dim}, num_grads={self.num_grads}, damp={self.damp:g}, "
            f"filled={min(self.count, self.num_grads)}, dtype={self.dtype}, device={self.device})"
        )
