"""LearningRate: the value at each step for every kind, validation, and composition with MFACOptimizer."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytest
import torch
from pydantic import Field, ValidationError
from torch import nn

from compressor.core import registry
from compressor.core.modifier import Modifier
from compressor.lifecycle.session import Session
from compressor.recipe import RecipeError, parse_recipe
from modifiers.learning_rate import LearningRate
from modifiers.mfac_optimizer import MFACOptimizer

BASE_LR = 0.5


class Probe(Modifier):
    """Records, at before_step: (step, which optimizer steps, its lr)."""

    type: Literal["Probe"] = "Probe"
    seen: list[Any] = Field(default_factory=list)

    def before_step(self, session: Session) -> None:
        opt = session.optimizer
        kind = "base" if opt is session.base_optimizer else "mfac"
        self.seen.append((session.step, kind, opt.param_groups[0]["lr"]))


def _run(
    modifiers: list[Modifier], steps: int = 8, total_epochs: float | None = None
) -> tuple[Session, Probe]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    base = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=BASE_LR)
    probe = Probe()
    session = Session([*modifiers, probe], model, base, steps_per_epoch=4, total_epochs=total_epochs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        session.optimizer.zero_grad()
        x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 2, (6,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        session.optimizer_step()
    session.finalize()
    return session, probe


def _lrs(probe: Probe) -> list[float]:
    return [lr for _, _, lr in probe.seen]


COS = [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(kind="constant", value=0.1), [0.1] * 6),
        (dict(kind="step", value=0.1, gamma=0.5, every={"step": 2}), [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]),
        (dict(kind="step", value=0.1, gamma=0.5, every=0.5), [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]),  # epochs
        (dict(kind="linear_warmup", value=0.1), [0.0, 0.025, 0.05, 0.075, 0.1, 0.1]),
        (dict(kind="linear_warmup", value=0.1, init=0.02), [0.02, 0.04, 0.06, 0.08, 0.1, 0.1]),
        (dict(kind="cosine", value=0.1), [*COS, COS[-1]]),
        (dict(kind="cosine", value=0.1, final=0.02), [0.02 + 0.8 * c for c in COS] + [0.02]),
    ],
)
def test_values_at_each_step(settings, expected):
    lr = LearningRate(start={"step": 2}, end=1.5, **settings)  # [step 2, step 6]: end included
    session, probe = _run([lr])
    assert _lrs(probe) == pytest.approx([BASE_LR, BASE_LR, *expected], abs=1e-12)
    assert all(g["lr"] == pytest.approx(expected[-1]) for g in session.base_optimizer.param_groups)


def test_end_none_runs_to_the_end_of_training():
    _, probe = _run([LearningRate(kind="cosine", value=0.1, start={"step": 4})], total_epochs=2.0)
    assert _lrs(probe)[4:] == pytest.approx(
        [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2]
    )
    with pytest.raises(ValueError, match="needs an end"):
        _run([LearningRate(kind="cosine", value=0.1)])
    _, probe = _run([LearningRate(kind="step", value=0.1, gamma=0.1, every={"step": 4})])
    assert _lrs(probe) == pytest.approx([0.1] * 4 + [0.01] * 4)


def test_every_below_one_step_is_refused_at_initialize():
    with pytest.raises(ValueError, match="less than one optimizer step"):
        _run([LearningRate(kind="step", value=0.1, gamma=0.5, every=0.1)], steps=1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(kind="constant", value=0.0), "greater than 0"),
        (dict(kind="constant", value=float("nan")), "finite"),
        (dict(kind="step", value=0.1, every=1), "needs gamma"),
        (dict(kind="step", value=0.1, gamma=0.5), "needs every"),
        (dict(kind="step", value=0.1, gamma=0.0, every=1), "greater than 0"),
        (dict(kind="step", value=0.1, gamma=1.5, every=1), "less than or equal to 1"),
        (dict(kind="step", value=0.1, gamma=0.5, every={"step": 0}), "every must be > 0"),
        (dict(kind="cosine", value=0.1, init=0.0), "init does not apply to kind 'cosine'"),
        (dict(kind="linear_warmup", value=0.1, final=0.0), "final does not apply"),
        (dict(kind="constant", value=0.1, gamma=0.5), "gamma does not apply"),
        (dict(kind="cosine", value=0.1, final=-0.1), "greater than or equal to 0"),
        (dict(kind="exponential", value=0.1), "kind"),
    ],
)
def test_settings_are_validated(settings, message):
    with pytest.raises(ValidationError, match=message):
        LearningRate(**settings)


def test_recipe_errors_point_at_the_line():
    registry.register("modifiers", "LearningRate", LearningRate)
    try:
        text = "version: 1\nmodifiers:\n  - type: LearningRate\n    kind: cosine\n    value: 0.1\n"
        text += "    gamma: 0.5\n"
        with pytest.raises(RecipeError) as err:
            parse_recipe(text, "r.yaml")
        assert str(err.value).startswith("r.yaml:6:")
        assert "gamma does not apply to kind 'cosine'" in str(err.value)
    finally:
        registry.unregister("modifiers", "LearningRate")


def test_composed_with_mfac_acts_on_the_current_optimizer():
    mfac = MFACOptimizer(lr=0.3, num_grads=2, damp=1e-2, start={"step": 2}, end={"step": 5})
    schedule = LearningRate(kind="linear_warmup", value=0.04, start={"step": 1}, end={"step": 5})
    session, probe = _run([mfac, schedule])  # the schedule listed after the swap
    assert [kind for _, kind, _ in probe.seen] == ["base"] * 2 + ["mfac"] * 3 + ["base"] * 3
    assert _lrs(probe) == pytest.approx([BASE_LR, 0.0, 0.01, 0.02, 0.03, 0.04, 0.04, 0.04])
    # The base optimizer kept the lr of step 1 while M-FAC was active, then got the schedule back.
    assert session.base_optimizer.param_groups[1]["lr"] == pytest.approx(0.04)

    mfac = MFACOptimizer(lr=0.3, num_grads=2, damp=1e-2, start={"step": 2}, end={"step": 5})
    schedule = LearningRate(kind="linear_warmup", value=0.04, start={"step": 1}, end={"step": 5})
    # Listed before: at the swap step the schedule sets the base optimizer's lr and M-FAC steps with its
    # own; at the hand-back step it sets M-FAC's, and the base optimizer steps with the lr of step 2.
    _, probe = _run([schedule, mfac])
    assert [lr for _, _, lr in probe.seen[2:6]] == pytest.approx([0.3, 0.02, 0.03, 0.01])


def test_an_lr_of_zero_leaves_mfac_parameters_unchanged():
    mfac = MFACOptimizer(lr=0.3, num_grads=2, damp=1e-2, start={"step": 1}, end={"step": 3})
    schedule = LearningRate(kind="linear_warmup", value=0.04, start={"step": 1}, end={"step": 3})

    class Snapshot(Modifier):
        type: Literal["Snapshot"] = "Snapshot"
        moved: list[bool] = Field(default_factory=list)
        _before: Any = None

        def before_step(self, session: Session) -> None:
            self._before = [p.detach().clone() for p in session.model.parameters()]

        def after_step(self, session: Session) -> None:
            after = list(session.model.parameters())
            self.moved.append(any(not torch.equal(a, b) for a, b in zip(after, self._before, strict=True)))

    snap = Snapshot()
    _run([mfac, schedule, snap], steps=3)
    assert snap.moved == [True, False, True]  # step 1: M-FAC with the warm-up's lr 0
