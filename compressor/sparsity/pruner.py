"""Shared base of scheduled pruners: settings, update steps, mask selection; subclasses give scores.

At each update step (the base ``Modifier.update_steps``: start, start + update_every, ..., end; or
the steps of the schedule's points) ``before_step`` computes the target sparsity from the schedule,
asks ``scores`` for per-weight importances, selects new masks (pruned weights stay pruned), lets
``update_weights`` adjust the kept weights (OBS does), and stores the masks. The last update, at
``end``, reaches ``final_sparsity``; when ``end`` is the step where training ends it fires in
``finalize``. start == end prunes in one shot. After ``end`` the masks stay in force: the session
applies them after every step (pruners do not apply them themselves).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from compressor.core.modifier import (
    Modifier,
    Position,
    StepPosition,
    WindowError,
    last_at,
    to_step,
    update_due,
)
from compressor.core.params import match_params
from compressor.core.schedules import sparsity_at
from compressor.sparsity.patterns import NM, Structure, nm_problem, select_masks, validate

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


class SchedulePoint(BaseModel):
    """From ``at`` (an absolute epoch or {step: N}) on, the target is ``sparsity``."""

    model_config = ConfigDict(extra="forbid")
    at: Position
    sparsity: float = Field(ge=0.0, le=1.0)


class PruningModifier(Modifier):
    """Gradual pruning of ``params`` from ``init_sparsity`` to ``final_sparsity`` over [start, end]."""

    prunes: ClassVar[bool] = True

    params: list[str] = Field(min_length=1, description="exact names, globs or re: patterns")
    init_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="target at start")
    final_sparsity: float = Field(ge=0.0, lt=1.0, description="target at end (fraction of zero weights)")
    schedule: Literal["cubic", "linear", "constant"] | list[SchedulePoint] = "cubic"
    update_every: Position = Field(1.0, description="epochs or {step: N} between updates")
    structure: Structure = "unstructured"
    global_ranking: bool = Field(True, description="one threshold over all params (else one per param)")

    _names: list[str] = PrivateAttr(default_factory=list)
    _steps: Sequence[int] = PrivateAttr(default_factory=list)
    _last_update: int | None = PrivateAttr(default=None)

    # Cross-field rules as field validators, so that errors point at the field that is wrong.
    @field_validator("final_sparsity")
    @classmethod
    def _final_not_below_init(cls, final: float, info: ValidationInfo) -> float:
        init = info.data.get("init_sparsity")
        if init is not None and init > final:
            raise ValueError(f"final_sparsity {final} is below init_sparsity {init}")
        return final

    @field_validator("update_every")
    @classmethod
    def _positive_interval(cls, every: float | StepPosition) -> float | StepPosition:
        if (every.step if isinstance(every, StepPosition) else every) <= 0:
            raise ValueError("update_every must be > 0")
        return every

    @field_validator("structure")
    @classmethod
    def _nm_sparsity(cls, structure: Structure, info: ValidationInfo) -> Structure:
        problem = None
        if isinstance(structure, NM):
            problem = nm_problem(structure.n, structure.m, info.data.get("final_sparsity"))
        if problem is not None:
            raise ValueError(problem)
        return structure

    @field_validator("schedule")
    @classmethod
    def _points_rise_to_final(cls, schedule: Any, info: ValidationInfo) -> Any:
        if isinstance(schedule, list):
            if not schedule:
                raise ValueError("a schedule given as points needs at least one point")
            values = [p.sparsity for p in schedule]
            final = info.data.get("final_sparsity")
            if values != sorted(values) or (final is not None and values[-1] != final):
                raise ValueError("schedule points must not decrease and must end at final_sparsity")
        return schedule

    def parameter_patterns(self) -> list[str]:
        return list(self.params)

    # ------------------------------------------------------------------ to implement

    def scores(self, session: Session, names: list[str]) -> dict[str, torch.Tensor]:
        """Importance of each weight (param shape; higher: keep). Subclasses implement."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores()")

    def update_weights(self, session: Session, names: list[str], masks: dict[str, torch.Tensor]) -> None:
        """Hook before the new ``masks`` are stored (OBS moves the kept weights here). Default: none."""

    # ------------------------------------------------------------------ schedule

    def _points(self, steps_per_epoch: int) -> list[tuple[int, float]] | None:
        if not isinstance(self.schedule, list):
            return None
        return [(to_step(p.at, steps_per_epoch), p.sparsity) for p in self.schedule]

    def target_at(self, step: int, steps_per_epoch: int) -> float:
        """Target sparsity at ``step``: init before start, final from end on (call after ``initialize``)."""
        start, end = self.start_step, self.end_step
        kind = self._points(steps_per_epoch) or self.schedule
        return sparsity_at(min(step, end), start, end, self.init_sparsity, self.final_sparsity, kind)

    @property
    def names(self) -> list[str]:
        """The normalized names of the pruned parameters (after ``initialize``)."""
        return list(self._names)

    # ------------------------------------------------------------------ hooks

    def initialize(self, session: Session) -> None:
        self._names = match_params(self.params, session.params)
        for name in self._names:
            validate(name, session.params[name].shape, self.structure)
        super().initialize(session)
        start, end = self.start_step, self.end_step
        points = self._points(session.steps_per_epoch)
        if points is not None:
            outside = [at for at, _ in points if not start <= at <= end]
            if outside:
                raise WindowError(f"{self.type}: schedule points at steps {outside} outside [{start}, {end}]")
            self._steps = sorted({at for at, _ in points})
        else:
            self._steps = self.update_steps(max(1, to_step(self.update_every, session.steps_per_epoch)))
        total = session.total_steps
        if total is not None and self._steps and self._steps[-1] > total:
            last = last_at(self._steps, total)
            last = start if last is None else last
            reached = self.target_at(last, session.steps_per_epoch)
            warnings.warn(
                f"{self.type}: its last update (step {self._steps[-1]}) comes after the end of training "
                f"(step {total}), so final_sparsity {self.final_sparsity:g} is not reached (about "
                f"{reached:.3g} is); set `end` within training",
                UserWarning,
                stacklevel=2,
            )

    def _due(self, step: int) -> bool:
        return update_due(self._steps, step, self._last_update)

    def before_step(self, session: Session) -> None:
        if self._due(session.step):
            self.update(session)

    def finalize(self, session: Session) -> None:
        if self._due(session.step):  # an update at the step where training ends
            self.update(session)

    def update(self, session: Session) -> None:
        """Prune to the target at ``session.step``: score, select, adjust weights, store, log."""
        names = self._names
        target = self.target_at(session.step, session.steps_per_epoch)
        current = {n: session.masks.mask(n) for n in names}
        new = self.new_masks(session, names, target, current)
        for name in names:
            session.masks.set(name, new[name])
        kept = sum(int(new[n].sum()) for n in names)
        total = sum(new[n].numel() for n in names)
        session.log("sparsity", 1.0 - kept / total)
        for name in names:
            session.log(f"sparsity/{name}", session.masks.sparsity(name))
        self._last_update = session.step

    def new_masks(
        self, session: Session, names: list[str], target: float, current: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The masks of the update to ``target`` (pruned weights stay pruned): ``scores``, then
        ``select_masks``, then ``update_weights``. Layer-wise pruners override it."""
        structures = dict.fromkeys(names, self.structure)
        new = select_masks(self.scores(session, names), target, structures, self.global_ranking, current)
        self.update_weights(session, names, new)
        return new

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"last_update_step": self._last_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_update = state.get("last_update_step")
