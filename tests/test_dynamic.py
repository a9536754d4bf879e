"""SlidingFisherInverse (dynamic M-FAC) against the dense float64 inverse and the paper's recursions.

The window's F uses the last m gradients (fewer, with zero rows, before m are in) and always 1/m.
Bounds as in test_static.py: float64 relative error <= 1e-9; float32 <= 5 * eps32 * cond(F).
"""

from __future__ import annotations

import io

import paper_recursions as pr
import pytest
import torch
from conftest import EPS32, condition, dense_fisher, probe_vectors, realistic_grads, rel_err

from compressor.mfac import SlidingFisherInverse

F64 = torch.float64
TOL64 = 1e-9


def _window_rows(history: list[torch.Tensor], m: int, d: int) -> torch.Tensor:
    """The rows the window should hold: the last m gradients, zero rows for empty slots."""
    rows = torch.zeros(m, d, dtype=F64)
    last = history[-m:]
    if last:
        rows[: len(last)] = torch.stack(last).to(F64)
    return rows


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("steps", [1, 5, 16, 3 * 16 + 5], ids=lambda s: f"{s}updates")
def test_window_matches_dense_inverse(gen, dtype, steps):
    """Partly filled, exactly full and wrapped around (3m updates) windows; update, mul and update_mul."""
    m, d, damp = 16, 800, 1e-5
    stream = realistic_grads(steps, d, gen)
    fisher = SlidingFisherInverse(d, m, damp, dtype=dtype)
    history: list[torch.Tensor] = []
    newest = None
    for t in range(steps):
        g = stream[t].to(dtype)
        history.append(g)
        if t % 2:
            newest = fisher.update_mul(g)
        else:
            fisher.update(g)
            newest = fisher.mul(g)
    rows = _window_rows(history, m, d)
    f = dense_fisher(rows, damp)
    finv = torch.linalg.inv(f)
    tol = TOL64 if dtype == F64 else 5 * EPS32 * condition(f)
    assert newest.dtype == dtype and newest.shape == (d,)
    assert rel_err(newest, history[-1].to(F64) @ finv) <= tol  # the newest gradient itself
    x = probe_vectors(torch.stack(history[-m:]).to(F64), gen).to(dtype)
    assert rel_err(fisher.mul(x), x.to(F64) @ finv) <= tol  # a batch: random, in-span, newest
    assert fisher.count == steps and fisher.next_slot == steps % m


def test_agrees_with_paper_recursions_after_wraparound(gen):
    m, d, damp = 12, 600, 1e-5
    stream = realistic_grads(3 * m + 4, d, gen)
    fisher = SlidingFisherInverse(d, m, damp, dtype=F64)
    for g in stream:
        fisher.update(g)
    x = probe_vectors(stream[-m:], gen)
    # the paper's dynamic recursions (8)-(13) over the slots in slot order
    assert rel_err(fisher.mul(x), pr.dynamic_ihvp(fisher.grads, damp, x)) <= TOL64
    assert rel_err(fisher.mul(x), pr.static_ihvp(stream[-m:], damp, x)) <= TOL64


def test_update_mul_is_update_then_mul(gen):
    d = 300
    a = SlidingFisherInverse(d, 8, 1e-4, dtype=F64)
    b = SlidingFisherInverse(d, 8, 1e-4, dtype=F64)
    for g in realistic_grads(20, d, gen):
        y = a.update_mul(g)
        b.update(g)
        assert rel_err(y, b.mul(g)) <= 1e-13


def test_duplicate_and_zero_gradients(gen):
    m, d, damp = 8, 400, 1e-5
    g = realistic_grads(1, d, gen)[0]
    fisher = SlidingFisherInverse(d, m, damp, dtype=F64)
    for v in (g, g, torch.zeros(d, dtype=F64), g):
        fisher.update(v)
    rows = torch.zeros(m, d, dtype=F64)
    rows[[0, 1, 3]] = g
    finv = torch.linalg.inv(dense_fisher(rows, damp))
    x = probe_vectors(rows[[0, 1, 3]], gen)
    assert rel_err(fisher.mul(x), x @ finv) <= TOL64


def test_more_slots_than_coordinates(gen):
    m, d, damp = 40, 25, 1e-3
    stream = realistic_grads(2 * m, d, gen, scale=1.0)
    fisher = SlidingFisherInverse(d, m, damp, dtype=F64)
    for g in stream:
        fisher.update(g)
    finv = torch.linalg.inv(dense_fisher(stream[-m:], damp))
    x = probe_vectors(stream[-m:], gen)
    assert rel_err(fisher.mul(x), x @ finv) <= TOL64


def test_reset_fills_and_empties(gen):
    m, d, damp = 6, 200, 1e-4
    grads = realistic_grads(m, d, gen)
    filled = SlidingFisherInverse(d, m, damp, dtype=F64)
    filled.reset(grads)
    stepped = SlidingFisherInverse(d, m, damp, dtype=F64)
    for g in grads:
        stepped.update(g)
    x = probe_vectors(grads, gen)
    assert rel_err(filled.mul(x), stepped.mul(x)) <= 1e-12
    filled.reset()
    torch.testing.assert_close(filled.mul(x), x / damp, rtol=1e-15, atol=0)
    assert filled.count == 0


def test_state_dict_round_trip_is_exact(gen):
    d = 300
    stream = realistic_grads(15, d, gen).float()
    a = SlidingFisherInverse(d, 8, 1e-5)
    for g in stream[:11]:
        a.update(g)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = SlidingFisherInverse(d, 8, 1e-5)
    b.load_state_dict(torch.load(buffer))
    for g in stream[11:]:
        assert torch.equal(a.update_mul(g), b.update_mul(g))
    with pytest.raises(ValueError, match="shape"):
        SlidingFisherInverse(d, 9, 1e-5).load_state_dict(a.state_dict())


def test_nonfinite_gradient_leaves_window_unchanged(gen):
    d = 100
    fisher = SlidingFisherInverse(d, 4, 1e-4, dtype=F64)
    fisher.update(realistic_grads(1, d, gen)[0])
    x = torch.randn(d, generator=gen, dtype=F64)
    before = fisher.mul(x)
    for bad in (float("nan"), float("inf")):
        g = torch.ones(d, dtype=F64)
        g[17] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            fisher.update(g)
        with pytest.raises(ValueError, match="NaN or Inf"):
            fisher.update_mul(g)
    assert torch.equal(fisher.mul(x), before) and fisher.count == 1
    grads = torch.ones(4, d, dtype=F64)
    grads[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        fisher.reset(grads)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SlidingFisherInverse(0, 4), "dim"),
        (lambda: SlidingFisherInverse(10, 0), "num_grads"),
        (lambda: SlidingFisherInverse(10, 4, damp=0.0), "damp"),
        (lambda: SlidingFisherInverse(10, 4, damp=-1.0), "damp"),
        (lambda: SlidingFisherInverse(10, 4, dtype=torch.int32), "dtype"),
        (lambda: SlidingFisherInverse(10, 4).update(torch.ones(11)), r"shape \(10,\)"),
        (lambda: SlidingFisherInverse(10, 4).update(torch.ones(2, 10)), r"shape \(10,\)"),
        (lambda: SlidingFisherInverse(10, 4).update(torch.ones(10, dtype=torch.int64)), "float32 or float64"),
        (lambda: SlidingFisherInverse(10, 4).mul(torch.ones(3, 9)), "x must"),
        (lambda: SlidingFisherInverse(10, 4).reset(torch.ones(3, 10)), "shape"),
    ],
)
def test_bad_input_raises_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_window_matches_cpu(gen):
    d = 3000
    stream = realistic_grads(40, d, gen)
    cpu = SlidingFisherInverse(d, 16, 1e-5, dtype=F64)
    gpu = SlidingFisherInverse(d, 16, 1e-5, dtype=F64, device="cuda")
    for g in stream:
        y_cpu = cpu.update_mul(g)
        y_gpu = gpu.update_mul(g.cuda())
        assert y_gpu.is_cuda and rel_err(y_gpu.cpu(), y_cpu) <= 1e-10


@pytest.mark.parametrize("steps", [1, 7, 16, 16 + 5], ids=lambda s: f"{s}updates")
def test_count_scaling_divides_by_the_gradients_in_the_window(gen, steps):
    """count_scaling: F = damp*I + G^T G / n, n = min(count, m): the dense inverse with the n real
    rows while the window fills, the same as 1/m once it is full."""
    m, d, damp = 16, 500, 1e-4
    stream = realistic_grads(steps, d, gen)
    scaled = SlidingFisherInverse(d, m, damp, dtype=F64, count_scaling=True)
    plain = SlidingFisherInverse(d, m, damp, dtype=F64)
    for t in range(steps):
        newest = scaled.update_mul(stream[t].to(F64))
        plain.update(stream[t].to(F64))
    n = min(steps, m)
    rows = torch.stack(list(stream[:steps][-m:])).to(F64)
    finv = torch.linalg.inv(dense_fisher(rows, damp))  # 1/n over the n real rows
    assert rel_err(newest, stream[steps - 1].to(F64) @ finv) <= TOL64
    x = probe_vectors(rows, gen)
    assert rel_err(scaled.mul(x), x @ finv) <= TOL64
    same = torch.allclose(scaled.mul(x), plain.mul(x), rtol=1e-12, atol=0.0)
    assert same == (n == m)  # differs from 1/m exactly while the window is not full


def test_count_scaling_empty_window_and_bad_value():
    fisher = SlidingFisherInverse(10, 4, 0.5, dtype=F64, count_scaling=True)
    x = torch.arange(10, dtype=F64)
    assert torch.allclose(fisher.mul(x), x / 0.5)  # no gradient yet: F = damp * I
    with pytest.raises(ValueError, match="count_scaling must be True or False"):
        SlidingFisherInverse(10, 4, 0.5, count_scaling=1)
