"""Optimal Brain Surgeon (paper 4.1) with the damped empirical Fisher F = lambda*I + G^T G / m.

The saliencies and updates of both pruners (``MFACPruning``, ``StructuredPruning``) live here.
Weights are float64; coordinates index the d columns of G (the weights F is built over).

One weight q (paper eq. 7, with H = F):

    rho_q = w_q^2 / (2 [F^-1]_qq)                                   ``saliencies``
    u_q   = w_q / [F^-1]_qq,   dw = -F^-1 u,   then w_q = 0 exactly   ``removal_vector``, ``obs_update``

A group Q of weights removed together (blocks, N:M, channels):

    rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2,   u_Q = ([F^-1]_QQ)^-1 w_Q,   dw = -F^-1 u

``group_obs`` solves with the k x k submatrices [F^-1]_QQ (``FisherInverse.submatrices``, float64,
``spd_solve``); ``nm_best_subsets`` enumerates the subsets of an N:M group. When k runs into thousands
(a channel's input slices) the same quantities come from m x m algebra instead: with R the other
coordinates of F and K = m*lambda*I + G_R G_R^T (Schur complement of F_RR),

    w_Q^T ([F^-1]_QQ)^-1 w_Q = lambda * (||w_Q||^2 + (G_Q w_Q)^T K^-1 (G_Q w_Q))   ``schur_group_saliencies``
    dw_R = G_R^T K^-1 G_Q w_Q,   dw_Q = -w_Q                                         ``schur_removal_update``

The dampening lambda (``damping``) is ``damp``, or with ``relative`` damp * mean(diag(G^T G / m)):
the same ``damp`` then means the same fraction of the Fisher's scale whatever the gradients' size.

Needs torch alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from .static import FisherInverse

#: Bound on the float64 temporaries of one batch of group solves (bytes).
GROUP_CHUNK_BYTES = 64 << 20


class InverseFisherProduct(Protocol):
    """Anything with x -> F^-1 x (``FisherInverse``, several of them over consecutive coordinates)."""

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x (d,)."""
        ...


# ---------------------------------------------------------------------- dampening


def mean_fisher_diagonal(grads: torch.Tensor) -> float:
    """mean(diag(G^T G / m)) = ||G||_F^2 / (m d) of the (m, d) gradients, accumulated in float64."""
    m, d = grads.shape
    if m * d == 0:
        return 0.0
    return float(torch.linalg.vector_norm(grads, dtype=torch.float64)) ** 2 / (m * d)


def damping(grads: torch.Tensor, damp: float, relative: bool) -> float:
    """lambda of F = lambda*I + G^T G / m for the (m, d) gradients ``grads``.

    Absolute: ``damp``. Relative: damp * mean(diag(G^T G / m)) over the d coordinates of F (one
    lambda for all of F's blocks), or ``damp`` itself when every gradient is zero.
    """
    if not relative:
        return float(damp)
    scale = mean_fisher_diagonal(grads)
    return float(damp) * scale if scale > 0.0 else float(damp)


# ---------------------------------------------------------------------- one weight at a time


def saliencies(w: torch.Tensor, finv_diag: torch.Tensor) -> torch.Tensor:
    """rho_q = w_q^2 / (2 [F^-1]_qq): the loss increase of removing weight q alone; shape of ``w``."""
    return w.square() / (2.0 * finv_diag)


def removal_vector(w: torch.Tensor, finv_diag: torch.Tensor) -> torch.Tensor:
    """u_q = w_q / [F^-1]_qq for the removed weights q (``w`` and ``finv_diag`` over those q only)."""
    return w / finv_diag


def obs_update(fisher: InverseFisherProduct, u: torch.Tensor) -> torch.Tensor:
    """dw = -F^-1 u (d,): the move of every weight that removes the weights u is nonzero on.

    After it the removed weights are 0 up to rounding; set them to exactly 0.
    """
    return -fisher.mul(u)


# ---------------------------------------------------------------------- groups


def spd_solve(k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with k x = b for a batch of symmetric positive definite k (..., n, n) and b (..., n, r).

    Cholesky in k's dtype (use float64); where any matrix of the batch is not positive definite
    in that precision (a near-singular group), a least-squares solve of the whole batch instead.
    """
    chol, info = torch.linalg.cholesky_ex(k)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(k, b).solution


class GroupOBS(NamedTuple):
    """Group OBS of g groups of k slots: u_Q = ([F^-1]_QQ)^-1 w_Q (g, k) and rho_Q (g,), float64."""

    u: torch.Tensor
    saliency: torch.Tensor


def group_obs(
    fisher: FisherInverse, index: torch.Tensor, w: torch.Tensor, valid: torch.Tensor | None = None
) -> GroupOBS:
    """u_Q = ([F^-1]_QQ)^-1 w_Q and rho_Q = w_Q . u_Q / 2 for each row Q of ``index``.

    Args:
        fisher: the inverse Fisher over d coordinates.
        index: (g, k) int64 coordinates of each group's slots in ``fisher``.
        w: (g, k) float64 weights of the slots.
        valid: (g, k) bool, False for slots that take no part (padding of short groups, weights
            already removed): they get u = 0 and do not enter the solve. Default: all valid.

    The k x k submatrices are solved in float64 (``spd_solve``), in batches of about
    ``GROUP_CHUNK_BYTES``.
    """
    g, k = index.shape
    if valid is None:
        valid = torch.ones(g, k, dtype=torch.bool, device=index.device)
    u = torch.zeros(g, k, dtype=torch.float64, device=index.device)
    step = max(1, GROUP_CHUNK_BYTES // (8 * k * (k + fisher.num_grads + 2)))
    for s in range(0, g, step):
        v = valid[s : s + step]
        wq = w[s : s + step].to(torch.float64).masked_fill(~v, 0.0)
        sub = fisher.submatrices(index[s : s + step].masked_fill(~v, 0)).to(index.device)
        both = v.unsqueeze(2) & v.unsqueeze(1)
        sub = sub.masked_fill(~both, 0.0) + torch.diag_embed((~v).to(torch.float64))  # identity rows
        u[s : s + step] = spd_solve(sub, wq.unsqueeze(-1)).squeeze(-1)
    u = u.masked_fill(~valid, 0.0)
    return GroupOBS(u, 0.5 * (w.to(torch.float64).masked_fill(~valid, 0.0) * u).sum(dim=1))


class NMChoice(NamedTuple):
    """Per group of M: the M-N slots to remove (g, M-N) int64 and their joint saliency rho_Q (g,)."""

    slots: torch.Tensor
    saliency: torch.Tensor


def nm_best_subsets(
    fisher: FisherInverse, index: torch.Tensor, w: torch.Tensor, n: int, alive: torch.Tensor | None = None
) -> NMChoice:
    """N:M group OBS: in each group of M slots, the subset Q of M-N slots with the least rho_Q.

    Args:
        fisher: the inverse Fisher over d coordinates.
        index: (g, M) int64 coordinates of each group's slots in ``fisher`` (any value where not alive).
        w: (g, M) float64 weights.
        n: the N kept per group, 0 <= N <= M.
        alive: (g, M) bool, False for weights removed earlier. A subset must hold all of a group's
            removed slots (they stay removed); a group with more than M-N removed slots has no
            admissible subset and gets saliency +inf. Default: all alive.

    Every one of the C(M, M-N) subsets is solved (``group_obs``); ties go to the subset listed first
    by ``itertools.combinations``. N = M: nothing is removed (slots (g, 0), saliency 0).
    """
    g, size = index.shape
    k = size - n
    if alive is None:
        alive = torch.ones(g, size, dtype=torch.bool, device=index.device)
    if k == 0:
        return NMChoice(
            torch.zeros(g, 0, dtype=torch.int64, device=index.device),
            torch.zeros(g, dtype=torch.float64, device=index.device),
        )
    subsets = torch.tensor(list(combinations(range(size), k)), device=index.device)  # (C, k)
    sub_alive = alive[:, subsets]  # (g, C, k)
    admissible = (~sub_alive).sum(dim=2) == (~alive).sum(dim=1, keepdim=True)
    rows = group_obs(
        fisher,
        index[:, subsets].reshape(-1, k),
        w[:, subsets].reshape(-1, k),
        sub_alive.reshape(-1, k),
    )
    sal = rows.saliency.view(g, -1).masked_fill(~admissible, torch.inf)
    best, which = sal.min(dim=1)
    return NMChoice(subsets[which], best)


# ---------------------------------------------------------------------- groups in m x m algebra


def _gram_with(gram: torch.Tensor, lam: float, m: int) -> torch.Tensor:
    """K = m*lambda*I + ``gram`` (..., m, m)."""
    return gram + m * lam * torch.eye(m, dtype=gram.dtype, device=gram.device)


def schur_group_saliencies(
    grads: torch.Tensor,
    w: torch.Tensor,
    owner: torch.Tensor,
    num_groups: int,
    lam: float,
    chunk_bytes: int = GROUP_CHUNK_BYTES,
) -> torch.Tensor:
    """rho_Q = lambda * (||w_Q||^2 + (G_Q w_Q)^T K^-1 (G_Q w_Q)) / 2 for each group Q; (num_groups,).

    Equal to w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 with F = lambda*I + G^T G / m over all d coordinates, and
    K = m*lambda*I + G_R G_R^T for R the coordinates outside Q: m x m algebra however large Q is.

    Args:
        grads: (m, d) float64 gradients. A coordinate outside F takes part in nothing when its
            column and its weight are zero.
        w: (d,) float64 weights.
        owner: (d,) int64 group of each coordinate in [0, num_groups), or -1 for none.
        num_groups: the number of groups.
        lam: the dampening lambda > 0 (``damping``).
        chunk_bytes: bound on the float64 temporaries of one batch of groups.
    """
    m = grads.shape[0]
    sel = owner >= 0
    groups, gs, ws = owner[sel], grads[:, sel], w[sel]
    v = torch.zeros(m, num_groups, dtype=torch.float64, device=grads.device)
    v.index_add_(1, groups, gs * ws)  # G_Q w_Q per group
    wsq = torch.zeros(num_groups, dtype=torch.float64, device=grads.device).index_add_(0, groups, ws.square())
    gram = grads @ grads.T
    quad = torch.zeros(num_groups, dtype=torch.float64, device=grads.device)
    for chunk, gram_q in _group_grams(gs, groups, num_groups, chunk_bytes):
        k = _gram_with(gram.expand(len(chunk), m, m) - gram_q, lam, m)  # m*lambda*I + G_R G_R^T
        vc = v[:, chunk].T.unsqueeze(-1)
        quad[chunk] = (vc * spd_solve(k, vc)).sum(dim=(1, 2))
    return lam * (wsq + quad) / 2.0


def schur_removal_update(
    grads: torch.Tensor, w: torch.Tensor, removed: torch.Tensor, lam: float
) -> torch.Tensor:
    """The OBS update dw (d,) removing the set Q = ``removed`` (bool (d,)) at once.

    dw_R = G_R^T K^-1 G_Q w_Q with K = m*lambda*I + G_R G_R^T (the minimizer of dw^T F dw with
    dw_Q = -w_Q), and dw_Q = -w_Q exactly. ``grads`` (m, d) and ``w`` (d,) float64.
    """
    m = grads.shape[0]
    gq, gr = grads[:, removed], grads.masked_fill(removed.unsqueeze(0), 0.0)
    k = _gram_with(gr @ gr.T, lam, m)
    x = spd_solve(k.unsqueeze(0), (gq @ w[removed]).view(1, m, 1)).view(m)
    dw = gr.T @ x
    dw[removed] = -w[removed]
    return dw


def _group_grams(
    gs: torch.Tensor, groups: torch.Tensor, num_groups: int, chunk_bytes: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (group ids, G_Q G_Q^T per group (c, m, m)) in chunks; Q the columns of ``gs`` (m, n)
    whose entry of ``groups`` (n,) is the group."""
    m = gs.shape[0]
    device = gs.device
    counts = torch.bincount(groups, minlength=num_groups)
    kmax = int(counts.max()) if counts.numel() else 0
    if (
        kmax
        and bool((counts == kmax).all())
        and torch.equal(groups, torch.arange(num_groups, device=device).repeat_interleave(kmax))
    ):  # consecutive runs of equal size (rows, or transposed columns, of a matrix): views, no gather
        per = max(1, chunk_bytes // (8 * m * (kmax + m)))
        for s in range(0, num_groups, per):
            e = min(num_groups, s + per)
            x = gs[:, s * kmax : e * kmax].reshape(m, e - s, kmax).transpose(0, 1)  # (c, m, kmax)
            yield torch.arange(s, e, device=device), torch.bmm(x, x.transpose(1, 2))
        return
    order = torch.argsort(groups, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(groups), device=device) - starts[groups[order]]
    table = torch.full((num_groups, max(kmax, 1)), -1, dtype=torch.int64, device=device)
    table[groups[order], slot] = order
    per = max(1, chunk_bytes // (8 * m * max(kmax + m, 1)))
    padded = torch.cat([gs, torch.zeros(m, 1, dtype=gs.dtype, device=device)], dim=1)  # column -1: zeros
    for s in range(0, num_groups, per):
        chunk = torch.arange(s, min(num_groups, s + per), device=device)
        cols = padded[:, table[chunk]]  # (m, c, kmax)
        yield chunk, torch.einsum("ick,jck->cij", cols, cols)
