"""The modifier contract: a Pydantic model of a modifier's settings plus a few lifecycle hooks.

A recipe lists modifiers by their registry name (``type``). A modifier class subclasses
``Modifier`` (one level; shared fields for pruners live in ``compressor.sparsity.pruner``), declares its
settings as Pydantic fields (unknown keys are rejected) and overrides the hooks it needs. The
session calls, in order:

    initialize(session)                       once, before the first step
    before_step(session) / after_step(session) around every optimizer step (session.step is the
                                              number of optimizer steps already taken)
    finalize(session)                          once, after the last step

Positions (``start``, ``end``) are epochs (float) or ``{step: N}``; the session turns them into
optimizer steps on integer boundaries (``to_step``: epochs rounded half up).

The window, decided here once for every modifier (``Modifier.resolve_window`` and its helpers):

    start_step = to_step(start); end_step = to_step(end), or the end of training when end is omitted
    active on [start_step, end_step): the optimizer steps start_step .. end_step - 1 run under the
        modifier (an optimizer swapped in, zeros held, the learning rate scheduled); at end_step it
        hands back
    updates at start_step, start_step + every, ... below end_step, then end_step: a schedule's last
        update, at end_step, reaches its final value (final sparsity, final lr); one that falls on
        the step where training ends fires in ``finalize``
    one-shot when start_step == end_step: no active steps, a single update at start_step

An update is due at a step when one of the update steps lies after the last update made and at or
before the step (``update_due``), so a resumed run that restores the last update step makes the
same updates as an uninterrupted one.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)

from compressor.core.errors import CompressorError
from compressor.core.schedules import UpdateSteps

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


class StepPosition(BaseModel):
    """A position given in optimizer steps: ``{step: 500}``."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0)


def _position(value: Any) -> float | StepPosition:
    """Accept an epoch (a number >= 0) or {step: N}; one clear message otherwise."""
    if isinstance(value, StepPosition):
        return value
    if isinstance(value, dict) and set(value) == {"step"}:
        step = value["step"]
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return StepPosition(step=step)
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise ValueError(f"expected an epoch (a number >= 0) or {{step: N}}, got {value!r}")


def _describe(value: float | StepPosition) -> str:
    return f"step {value.step}" if isinstance(value, StepPosition) else f"epoch {value:g}"


def _in_steps(position: float | StepPosition | None, step: int) -> str:
    """A position with the step it became: "epoch 1.5 = step 6", "step 6", "the end of training = ..."."""
    if isinstance(position, StepPosition):
        return f"step {step}"
    where = "the end of training" if position is None else _describe(position)
    return f"{where} = step {step}"


def _dump_position(value: float | StepPosition) -> float | dict[str, int]:
    return {"step": value.step} if isinstance(value, StepPosition) else value


#: An epoch (float >= 0) or ``{step: N}``.
Position = Annotated[float | StepPosition, PlainValidator(_position), PlainSerializer(_dump_position)]


def to_step(position: Position, steps_per_epoch: int) -> int:
    """The optimizer step at ``position``: exact for epochs (no float drift), rounded half up."""
    if isinstance(position, StepPosition):
        return position.step
    exact = Fraction(repr(float(position))) * steps_per_epoch
    return int(exact + Fraction(1, 2)) if exact >= 0 else 0


def same_unit_le(a: Position, b: Position) -> bool | None:
    """a <= b when both are epochs or both steps; None when the units differ (checked at run time)."""
    if isinstance(a, StepPosition) and isinstance(b, StepPosition):
        return a.step <= b.step
    if not isinstance(a, StepPosition) and not isinstance(b, StepPosition):
        return float(a) <= float(b)
    return None


class WindowError(CompressorError, ValueError):
    """A modifier's window cannot be placed in optimizer steps (end before start, or an end is
    needed and neither ``end`` nor the length of training is known)."""


def in_window(step: float, start: float, end: float | None) -> bool:
    """Whether ``step`` is in the active window [start, end) (end None: no end)."""
    return start <= step and (end is None or step < end)


def update_due(updates: Sequence[int], step: int, last: int | None) -> bool:
    """Whether an update is due at ``step``: one of the sorted ``updates`` lies in (last, step].

    ``last`` is the step of the last update made (None: none yet); keying on it, not on
    ``step in updates``, makes a resumed run (or a skipped step) catch up with the update it missed.
    """
    reached = last_at(updates, step)
    return reached is not None and (last is None or reached > last)


def last_at(updates: Sequence[int], step: int) -> int | None:
    """The last of the sorted ``updates`` at or before ``step`` (None: none); O(1) for a range or
    UpdateSteps of any length (a bisection would need ``len()``, which stops at ``sys.maxsize``)."""
    if isinstance(updates, UpdateSteps):
        return updates.last_at(step)
    if isinstance(updates, range) and updates.step > 0:
        if not updates or step < updates.start:
            return None
        return min(updates.start + (step - updates.start) // updates.step * updates.step, updates[-1])
    reached = bisect_right(updates, step)
    return updates[reached - 1] if reached else None


class Modifier(BaseModel):
    """Base of every modifier: validated settings, its window in steps, and no-op lifecycle hooks.

    The window (module doc): active on [start_step, end_step), updates at start_step,
    start_step + every, ..., end_step, one-shot when the two are equal. ``resolve_window`` places it
    in steps (the session calls it before ``initialize``; so does ``Modifier.initialize``); then
    ``window_steps``, ``start_step``, ``end_step``, ``active`` and ``update_steps`` answer from it, and
    ``update_due`` says whether an update is due, so no modifier computes a window of its own.

    Class attributes a modifier may set:
        prunes: it owns the masks of the parameters its ``params`` select (two pruners may not
            hold one parameter in overlapping windows).
        restructures: it changes the model's shapes (structured pruning removes channels).
        needs_gradients: it samples gradients (the memory preflight asks ``gradient_bytes``).
        one_shot: it acts once, at ``start``; ``end`` must be left unset or equal to ``start``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    prunes: ClassVar[bool] = False
    restructures: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False
    one_shot: ClassVar[bool] = False

    type: str
    start: Position = Field(default=0.0, description="epoch (float >= 0) or {step: N} where it starts")
    end: Position | None = Field(default=None, description="where it ends; None: the end of training")

    _span: tuple[int, int | None] | None = PrivateAttr(default=None)

    @field_validator("end")
    @classmethod
    def _end_not_before_start(cls, end: float | StepPosition | None, info: ValidationInfo) -> Any:
        start = info.data.get("start")
        if end is None or start is None:
            return end
        if cls.one_shot and _dump_position(end) != _dump_position(start):
            name = cls.model_fields["type"].default or cls.__name__
            raise ValueError(f"{name} is one-shot at `start`: leave `end` unset or equal to start")
        if same_unit_le(start, end) is False:
            raise ValueError(f"end ({_describe(end)}) is before start ({_describe(start)})")
        return end

    # ------------------------------------------------------------------ the window

    def resolve_window(self, session: Session) -> tuple[int, int | None]:
        """Place the window in ``session``'s optimizer steps and keep it: (start_step, end_step).

        ``end`` omitted is the end of training (``session.total_steps``; None where the session does
        not know it); a one-shot modifier ends where it starts. WindowError when end < start.
        """
        spe = session.steps_per_epoch
        start = to_step(self.start, spe)
        if self.one_shot:
            end: int | None = start
        elif self.end is not None:
            end = to_step(self.end, spe)
        else:
            end = session.total_steps
        if end is not None and end < start:
            raise WindowError(
                f"{self.type}: end ({_in_steps(self.end, end)}) is before start "
                f"({_in_steps(self.start, start)}) at {spe} steps per epoch"
            )
        self._span = (start, end)
        return self._span

    def _resolved(self) -> tuple[int, int | None]:
        if self._span is None:
            raise WindowError(f"{self.type}: its window is not resolved yet (call resolve_window(session))")
        return self._span

    @property
    def window_steps(self) -> tuple[int, int | None]:
        """(start_step, end_step) as ``resolve_window`` placed them (end_step None: not known)."""
        return self._resolved()

    @property
    def start_step(self) -> int:
        """The first step of the window (after ``resolve_window``)."""
        return self._resolved()[0]

    @property
    def end_step(self) -> int:
        """The step where the window ends; WindowError when neither ``end`` nor the length of
        training is known (after ``resolve_window``)."""
        end = self._resolved()[1]
        if end is None:
            raise WindowError(
                f"{self.type}: set `end` (the session does not know the length of training: "
                "give it total_epochs)"
            )
        return end

    def active(self, step: int) -> bool:
        """Whether the optimizer step ``step`` runs under this modifier: start_step <= step < end_step."""
        start, end = self._resolved()
        return in_window(step, start, end)

    def update_steps(self, every: int = 1) -> Sequence[int]:
        """The steps where a scheduled update fires: start_step, start_step + every, ... below
        end_step, then end_step (just start_step when one-shot); needs a known end."""
        if every < 1:
            raise WindowError(f"{self.type}: the update interval must be at least one step, got {every}")
        start, end = self.start_step, self.end_step
        return range(start, end + 1) if every == 1 else UpdateSteps(start, end, every)

    # ------------------------------------------------------------------ settings

    def parameter_patterns(self) -> list[str]:
        """The patterns of the parameters this modifier acts on (empty: none or all)."""
        return []

    def model_buffers(self, model: Any) -> dict[str, Any]:
        """Buffers this modifier keeps in ``model`` (a ``torch.nn.Module``), full name -> initial
        tensor (default none). The session registers them when it is built
        (``compressor.core.quantized.attach``), before a checkpoint is loaded into the model, so that
        the checkpoint fills them.
        """
        return {}

    def gradient_bytes(self, num_params: int) -> int:
        """Bytes of gradients it will hold at once for ``num_params`` selected weights (preflight)."""
        return 0

    def initialize(self, session: Session) -> None:
        """Called once before the first optimizer step (or after a resume); the base resolves the
        window (``resolve_window``), so an override calls ``super().initialize(session)`` first."""
        self.resolve_window(session)

    def before_step(self, session: Session) -> None:
        """Called before every optimizer step; gradients of the step are in ``.grad``."""

    def after_step(self, session: Session) -> None:
        """Called after every optimizer step; the session applies the masks once after all modifiers'
        ``after_step`` (a modifier sets masks, it does not apply them)."""

    def finalize(self, session: Session) -> None:
        """Called once after the last step."""

    def state_dict(self) -> dict[str, Any]:
        """Run-time state to checkpoint (settings come from the recipe)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
