"""Rules across a recipe's fields and modifiers, as (path, message) pairs; the loader turns the
paths into file positions. Duck-typed on the fields a modifier has (start, end, sparsities, params).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from compressor.core.modifier import Modifier, StepPosition, same_unit_le
from compressor.core.params import PatternError, match_params

Problem = tuple[tuple[str | int, ...], str]


def cross_field_problems(
    items: list[tuple[int, Modifier]],
    param_names: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Rules across fields and modifiers, duck-typed on the fields a modifier has.

    Per modifier: start <= end (same unit); 0 <= init_sparsity <= final_sparsity < 1; for an N:M
    ``structure``, ``compressor.sparsity.patterns.nm_problem`` (the rule the structure itself checks).
    Across pruners (``prunes = True``): no
    parameter held by two in overlapping [start, end) windows; with ``param_names``, every pattern
    must match a parameter (without them, patterns are compared as strings). When ``param_names``
    maps names to shapes, a modifier's ``shape_problems(shapes)`` (if it has one) checks them too.
    ``aliases`` (``core.params.tied_aliases``): a pattern matching only the alias of a tied weight
    is reported naming the tensor's listed name.
    """
    problems: list[Problem] = []
    for index, modifier in items:
        problems += _window_and_sparsity(index, modifier)
        if isinstance(param_names, Mapping):
            problems += _shape_problems(index, modifier, param_names, aliases)
    names = list(param_names) if param_names is not None else None
    return problems + _pruner_overlaps(items, names, aliases)


def _shape_problems(
    index: int, modifier: Modifier, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str] | None
) -> list[Problem]:
    """A modifier's ``shape_problems`` on the shapes of the weights its patterns select (a pattern
    that selects nothing is reported by the pattern check)."""
    check = getattr(modifier, "shape_problems", None)
    if check is None:
        return []
    selected: dict[str, tuple[int, ...]] = {}
    problems: list[Problem] = []
    for i, pattern in enumerate(modifier.parameter_patterns()):
        try:
            selected.update({n: shapes[n] for n in match_params([pattern], list(shapes), aliases)})
        except PatternError as err:  # a pruner's patterns are reported by the overlap check
            if not getattr(type(modifier), "prunes", False):
                problems.append((("modifiers", index, "params", i), str(err)))
    return problems + [(("modifiers", index, field), message) for field, message in check(selected)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _window_and_sparsity(index: int, modifier: Modifier) -> list[Problem]:
    base = ("modifiers", index)
    problems: list[Problem] = []
    start, end = getattr(modifier, "start", None), getattr(modifier, "end", None)
    if start is not None and end is not None and same_unit_le(start, end) is False:
        problems.append(((*base, "end"), f"end ({_when(end)}) is before start ({_when(start)})"))
    init = _number(getattr(modifier, "init_sparsity", None))
    final = _number(getattr(modifier, "final_sparsity", None))
    if init is not None and init < 0:
        problems.append(((*base, "init_sparsity"), f"init_sparsity must be >= 0, got {init:g}"))
    if final is not None and not 0 <= final < 1:
        problems.append(((*base, "final_sparsity"), f"final_sparsity must be in [0, 1), got {final:g}"))
    if init is not None and final is not None and init >= 0 and 0 <= final < 1 and init > final:
        message = f"init_sparsity ({init:g}) must be <= final_sparsity ({final:g})"
        problems.append(((*base, "init_sparsity"), message))
    n, m = _n_m(getattr(modifier, "structure", None))
    if n is not None and m is not None:
        from compressor.sparsity.patterns import (
            nm_problem,  # torch, only for recipes that have an N:M structure
        )

        problem = nm_problem(n, m, final)
        if problem is not None:
            problems.append(((*base, "structure"), problem))
    return problems


def _n_m(structure: Any) -> tuple[int | None, int | None]:
    """(N, M) of an N:M structure (a mapping or an object with ``n`` and ``m``); else (None, None)."""
    if isinstance(structure, dict):
        n, m = structure.get("n"), structure.get("m")
    else:
        n, m = getattr(structure, "n", None), getattr(structure, "m", None)
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m))
    return (n, m) if ok else (None, None)


def _when(position: Any) -> str:
    if position is None:
        return "end of training"
    return f"step {position.step}" if isinstance(position, StepPosition) else f"epoch {float(position):g}"


#: (unit, start, end): end is inf for "end of training".
Window = tuple[str, float, float]


def _window(modifier: Modifier) -> Window | None:
    """The modifier's window in one unit; None when start and end use different units or are inverted."""
    start, end = getattr(modifier, "start", 0.0), getattr(modifier, "end", None)
    unit = "step" if isinstance(start, StepPosition) else "epoch"
    if end is not None and isinstance(end, StepPosition) != (unit == "step"):
        return None

    def value(p: Any) -> float:
        return float(p.step) if isinstance(p, StepPosition) else float(p)

    first, last = value(start), math.inf if end is None else value(end)
    return (unit, first, last) if first <= last else None  # an inverted window is reported on its own


def _overlap(a: Window, b: Window) -> bool:
    """Whether windows [start, end) overlap; a window with start == end is the single point start."""
    (ua, a0, a1), (ub, b0, b1) = a, b
    if ua != ub:
        return False  # different units: only the session knows the steps per epoch
    if a0 == a1 and b0 == b1:
        return a0 == b0
    if a0 == a1:
        return b0 <= a0 < b1
    if b0 == b1:
        return a0 <= b0 < a1
    return a0 < b1 and b0 < a1


def _selections(
    index: int,
    modifier: Modifier,
    param_names: list[str] | None,
    aliases: Mapping[str, str] | None,
    problems: list[Problem],
) -> list[tuple[tuple[str | int, ...], str, set[str]]]:
    """(path, pattern, selected names) per pattern; without param_names a pattern stands for itself."""
    listed = list(getattr(modifier, "params", None) or [])
    patterns = list(modifier.parameter_patterns()) or listed
    out = []
    for pattern in patterns:
        where: tuple[str | int, ...] = ("modifiers", index, "params")
        if pattern in listed:
            where = (*where, listed.index(pattern))
        if param_names is None:
            out.append((where, pattern, {pattern}))
            continue
        try:
            out.append((where, pattern, set(match_params([pattern], param_names, aliases))))
        except PatternError as err:  # names the pattern and the closest parameter names
            problems.append((where, str(err)))
    return out


def _pruner_overlaps(
    items: list[tuple[int, Modifier]], param_names: list[str] | None, aliases: Mapping[str, str] | None
) -> list[Problem]:
    problems: list[Problem] = []
    pruners = [
        (index, modifier, _window(modifier), _selections(index, modifier, param_names, aliases, problems))
        for index, modifier in items
        if getattr(type(modifier), "prunes", False)
    ]
    for n, (i, first, window_i, sel_i) in enumerate(pruners):
        held = set().union(*(names for _, _, names in sel_i))
        for _, second, window_j, sel_j in pruners[n + 1 :]:
            if window_i is None or window_j is None or not _overlap(window_i, window_j):
                continue
            for where, pattern, names in sel_j:
                shared = sorted(names & held)
                if not shared:
                    continue
                what = f"pattern {pattern!r}" if param_names is None else ", ".join(map(repr, shared[:3]))
                problems.append(
                    (
                        where,
                        f"{what} also pruned by modifiers[{i}] ({first.type}, {_when(first.start)} to "
                        f"{_when(first.end)}), overlapping {_when(second.start)} to {_when(second.end)}",
                    )
                )
    return problems
