"""Sparsity schedules: end points, monotonicity, the cubic formula, points and update steps."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from compressor.core.schedules import UpdateSteps, sparsity_at, update_steps


def _window(gen: torch.Generator) -> tuple[int, int, float, float]:
    start = int(torch.randint(0, 50, (1,), generator=gen))
    end = start + int(torch.randint(1, 200, (1,), generator=gen))
    init, final = sorted(torch.rand(2, generator=gen).tolist())
    return start, end, init, final


@pytest.mark.parametrize("kind", ["cubic", "linear", "constant"])
def test_end_points_and_monotone(kind: str, gen: torch.Generator) -> None:
    start, end, init, final = _window(gen)
    values = [sparsity_at(step, start, end, init, final, kind) for step in range(end + 10)]
    assert values[end] == final and values[-1] == final
    assert all(a <= b for a, b in pairwise(values))
    assert all(v == init for v in values[:start])
    assert values[start] == (final if kind == "constant" else init)


def test_cubic_formula_values(gen: torch.Generator) -> None:
    start, end, init, final = _window(gen)
    for step in torch.randint(start, end + 1, (20,), generator=gen).tolist():
        t = (step - start) / (end - start)
        expected = final + (init - final) * (1 - t) ** 3
        assert sparsity_at(step, start, end, init, final, "cubic") == pytest.approx(expected, abs=1e-12)
    # fast early, flat late: half way, 7/8 of the distance is done
    assert sparsity_at(10, 0, 20, 0.0, 0.8, "cubic") == pytest.approx(0.7)
    assert sparsity_at(10, 0, 20, 0.0, 0.8, "linear") == pytest.approx(0.4)


def test_points_are_piecewise_constant(gen: torch.Generator) -> None:
    points = [(10, 0.3), (4, 0.1), (20, 0.7)]
    init = torch.rand(1, generator=gen).item() * 0.1
    got = [sparsity_at(step, 4, 20, init, 0.7, points) for step in (0, 3, 4, 9, 10, 19, 20, 30)]
    assert got == [init, init, 0.1, 0.1, 0.3, 0.3, 0.7, 0.7]


def test_one_shot_gives_final_at_start(gen: torch.Generator) -> None:
    start = int(torch.randint(0, 100, (1,), generator=gen))
    for kind in ("cubic", "linear", "constant"):
        assert sparsity_at(start - 1, start, start, 0.1, 0.9, kind) == 0.1
        assert sparsity_at(start, start, start, 0.1, 0.9, kind) == 0.9
    assert update_steps(start, start, 3) == [start]


def test_update_steps_always_include_start_and_end(gen: torch.Generator) -> None:
    start, end, _, _ = _window(gen)
    every = int(torch.randint(1, 30, (1,), generator=gen))
    steps = update_steps(start, end, every)
    assert steps[0] == start and steps[-1] == end
    assert all(b - a == every for a, b in pairwise(steps[:-1]))
    assert 0 < steps[-1] - steps[-2] <= every
    assert update_steps(0, 10, 5) == [0, 5, 10]
    assert update_steps(0, 11, 5) == [0, 5, 10, 11]
    with pytest.raises(ValueError):
        update_steps(0, 10, 0)
    with pytest.raises(ValueError):
        update_steps(5, 4, 1)


@pytest.mark.parametrize(
    ("start", "end", "every"), [(0, 10, 5), (0, 11, 5), (3, 3, 2), (2, 9, 1), (7, 30, 4)]
)
def test_update_steps_without_the_list_are_the_same_steps(start: int, end: int, every: int) -> None:
    listed, lazy = update_steps(start, end, every), UpdateSteps(start, end, every)
    assert list(lazy) == listed and len(lazy) == len(listed)
    assert [lazy[i] for i in range(-len(listed), len(listed))] == listed + listed
    assert [s for s in range(-1, end + 3) if s in lazy] == listed
    assert [lazy.last_at(s) for s in range(-1, end + 3)] == [
        max((u for u in listed if u <= s), default=None) for s in range(-1, end + 3)
    ]
    with pytest.raises(IndexError):
        lazy[len(listed)]


def test_update_steps_of_a_huge_window_list_nothing() -> None:
    steps = UpdateSteps(5, 10**30, 7)  # end: {step: 10**30}: a list would need ~1e29 entries
    assert steps[0] == 5 and steps[1] == 12 and steps[-1] == 10**30 and steps[-2] < 10**30
    assert 10**30 in steps and 12 in steps and 13 not in steps
    assert steps.last_at(10**20) == 5 + (10**20 - 5) // 7 * 7 and steps.last_at(4) is None
