"""Sparsity schedules: end points, monotonicity, the cubic formula, points and update steps."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from compressor.core.schedules import sparsity_at, update_steps


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
