"""Sparsity schedules: the target sparsity at a step, and the steps where pruning updates fire.

Kinds, with t = (step - start) / (end - start) clamped to [0, 1] (t = 1 from start on when
start == end, the one-shot case):

    "cubic"     s = final + (init - final) * (1 - t)^3     (Zhu & Gupta: fast early, flat late)
    "linear"    s = init + (final - init) * t
    "constant"  final from start on
    points      [(step, sparsity), ...]: piecewise constant, the last point at or before step

Before ``start`` every kind gives ``init``. Steps may be floats (epochs work the same way).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, overload

Kind = Literal["cubic", "linear", "constant"]
Points = Sequence[tuple[float, float]]


def _progress(step: float, start: float, end: float) -> float:
    """t in [0, 1]; a step function at ``start`` when start == end."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def sparsity_at(
    step: float, start_step: float, end_step: float, init: float, final: float, kind: Kind | Points
) -> float:
    """Target sparsity (fraction of zero weights) at ``step`` for the schedule ``kind``."""
    if not isinstance(kind, str):
        reached = [sparsity for at, sparsity in sorted(kind) if at <= step]
        return reached[-1] if reached else init
    if step < start_step:
        return init
    t = _progress(step, start_step, end_step)
    if kind == "cubic":
        return final + (init - final) * (1.0 - t) ** 3
    if kind == "linear":
        return init + (final - init) * t
    if kind == "constant":
        return final
    raise ValueError(f"unknown schedule {kind!r}; expected 'cubic', 'linear', 'constant' or a list of points")


def update_steps(start_step: int, end_step: int, every_steps: int) -> list[int]:
    """start, start + every, ... below end, then end: the steps where pruning updates fire."""
    return list(UpdateSteps(start_step, end_step, every_steps))


class UpdateSteps(Sequence[int]):
    """``update_steps(start, end, every)`` without the list: start, start + every, ... below end, then
    end, for a window of any length (``end: {step: 100000000000}`` lists nothing). Indexing, ``in``
    and ``last_at`` cost O(1); ``len()`` raises OverflowError beyond ``sys.maxsize`` items, as a
    range's does."""

    def __init__(self, start_step: int, end_step: int, every_steps: int) -> None:
        if every_steps < 1:
            raise ValueError(f"update interval must be >= 1 step, got {every_steps}")
        if end_step < start_step:
            raise ValueError(f"end step {end_step} is before start step {start_step}")
        self._body = range(start_step, end_step, every_steps)
        self._count = -(-(end_step - start_step) // every_steps)  # items of _body, as a Python int
        self.end = end_step

    def __len__(self) -> int:
        return self._count + 1

    def __bool__(self) -> bool:
        return True

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return list(self)[index]
        if index == self._count or index == -1:
            return self.end
        if -self._count - 1 <= index < 0:
            return self._body[index + 1]
        return self._body[index]  # IndexError past the end

    def __contains__(self, step: object) -> bool:
        return step == self.end or step in self._body

    def __iter__(self) -> Iterator[int]:
        yield from self._body
        yield self.end

    def __repr__(self) -> str:
        start, every = self._body.start, self._body.step
        return f"UpdateSteps(start={start}, end={self.end}, every={every})"

    def last_at(self, step: int) -> int | None:
        """The last of these steps at or before ``step`` (None: ``step`` is before the first)."""
        if step >= self.end:
            return self.end
        body = self._body
        if step < body.start:
            return None
        return body.start + (step - body.start) // body.step * body.step
