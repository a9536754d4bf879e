"""Shared base of scheduled pruners: settings, update steps, mask selection; subclasses give scores.

At each update step (start, start + update_every, ..., end) ``before_step`` computes the target
sparsity from the schedule, asks ``scores`` for per-weight importances, selects new masks (pruned
weights stay pruned), lets ``update_weights`` adjust the kept weights (OBS does), and stores the
masks. An update whose step falls at or after the end of training fires in ``finalize``, so the
final sparsity is always reached. After ``end`` the masks stay in force (zeros are held).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from .mask_patterns import NM, Structure, nm_problem, select_masks, validate
from .modifier import Modifier, Position, StepPosition, to_step
from .params import match_params
from .schedules import sparsity_at, update_steps

if TYPE_CHECKING:
    from .session import Session


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
    _steps: list[int] = PrivateAttr(default_factory=list)
    _window: tuple[int, int] = PrivateAttr(default=(0, 0))
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
        """Target sparsity at ``step`` (call after ``initialize``)."""
        start, end = self._window
        kind = self._points(steps_per_epoch) or self.schedule
        return sparsity_at(step, start, end, self.init_sparsity, self.final_sparsity, kind)

    @property
    def names(self) -> list[str]:
        """The normalized names of the pruned parameters (after ``initialize``)."""
        return list(self._names)

    # ------------------------------------------------------------------ hooks

    def initialize(self, session: Session) -> None:
        self._names = match_params(self.params, session.params)
        for name in self._names:
            validate(name, session.params[name].shape, self.structure)
        spe = session.steps_per_epoch
        start = to_step(self.start, spe)
        if self.end is not None:
            end = to_step(self.end, spe)
        elif session.total_steps is not None:
            end = session.total_steps
        else:
            raise ValueError(f"{self.type}: set `end` (the session does not know the length of training)")
        if end < start:
            raise ValueError(f"{self.type}: end (step {end}) is before start (step {start})")
        self._window = (start, end)
        points = self._points(spe)
        if points is not None:
            outside = [at for at, _ in points if not start <= at <= end]
            if outside:
                raise ValueError(f"{self.type}: schedule points at steps {outside} outside [{start}, {end}]")
            self._steps = sorted({at for at, _ in points})
        else:
            self._steps = update_steps(start, end, max(1, to_step(self.update_every, spe)))

    def _due(self, step: int) -> bool:
        last = -1 if self._last_update is None else self._last_update
        return any(last < s <= step for s in self._steps)

    def before_step(self, session: Session) -> None:
        if self._due(session.step):
            self.update(session)

    def after_step(self, session: Session) -> None:
        session.masks.apply()

    def finalize(self, session: Session) -> None:
        if self._due(session.step):  # an update at the step where training ends
            self.update(session)

    def update(self, session: Session) -> None:
        """Prune to the target at ``session.step``: score, select, adjust weights, store, log."""
        names = self._names
        target = self.target_at(min(session.step, self._window[1]), session.steps_per_epoch)
        current = {n: session.masks.mask(n) for n in names}
        structures = dict.fromkeys(names, self.structure)
        new = select_masks(self.scores(session, names), target, structures, self.global_ranking, current)
        self.update_weights(session, names, new)
        for name in names:
            session.masks.set(name, new[name])
        kept = sum(int(new[n].sum()) for n in names)
        total = sum(new[n].numel() for n in names)
        session.log("sparsity", 1.0 - kept / total)
        for name in names:
            session.log(f"sparsity/{name}", session.masks.sparsity(name))
        self._last_update = session.step

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"last_update_step": self._last_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_update = state.get("last_update_step")
