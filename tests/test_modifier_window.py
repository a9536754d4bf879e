"""The window every modifier shares (compressor.core.modifier): placing start and end in steps, the
active steps [start, end), the update steps start, start + every, ..., end, and resuming mid-window."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import pytest
import torch
from pydantic import Field, ValidationError
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.modifier import Modifier, StepPosition, WindowError, in_window, update_due
from compressor.core.schedules import UpdateSteps
from compressor.lifecycle.session import Session
from modifiers.learning_rate import LearningRate
from modifiers.magnitude import ConstantPruning, MagnitudePruning
from modifiers.mfac_optimizer import MFACOptimizer


class Plain(Modifier):
    """A modifier with only the base's window."""

    type: Literal["Plain"] = "Plain"


class Once(Modifier):
    """A one-shot modifier."""

    one_shot: ClassVar[bool] = True
    type: Literal["Once"] = "Once"


class Trace(Modifier):
    """Records the hooks it sees (and whether it was initialized)."""

    type: Literal["Trace"] = "Trace"
    calls: list[Any] = Field(default_factory=list)

    def initialize(self, session: Session) -> None:
        super().initialize(session)
        self.calls.append("initialize")


class LengthOnly:
    """What ``resolve_window`` reads from a session."""

    def __init__(self, steps_per_epoch: int, total_steps: int | None) -> None:
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps


# ---------------------------------------------------------------------- placing the window


@pytest.mark.parametrize(
    ("start", "end", "spe", "total", "expected"),
    [
        (0, None, 4, 20, (0, 20)),  # end omitted: the end of training
        (0, None, 4, None, (0, None)),  # ... unknown length: open
        ({"step": 3}, {"step": 3}, 4, None, (3, 3)),
        ({"step": 3}, 2, 4, None, (3, 8)),  # mixed units
        (0.5, 1.5, 3, None, (2, 5)),  # 1.5 -> 2 and 4.5 -> 5 steps: rounded half up
        (0.1, 0.2, 10, None, (1, 2)),  # 0.1 * 10 is exactly 1 (no float drift)
        (1.25, 1.3, 2, None, (3, 3)),  # 2.5 -> 3, 2.6 -> 3: one shot after rounding
    ],
)
def test_positions_become_steps(start, end, spe, total, expected):
    modifier = Plain(start=start, end=end)
    assert modifier.resolve_window(LengthOnly(spe, total)) == expected
    assert modifier.window_steps == expected and modifier.start_step == expected[0]


def test_an_end_before_start_after_conversion_is_a_window_error():
    with pytest.raises(WindowError, match=r"end \(step 5\) is before start \(epoch 2 = step 8\) at 4 steps"):
        Plain(start=2, end={"step": 5}).resolve_window(LengthOnly(4, None))
    late = r"end \(the end of training = step 12\) is before start \(epoch 4 = step 16\)"
    with pytest.raises(WindowError, match=late):
        Plain(start=4).resolve_window(LengthOnly(4, 12))
    assert issubclass(WindowError, CompressorError) and issubclass(WindowError, ValueError)


def test_an_open_end_is_refused_only_where_an_end_is_needed():
    modifier = Plain(start={"step": 2})
    modifier.resolve_window(LengthOnly(4, None))
    assert modifier.active(2) and modifier.active(10**9) and not modifier.active(1)
    with pytest.raises(WindowError, match="set `end`"):
        _ = modifier.end_step
    with pytest.raises(WindowError, match="set `end`"):
        modifier.update_steps(1)


def test_the_window_must_be_resolved_first():
    with pytest.raises(WindowError, match="not resolved"):
        Plain().active(0)


def test_one_shot_ends_where_it_starts():
    modifier = Once(start=1.5)
    assert modifier.resolve_window(LengthOnly(2, 100)) == (3, 3)
    assert list(modifier.update_steps(5)) == [3] and not modifier.active(3)
    assert Once(start={"step": 2}, end={"step": 2}).end == StepPosition(step=2)  # end == start: allowed
    assert Once(start=1, end=1.0).end == 1.0
    with pytest.raises(ValidationError, match="Once is one-shot at `start`"):
        Once(start=1, end=2)
    with pytest.raises(ValidationError, match="one-shot"):
        Once(start=1, end={"step": 4})  # another unit is refused even where it would convert equal


# ---------------------------------------------------------------------- active steps and updates


def test_active_is_start_inclusive_end_exclusive():
    modifier = Plain(start={"step": 2}, end={"step": 5})
    modifier.resolve_window(LengthOnly(4, None))
    assert [s for s in range(8) if modifier.active(s)] == [2, 3, 4]
    assert in_window(2.0, 2.0, 5.0) and not in_window(5.0, 2.0, 5.0) and in_window(7.5, 2.0, None)


@pytest.mark.parametrize(
    ("start", "end", "every", "expected"),
    [
        (2, 10, 3, [2, 5, 8, 10]),  # the last update at end even off the interval
        (2, 8, 3, [2, 5, 8]),
        (4, 4, 3, [4]),  # one shot
        (2, 5, 1, [2, 3, 4, 5]),
    ],
)
def test_update_steps_run_from_start_to_end(start, end, every, expected):
    modifier = Plain(start={"step": start}, end={"step": end})
    modifier.resolve_window(LengthOnly(4, None))
    assert list(modifier.update_steps(every)) == expected
    with pytest.raises(WindowError, match="at least one step"):
        modifier.update_steps(0)


def test_update_due_keys_on_the_last_update():
    updates = [2, 5, 8]
    assert [s for s in range(10) if update_due(updates, s, s - 1 if s else None)] == [2, 5, 8]
    assert not update_due(updates, 1, None)
    assert update_due(updates, 6, 2)  # step 5 was missed (a resume, a skipped step): due at 6
    assert not update_due(updates, 7, 6)  # ... and only once
    assert not update_due(updates, 12, 8)  # after the last
    assert update_due(range(3, 10**12), 10**11, 10**11 - 1)  # a range works (no list of every step)
    assert update_due(range(3, 10**30), 10**29, 10**29 - 1)  # beyond sys.maxsize items too (no len())
    assert not update_due(range(3, 10**30), 2, None)
    assert update_due(UpdateSteps(3, 10**30, 7), 10**29, 3) and not update_due(
        UpdateSteps(3, 10**30, 7), 4, 3
    )


# ---------------------------------------------------------------------- modifiers in a Session


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)) for _ in range(steps)
    ]


def _step(session: Session, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    session.optimizer.zero_grad()
    x, y = batch
    nn.functional.cross_entropy(session.model(x), y).backward()
    session.optimizer_step()


def _run(
    modifiers: list[Modifier], steps: int, *, spe: int = 4, total_epochs: float | None = None
) -> tuple[Session, list[tuple[int, str, float]]]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logs: list[tuple[int, str, float]] = []
    session = Session(
        modifiers,
        model,
        opt,
        steps_per_epoch=spe,
        total_epochs=total_epochs,
        metrics=lambda *r: logs.append(r),
    )
    for batch in _batches(steps):
        _step(session, batch)
    session.finalize()
    return session, logs


def _updates(logs: list[tuple[int, str, float]]) -> list[int]:
    return [step for step, name, _ in logs if name == "sparsity"]


def _pruner(**window: Any) -> MagnitudePruning:
    return MagnitudePruning(params=["0.weight"], init_sparsity=0.2, final_sparsity=0.75, **window)


def test_one_shot_pruning_updates_once_at_start():
    session, logs = _run([_pruner(start={"step": 3}, end={"step": 3})], steps=6)
    assert _updates(logs) == [3]
    assert session.masks.sparsity("0.weight") == 0.75


def test_step_positions_and_end_before_the_end_of_training():
    session, logs = _run([_pruner(start={"step": 1}, end={"step": 6}, update_every={"step": 2})], steps=8)
    assert _updates(logs) == [1, 3, 5, 6]
    assert session.masks.sparsity("0.weight") == 0.75


def test_end_at_the_last_step_updates_in_before_step_and_not_again():
    session, logs = _run(
        [_pruner(start=0, end={"step": 7}, update_every={"step": 3})], steps=8, total_epochs=2
    )
    assert _updates(logs) == [0, 3, 6, 7]  # step 7 is the last optimizer step (8 in all)
    assert session.masks.sparsity("0.weight") == 0.75


def test_end_omitted_updates_at_the_end_of_training_in_finalize():
    session, logs = _run([_pruner(update_every={"step": 3})], steps=8, total_epochs=2)
    assert _updates(logs) == [0, 3, 6, 8]  # step 8: no optimizer step, the update fires in finalize
    assert session.masks.sparsity("0.weight") == 0.75


def test_an_end_after_training_warns_that_final_sparsity_is_not_reached():
    with pytest.warns(UserWarning, match=r"after the end of training \(step 8\).*final_sparsity 0.75"):
        session, logs = _run([_pruner(end={"step": 12}, update_every={"step": 3})], steps=8, total_epochs=2)
    assert _updates(logs) == [0, 3, 6]  # steps 9 and 12 never come
    assert session.masks.sparsity("0.weight") < 0.75
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within training: no warning
        _run([_pruner(end={"step": 8}, update_every={"step": 3})], steps=8, total_epochs=2)


def test_end_omitted_without_the_length_of_training_is_refused_before_any_initialize():
    first = Trace(calls=[])
    with pytest.raises(WindowError, match="MagnitudePruning: set `end`"):
        _run([first, _pruner()], steps=1)
    with pytest.raises(WindowError, match="before start"):  # a bad window fails before any side effect
        _run([first, Plain(start=2, end={"step": 1})], steps=1)
    assert first.calls == ["initialize"]  # only by the first run, whose window error came later


def test_epoch_positions_off_integer_steps():
    # 3 steps per epoch: start 0.5 -> 1.5 -> step 2, end 1.5 -> 4.5 -> step 5, every 0.5 -> 2 steps
    session, logs = _run([_pruner(start=0.5, end=1.5, update_every=0.5)], steps=7, spe=3)
    assert _updates(logs) == [2, 4, 5]
    assert session.masks.sparsity("0.weight") == 0.75


def test_learning_rate_schedules_its_window_and_sets_the_final_value_at_end():
    schedule = LearningRate(kind="linear_warmup", value=0.4, start={"step": 1}, end={"step": 5})
    _, logs = _run([schedule], steps=8)
    lrs = [(step, value) for step, name, value in logs if name == "lr"]
    assert lrs == [(s, pytest.approx(0.1 * (s - 1))) for s in range(1, 6)]  # [1, 5): the ramp; 5: final
    one_shot = LearningRate(kind="cosine", value=0.4, final=0.01, start={"step": 2}, end={"step": 2})
    session, logs = _run([one_shot], steps=4)
    assert [(s, v) for s, n, v in logs if n == "lr"] == [(2, pytest.approx(0.01))]
    assert session.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_optimizer_swap_and_constant_pruning_are_active_on_start_to_end():
    class Probe(Modifier):
        type: Literal["Probe"] = "Probe"
        seen: list[Any] = Field(default_factory=list)

        def before_step(self, session: Session) -> None:
            self.seen.append(session.optimizer is not session.base_optimizer)

    probe = Probe(seen=[])
    swap = MFACOptimizer(lr=0.01, num_grads=2, damp=1e-2, start={"step": 2}, end={"step": 5})
    _run([swap, probe], steps=7)
    assert [s for s, swapped in enumerate(probe.seen) if swapped] == [2, 3, 4]

    hold = ConstantPruning(params=["0.weight"], start={"step": 2}, end={"step": 5})
    _, logs = _run([hold], steps=7)
    assert _updates(logs) == [2] and hold.state_dict() == {"phase": "released"}
    empty = ConstantPruning(params=["0.weight"], start={"step": 2}, end={"step": 2})
    _, logs = _run([empty], steps=4)
    assert _updates(logs) == [] and empty.state_dict() == {"phase": "waiting"}  # holds nothing


# ---------------------------------------------------------------------- resume mid-window


def _recipe() -> list[Modifier]:
    return [
        MagnitudePruning(
            params=["0.weight"], init_sparsity=0.1, final_sparsity=0.7, start=0.25, end=1.75, update_every=0.5
        ),
        LearningRate(kind="cosine", value=0.2, final=0.02, start={"step": 2}, end={"step": 9}),
        ConstantPruning(params=["2.weight"], start={"step": 3}, end={"step": 8}),
    ]


def _fresh(logs: list[tuple[int, str, float]]) -> Session:
    """A new model (with zeros in 2.weight for ConstantPruning to hold), optimizer and session."""
    model = _model()
    with torch.no_grad():
        model[2].weight[:, :3] = 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Session(
        _recipe(), model, opt, steps_per_epoch=4, total_epochs=2.5, metrics=lambda *r: logs.append(r)
    )


@pytest.mark.parametrize("stop", [1, 3, 4, 6])  # at and between updates (steps 1, 3, 5, 7)
def test_resume_mid_window_makes_the_same_updates(stop):
    batches = _batches(10)
    reference_logs: list[tuple[int, str, float]] = []
    reference = _fresh(reference_logs)
    for batch in batches:
        _step(reference, batch)
    reference.finalize()
    # MagnitudePruning at 1, 3, 5, 7 (0.25 .. 1.75 epochs, every 0.5); ConstantPruning captures at 3
    assert _updates(reference_logs) == [1, 3, 3, 5, 7]

    logs: list[tuple[int, str, float]] = []
    first = _fresh(logs)
    for batch in batches[:stop]:
        _step(first, batch)
    saved = {
        "model": first.model.state_dict(),
        "opt": first.optimizer.state_dict(),
        "session": first.state_dict(),
    }
    second = _fresh(logs)  # fresh modifiers too: only the state dicts carry over
    second.model.load_state_dict(saved["model"])
    second.optimizer.load_state_dict(saved["opt"])
    second.load_state_dict(saved["session"])
    for batch in batches[stop:]:
        _step(second, batch)
    second.finalize()

    assert logs == reference_logs
    assert second.state_dict() == reference.state_dict()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
