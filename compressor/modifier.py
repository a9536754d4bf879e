"""The modifier contract: a Pydantic model of a modifier's settings plus a few lifecycle hooks.

A recipe lists modifiers by their registry name (``type``). A modifier class subclasses
``Modifier`` (one level; shared fields for pruners live in ``compressor.pruning``), declares its
settings as Pydantic fields (unknown keys are rejected) and overrides the hooks it needs. The
session calls, in order:

    initialize(session)                       once, before the first step
    before_step(session) / after_step(session) around every optimizer step (session.step is the
                                              number of optimizer steps already taken)
    finalize(session)                          once, after the last step

Positions (``start``, ``end``) are epochs (float) or ``{step: N}``; the session turns them into
optimizer steps on integer boundaries (``to_step``).
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
)

if TYPE_CHECKING:
    from .session import Session


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


class Modifier(BaseModel):
    """Base of every modifier: validated settings plus no-op lifecycle hooks.

    Class attributes a modifier may set:
        prunes: it owns the masks of the parameters its ``params`` select (two pruners may not
            hold one parameter in overlapping windows).
        restructures: it changes the model's shapes (structured pruning removes channels).
        needs_gradients: it samples gradients (the memory preflight asks ``gradient_bytes``).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    prunes: ClassVar[bool] = False
    restructures: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False

    type: str
    start: Position = Field(default=0.0, description="epoch (float >= 0) or {step: N} where it starts")
    end: Position | None = Field(default=None, description="where it ends; None: the end of training")

    @field_validator("end")
    @classmethod
    def _end_not_before_start(cls, end: float | StepPosition | None, info: ValidationInfo) -> Any:
        start = info.data.get("start")
        if end is not None and start is not None and same_unit_le(start, end) is False:
            raise ValueError(f"end ({_describe(end)}) is before start ({_describe(start)})")
        return end

    def parameter_patterns(self) -> list[str]:
        """The patterns of the parameters this modifier acts on (empty: none or all)."""
        return []

    def gradient_bytes(self, num_params: int) -> int:
        """Bytes of gradients it will hold at once for ``num_params`` selected weights (preflight)."""
        return 0

    def initialize(self, session: Session) -> None:
        """Called once before the first optimizer step (or after a resume)."""

    def before_step(self, session: Session) -> None:
        """Called before every optimizer step; gradients of the step are in ``.grad``."""

    def after_step(self, session: Session) -> None:
        """Called after every optimizer step."""

    def finalize(self, session: Session) -> None:
        """Called once after the last step."""

    def state_dict(self) -> dict[str, Any]:
        """Run-time state to checkpoint (settings come from the recipe)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
