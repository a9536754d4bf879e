"""MFAC, the torch.optim.Optimizer of paper 4.2, against a step written out with the dense inverse."""

from __future__ import annotations

import copy
import io
import statistics
import warnings

import pytest
import torch
from conftest import dense_fisher, realistic_grads

from compressor.mfac import MFAC, optim

F64 = torch.float64


def _model(gen: torch.Generator) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    return model


def _batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(32, 6, generator=gen, dtype=F64), torch.randint(0, 3, (32,), generator=gen)


def _flat_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(("weight_decay", "momentum"), [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.9), (5e-3, 0.5)])
def test_steps_match_the_dense_formula(gen, weight_decay, momentum):
    """g = grad + wd p; window gets g; u = F^-1 g; v = mu v + (1 - mu) u; p -= lr v (over 2m steps)."""
    m, lr, damp = 4, 0.05, 1e-3
    model = _model(gen)
    twin = copy.deepcopy(model)
    opt = MFAC(
        model.parameters(), lr=lr, num_grads=m, damp=damp, weight_decay=weight_decay, momentum=momentum
    )
    window: list[torch.Tensor] = []
    v = torch.zeros(sum(p.numel() for p in twin.parameters()), dtype=F64)
    for _ in range(2 * m + 1):
        x, y = _batch(gen)
        _flat_grad(model, x, y)
        opt.step()
        w = torch.cat([p.detach().reshape(-1) for p in twin.parameters()])
        g = _flat_grad(twin, x, y) + weight_decay * w
        window = [*window, g][-m:]
        rows = torch.zeros(m, g.numel(), dtype=F64)
        rows[: len(window)] = torch.stack(window)
        u = torch.linalg.solve(dense_fisher(rows, damp), g)
        v = momentum * v + (1 - momentum) * u if momentum else u
        with torch.no_grad():
            offset = 0
            for p in twin.parameters():
                p.sub_(lr * v[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_param_groups_have_their_own_lr(gen):
    model = _model(gen)
    opt = MFAC(
        [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.1, num_grads=3
    )
    first = [p.detach().clone() for p in model[0].parameters()]
    x, y = _batch(gen)
    _flat_grad(model, x, y)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(first, model[0].parameters(), strict=True))
    assert opt.window.count == 1


def test_closure_and_missing_gradients(gen):
    model = _model(gen)
    # damp 1 keeps F^-1 near the identity: a safe step size, so the loss must go down over 15 steps
    opt = MFAC(model.parameters(), lr=0.1, num_grads=3, damp=1.0)
    x, y = _batch(gen)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None  # no gradients yet: nothing happens
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(15)]
    assert losses[-1] < losses[0]
    model[2].bias.grad = None  # a parameter without a gradient counts as a zero gradient
    opt.step()
    assert opt.window.count == 16


def test_state_dict_round_trip_resumes_exactly(gen):
    model = _model(gen).float()
    opt = MFAC(model.parameters(), lr=0.05, num_grads=5, damp=1e-3, weight_decay=1e-3, momentum=0.8)
    batches = [_batch(gen) for _ in range(12)]
    for x, y in batches[:7]:
        _flat_grad(model, x.float(), y)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin = _model(gen).float()
    twin.load_state_dict(saved["model"])
    twin_opt = MFAC(twin.parameters(), lr=0.05, num_grads=5, damp=1e-3, weight_decay=1e-3, momentum=0.8)
    twin_opt.load_state_dict(saved["opt"])
    for x, y in batches[7:]:
        _flat_grad(model, x.float(), y)
        opt.step()
        _flat_grad(twin, x.float(), y)
        twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_foreign_state(gen):
    model = _model(gen)
    opt = MFAC(model.parameters(), num_grads=4)
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not an MFAC state dict"):
        opt.load_state_dict(sgd_state)
    with pytest.raises(ValueError, match="shape"):
        MFAC(model.parameters(), num_grads=5).load_state_dict(opt.state_dict())


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MFAC(emb.parameters(), num_grads=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"num_grads": 0}, "num_grads"),
        ({"damp": 0.0}, "damp"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MFAC([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_unsupported_parameters_and_groups():
    with pytest.raises(ValueError, match="one device with one dtype"):
        MFAC([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=F64))])
    with pytest.raises(ValueError, match="float32 and float64"):
        MFAC([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ValueError, match="momentum"):
        MFAC([{"params": [torch.nn.Parameter(torch.zeros(3))], "momentum": 2.0}])
    opt = MFAC([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="after construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_count_scaling_steps_with_the_fisher_of_the_gradients_so_far(gen):
    """MFAC(count_scaling=True): step t moves p by -lr * (damp*I + G_t^T G_t / t)^-1 g_t while t < m."""
    d, m, lr, damp = 30, 8, 0.1, 1e-2
    p = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = MFAC([p], lr=lr, num_grads=m, damp=damp, count_scaling=True)
    seen = []
    for _ in range(3):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        seen.append(g)
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        expected = -lr * torch.linalg.solve(dense_fisher(torch.stack(seen), damp), g)
        torch.testing.assert_close(p.detach() - before, expected, rtol=1e-9, atol=1e-12)
    assert opt.window.count_scaling


# ------------------------------------------------------------------------------- the step's length


def _steps(p: torch.Tensor, opt: MFAC, rows: torch.Tensor) -> list[torch.Tensor]:
    """u = F^-1 g of each step for the gradients ``rows`` (k, d) of the one parameter p (lr = 1)."""
    out = []
    for g in rows:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append(before - p.detach())
    return out


def _leverage_terms(rows: torch.Tensor, m: int, damp: float, k: int) -> float:
    """1 - m damp [K^-1]_kk for K = m damp I + G G^T over the window ``rows`` (n <= m, empty slots
    zero; they only add m damp to K's diagonal, apart from the filled rows)."""
    gram = rows @ rows.T + m * damp * torch.eye(rows.shape[0], dtype=F64)
    return 1.0 - m * damp * torch.linalg.inv(gram)[k, k].item()


def test_the_step_has_a_length_of_about_m_over_the_gradient_norm(gen):
    """|F^-1 g| for g in the window (optim.py's docstring). Exact, float64: g . F^-1 g =
    m (1 - m damp [K^-1]_kk) (push-through: F^-1 G^T = m G^T K^-1) and |F^-1 g|^2 =
    m^2 ([K^-1]_kk - m damp [K^-2]_kk). For N(0, s^2) rows, m x d, the singular values of G lie in
    s (sqrt(d) -+ (sqrt(m) + t)) with probability >= 1 - 2 exp(-t^2 / 2) and |g| <= s (sqrt(d) + t)
    with >= 1 - exp(-t^2 / 2) (Gaussian concentration; t = 6.5, over the 32 rows and 32 windows
    here: a failure below 7e-8), so |F^-1 g| |g| / m lies in
    [1 - m damp / (s (sqrt(d) - sqrt(m) - t))^2, (sqrt(d) + t) / (sqrt(d) - sqrt(m) - t)], while the
    window fills (empty slots: the same bounds over the filled rows) and once it is full."""
    m, d, s, damp, t = 16, 4000, 1e-2, 1e-6, 6.5
    p = torch.zeros(d, dtype=F64, requires_grad=True)
    opt = MFAC([p], lr=1.0, num_grads=m, damp=damp)
    rows = torch.randn(2 * m, d, generator=gen, dtype=F64) * s
    low = 1 - m * damp / (s * (d**0.5 - m**0.5 - t)) ** 2
    high = (d**0.5 + t) / (d**0.5 - m**0.5 - t)
    for i, u in enumerate(_steps(p, opt, rows)):
        g = rows[i]
        window = rows[max(0, i - m + 1) : i + 1]  # the newest gradient last
        exact = m * _leverage_terms(window, m, damp, window.shape[0] - 1)
        assert abs(float(g @ u) - exact) <= 1e-9 * exact, i
        assert low <= float(u.norm() * g.norm()) / m <= high, i


def test_the_step_is_g_over_its_squared_norm_over_m_plus_damp_for_orthogonal_gradients(gen):
    """Orthogonal window gradients: F g = (damp + |g|^2 / m) g, so F^-1 g = g / (|g|^2 / m + damp)
    exactly: about m / |g| in length when |g|^2 / m >> damp, SGD with lr / damp when << (float64;
    cond(K) <= 1 + |g|^2 / (m damp) <= 1e3 here, so 1e-10 relative)."""
    m, d, damp = 8, 50, 1e-3
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=gen, dtype=F64))
    norms = torch.sqrt(m * damp * torch.logspace(-2, 2, m, dtype=F64))  # |g|^2 / (m damp): 1e-2 .. 1e2
    rows = q.T * norms[:, None]
    p = torch.zeros(d, dtype=F64, requires_grad=True)
    for g, u in zip(rows, _steps(p, MFAC([p], lr=1.0, num_grads=m, damp=damp), rows), strict=True):
        torch.testing.assert_close(u, g / (g.norm() ** 2 / m + damp), rtol=1e-10, atol=0)


def test_correlated_gradients_take_no_shorter_steps(gen):
    """Realistic (correlated) gradients: |F^-1 g| >= g . F^-1 g / |g| = (m / |g|)(1 - m damp [K^-1]_kk)."""
    m, damp = 8, 1e-5
    rows = realistic_grads(3 * m, 500, gen)
    p = torch.zeros(500, dtype=F64, requires_grad=True)
    for i, u in enumerate(_steps(p, MFAC([p], lr=1.0, num_grads=m, damp=damp), rows)):
        window = rows[max(0, i - m + 1) : i + 1]
        lower = m / float(rows[i].norm()) * _leverage_terms(window, m, damp, window.shape[0] - 1)
        assert float(u.norm()) >= lower * (1 - 1e-9), i


# ------------------------------------------------------------------------------- the step-size check


def _small_step_warnings(caught) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, UserWarning) and "MFAC:" in str(w.message)
    ]


def _train(gen_seed: int, steps: int, **kwargs) -> tuple[list[float], list[str], MFAC]:
    """``steps`` M-FAC steps of _model on fixed batches (one seed); the ratios |dp| / |p| of each
    step (lr |u| / |p| without momentum) and the step-size warnings raised."""
    gen = torch.Generator().manual_seed(gen_seed)
    model = _model(gen)
    opt = MFAC(model.parameters(), **kwargs)
    batches = [_batch(gen) for _ in range(steps)]
    ratios = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            _flat_grad(model, x, y)
            opt.step()
            after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            ratios.append(float((after - before).norm() / before.norm()))
    return ratios, _small_step_warnings(caught), opt


def test_a_too_small_lr_warns_once_at_the_threshold_and_a_sensible_one_does_not(gen):
    """The median of lr |u| / |p| over the first STEP_CHECK_STEPS steps against SMALL_STEP_RATIO:
    the ratio is linear in lr while the steps are this small (the parameters move by < 1e-4 of
    themselves over the check), so lr = lr0 * SMALL_STEP_RATIO / r0 * 1.5 (0.5) lands above (below)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    n = optim.STEP_CHECK_STEPS
    ratios, said, _ = _train(seed, n, lr=1e-9, num_grads=4, damp=1e-3)
    r0 = statistics.median(ratios)
    assert len(said) == 1 and "m / |g|" in said[0] and "lr ~" in said[0]  # at the n-th step
    ratios, said, _ = _train(seed, 3 * n, lr=1e-9, num_grads=4, damp=1e-3)
    assert len(said) == 1  # once only
    at_threshold = 1e-9 * optim.SMALL_STEP_RATIO / r0
    _, said, _ = _train(seed, 3 * n, lr=1.5 * at_threshold, num_grads=4, damp=1e-3)
    assert said == []
    _, said, _ = _train(seed, 3 * n, lr=0.5 * at_threshold, num_grads=4, damp=1e-3)
    assert len(said) == 1
    _, said, _ = _train(seed, 3 * n, lr=0.05, num_grads=4, damp=1e-3)  # test_steps_match's setting
    assert said == []
    _, said, _ = _train(seed, 3 * n, lr=0.0, num_grads=4, damp=1e-3)  # no step asked for
    assert said == []


def test_a_warm_up_and_count_scaling_are_not_taken_for_a_too_small_lr(gen):
    """A warm-up from ~0 (the lr the optimizer was built with counts) and count_scaling's short first steps
    (about n / m of the full window's: scaled back by m / n) do not warn at an lr 2x above the
    threshold (over seeds 0-39: the unscaled medians at most 0.42x the threshold, the scaled ones at
    least 2.5x)."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    m, n = 64, optim.STEP_CHECK_STEPS
    ratios, _, _ = _train(seed, n, lr=1e-9, num_grads=m, damp=1e-3)
    lr = 2 * 1e-9 * optim.SMALL_STEP_RATIO / statistics.median(ratios)
    ratios, said, opt = _train(seed, n, lr=lr, num_grads=m, damp=1e-3, count_scaling=True)
    assert statistics.median(ratios) < optim.SMALL_STEP_RATIO  # unscaled, these steps are too short
    assert said == [] and opt.window.count_scaling
    gen2 = torch.Generator().manual_seed(seed)
    model = _model(gen2)
    opt = MFAC(model.parameters(), lr=lr, num_grads=m, damp=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2 * n):
            opt.param_groups[0]["lr"] = lr * 1e-6 * (step + 1)  # as the LearningRate modifier sets it
            _flat_grad(model, *_batch(gen2))
            opt.step()
    assert _small_step_warnings(caught) == []
