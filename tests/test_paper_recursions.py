"""Prove the paper-recursion oracle (tests/paper_recursions.py) against a dense float64 inverse.

Reference: F^{-1} = inv(damp * I + G^T G / m), formed densely. Every test draws
fresh data from the ``gen`` fixture of conftest.py (session seed and test id).

Error budget: forward error of both the dense inverse and the recursions is
O(eps64 * cond(F)); empirically the constant stays below ~50 (x in the gradient
span is the worst case, because F^{-1} x then cancels most of x / damp). Each
comparison first asserts eps64 * cond(F) * C_SAFETY <= TOL (C_SAFETY = 100), so
the asserted relative error TOL = 1e-9 is a valid bound for the drawn data.
"""

from __future__ import annotations

import math

import paper_recursions as pr
import pytest
import torch

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
TOL = 1e-9
C_SAFETY = 100.0

STATIC_DYNAMIC = [("static", pr.static_ihvp), ("dynamic", pr.dynamic_ihvp)]
BLOCKED = [("static", pr.static_ihvp_blocked), ("dynamic", pr.dynamic_ihvp_blocked)]


# ----------------------------------------------------------------------------
# data + reference helpers
# ----------------------------------------------------------------------------


def normal_grads(gen: torch.Generator, m: int, d: int) -> torch.Tensor:
    return torch.randn(m, d, generator=gen, dtype=F64)


def realistic_grads(
    gen: torch.Generator, m: int, d: int, log10_norm: tuple[float, float], corr: float = 0.0
) -> torch.Tensor:
    """Rows with norms log-uniform in 10**log10_norm; ``corr`` mixes in one shared direction."""
    u = torch.randn(m, d, generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    if corr > 0:
        shared = torch.randn(d, generator=gen, dtype=F64)
        shared = shared / shared.norm()
        sign = torch.where(torch.rand(m, 1, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        u = math.sqrt(1 - corr) * u + math.sqrt(corr) * sign * shared
        u = u / u.norm(dim=1, keepdim=True)
    lo, hi = log10_norm
    norms = 10 ** (lo + (hi - lo) * torch.rand(m, 1, generator=gen, dtype=F64))
    return u * norms


# (id, m, d, damp, kind) where kind is "normal" or (log10_norm_range, corr)
CASES = [
    ("normal-m16-d1000-damp1e-2", 16, 1000, 1e-2, "normal"),
    ("normal-m32-d2000-damp1", 32, 2000, 1.0, "normal"),
    ("real-m16-d1000-damp1e-4", 16, 1000, 1e-4, ((-2.0, 0.0), 0.0)),
    ("real-m48-d1500-damp1e-5", 48, 1500, 1e-5, ((-2.0, -0.5), 0.0)),
    ("real-m8-d2000-damp1e-6", 8, 2000, 1e-6, ((-2.0, -1.0), 0.0)),
    ("realcorr-m24-d800-damp1e-5", 24, 800, 1e-5, ((-2.0, -0.5), 0.9)),
]


def draw_case(gen: torch.Generator, case) -> tuple[torch.Tensor, float]:
    _, m, d, damp, kind = case
    if kind == "normal":
        return normal_grads(gen, m, d), damp
    log10_norm, corr = kind
    return realistic_grads(gen, m, d, log10_norm, corr), damp


case_param = pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])


def dense_inv(G: torch.Tensor, damp: float) -> torch.Tensor:
    m, d = G.shape
    return torch.linalg.inv(damp * torch.eye(d, dtype=F64) + G.T @ G / m)


def dense_block_inv(G: torch.Tensor, damp: float, block_size: int) -> torch.Tensor:
    return torch.block_diag(*[dense_inv(G[:, b], damp) for b in pr.block_slices(G.shape[1], block_size)])


def cond_F(G: torch.Tensor, damp: float, block_size: int | None = None) -> float:
    """cond_2(F) from the singular values of G (per block for a block-diagonal F)."""
    m, d = G.shape
    blocks = [slice(0, d)] if block_size is None else pr.block_slices(d, block_size)
    lam_max, lam_min = -math.inf, math.inf
    for b in blocks:
        s2 = torch.linalg.svdvals(G[:, b]) ** 2 / m
        width = b.stop - b.start
        lam_max = max(lam_max, damp + s2[0].item())
        lam_min = min(lam_min, damp + (s2[-1].item() if m >= width else 0.0))
    return lam_max / lam_min


def assert_well_conditioned(G: torch.Tensor, damp: float, block_size: int | None = None) -> float:
    cond = cond_F(G, damp, block_size)
    assert EPS64 * cond * C_SAFETY <= TOL, f"test data too ill-conditioned: cond(F)={cond:.3e}"
    return cond


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max over rows (for a batch) of ||got - ref|| / ||ref||."""
    assert got.shape == ref.shape and got.dtype == F64
    got2, ref2 = got.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return ((got2 - ref2).norm(dim=1) / ref2.norm(dim=1)).max().item()


def check_ihvp(fn, G, damp, x, Finv, cond, block_size=None, label="") -> None:
    """Assert rel err of fn(G, damp, x[, block_size]) vs x @ Finv; cond from assert_well_conditioned."""
    got = fn(G, damp, x) if block_size is None else fn(G, damp, x, block_size)
    ref = x @ Finv  # Finv is symmetric; works for (d,) and (k, d)
    err = rel_err(got, ref)
    assert err <= TOL, f"{label}: rel err {err:.3e} > {TOL} (cond(F)={cond:.2e}, eps*cond={EPS64 * cond:.2e})"


# ----------------------------------------------------------------------------
# IHVP: static eq. (4) and dynamic eqs. (11)-(13)
# ----------------------------------------------------------------------------


@case_param
def test_ihvp_against_dense(gen, case):
    """Random x, x in the gradient span (G^T r), x = last gradient, and batches of x."""
    G, damp = draw_case(gen, case)
    m, d = G.shape
    cond = assert_well_conditioned(G, damp)
    Finv = dense_inv(G, damp)  # one dense inverse per case keeps the file fast
    xs = {
        "random": torch.randn(d, generator=gen, dtype=F64),
        "span": torch.randn(m, generator=gen, dtype=F64) @ G,
        "last-gradient": G[-1].clone(),
        "all-gradients": G.clone(),
        "mixed-batch": torch.cat(
            [
                torch.randn(3, d, generator=gen, dtype=F64),
                torch.randn(2, m, generator=gen, dtype=F64) @ G,
                G[-1:],
                1e-3 * torch.randn(1, d, generator=gen, dtype=F64),
            ]
        ),
    }
    for algo, fn in STATIC_DYNAMIC:
        for name, x in xs.items():
            check_ihvp(fn, G, damp, x, Finv, cond, label=f"{algo}/{name}")
        X = xs["mixed-batch"]
        rows = torch.stack([fn(G, damp, X[r]) for r in range(X.shape[0])])
        assert rel_err(fn(G, damp, X), rows) <= TOL, f"{algo}: batch differs from row-by-row"


@pytest.mark.parametrize("algo,fn", STATIC_DYNAMIC, ids=[a for a, _ in STATIC_DYNAMIC])
def test_ihvp_more_rows_than_columns(gen, algo, fn):
    for G, damp in [
        (normal_grads(gen, 48, 24), 1e-2),
        (realistic_grads(gen, 40, 16, (-2.0, 0.0)), 1e-5),
    ]:
        cond = assert_well_conditioned(G, damp)
        Finv = dense_inv(G, damp)
        assert torch.linalg.matrix_rank(G).item() == G.shape[1]
        check_ihvp(fn, G, damp, torch.randn(G.shape[1], generator=gen, dtype=F64), Finv, cond)
        check_ihvp(fn, G, damp, G[-1].clone(), Finv, cond)
        check_ihvp(fn, G, damp, G.clone(), Finv, cond)


# ----------------------------------------------------------------------------
# degenerate gradient sets
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("algo,fn", STATIC_DYNAMIC, ids=[a for a, _ in STATIC_DYNAMIC])
def test_zero_rows_count_in_m(gen, algo, fn):
    m, d, damp = 20, 900, 1e-5
    G = realistic_grads(gen, m, d, (-2.0, -0.5))
    zero = [0, 7, 8, m - 1]
    G[zero] = 0.0
    cond = assert_well_conditioned(G, damp)
    Finv = dense_inv(G, damp)  # 1/m with m = 20, zero rows included
    x = torch.randn(d, generator=gen, dtype=F64)
    check_ihvp(fn, G, damp, x, Finv, cond)
    check_ihvp(fn, G, damp, torch.randn(m, generator=gen, dtype=F64) @ G, Finv, cond)
    check_ihvp(fn, G, damp, G[-2].clone(), Finv, cond)
    # the 1/m really uses all rows: dropping the zero rows (m = 16) gives a different F
    keep = [i for i in range(m) if i not in zero]
    other = x @ dense_inv(G[keep], damp)
    assert rel_err(fn(G, damp, x), other) > 1e3 * TOL


@pytest.mark.parametrize("algo,fn", STATIC_DYNAMIC, ids=[a for a, _ in STATIC_DYNAMIC])
def test_all_zero_rows(gen, algo, fn):
    G = torch.zeros(6, 300, dtype=F64)
    x = torch.randn(2, 300, generator=gen, dtype=F64)
    torch.testing.assert_close(fn(G, 1e-4, x), x / 1e-4, rtol=0, atol=0)


@pytest.mark.parametrize("algo,fn", STATIC_DYNAMIC, ids=[a for a, _ in STATIC_DYNAMIC])
def test_duplicate_rows(gen, algo, fn):
    m, d, damp = 16, 1200, 1e-5
    G = realistic_grads(gen, m, d, (-2.0, -0.5))
    G[5] = G[2]
    G[9] = G[2]
    G[-1] = G[0]
    cond = assert_well_conditioned(G, damp)
    Finv = dense_inv(G, damp)
    x = torch.randn(d, generator=gen, dtype=F64)
    check_ihvp(fn, G, damp, x, Finv, cond)
    check_ihvp(fn, G, damp, G[2].clone(), Finv, cond)
    check_ihvp(fn, G, damp, G.clone(), Finv, cond)
    # same F from merged rows: 3 copies of g_2 == sqrt(3) g_2 plus two zero rows (m unchanged)
    H = G.clone()
    H[2] = math.sqrt(3) * G[2]
    H[0] = math.sqrt(2) * G[0]
    H[[5, 9, m - 1]] = 0.0
    assert rel_err(fn(H, damp, x), fn(G, damp, x)) <= TOL


# ----------------------------------------------------------------------------
# static queries, eq. (5)
# ----------------------------------------------------------------------------


@case_param
def test_static_diag_and_entries(gen, case):
    G, damp = draw_case(gen, case)
    d = G.shape[1]
    assert_well_conditioned(G, damp)
    Finv = dense_inv(G, damp)
    assert rel_err(pr.static_diag(G, damp), Finv.diagonal()) <= TOL
    scale = Finv.abs().max()
    idx = [*torch.randint(0, d, (6, 2), generator=gen).tolist(), [3, 3], [d - 1, d - 1], [0, d - 1]]
    for i, j in idx:
        got = pr.static_entry(G, damp, i, j)
        assert got.dtype == F64 and got.dim() == 0
        assert abs(got - Finv[i, j]).item() <= TOL * scale, (i, j)
        assert got.item() == pr.static_entry(G, damp, j, i).item()


def test_static_vectors_match_partial_inverses(gen):
    m, d, damp = 10, 300, 1e-4
    G = realistic_grads(gen, m, d, (-2.0, 0.0))
    assert_well_conditioned(G, damp)  # F_{i-1} <= F with the same smallest eigenvalue (m < d)
    V, q = pr.static_vectors(G, damp)
    assert V.shape == (m, d) and q.shape == (m,)
    for i in range(m):
        Fi = damp * torch.eye(d, dtype=F64) + G[:i].T @ G[:i] / m  # F_{i-1} (0-based: rows < i)
        v_ref = torch.linalg.solve(Fi, G[i])  # dense F_{i-1}^{-1} g_i
        assert rel_err(V[i], v_ref) <= TOL
        assert abs(q[i] - (m + G[i] @ v_ref)).item() <= TOL * q[i].item()


# ----------------------------------------------------------------------------
# dynamic precomputation, eqs. (8)-(10)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["normal", "realistic"])
def test_dynamic_matrices_against_partial_inverses(gen, kind):
    m, d = 12, 300
    if kind == "normal":
        G, damp = normal_grads(gen, m, d), 1e-1
    else:
        G, damp = realistic_grads(gen, m, d, (-2.0, -0.5), corr=0.5), 1e-5
    assert_well_conditioned(G, damp)
    D, B = pr.dynamic_matrices(G, damp)
    assert D.shape == B.shape == (m, m) and D.dtype == B.dtype == F64
    assert torch.equal(D, D.triu()) and torch.equal(B, B.tril())
    assert torch.equal(B.diagonal(), torch.full((m,), 1.0 / damp, dtype=F64))
    D_ref = torch.zeros(m, m, dtype=F64)
    V_ref = torch.zeros(m, d, dtype=F64)
    for i in range(m):
        F_prev = damp * torch.eye(d, dtype=F64) + G[:i].T @ G[:i] / m  # F_{i-1}
        V_ref[i] = torch.linalg.solve(F_prev, G[i])  # dense F_{i-1}^{-1} g_i
        D_ref[i, i:] = G[i:] @ V_ref[i]
    assert (D - D_ref).norm() <= TOL * D_ref.norm()
    # B holds the coefficients of F_{i-1}^{-1} g_i in the gradients: row i of B @ G
    assert rel_err(B @ G, V_ref) <= TOL
    # consistency with the static algorithm
    V, q = pr.static_vectors(G, damp)
    assert rel_err(V, B @ G) <= TOL
    assert rel_err(q, m + D.diagonal()) <= TOL


# ----------------------------------------------------------------------------
# block-diagonal F
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [384, 999, 1000, 4096, 7])
def test_blocked(gen, block_size):
    m, d, damp = 12, 1000, 1e-5
    G = realistic_grads(gen, m, d, (-2.0, -0.5))
    G[4] = 0.0
    cond = assert_well_conditioned(G, damp, block_size)
    Finv = dense_block_inv(G, damp, block_size)
    X = torch.cat(
        [torch.randn(2, d, generator=gen, dtype=F64), torch.randn(1, m, generator=gen, dtype=F64) @ G, G[-1:]]
    )
    for _, fn in BLOCKED:
        check_ihvp(fn, G, damp, X, Finv, cond, block_size)
        check_ihvp(fn, G, damp, X[0], Finv, cond, block_size)
    assert rel_err(pr.static_diag_blocked(G, damp, block_size), Finv.diagonal()) <= TOL
    # entries: inside one block via eq. (5), exactly zero across blocks
    scale = Finv.abs().max()
    last = d - 1
    pairs = [
        (0, 1),
        (last, last),
        (last - 1, last),
        (min(block_size, d) - 1, min(block_size, last)),
        (0, last),
    ]
    for i, j in pairs:
        got = pr.static_entry_blocked(G, damp, i, j, block_size)
        if i // block_size != j // block_size:
            assert got.item() == 0.0 and Finv[i, j].item() == 0.0
        else:
            assert abs(got - Finv[i, j]).item() <= TOL * scale
    if block_size < d:  # really block-diagonal: differs from the full F^{-1}
        full = pr.static_ihvp(G, damp, X[0])
        assert rel_err(pr.static_ihvp_blocked(G, damp, X[0], block_size), full) > 1e3 * TOL


def test_block_slices():
    assert pr.block_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert pr.block_slices(8, 4) == [slice(0, 4), slice(4, 8)]
    assert pr.block_slices(3, 5) == [slice(0, 3)]
    with pytest.raises(ValueError):
        pr.block_slices(3, 0)


# ----------------------------------------------------------------------------
# larger window, shapes, dtypes
# ----------------------------------------------------------------------------


def test_m64_window(gen):
    G, damp = realistic_grads(gen, 64, 2000, (-2.0, -0.5), corr=0.3), 1e-5
    cond = assert_well_conditioned(G, damp)
    Finv = dense_inv(G, damp)
    X = torch.cat([torch.randn(2, 2000, generator=gen, dtype=F64), G[-1:]])
    for _, fn in STATIC_DYNAMIC:
        check_ihvp(fn, G, damp, X, Finv, cond)


def test_shapes_and_dtypes(gen):
    m, d, damp = 5, 64, 1e-3
    G32 = torch.randn(m, d, generator=gen).mul(0.1)
    x32 = torch.randn(d, generator=gen)
    X32 = torch.randn(3, d, generator=gen)
    Finv = dense_inv(G32.double(), damp)
    for fn in (pr.static_ihvp, pr.dynamic_ihvp):
        y = fn(G32, damp, x32)
        assert y.shape == (d,) and y.dtype == F64
        assert rel_err(y, x32.double() @ Finv) <= TOL
        Y = fn(G32, damp, X32)
        assert Y.shape == (3, d) and Y.dtype == F64
        with pytest.raises(ValueError):
            fn(G32, damp, torch.zeros(d + 1))
        with pytest.raises(ValueError):
            fn(G32, 0.0, x32)
        with pytest.raises(ValueError):
            fn(G32[0], damp, x32)
    for fn in (pr.static_ihvp_blocked, pr.dynamic_ihvp_blocked):
        assert fn(G32, damp, X32, 10).shape == (3, d)
        assert fn(G32, damp, x32, 10).shape == (d,)
    assert pr.static_diag(G32, damp).shape == (d,)
    assert pr.static_diag_blocked(G32, damp, 10).shape == (d,)
    V, q = pr.static_vectors(G32, damp)
    D, B = pr.dynamic_matrices(G32, damp)
    assert V.dtype == q.dtype == D.dtype == B.dtype == F64
    with pytest.raises(IndexError):
        pr.static_entry(G32, damp, d, 0)
