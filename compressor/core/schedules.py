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

from collections.abc import Sequence
from typing import Literal

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
    if every_steps < 1:
        raise ValueError(f"update interval must be >= 1 step, got {every_steps}")
    if end_step < start_step:
        raise ValueError(f"end step {end_step} is before start step {start_step}")
    return [*range(start_step, end_step, every_steps), end_step]
