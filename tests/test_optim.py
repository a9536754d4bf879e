"""MFAC, the torch.optim.Optimizer of paper 4.2, against a step written out with the dense inverse."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import dense_fisher

from compressor.mfac import MFAC

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
