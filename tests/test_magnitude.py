"""MagnitudePruning and ConstantPruning driven by a fake session through a short training run."""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compressor.core.masks import MaskSet
from compressor.core.params import normalize
from modifiers.magnitude import ConstantPruning, MagnitudePruning

NAMES = ["0.weight", "2.weight"]


class FakeSession:
    """The attributes a Session gives modifiers; logs go to ``self.logs`` as (step, name, value)."""

    def __init__(self, model: nn.Module, names: list[str], steps_per_epoch: int, total_steps: int | None):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.step = 0
        self.params = {normalize(n): p for n, p in model.named_parameters()}
        self.masks = MaskSet(model, names)
        self.logs: list[tuple[int, str, float]] = []

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def log(self, name: str, value: float) -> None:
        self.logs.append((self.step, name, value))


def _net(gen: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


def _data(gen: torch.Generator, steps: int) -> list[torch.Tensor]:
    return [torch.randn(8, 12, generator=gen) for _ in range(steps)]


def _train(session: FakeSession, modifier: Any, data: list[torch.Tensor], start: int = 0) -> list[dict]:
    """Steps ``start..len(data)-1`` as ``Session`` runs them (masks applied once, after the hooks);
    returns the masks after each step."""
    history = []
    for step in range(start, len(data)):
        session.step = step
        session.optimizer.zero_grad()
        session.model(data[step]).square().mean().backward()
        modifier.before_step(session)
        session.optimizer.step()
        modifier.after_step(session)
        session.masks.apply()
        history.append({n: session.masks.mask(n).clone() for n in NAMES})
    session.step = len(data)
    return history


def _check_zeros(session: FakeSession) -> None:
    for name in NAMES:
        assert torch.all(session.params[name][~session.masks.mask(name)] == 0)


@pytest.mark.parametrize("global_ranking", [True, False])
def test_gradual_pruning_reaches_final_at_end_and_never_unprunes(global_ranking: bool, gen) -> None:
    final = 0.5 + 0.4 * torch.rand(1, generator=gen).item()
    modifier = MagnitudePruning(
        params=["re:.*weight"],
        final_sparsity=final,
        init_sparsity=0.1,
        end={"step": 8},
        update_every={"step": 2},
        global_ranking=global_ranking,
    )
    session = FakeSession(_net(gen), NAMES, steps_per_epoch=5, total_steps=10)
    modifier.initialize(session)
    history = _train(session, modifier, _data(gen, 10))
    for before, after in pairwise(history):
        assert all(not (after[n] & ~before[n]).any() for n in NAMES)
    _check_zeros(session)
    sizes = {n: session.params[n].numel() for n in NAMES}
    if global_ranking:
        pruned = sum(int((~session.masks.mask(n)).sum()) for n in NAMES)
        assert pruned == math.floor(final * sum(sizes.values()) + 0.5)
    else:
        for name in NAMES:
            assert int((~session.masks.mask(name)).sum()) == math.floor(final * sizes[name] + 0.5)
    logged = [(step, value) for step, name, value in session.logs if name == "sparsity"]
    assert [step for step, _ in logged] == [0, 2, 4, 6, 8]
    assert logged[0][1] == pytest.approx(0.1, abs=0.01) and logged[-1][1] == pytest.approx(final, abs=0.01)
    assert all(a[1] <= b[1] for a, b in pairwise(logged))
    assert any(not torch.equal(history[7][n], history[8][n]) for n in NAMES)  # the last update: step 8
    assert all(torch.equal(history[8][n], history[9][n]) for n in NAMES)  # held after end


def test_end_of_training_update_fires_in_finalize(gen: torch.Generator) -> None:
    modifier = MagnitudePruning(params=["0.weight"], final_sparsity=0.75, update_every={"step": 2})
    session = FakeSession(_net(gen), ["0.weight"], steps_per_epoch=4, total_steps=10)
    modifier.initialize(session)
    for step in range(10):
        session.step = step
        modifier.before_step(session)
    session.step = 10
    assert session.masks.sparsity("0.weight") < 0.75  # the update at step 10 is pending
    modifier.finalize(session)
    assert session.masks.sparsity("0.weight") == 0.75


def test_one_shot_magnitude_prunes_the_smallest(gen: torch.Generator) -> None:
    net = _net(gen)
    weights = net[2].weight.detach().abs().clone()
    modifier = MagnitudePruning(params=["2.weight"], final_sparsity=0.5, start=0, end=0)
    session = FakeSession(net, ["2.weight"], steps_per_epoch=3, total_steps=None)
    modifier.initialize(session)
    modifier.before_step(session)
    mask = session.masks.mask("2.weight")
    assert int((~mask).sum()) == 32
    assert weights[~mask].max() <= weights[mask].min()


def test_resume_from_state_dicts_gives_the_uninterrupted_result(gen: torch.Generator) -> None:
    data = _data(gen, 10)
    start_state = _net(gen).state_dict()

    def fresh() -> tuple[FakeSession, MagnitudePruning]:
        net = _net(gen)
        net.load_state_dict(start_state)
        mod = MagnitudePruning(params=NAMES, final_sparsity=0.8, end=1.6, update_every=0.4, schedule="linear")
        return FakeSession(net, NAMES, steps_per_epoch=5, total_steps=10), mod

    session, modifier = fresh()
    modifier.initialize(session)
    _train(session, modifier, data)

    first, mod1 = fresh()
    mod1.initialize(first)
    _train(first, mod1, data[:5])
    model_state, opt_state, mod_state = (
        first.model.state_dict(),
        first.optimizer.state_dict(),
        mod1.state_dict(),
    )
    second, mod2 = fresh()
    second.model.load_state_dict(model_state)
    second.optimizer.load_state_dict(opt_state)
    mod2.load_state_dict(mod_state)
    mod2.initialize(second)
    _train(second, mod2, data, start=5)
    for name in NAMES:
        assert torch.equal(second.masks.mask(name), session.masks.mask(name))
        assert torch.equal(second.params[name], session.params[name])
    assert second.masks.global_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_nm_magnitude_pruning(gen: torch.Generator) -> None:
    modifier = MagnitudePruning(params=["0.weight"], final_sparsity=0.5, structure={"n": 2, "m": 4}, end=0)
    session = FakeSession(_net(gen), ["0.weight"], steps_per_epoch=1, total_steps=1)
    modifier.initialize(session)
    modifier.before_step(session)
    kept = session.masks.mask("0.weight").reshape(16, 3, 4).sum(dim=2)
    assert torch.all(kept == 2)


def test_constant_pruning_holds_zeros_from_start_to_end(gen: torch.Generator) -> None:
    net = _net(gen)
    params = dict(net.named_parameters())
    zeros = {n: torch.rand(params[n].shape, generator=gen) < 0.4 for n in NAMES}
    with torch.no_grad():
        for name in NAMES:
            params[name][zeros[name]] = 0
    modifier = ConstantPruning(params=["re:.*weight"], start={"step": 1}, end={"step": 7})
    session = FakeSession(net, NAMES, steps_per_epoch=5, total_steps=10)
    modifier.initialize(session)
    modifier.before_step(session)  # step 0: before start, nothing held
    assert all(session.masks.mask(n).all() for n in NAMES)
    session.step = 1
    modifier.before_step(session)  # captures the zeros
    history = _train(session, modifier, _data(gen, 10), start=1)
    for masks in history[:6]:  # steps 1..6
        assert all(torch.equal(masks[n], ~zeros[n]) for n in NAMES)
    assert all(masks[n].all() for masks in history[6:] for n in NAMES)  # released at step 7
    assert all(torch.count_nonzero(params[n][zeros[n]]) > 0 for n in NAMES)  # zeros then regrew
    assert modifier.state_dict() == {"phase": "released"}


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="init_sparsity"):
        MagnitudePruning(params=["w"], init_sparsity=0.6, final_sparsity=0.5)
    with pytest.raises(ValidationError, match="2:4"):
        MagnitudePruning(params=["w"], final_sparsity=0.7, structure={"n": 2, "m": 4})
    with pytest.raises(ValidationError):
        MagnitudePruning(params=[], final_sparsity=0.5)
    with pytest.raises(ValidationError):
        MagnitudePruning(params=["w"], final_sparsity=0.5, update_every={"step": 0})
    with pytest.raises(ValidationError):
        MagnitudePruning(params=["w"], final_sparsity=0.5, leave_enabled=True)
    with pytest.raises(ValidationError, match=r"end \(epoch 2\) is before start \(epoch 3\)"):
        MagnitudePruning(params=["w"], final_sparsity=0.5, start=3, end=2)
    points = MagnitudePruning(
        params=["w"],
        final_sparsity=0.6,
        schedule=[{"at": 1, "sparsity": 0.3}, {"at": {"step": 9}, "sparsity": 0.6}],
    )
    assert points.schedule[1].at.step == 9
    assert MagnitudePruning.prunes and ConstantPruning.prunes
