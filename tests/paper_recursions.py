"""Second oracle: the M-FAC paper's recursions, written out literally.

Reference: Frantar et al., "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", sections 3.1 (static, eqs. (3)-(5)) and 3.2
(dynamic, eqs. (8)-(13)).

Everything here is pure torch in float64 with plain Python loops over the
gradient index; no closed form, Cholesky, solve or inverse is used, so it is
independent of the library's implementation. Intended for m <= 64, d <= 3000.

Conventions (all functions):
    grads  (m, d)   rows are the gradients g_1..g_m (zero rows allowed).
    damp   float    lambda > 0.
    F = damp * I_d + (1/m) * sum_i g_i g_i^T, with m = grads.shape[0].
    x      (d,) or (k, d); results have the same shape as x.
Blocked variants: F is block-diagonal over consecutive runs of ``block_size``
coordinates (the last block may be shorter); every block uses the same m rows
and the same damp, and entries across blocks are zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "block_slices",
    "blockwise",
    "dynamic_ihvp",
    "dynamic_ihvp_blocked",
    "dynamic_matrices",
    "static_diag",
    "static_diag_blocked",
    "static_entry",
    "static_entry_blocked",
    "static_ihvp",
    "static_ihvp_blocked",
    "static_vectors",
]

_F64 = torch.float64


def _grads64(grads: torch.Tensor, damp: float) -> torch.Tensor:
    if grads.dim() != 2:
        raise ValueError(f"grads must be (m, d), got shape {tuple(grads.shape)}")
    if grads.shape[0] < 1:
        raise ValueError("grads needs at least one row")
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp}")
    return grads.detach().to(_F64)


def _x64(x: torch.Tensor, d: int) -> torch.Tensor:
    if x.dim() not in (1, 2) or x.shape[-1] != d:
        raise ValueError(f"x must be (d,) or (k, d) with d={d}, got shape {tuple(x.shape)}")
    return x.detach().to(_F64)


# --------------------------------------------------------------------------
# Static algorithm, section 3.1
# --------------------------------------------------------------------------


def static_vectors(grads: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute v_i = F_{i-1}^{-1} g_i and q_i = m + g_i^T v_i (eqs. (3)-(4)).

    v_i is eq. (4) applied to x = g_i with the sum running over j < i:
    ``v_i = g_i / damp - sum_{j<i} v_j (v_j^T g_i) / q_j``.

    Args: grads (m, d), damp > 0.
    Returns: V (m, d) with rows v_i, q (m,).
    """
    g = _grads64(grads, damp)
    m, d = g.shape
    V = torch.zeros(m, d, dtype=_F64)
    q = torch.zeros(m, dtype=_F64)
    for i in range(m):
        v = g[i] / damp
        for j in range(i):
            v = v - V[j] * (torch.dot(V[j], g[i]) / q[j])
        V[i] = v
        q[i] = m + torch.dot(g[i], v)
    return V, q


def _apply_eq4(V: torch.Tensor, q: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """Eq. (4) with i = m: x / damp - sum_j v_j (v_j^T x) / q_j; x (d,) or (k, d)."""
    coef = (x @ V.T) / q  # (m,) or (k, m): the scalar fractions (v_j^T x) / q_j
    return x / damp - coef @ V  # minus sum_j coef_j v_j


def static_ihvp(grads: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """F_m^{-1} x by the unrolled Sherman-Morrison recursion, eq. (4) with i = m.

    Args: grads (m, d), damp > 0, x (d,) or (k, d).
    Returns: float64 tensor with the shape of x.
    """
    V, q = static_vectors(grads, damp)
    return _apply_eq4(V, q, damp, _x64(x, V.shape[1]))


def static_diag(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """diag(F_m^{-1}) by eq. (5) with i = j: 1/damp - sum_k v_k[i]^2 / q_k.

    Args: grads (m, d), damp > 0.
    Returns: (d,) float64.
    """
    V, q = static_vectors(grads, damp)
    out = torch.full((V.shape[1],), 1.0 / damp, dtype=_F64)
    for k in range(V.shape[0]):
        out = out - V[k] * V[k] / q[k]
    return out


def static_entry(grads: torch.Tensor, damp: float, i: int, j: int) -> torch.Tensor:
    """Single entry [F_m^{-1}]_{ij} by eq. (5).

    Args: grads (m, d), damp > 0, 0 <= i, j < d.
    Returns: 0-dim float64 tensor.
    """
    V, q = static_vectors(grads, damp)
    d = V.shape[1]
    if not (0 <= i < d and 0 <= j < d):
        raise IndexError(f"entry ({i}, {j}) out of range for d={d}")
    out = torch.tensor(1.0 / damp if i == j else 0.0, dtype=_F64)
    for k in range(V.shape[0]):
        out = out - V[k, i] * V[k, j] / q[k]
    return out


# --------------------------------------------------------------------------
# Dynamic algorithm, section 3.2
# --------------------------------------------------------------------------


def dynamic_matrices(grads: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D and B of the dynamic algorithm, eqs. (8)-(10).

    The table T^{(i)}_{jk} = g_j^T F_i^{-1} g_k starts at T^{(0)} = G G^T / damp
    (eq. (8)) and is advanced by eq. (9); D_ij = T^{(i-1)}_{ij} for i <= j.
    B is built row by row from D by eq. (10), with B_ii = 1/damp, so that
    F_{i-1}^{-1} g_i = sum_j B_ij g_j.

    Args: grads (m, d), damp > 0.
    Returns: D (m, m) upper triangular, B (m, m) lower triangular, float64.
    """
    g = _grads64(grads, damp)
    m = g.shape[0]
    T = (g @ g.T) / damp  # eq. (8): scalar products under F_0^{-1}
    D = torch.zeros(m, m, dtype=_F64)
    for i in range(m):
        D[i, i:] = T[i, i:]
        # eq. (9): T^{(i)}_{jk} = T^{(i-1)}_{jk} - T^{(i-1)}_{ji} T^{(i-1)}_{ik} / (m + T^{(i-1)}_{ii})
        T = T - torch.outer(T[:, i], T[i, :]) / (m + T[i, i])
    B = torch.zeros(m, m, dtype=_F64)
    for i in range(m):
        B[i, i] = 1.0 / damp
        for j in range(i):
            # eq. (10): B_ij = - sum_{k=j}^{i-1} D_ki / (m + D_kk) * B_kj
            k = slice(j, i)
            B[i, j] = -(D[k, i] / (m + D.diagonal()[k]) * B[k, j]).sum()
    return D, B


def dynamic_ihvp(grads: torch.Tensor, damp: float, x: torch.Tensor) -> torch.Tensor:
    """F_m^{-1} x by the dynamic algorithm: p = G x, q by eqs. (11)-(12), result by eq. (13).

    Args: grads (m, d), damp > 0, x (d,) or (k, d).
    Returns: float64 tensor with the shape of x.
    """
    g = _grads64(grads, damp)
    m, d = g.shape
    x = _x64(x, d)
    D, B = dynamic_matrices(g, damp)
    p = x @ g.T  # (m,) or (k, m): p = G x
    s = p / damp  # eq. (11) base case: s_j = g_j^T F_0^{-1} x
    q = torch.zeros_like(p)
    for i in range(m):
        denom = m + D[i, i]
        q[..., i] = s[..., i] / denom  # eq. (11)
        # eq. (12): s_j <- s_j - D_ij / (m + D_ii) * s_i, for j > i
        s[..., i + 1 :] = s[..., i + 1 :] - (D[i, i + 1 :] / denom) * s[..., i : i + 1]
    # eq. (13): F_m^{-1} x = x / damp - sum_j (sum_{k>=j} q_k B_kj) g_j
    c = torch.zeros_like(p)
    for j in range(m):
        c[..., j] = (q[..., j:] * B[j:, j]).sum(-1)
    return x / damp - c @ g


# --------------------------------------------------------------------------
# Block-diagonal variants
# --------------------------------------------------------------------------


def block_slices(d: int, block_size: int) -> list[slice]:
    """Consecutive slices of length ``block_size`` covering range(d); the last may be shorter."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [slice(s, min(s + block_size, d)) for s in range(0, d, block_size)]


def blockwise(
    fn: Callable[..., torch.Tensor],
    grads: torch.Tensor,
    damp: float,
    x: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """Apply ``fn(grads[:, blk], damp[, x[..., blk]])`` per block and concatenate on the last dim.

    Every block keeps all m rows (so the 1/m factor is the same) and the same damp.
    With ``x=None`` calls ``fn(grads_blk, damp)`` (e.g. ``static_diag``).

    Args: grads (m, d), damp > 0, x (d,), (k, d) or None, block_size >= 1.
    Returns: (d,) or (k, d) float64.
    """
    g = _grads64(grads, damp)
    d = g.shape[1]
    if x is not None:
        x = _x64(x, d)
    outs = []
    for blk in block_slices(d, block_size):
        outs.append(fn(g[:, blk], damp) if x is None else fn(g[:, blk], damp, x[..., blk]))
    return torch.cat(outs, dim=-1)


def static_ihvp_blocked(grads: torch.Tensor, damp: float, x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-diagonal F^{-1} x, eq. (4) per block. x (d,) or (k, d); returns the shape of x."""
    return blockwise(static_ihvp, grads, damp, x, block_size)


def static_diag_blocked(grads: torch.Tensor, damp: float, block_size: int) -> torch.Tensor:
    """diag of the block-diagonal F^{-1}, eq. (5) per block. Returns (d,)."""
    return blockwise(static_diag, grads, damp, None, block_size)


def static_entry_blocked(grads: torch.Tensor, damp: float, i: int, j: int, block_size: int) -> torch.Tensor:
    """[F^{-1}]_{ij} of the block-diagonal F: eq. (5) in the shared block, 0 across blocks. 0-dim."""
    g = _grads64(grads, damp)
    d = g.shape[1]
    if not (0 <= i < d and 0 <= j < d):
        raise IndexError(f"entry ({i}, {j}) out of range for d={d}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if i // block_size != j // block_size:
        return torch.zeros((), dtype=_F64)
    start = (i // block_size) * block_size
    blk = slice(start, min(start + block_size, d))
    return static_entry(g[:, blk], damp, i - start, j - start)


def dynamic_ihvp_blocked(grads: torch.Tensor, damp: float, x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-diagonal F^{-1} x, eqs. (11)-(13) per block. x (d,) or (k, d); returns the shape of x."""
    return blockwise(dynamic_ihvp, grads, damp, x, block_size)
