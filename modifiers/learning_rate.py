"""LearningRate: a schedule for the learning rate of whatever optimizer is current.

The window is the base ``Modifier``'s: active on [start, end) (end None: to the end of training),
with an update at every step from start to end. At ``before_step`` of each of those steps it sets
``lr`` of every parameter group of ``session.optimizer`` to the schedule's value at
``session.step``: the steps of [start, end) run with the schedule's values, and the update at
``end`` (the schedule's last, as a pruner's last update reaches its final sparsity) sets the final
value, which stays. Before ``start`` and after ``end`` it leaves the lr alone. The value is a
function of the step alone and the last update step is in ``state_dict``, so a resumed run gets
exactly the learning rates of an uninterrupted one.

Kinds, with t = (step - start) / (end - start) (t = 1 when start == end):

    constant        value
    step            value * gamma ** floor((step - start) / every)     every: epochs or {step: N}
    linear_warmup   init + (value - init) * t                          init defaults to 0
    cosine          final + (value - final) * (1 + cos(pi t)) / 2      final defaults to 0

Composition with an optimizer swap (``MFACOptimizer``): the schedule acts on ``session.optimizer``,
so while M-FAC is active it sets M-FAC's lr. Modifiers run in recipe order: list ``LearningRate``
*after* the ``MFACOptimizer`` so that at the swap step (and at the hand-back step) it already acts on
the optimizer that steps; listed before, at those two steps it sets the lr of the one being swapped
out. To schedule the training and the M-FAC phases differently, use two LearningRate modifiers with
the windows of the two phases.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator

from compressor.core.modifier import Modifier, Position, StepPosition, WindowError, update_due

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session

Kind = Literal["constant", "step", "linear_warmup", "cosine"]

#: The settings each kind takes besides ``value`` (the others must be left unset).
KIND_FIELDS: dict[str, set[str]] = {
    "constant": set(),
    "step": {"gamma", "every"},
    "linear_warmup": {"init"},
    "cosine": {"final"},
}
REQUIRED = {"step": {"gamma", "every"}}


def lr_at(
    step: int,
    start: int,
    end: int | None,
    kind: Kind,
    value: float,
    *,
    gamma: float = 1.0,
    every: int = 1,
    init: float = 0.0,
    final: float = 0.0,
) -> float:
    """The learning rate at ``step`` (>= start) of a schedule over [start, end] (in steps)."""
    if kind == "constant":
        return value
    if kind == "step":
        return value * gamma ** ((step - start) // every)
    if end is None:
        raise ValueError(f"a '{kind}' schedule needs an end")
    t = 1.0 if end <= start else min(1.0, max(0.0, (step - start) / (end - start)))
    if kind == "linear_warmup":
        return init + (value - init) * t
    if kind == "cosine":
        return final + (value - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


class LearningRate(Modifier):
    """Set the lr of the current optimizer from a schedule over [start, end] (see the module doc)."""

    type: Literal["LearningRate"] = "LearningRate"
    kind: Kind = Field(description="constant, step, linear_warmup or cosine")
    value: float = Field(gt=0, allow_inf_nan=False, description="the lr (the peak, for warm-up and cosine)")
    gamma: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, validate_default=True, description="step: factor per interval"
    )
    every: Position | None = Field(
        None, validate_default=True, description="step: epochs or {step: N} between decays"
    )
    init: float | None = Field(
        None, ge=0, allow_inf_nan=False, validate_default=True, description="linear_warmup: lr at start"
    )
    final: float | None = Field(
        None, ge=0, allow_inf_nan=False, validate_default=True, description="cosine: lr at end"
    )

    _every_steps: int = PrivateAttr(default=1)
    _updates: Sequence[int] = PrivateAttr(default=())
    _last_update: int | None = PrivateAttr(default=None)

    @field_validator("gamma", "every", "init", "final")
    @classmethod
    def _fits_kind(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("kind")
        name = info.field_name
        if kind is None or name is None:
            return value
        if value is not None and name not in KIND_FIELDS[kind]:
            takes = ", ".join(sorted(KIND_FIELDS[kind])) or "nothing but value"
            raise ValueError(f"{name} does not apply to kind '{kind}' (it takes {takes})")
        if value is None and name in REQUIRED.get(kind, set()):
            raise ValueError(f"kind '{kind}' needs {name}")
        interval = value.step if isinstance(value, StepPosition) else value
        if name == "every" and interval is not None and interval <= 0:
            raise ValueError("every must be > 0")
        return value

    def initialize(self, session: Session) -> None:
        super().initialize(session)
        start, end = self.window_steps
        if self.kind in ("linear_warmup", "cosine") and end is None:
            raise WindowError(
                f"{self.type} '{self.kind}' needs an end: set end, or give the session total_epochs"
            )
        # every step from start to end; with no end known (constant and step kinds), from start on
        self._updates = self.update_steps(1) if end is not None else range(start, sys.maxsize)
        if self.kind == "step":
            assert self.every is not None  # checked by validation
            self._every_steps = session.to_step(self.every)
            if self._every_steps < 1:
                raise ValueError(
                    f"{self.type}: every ({self.every}) is less than one optimizer step "
                    f"at {session.steps_per_epoch} steps per epoch"
                )

    def value_at(self, step: int) -> float | None:
        """The lr this schedule sets at ``step`` (after ``initialize``), or None where it sets none
        (before start, after end)."""
        if step not in self._updates:
            return None
        start, end = self.window_steps
        return lr_at(
            step,
            start,
            end,
            self.kind,
            self.value,
            gamma=1.0 if self.gamma is None else self.gamma,
            every=self._every_steps,
            init=0.0 if self.init is None else self.init,
            final=0.0 if self.final is None else self.final,
        )

    def before_step(self, session: Session) -> None:
        if not update_due(self._updates, session.step, self._last_update):
            return
        self._last_update = session.step
        lr = self.value_at(min(session.step, self._updates[-1]))
        if lr is None:
            return
        for group in session.optimizer.param_groups:
            group["lr"] = lr
        session.log("lr", lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_update_step": self._last_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_update = state.get("last_update_step")
