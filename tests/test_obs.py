"""compressor.mfac.obs against dense float64 OBS: F = lambda*I + G^T G / m built and inverted explicitly."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from conftest import dense_fisher, realistic_grads

from compressor.mfac import FisherInverse
from compressor.mfac.obs import (
    damping,
    group_obs,
    mean_fisher_diagonal,
    nm_best_subsets,
    obs_update,
    removal_vector,
    saliencies,
    schur_group_saliencies,
    schur_removal_update,
    spd_solve,
)

#: float64 gradients: everything but the Fisher's conditioning is exact.
TOL64 = 1e-8


def _problem(
    gen: torch.Generator, m: int, d: int, rel: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Realistic gradients (m, d) float64, weights (d,) and lambda = rel * mean(diag(G^T G / m))."""
    grads = realistic_grads(m, d, gen)
    w = torch.randn(d, generator=gen, dtype=torch.float64) * 0.05
    return grads, w, damping(grads, rel, relative=True)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """||got - want||_inf <= rtol * ||want||_inf (entries near zero judged at the vector's scale)."""
    assert (got - want).abs().max() <= rtol * want.abs().max(), float((got - want).abs().max())


# ---------------------------------------------------------------------- dampening


def test_relative_damping_is_damp_times_the_mean_fisher_diagonal_and_scale_free(gen: torch.Generator) -> None:
    m, d = 9, 37
    grads = realistic_grads(m, d, gen).float()
    diag = dense_fisher(grads, 0.0).diagonal()  # diag(G^T G / m), float64
    assert mean_fisher_diagonal(grads) == pytest.approx(float(diag.mean()), rel=1e-6)
    assert damping(grads, 0.1, relative=True) == pytest.approx(0.1 * float(diag.mean()), rel=1e-6)
    assert damping(grads, 0.1, relative=False) == 0.1
    # x1000 gradients: F scales by 1e6 and so does a relative lambda; an absolute one does not
    ratio = damping(grads * 1000.0, 0.1, relative=True) / damping(grads, 0.1, relative=True)
    assert ratio == pytest.approx(1e6, rel=1e-6)
    assert damping(torch.zeros(m, d), 0.1, relative=True) == 0.1  # nothing to scale by: damp itself


def test_relative_damping_gives_scale_free_obs(gen: torch.Generator) -> None:
    """Gradients x1000 with a relative lambda: the same saliency order and the same update dw."""
    m, d, block = 8, 45, 16
    grads, w, _ = _problem(gen, m, d)
    removed = torch.randperm(d, generator=gen)[:10]
    out = []
    for scale in (1.0, 1000.0):
        g = grads * scale
        fi = FisherInverse(g, damping(g, 0.1, relative=True), block)
        rho = saliencies(w, fi.diag())
        u = torch.zeros(d, dtype=torch.float64)
        u[removed] = removal_vector(w[removed], fi.diag()[removed])
        out.append((rho, obs_update(fi, u)))
    (rho1, dw1), (rho2, dw2) = out
    assert torch.equal(torch.argsort(rho1), torch.argsort(rho2))
    _close(rho2, rho1 * 1e6, 1e-9)
    _close(dw2, dw1, 1e-9)


# ---------------------------------------------------------------------- one weight at a time


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saliency_removal_and_update_match_dense_obs(gen: torch.Generator, dtype: torch.dtype) -> None:
    """Blocks of 16 over d = 45 (a short last block): rho_q, u_q and dw = -F^-1 u equal the dense ones."""
    m, d, block = 12, 45, 16
    grads, w, lam = _problem(gen, m, d)
    fi = FisherInverse(grads.to(dtype), lam, block)
    finv = torch.linalg.inv(dense_fisher(grads.to(dtype), lam, block))
    rtol = TOL64 if dtype == torch.float64 else 2e-4
    _close(saliencies(w, fi.diag().double()), w.square() / (2 * finv.diagonal()), rtol)
    removed = torch.randperm(d, generator=gen)[:15]
    u = torch.zeros(d, dtype=torch.float64)
    u[removed] = removal_vector(w[removed], fi.diag().double()[removed])
    dense_u = torch.zeros(d, dtype=torch.float64)
    dense_u[removed] = w[removed] / finv.diagonal()[removed]
    _close(u, dense_u, rtol)
    _close(obs_update(fi, u), -finv @ dense_u, rtol)


def test_one_weights_update_zeroes_it_and_raises_the_quadratic_by_its_saliency(gen: torch.Generator) -> None:
    """For a single q: w_q + dw_q = 0 and 1/2 dw^T F dw = rho_q, less than zeroing w_q alone costs."""
    m, d = 10, 30
    grads, w, lam = _problem(gen, m, d)
    fisher = dense_fisher(grads, lam)
    fi = FisherInverse(grads, lam)
    q = int(torch.randint(0, d, (1,), generator=gen))
    u = torch.zeros(d, dtype=torch.float64)
    u[q] = removal_vector(w[q : q + 1], fi.diag()[q : q + 1])[0]
    dw = obs_update(fi, u)
    assert abs(float(w[q] + dw[q])) <= TOL64 * abs(float(w[q]))
    rho = float(saliencies(w[q : q + 1], fi.diag()[q : q + 1])[0])
    assert float(0.5 * dw @ fisher @ dw) == pytest.approx(rho, rel=1e-8)
    assert 0.5 * float(w[q] ** 2 * fisher[q, q]) > rho


def test_vectors_in_the_gradient_span_and_zero_gradients(gen: torch.Generator) -> None:
    """Weights in the span of the gradients (where F^-1 is far from I/lambda), and zero gradients
    (F^-1 = I/lambda: OBS is magnitude pruning, dw moves nothing but the removed weight)."""
    m, d, block = 8, 40, 13
    grads, _, lam = _problem(gen, m, d)
    w = torch.randn(m, generator=gen, dtype=torch.float64) @ grads
    w = w * (0.05 / w.abs().max())
    fi = FisherInverse(grads, lam, block)
    finv = torch.linalg.inv(dense_fisher(grads, lam, block))
    _close(saliencies(w, fi.diag()), w.square() / (2 * finv.diagonal()), 1e-7)
    _close(obs_update(fi, w), -finv @ w, 1e-7)

    zero = FisherInverse(torch.zeros(m, d, dtype=torch.float64), 1e-3, block)
    _close(saliencies(w, zero.diag()), w.square() * 1e-3 / 2, TOL64)
    u = torch.zeros(d, dtype=torch.float64)
    u[3] = removal_vector(w[3:4], zero.diag()[3:4])[0]
    dw = obs_update(zero, u)
    assert dw[3] == pytest.approx(-float(w[3]), rel=TOL64) and torch.count_nonzero(dw) == 1


# ---------------------------------------------------------------------- groups


def _dense_group(finv: torch.Tensor, index: list[int], w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """u_Q = ([F^-1]_QQ)^-1 w_Q and rho_Q = w_Q . u_Q / 2 by a dense float64 solve."""
    q = torch.tensor(index, dtype=torch.int64)
    u = torch.linalg.solve(finv[q][:, q], w)
    return u, float(w @ u) / 2


def test_group_obs_matches_dense_solves_across_fisher_blocks(gen: torch.Generator) -> None:
    """Groups whose coordinates straddle Fisher blocks (blocks of 7 over d = 50), with padded slots."""
    m, d, block, k = 12, 50, 7, 5
    grads, w, lam = _problem(gen, m, d)
    fi = FisherInverse(grads, lam, block)
    finv = torch.linalg.inv(dense_fisher(grads, lam, block))
    index = torch.randperm(d, generator=gen)[:40].reshape(8, k)
    valid = torch.rand(8, k, generator=gen) < 0.7
    valid[0] = True
    valid[1] = False  # a group of padding only: nothing to remove
    got = group_obs(fi, index.masked_fill(~valid, -1), w[index], valid)
    for r in range(8):
        q = index[r][valid[r]].tolist()
        assert torch.all(got.u[r][~valid[r]] == 0)
        if not q:
            assert got.saliency[r] == 0
            continue
        u, rho = _dense_group(finv, q, w[q])
        _close(got.u[r][valid[r]], u, 1e-7)
        assert float(got.saliency[r]) == pytest.approx(rho, rel=1e-7)
    # a single group's update dw = -F^-1 u zeroes all its weights together
    u = torch.zeros(d, dtype=torch.float64)
    u[index[0]] = got.u[0]
    after = w + obs_update(fi, u)
    assert after[index[0]].abs().max() <= 1e-7 * w.abs().max()


def test_group_obs_in_chunks_equals_one_batch(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor.mfac import obs

    m, d = 6, 30
    grads, w, lam = _problem(gen, m, d)
    fi = FisherInverse(grads, lam, 11)
    index = torch.randperm(d, generator=gen)[:24].reshape(8, 3)
    whole = group_obs(fi, index, w[index])
    monkeypatch.setattr(obs, "GROUP_CHUNK_BYTES", 1)  # one group per batch
    pieces = group_obs(fi, index, w[index])
    _close(pieces.u, whole.u, 1e-12)
    _close(pieces.saliency, whole.saliency, 1e-12)


class _SingularFisher:
    """[F^-1]_QQ = [[1, 1], [1, 1]] for every group: rank one, Cholesky fails exactly (pivot 1 - 1)."""

    num_grads = 1

    def submatrices(self, index: torch.Tensor) -> torch.Tensor:
        return torch.ones(index.shape[0], 2, 2, dtype=torch.float64)


def test_a_singular_group_falls_back_to_least_squares() -> None:
    w = torch.tensor([[0.3, 0.3], [0.2, -0.4]], dtype=torch.float64)
    got = group_obs(_SingularFisher(), torch.zeros(2, 2, dtype=torch.int64), w)
    # minimum-norm least squares: u = (w1 + w2) / 4 * (1, 1)
    expected = (w.sum(dim=1, keepdim=True) / 4).expand(2, 2)
    torch.testing.assert_close(got.u, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.saliency, (w * expected).sum(dim=1) / 2, rtol=1e-10, atol=1e-12)


def test_spd_solve_uses_cholesky_and_falls_back_for_the_whole_batch(gen: torch.Generator) -> None:
    a = torch.randn(3, 4, 4, generator=gen, dtype=torch.float64)
    spd = a @ a.mT + 0.1 * torch.eye(4, dtype=torch.float64)
    b = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(spd, b), torch.linalg.solve(spd, b))
    singular = spd.clone()
    singular[1] = torch.ones(4, 4, dtype=torch.float64)  # rank one: not positive definite
    x = spd_solve(singular, b)
    torch.testing.assert_close(x[[0, 2]], torch.linalg.solve(spd[[0, 2]], b[[0, 2]]))
    torch.testing.assert_close(x[1], torch.linalg.pinv(singular[1]) @ b[1])


# ---------------------------------------------------------------------- N:M


@pytest.mark.parametrize(("n", "size"), [(2, 4), (1, 4), (3, 5)])
def test_nm_best_subset_is_the_dense_argmin(gen: torch.Generator, n: int, size: int) -> None:
    """Every subset of M-N slots solved densely; weights removed earlier must be in the subset."""
    m, d, g = 10, 6 * size, 6
    grads, w, lam = _problem(gen, m, d)
    fi = FisherInverse(grads, lam, 9)  # 9 does not divide d: groups straddle blocks
    finv = torch.linalg.inv(dense_fisher(grads, lam, 9))
    index = torch.randperm(d, generator=gen).reshape(g, size)
    alive = torch.ones(g, size, dtype=torch.bool)
    alive[1, 0] = False  # one removed earlier: it must be in the chosen subset
    alive[2, : size - n + 1] = False  # more removed than M-N: no admissible subset
    wg = w[index].masked_fill(~alive, 0.0)
    got = nm_best_subsets(fi, index.masked_fill(~alive, -1), wg, n, alive)
    assert got.slots.shape == (g, size - n)
    for r in range(g):
        if r == 2:
            assert got.saliency[r] == math.inf
            continue
        best, best_subset = math.inf, None
        for subset in combinations(range(size), size - n):
            if any(not alive[r, s] for s in range(size) if s not in subset):
                continue  # leaves a removed weight out
            q = [int(index[r, s]) for s in subset if alive[r, s]]
            rho = _dense_group(finv, q, w[q])[1] if q else 0.0
            if rho < best:
                best, best_subset = rho, subset
        assert tuple(got.slots[r].tolist()) == best_subset
        assert float(got.saliency[r]) == pytest.approx(best, rel=1e-7)
    assert 0 in got.slots[1].tolist()


def test_nm_keeping_everything_removes_nothing(gen: torch.Generator) -> None:
    grads, w, lam = _problem(gen, 4, 8)
    got = nm_best_subsets(FisherInverse(grads, lam), torch.arange(8).reshape(2, 4), w.reshape(2, 4), 4)
    assert got.slots.shape == (2, 0) and torch.all(got.saliency == 0)


# ---------------------------------------------------------------------- groups in m x m algebra


def _owner(gen: torch.Generator, d: int, groups: int) -> torch.Tensor:
    """Group of each coordinate, about a fifth of them in none (-1); group 0 larger than m."""
    owner = torch.randint(-1, groups, (d,), generator=gen)
    owner[owner == -1] = torch.where(torch.rand(int((owner == -1).sum()), generator=gen) < 0.6, -1, 0)
    owner[:20] = 0
    owner[20 : 20 + groups] = torch.arange(groups)  # no group is empty by chance
    owner[-3:] = groups - 1
    return owner


def test_schur_group_saliencies_equal_the_dense_submatrix_form(gen: torch.Generator) -> None:
    """lambda * (||w_Q||^2 + (G_Q w_Q)^T K^-1 (G_Q w_Q)) / 2 = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2, with
    groups larger than m, coordinates in no group, and coordinates outside F (zero column and weight)."""
    m, d, groups = 8, 60, 6
    grads, w, lam = _problem(gen, m, d)
    outside = torch.zeros(d, dtype=torch.bool)
    outside[torch.randperm(d, generator=gen)[:7]] = True
    grads[:, outside], w[outside] = 0.0, 0.0
    owner = _owner(gen, d, groups)
    finv = torch.linalg.inv(dense_fisher(grads, lam))
    got = schur_group_saliencies(grads, w, owner, groups + 1, lam, chunk_bytes=1)  # group 6 is empty
    assert got.shape == (groups + 1,) and got[groups] == 0
    for c in range(groups):
        q = (owner == c).nonzero().flatten().tolist()
        assert float(got[c]) == pytest.approx(_dense_group(finv, q, w[q])[1], rel=1e-7)
    assert int((owner == 0).sum()) > m


def test_schur_group_saliencies_of_equal_runs_equal_the_general_path(
    gen: torch.Generator,
) -> None:
    """Groups in consecutive runs of one size (a matrix's rows) take the no-gather path: same values
    as the same coordinates shuffled (the general path), whatever the chunking."""
    m, groups, k = 5, 7, 4
    grads, w, lam = _problem(gen, m, groups * k)
    owner = torch.arange(groups).repeat_interleave(k)
    perm = torch.randperm(groups * k, generator=gen)
    shuffled = schur_group_saliencies(grads[:, perm], w[perm], owner[perm], groups, lam)
    for chunk_bytes in (1, 1 << 30):
        got = schur_group_saliencies(grads, w, owner, groups, lam, chunk_bytes=chunk_bytes)
        _close(got, shuffled, 1e-10)


def test_schur_removal_update_is_the_dense_obs_update(gen: torch.Generator) -> None:
    """dw = -F^-1 e_Q ([F^-1]_QQ)^-1 w_Q for a set Q larger than m; w_Q + dw_Q = 0 exactly."""
    m, d = 6, 40
    grads, w, lam = _problem(gen, m, d)
    removed = torch.rand(d, generator=gen) < 0.4
    removed[: m + 1] = True
    finv = torch.linalg.inv(dense_fisher(grads, lam))
    q = removed.nonzero().flatten()
    u = torch.zeros(d, dtype=torch.float64)
    u[q] = _dense_group(finv, q.tolist(), w[q])[0]
    dw = schur_removal_update(grads, w, removed, lam)
    assert torch.equal(dw[removed], -w[removed])
    _close(dw[~removed], (-finv @ u)[~removed], 1e-7)
