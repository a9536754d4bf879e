"""The lifecycle: hook order, the optimizer wrapper, errors for events out of order, DDP names,
the gradient sampler and its memory preflight, and checkpoints."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import pytest
import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from compressor.core import registry
from compressor.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from compressor.core.masks import MaskSet
from compressor.core.modifier import Modifier
from compressor.core.preflight import PreflightError, preflight
from compressor.lifecycle.sampling import GradientSampler
from compressor.lifecycle.session import LifecycleError, Session
from modifiers.magnitude import ConstantPruning, MagnitudePruning


class Recorder(Modifier):
    """Records the hooks it sees with the session's step."""

    type: Literal["Recorder"] = "Recorder"
    calls: list[Any] = Field(default_factory=list)

    def initialize(self, session: Session) -> None:
        self.calls.append(("initialize", session.step))

    def before_step(self, session: Session) -> None:
        self.calls.append(("before", session.step))

    def after_step(self, session: Session) -> None:
        self.calls.append(("after", session.step))

    def finalize(self, session: Session) -> None:
        self.calls.append(("finalize", session.step))


def _setup(gen: torch.Generator, modifiers: list[Modifier]) -> tuple[torch.nn.Module, Session, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session = Session(modifiers, model, opt, steps_per_epoch=4)
    return model, session, opt


def _backward(model: torch.nn.Module, gen: torch.Generator) -> None:
    x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def test_wrapped_optimizer_runs_hooks_in_order(gen):
    rec = Recorder(calls=[])
    model, session, opt = _setup(gen, [rec])
    wrapped = session.wrap(opt)
    assert wrapped.param_groups is opt.param_groups  # everything else is delegated
    for _ in range(3):
        wrapped.zero_grad()
        _backward(model, gen)
        wrapped.step()
    session.finalize()
    assert rec.calls == [
        ("initialize", 0),
        ("before", 0),
        ("after", 0),
        ("before", 1),
        ("after", 1),
        ("before", 2),
        ("after", 2),
        ("finalize", 3),
    ]
    assert session.step == 3 and session.epoch == 0.75


def test_events_out_of_order_are_refused(gen):
    _model, session, _opt = _setup(gen, [Recorder(calls=[])])
    with pytest.raises(LifecycleError, match="after_step\\(\\) without before_step"):
        session.after_step()
    session.before_step()
    with pytest.raises(LifecycleError, match="twice"):
        session.before_step()
    with pytest.raises(LifecycleError, match="between"):
        session.finalize()
    session.after_step()
    session.finalize()
    with pytest.raises(LifecycleError, match="after finalize"):
        session.before_step()
    with pytest.raises(LifecycleError, match="twice"):
        session.finalize()


def test_bad_arguments_are_refused(gen):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Session([], model, opt, steps_per_epoch=0)
    with pytest.raises(TypeError, match="Recipe or a list"):
        Session("recipe.yaml", model, opt, steps_per_epoch=3)
    with pytest.raises(ValueError, match=r"matches no parameter|closest"):
        Session(
            [MagnitudePruning(type="MagnitudePruning", params=["fc9.weight"], final_sparsity=0.5)],
            model,
            opt,
            steps_per_epoch=3,
        )


def test_ddp_prefixed_names_match_plain_patterns(gen):
    class Wrapper(torch.nn.Module):  # what DDP looks like to named_parameters()
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    inner = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = Wrapper(inner)
    pruner = MagnitudePruning(
        type="MagnitudePruning", params=["0.weight"], start=0, end=0, final_sparsity=0.5
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    session = Session([pruner], model, opt, steps_per_epoch=2)
    wrapped = session.wrap(opt)
    _backward(model, gen)
    wrapped.step()
    assert abs(session.masks.sparsity("0.weight") - 0.5) < 1e-9
    assert float((inner[0].weight == 0).float().mean()) == pytest.approx(0.5)


def test_masked_weights_stay_zero_through_training(gen):
    pruner = MagnitudePruning(
        type="MagnitudePruning", params=["*.weight"], start=0, end=1, final_sparsity=0.7
    )
    model, session, opt = _setup(gen, [pruner])
    wrapped = session.wrap(opt)
    for _ in range(12):
        wrapped.zero_grad()
        _backward(model, gen)
        wrapped.step()
        for name in session.masks.names:
            weight = session.params[name]
            assert torch.all(weight[~session.masks.mask(name)] == 0)
    session.finalize()
    assert session.masks.global_sparsity() == pytest.approx(0.7, abs=1 / 192)  # 192 weights


def _three_pruners() -> list[Modifier]:
    """Two gradual pruners and a ConstantPruning, all active through the first steps."""
    return [
        MagnitudePruning(
            params=["0.weight"],
            end={"step": 4},
            update_every={"step": 2},
            init_sparsity=0.3,
            final_sparsity=0.6,
        ),
        MagnitudePruning(params=["2.weight"], end={"step": 3}, init_sparsity=0.3, final_sparsity=0.5),
        ConstantPruning(params=["0.bias"]),
    ]


def test_masks_are_applied_once_per_step(gen, monkeypatch):
    applied: list[int] = []
    original = MaskSet.apply

    def counted(self: MaskSet) -> None:
        applied.append(session.step)
        original(self)

    model, session, opt = _setup(gen, _three_pruners())
    monkeypatch.setattr(MaskSet, "apply", counted)
    wrapped = session.wrap(opt)
    for _ in range(6):
        wrapped.zero_grad()
        _backward(model, gen)
        wrapped.step()
    assert applied == list(range(6))  # once per step, by the session, with several pruners active
    session.finalize()
    assert applied == [*range(6), 6]  # and once when the session finalizes


def test_masked_weights_are_exact_zeros_after_every_step_with_two_pruners_and_momentum(gen):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    with torch.no_grad():
        model[0].bias[:5] = 0  # zeros for ConstantPruning to hold
    session = Session(_three_pruners(), model, opt, steps_per_epoch=4)
    for step in range(10):
        opt.zero_grad()
        _backward(model, gen)
        session.before_step()
        opt.step()
        session.after_step()
        for name in session.masks.names:
            masked = session.params[name][~session.masks.mask(name)]
            assert masked.numel() > 0 and torch.all(masked == 0), (step, name)
        assert opt.state[model[0].weight]["momentum_buffer"].abs().sum() > 0  # momentum moves weights
    session.finalize()
    assert session.masks.sparsity("0.weight") == pytest.approx(0.6, abs=1 / 128)
    assert session.masks.sparsity("2.weight") == pytest.approx(0.5)
    assert session.masks.sparsity("0.bias") == pytest.approx(5 / 16)


def test_registered_modifier_is_found_by_name():
    registry.register("modifiers", "Recorder", Recorder)
    try:
        assert registry.get("modifiers", "Recorder") is Recorder
        assert "Recorder" in registry.names("modifiers")
    finally:
        registry.unregister("modifiers", "Recorder")
    with pytest.raises(KeyError, match="did you mean 'MagnitudePruning'"):
        registry.get("modifiers", "MagnitudePrunin")


def test_gradient_sampler_matches_manual_gradients(gen):
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    data = TensorDataset(torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    stats = model[1].running_mean.clone()
    sampler = GradientSampler(model, data, seed=3)
    names = ["0.weight", "2.weight"]
    select = {
        "0.weight": torch.rand(6, 5, generator=gen) > 0.5,
        "2.weight": torch.ones(3, 6, dtype=torch.bool),
    }
    grads = sampler.sample(names, num_grads=4, batch_size=8, key=11, select=select)
    assert grads.shape == (4, int(select["0.weight"].sum()) + 18)
    assert model.training and torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert torch.equal(model[1].running_mean, stats)  # eval mode: batch-norm statistics untouched
    assert model[2].weight.grad is None
    batches = sampler._batches(8, 11)
    model.eval()
    for row in range(4):
        x, y = next(batches)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        expected = torch.cat([model[0].weight.grad[select["0.weight"]], model[2].weight.grad.reshape(-1)])
        torch.testing.assert_close(grads[row], expected)
    again = sampler.sample(names, num_grads=4, batch_size=8, key=11, select=select)
    assert torch.equal(again, grads)  # same key: same batches


def test_preflight_stops_with_estimate_and_suggestion():
    with pytest.raises(PreflightError, match=r"needs about 1\.0 GiB but only 512\.0 MiB.*lower num_grads"):
        preflight("pruner", 1 << 30, budget=512 << 20, suggestion="lower num_grads")
    preflight("pruner", 1 << 20, budget=512 << 20)


def test_checkpoint_round_trip_and_damage(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(5.0)}, "epoch": 3})
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.arange(5.0))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    raw = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or tampered"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a compressor checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------- the wrapped optimizer


class Swapper(Modifier):
    """Swaps ``other`` in over steps [start, end) (as MFACOptimizer swaps in M-FAC)."""

    type: Literal["Swapper"] = "Swapper"
    other: Any = None
    first: int = 0
    last: int = 0

    def before_step(self, session: Session) -> None:
        inside = self.first <= session.step < self.last
        session.swap_optimizer(self.other if inside else None)


def _scalar() -> tuple[torch.nn.Linear, torch.optim.SGD]:
    """A 1 -> 1 linear layer at weight 0 whose loss ``weight`` has gradient 1: a step moves it by -lr."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _unit_step(model: torch.nn.Linear, optimizer: torch.optim.Optimizer) -> float:
    """One step on loss = weight (gradient 1); the step's learning rate (minus the weight's change)."""
    before = float(model.weight.detach())
    optimizer.zero_grad()
    model.weight.sum().backward()
    optimizer.step()
    return before - float(model.weight.detach())


def test_wrap_returns_the_optimizer_itself(gen):
    rec = Recorder(calls=[])
    model, session, opt = _setup(gen, [rec])
    wrapped = session.wrap(opt)
    assert wrapped is opt and isinstance(wrapped, torch.optim.SGD)
    assert session.wrap() is opt  # wrapping again: the same object, hooks run once a step
    _backward(model, gen)
    opt.step()
    assert rec.calls == [("initialize", 0), ("before", 0), ("after", 0)] and session.step == 1
    with pytest.raises(ValueError, match="the optimizer the session was built with"):
        session.wrap(torch.optim.SGD(model.parameters(), lr=0.1))


SCHEDULERS = {
    "StepLR": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)),
    "LambdaLR": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (i + 1))),
    "OneCycleLR": (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=6)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("scheduler_first", [False, True])
def test_lr_schedulers_set_the_rate_the_wrapped_step_uses(name, scheduler_first):
    """The rates a scheduler sets are the ones the steps take, as without the session; no warning."""
    plain_model, plain = _scalar()
    plain_scheduler = SCHEDULERS[name](plain)
    expected = []
    for _ in range(6):
        expected.append(_unit_step(plain_model, plain))
        plain_scheduler.step()

    model, opt = _scalar()
    session = Session([Recorder(calls=[])], model, opt, steps_per_epoch=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        scheduler = SCHEDULERS[name](opt) if scheduler_first else None
        wrapped = session.wrap(opt)
        scheduler = scheduler or SCHEDULERS[name](wrapped)
        seen = []
        for _ in range(6):
            seen.append(_unit_step(model, wrapped))
            scheduler.step()
    assert seen == pytest.approx(expected, abs=1e-6) and len(set(seen)) > 1
    assert session.step == 6


def test_an_attribute_set_on_the_wrapped_optimizer_stays_on_it(gen):
    model, opt = _scalar()
    other = torch.optim.SGD(model.parameters(), lr=0.25)
    session = Session([Swapper(other=other, first=1, last=3)], model, opt, steps_per_epoch=4)
    wrapped = session.wrap(opt)
    rates = [_unit_step(model, wrapped) for _ in range(4)]  # the swapped-in one steps in [1, 3)
    assert rates == pytest.approx([0.1, 0.25, 0.25, 0.1], abs=1e-6)
    session.before_step()  # step 4: swap in again, then look at what an assignment changes
    session.swap_optimizer(other)
    wrapped.custom = "mine"
    wrapped.param_groups[0]["lr"] = 0.5
    session.after_step()
    assert not hasattr(other, "custom") and other.param_groups[0]["lr"] == 0.25
    assert opt.custom == "mine" and opt.param_groups[0]["lr"] == 0.5


def test_a_scheduler_drives_the_base_optimizer_while_another_is_swapped_in():
    model, opt = _scalar()
    other = torch.optim.SGD(model.parameters(), lr=0.25)
    session = Session([Swapper(other=other, first=2, last=4)], model, opt, steps_per_epoch=4)
    wrapped = session.wrap(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            rates.append(_unit_step(model, wrapped))
            scheduler.step()
    # the base's schedule runs on through the swap: 0.1, 0.05, (0.025, 0.0125 unused), 0.00625, ...
    assert rates == pytest.approx([0.1, 0.05, 0.25, 0.25, 0.1 / 16, 0.1 / 32], abs=1e-6)


def test_masks_and_closures_work_through_the_wrapped_optimizer(gen):
    pruner = MagnitudePruning(
        type="MagnitudePruning", params=["*.weight"], start=0, end=0, final_sparsity=0.5
    )
    model, session, opt = _setup(gen, [pruner])
    wrapped = session.wrap(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.9)
    x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)

    def closure() -> torch.Tensor:
        wrapped.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        assert isinstance(wrapped.step(closure), torch.Tensor)
        scheduler.step()
        for name in session.masks.names:
            assert torch.all(session.params[name][~session.masks.mask(name)] == 0)
    assert session.step == 3 and session.masks.global_sparsity() == pytest.approx(0.5, abs=0.01)
