"""Half-precision storage (storage_dtype bfloat16 / float16) of FisherInverse, SlidingFisherInverse, MFAC
and the MFACOptimizer modifier, against the dense float64 inverse and the float32 path.

Tolerances, from the storage precision (unit roundoff u = eps / 2: 2^-9 bfloat16, 2^-12 float16; the
power-of-two row scales are exact, so each stored value x becomes x (1 + delta), |delta| <= u):

- FisherInverse stores W (or P = damp F_b^-1 for blocks narrower than m) rounded: W~ = W + E with
  ||E||_2 <= max_b ||E_b||_F <= u max_b ||W_b||_F =: e. Then
  ||(W~^T W~ - W^T W) x|| <= e (||W x|| + (1 + e) ||x||), so F^-1 x moves by at most that over damp;
  with ||W_b||_F^2 = sum_{i in b} (1 - damp [F^-1]_ii) and ||W x||^2 = ||x||^2 - damp x^T F^-1 x, all
  from the dense inverse. For P: ||E x|| <= u max_b ||P_b||_F ||x||. Plus the float32 path's own
  bound, 5 eps32 cond(F) (tests/test_static.py). diag (and entry(i, i)) come from the unrounded W:
  the float32 bound 2 eps32 / damp. entry(i, j): |W~_i . W~_j - W_i . W_j| <= (2u + u^2) |W_i| |W_j|
  <= 2u + u^2 (columns of W have norm <= 1; for P, |P~_ij - P_ij| <= u |P_ij| <= u), over damp.
- SlidingFisherInverse stores G rounded: it computes, to float32 rounding (5 eps32 cond), the exact
  inverse of F~ = F(G~). Against the unrounded F: F~^-1 x - F^-1 x = F~^-1 (F - F~) F^-1 x, so the
  relative error is <= ||F~ - F||_2 / lambda_min(F~), and ||F~ - F||_2 <= (2u + u^2) ||G||_F ||G||_2 / m.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EPS32, condition, dense_fisher, entry_pairs, probe_vectors, realistic_grads, rel_err
from pydantic import ValidationError
from torch import nn

from compressor.lifecycle.session import Session
from compressor.mfac import MFAC, FisherInverse, SlidingFisherInverse
from modifiers.mfac_optimizer import MFACOptimizer

F64 = torch.float64
HALF = [torch.bfloat16, torch.float16]
IDS = ["bf16", "fp16"]


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _blocks(d: int, block_size: int | None) -> list[slice]:
    size = d if block_size is None else block_size
    return [slice(s, min(s + size, d)) for s in range(0, d, size)]


def _storage_term(finv: torch.Tensor, damp: float, x: torch.Tensor, m: int, block_size: int | None, u: float):
    """Per row of x: the bound on ||F~^-1 x - F^-1 x|| / ||F^-1 x|| from the rounded factor (docstring)."""
    d = finv.shape[0]
    blocks = _blocks(d, block_size)
    direct = block_size is not None and min(block_size, d) < m
    if direct:  # P = damp F_b^-1 stored, ||P_b||_F
        e = u * max((damp * finv[b, b]).norm().item() for b in blocks)
    else:  # W stored, ||W_b||_F^2 = sum (1 - damp diag)
        e = u * max((1.0 - damp * finv.diagonal()[b]).clamp(min=0).sum().sqrt().item() for b in blocks)
    y = x @ finv
    xn = x.norm(dim=1)
    if direct:
        bound = e * xn
    else:
        wx = (xn.square() - damp * (x * y).sum(dim=1)).clamp(min=0).sqrt()
        bound = e * (wx + (1 + e) * xn)
    return bound / (damp * y.norm(dim=1))


def _check_static(grads, damp, block_size, storage, gen, oracle_grads=None, page_bytes=None):
    """mul, diag, entry and submatrices of the half-storage FisherInverse against the dense inverse of
    ``oracle_grads`` (default: ``grads``), with the derived tolerances."""
    ref_g = (grads if oracle_grads is None else oracle_grads).to(F64)
    m, d = ref_g.shape
    f = dense_fisher(ref_g, damp, block_size)
    finv = torch.linalg.inv(f)
    fi = FisherInverse(grads, damp, block_size, storage_dtype=storage, page_bytes=page_bytes)
    assert fi.storage_dtype == storage and fi.dtype == torch.float32
    u = unit_roundoff(storage)
    x = probe_vectors(ref_g, gen)
    ref = x @ finv
    tol = 5 * EPS32 * condition(f) + _storage_term(finv, damp, x, m, block_size, u)
    y = fi.mul(x.float())
    assert y.dtype == torch.float32 and y.shape == x.shape
    errs = (y.to(F64) - ref).norm(dim=1) / ref.norm(dim=1)
    assert bool((errs <= tol).all()), (errs.tolist(), tol.tolist())
    y64 = fi.mul(x)  # results in x's dtype
    assert y64.dtype == F64 and rel_err(y64, ref) <= tol.max().item()
    for k in range(3):
        assert rel_err(fi.mul(x[k].float()), ref[k]) <= tol[k].item(), f"probe {k}"
    diag_atol = 2 * EPS32 / damp
    diag = fi.diag()
    assert diag.dtype == torch.float32
    assert (diag.to(F64) - finv.diagonal()).abs().max().item() <= diag_atol
    entry_atol = (2 * u + u * u + 2 * EPS32) / damp
    pairs = entry_pairs(d, gen)
    for i, j in pairs:
        atol = diag_atol if i == j else entry_atol
        assert abs(fi.entry(i, j) - finv[i, j].item()) <= atol, (i, j)
    index = torch.randint(0, d, (6, 4), generator=gen)
    index[0] = torch.arange(4)  # a group inside one block
    sub = fi.submatrices(index)
    want = torch.stack([finv[q][:, q] for q in index])
    off = ~torch.eye(4, dtype=torch.bool).expand(6, 4, 4)
    assert (sub - want)[off].abs().max().item() <= entry_atol
    assert (sub - want).diagonal(dim1=1, dim2=2).abs().max().item() <= diag_atol
    return fi


@pytest.mark.parametrize("storage", HALF, ids=IDS)
@pytest.mark.parametrize("block_size", [None, 128, 333, 20], ids=lambda b: f"B{b}")
def test_fisher_inverse_matches_dense_inverse(gen, storage, block_size):
    """Unblocked, blocks that do and do not divide d, and blocks narrower than m (the direct form)."""
    grads = realistic_grads(40, 1001, gen).float()
    _check_static(grads, 1e-5, block_size, storage, gen, oracle_grads=grads.to(F64))


@pytest.mark.parametrize("storage", HALF, ids=IDS)
@pytest.mark.parametrize("scale", [1e-6, 1e8], ids=["tiny", "huge"])
def test_fisher_inverse_at_extreme_gradient_scales(gen, storage, scale):
    """Gradients of 1e-9 (zero in plain float16) or 1e3..1e5 (past float16's 65504): the row scales
    keep the storage error at u; damp scales with the gradients' square to keep cond(F) the same."""
    grads = (realistic_grads(32, 800, gen) * scale).float()
    assert grads.abs().max() > 65504 or grads.abs().max() < 6e-8 * 100
    _check_static(grads, 1e-5 * scale**2, None, storage, gen, oracle_grads=grads.to(F64))
    _check_static(grads, 1e-5 * scale**2, 100, storage, gen, oracle_grads=grads.to(F64))


@pytest.mark.parametrize("storage", HALF, ids=IDS)
def test_half_gradients_give_the_inverse_of_the_rounded_gradients(gen, storage):
    """A gradient buffer kept in half precision: FisherInverse is that of the rounded rows, exactly to
    float32 rounding when the factor is float32, with the storage term when it is half too."""
    grads = realistic_grads(40, 900, gen)
    half = grads.to(storage)
    rounded = half.to(F64)
    f = dense_fisher(rounded, 1e-5, 64)
    finv = torch.linalg.inv(f)
    full = FisherInverse(half, 1e-5, 64, storage_dtype=torch.float32)
    x = probe_vectors(rounded, gen)
    assert rel_err(full.mul(x.float()), x @ finv) <= 5 * EPS32 * condition(f)
    fi = _check_static(half, 1e-5, 64, storage, gen, oracle_grads=rounded)
    default = FisherInverse(half, 1e-5, 64)  # storage_dtype None: the gradients' dtype
    assert default.storage_dtype == storage and torch.equal(default.mul(x.float()), fi.mul(x.float()))


@pytest.mark.parametrize("storage", HALF, ids=IDS)
def test_paged_and_whole_give_the_same_numbers(gen, storage):
    """Tiny pages (a wide block split into column pages, several blocks a page): the same bounds (the
    summation order changes W at float32 rounding, so single stored values may round the other way)."""
    grads = realistic_grads(16, 1000, gen).float()
    for block_size in (None, 100):
        _check_static(grads, 1e-5, block_size, storage, gen, grads.to(F64), page_bytes=16 * 4 * 37)


@pytest.mark.parametrize("block_size", [None, 128, 20], ids=lambda b: f"B{b}")
def test_stored_bytes_halve(gen, block_size):
    grads = realistic_grads(48, 3000, gen).float()
    full = FisherInverse(grads, 1e-5, block_size)
    for storage in HALF:
        half = FisherInverse(grads, 1e-5, block_size, storage_dtype=storage)
        assert all(f.dtype == storage for f in half._factors)
        factor_bytes = sum(f.numel() * f.element_size() for f in half._factors)
        assert factor_bytes * 2 == sum(f.numel() * f.element_size() for f in full._factors)
        scale_bytes = sum(s.numel() * s.element_size() for s in half._scales)
        rows = 3000 if block_size is not None and block_size < 48 else 48 * -(-3000 // (block_size or 3000))
        assert scale_bytes == 4 * rows  # one float32 scale per stored row
        assert half.nbytes == factor_bytes + scale_bytes + 4 * 3000


# ----------------------------------------------------------------------------- the sliding window


def _window_rows(window: SlidingFisherInverse) -> torch.Tensor:
    """The window as stored, in float64 (rounded rows times their scales)."""
    rows = window.grads.to(F64)
    return rows if window.scales is None else rows * window.scales.to(F64)


@pytest.mark.parametrize("storage", HALF, ids=IDS)
@pytest.mark.parametrize("steps", [20, 45])  # filling, and wrapped around
def test_window_is_the_exact_inverse_of_the_rounded_window(gen, storage, steps):
    d, m, damp = 1000, 24, 1e-5
    history = realistic_grads(steps, d, gen)
    window = SlidingFisherInverse(d, m, damp, storage_dtype=storage)
    u = unit_roundoff(storage)
    for g in history:
        newest = window.update_mul(g.float())
    assert window.grads.dtype == storage
    rows = _window_rows(window)
    slot = (window.next_slot - 1) % m
    # each stored row is its gradient rounded: relative error <= u per entry
    assert bool(((rows[slot] - history[-1]).abs() <= u * history[-1].abs()).all())
    f_r = dense_fisher(rows, damp)
    finv_r = torch.linalg.inv(f_r)
    tol32 = 5 * EPS32 * condition(f_r)
    assert rel_err(newest, rows[slot] @ finv_r) <= tol32  # update_mul: F~^-1 of the rounded g
    x = probe_vectors(history[-min(steps, m) :], gen)
    assert rel_err(window.mul(x.float()), x @ finv_r) <= tol32
    # against the unrounded window: the perturbation bound, itself within the a-priori one
    g_true = torch.zeros(m, d, dtype=F64)
    for i, g in enumerate(history):
        g_true[i % m] = g
    f = dense_fisher(g_true, damp)
    delta = torch.linalg.matrix_norm(f_r - f, ord=2).item()
    apriori = (2 * u + u * u) * g_true.norm().item() * torch.linalg.matrix_norm(g_true, ord=2).item() / m
    assert delta <= apriori
    lam_min = torch.linalg.eigvalsh(f_r)[0].item()
    assert rel_err(window.mul(x.float()), x @ torch.linalg.inv(f)) <= delta / lam_min + tol32


@pytest.mark.parametrize("storage", HALF, ids=IDS)
def test_window_reset_state_dict_and_bytes(gen, storage):
    d, m, damp = 800, 8, 1e-4
    grads = realistic_grads(m, d, gen).float()
    full = SlidingFisherInverse(d, m, damp)
    half = SlidingFisherInverse(d, m, damp, storage_dtype=storage)
    full.reset(grads)
    half.reset(grads)
    assert half.grads.nbytes * 2 == full.grads.nbytes
    assert half.nbytes <= full.nbytes - full.grads.nbytes // 2 + 4 * m
    rows = _window_rows(half)
    f_r = dense_fisher(rows, damp)
    x = probe_vectors(rows, gen)
    assert rel_err(half.mul(x.float()), x @ torch.linalg.inv(f_r)) <= 5 * EPS32 * condition(f_r)
    # round trip: same storage exactly; into a float32 window, the same rounded rows
    again = SlidingFisherInverse(d, m, damp, storage_dtype=storage)
    again.load_state_dict(half.state_dict())
    assert torch.equal(again.mul(x.float()), half.mul(x.float()))
    wide = SlidingFisherInverse(d, m, damp)
    wide.load_state_dict(half.state_dict())
    assert rel_err(wide.mul(x.float()), x @ torch.linalg.inv(f_r)) <= 5 * EPS32 * condition(f_r)
    narrow = SlidingFisherInverse(d, m, damp, storage_dtype=storage)
    narrow.load_state_dict(full.state_dict())  # a float32 checkpoint into a half window: rounded
    assert torch.equal(narrow.mul(x.float()), half.mul(x.float()))
    half.reset()
    assert half.count == 0 and bool((half.scales == 1).all())


# ----------------------------------------------------------------------------- the optimizer


@pytest.mark.parametrize("storage", HALF, ids=IDS)
def test_mfac_steps_are_those_of_the_rounded_window(gen, storage):
    """Step by step (past a wrap-around), the update is -lr F~^-1 g~ with F~ over the rounded window
    and g~ the rounded gradient, to float32 rounding; and within the perturbation bound of the float32
    optimizer's step from the same state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4))
    params = list(model.parameters())
    m, damp, lr = 6, 1e-4, 1e-3
    opt = MFAC(params, lr=lr, num_grads=m, damp=damp, storage_dtype=storage)
    u = unit_roundoff(storage)
    assert opt.window.grads.dtype == storage
    for step in range(2 * m + 2):
        x = torch.randn(32, 20, generator=gen)
        y = torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(F64)
        before = torch.cat([p.detach().reshape(-1) for p in params]).to(F64)
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params]).to(F64)
        rows = _window_rows(opt.window)
        g_r = rows[(opt.window.next_slot - 1) % m]
        assert bool(((g_r - g).abs() <= u * g.abs()).all()), step
        f_r = dense_fisher(rows, damp)
        want = -lr * torch.linalg.solve(f_r, g_r)
        assert rel_err(after - before, want) <= 5 * EPS32 * condition(f_r) + 4 * EPS32, step


def test_mfac_storage_options_and_errors():
    p = [torch.zeros(10, requires_grad=True)]
    with pytest.raises(ValueError, match="storage_dtype"):
        MFAC(p, num_grads=2, storage_dtype=torch.int8)
    with pytest.raises(ValueError, match="wider"):
        MFAC(p, num_grads=2, storage_dtype=torch.float64)
    opt = MFAC(p, num_grads=2, storage_dtype=torch.bfloat16)
    assert opt.constructor_kwargs()["storage_dtype"] == torch.bfloat16
    p64 = [torch.zeros(10, dtype=F64, requires_grad=True)]
    assert MFAC(p64, num_grads=2, storage_dtype=torch.float32).window.grads.dtype == torch.float32
    with pytest.raises(ValueError, match="storage_dtype"):
        FisherInverse(torch.ones(2, 3), storage_dtype="bfloat16")
    with pytest.raises(ValueError, match="wider"):
        FisherInverse(torch.ones(2, 3), storage_dtype=torch.float64)
    with pytest.raises(ValueError, match="wider"):
        FisherInverse(torch.ones(2, 3, dtype=torch.bfloat16), storage_dtype=torch.float64)
    with pytest.raises(ValueError, match="storage_dtype"):
        SlidingFisherInverse(3, 2, storage_dtype=torch.int32)


def test_modifier_storage_dtype(gen):
    with pytest.raises(ValidationError, match="storage_dtype"):
        MFACOptimizer(lr=0.1, storage_dtype="int8")
    with pytest.raises(ValidationError, match="shard"):
        MFACOptimizer(lr=0.1, storage_dtype="bfloat16", shard=True)
    assert MFACOptimizer(lr=0.1, num_grads=2, storage_dtype="bfloat16").gradient_bytes(1000) == 2 * 2 * 1000
    assert MFACOptimizer(lr=0.1, num_grads=2).gradient_bytes(1000) == 4 * 2 * 1000
    mfac = MFACOptimizer(lr=0.01, num_grads=3, damp=1e-3, storage_dtype="float16")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    session = Session([mfac], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=4)
    for _ in range(4):
        session.optimizer.zero_grad()
        x, y = torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)
        nn.functional.cross_entropy(session.model(x), y).backward()
        session.before_step()
        session.optimizer.step()
        session.after_step()
    window = mfac.optimizer.window
    assert window.grads.dtype == torch.float16 and window.count == 4
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    session.finalize()
