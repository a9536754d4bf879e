"""Mask structures and selection: exact sparsity, N:M / block / channel patterns, monotone updates."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from oracles import nm_topk_mask
from pydantic import ValidationError

from compressor.core import registry
from compressor.core.modifier import Modifier
from compressor.recipe import RecipeError, load_recipe
from compressor.sparsity.patterns import (
    as_structure,
    expand,
    group_layout,
    group_scores,
    group_sizes,
    nm_problem,
    select_masks,
)
from modifiers.magnitude import MagnitudePruning


def _pruned(masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks.values())


def _nm_groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept counts of every group of m along input channels, by explicit loops: (num_groups,)."""
    counts = []
    if mask.dim() == 2:
        for o in range(mask.shape[0]):
            for g in range(0, mask.shape[1], m):
                counts.append(int(mask[o, g : g + m].sum()))
    else:
        out, cin, kh, kw = mask.shape
        for o in range(out):
            for i in range(kh):
                for j in range(kw):
                    for g in range(0, cin, m):
                        counts.append(int(mask[o, g : g + m, i, j].sum()))
    return torch.tensor(counts)


def test_unstructured_exact_sparsity_per_layer_and_global(gen: torch.Generator) -> None:
    scores = {"a": torch.randn(37, 11, generator=gen), "b": torch.randn(5, 3, 3, 3, generator=gen)}
    s = 0.05 + torch.rand(1, generator=gen).item() * 0.85  # every layer prunes at least one weight
    per_layer = select_masks(scores, s, "unstructured", global_ranking=False)
    for name, score in scores.items():
        assert int((~per_layer[name]).sum()) == math.floor(s * score.numel() + 0.5)
        # the pruned ones are the lowest scores
        assert score[~per_layer[name]].max() <= score[per_layer[name]].min()
    glob = select_masks(scores, s, "unstructured", global_ranking=True)
    total = sum(t.numel() for t in scores.values())
    assert _pruned(glob) == math.floor(s * total + 0.5)
    everything = torch.cat([t.flatten() for t in scores.values()])
    kept = torch.cat([glob[n].flatten() for n in scores])
    assert everything[~kept].max() <= everything[kept].min()


def test_global_and_per_layer_differ_on_layers_of_different_scales(gen: torch.Generator) -> None:
    scores = {"small": torch.rand(20, 20, generator=gen), "large": 10 + torch.rand(20, 20, generator=gen)}
    glob = select_masks(scores, 0.5, "unstructured", global_ranking=True)
    local = select_masks(scores, 0.5, "unstructured", global_ranking=False)
    assert not glob["small"].any() and glob["large"].all()  # all 400 pruned weights from the small layer
    assert int((~local["small"]).sum()) == int((~local["large"]).sum()) == 200


def test_pruned_weights_stay_pruned_and_updates_are_monotone(gen: torch.Generator) -> None:
    shape = (16, 24)
    current = None
    for s in (0.2, 0.35, 0.5, 0.8):
        score = torch.randn(shape, generator=gen)  # fresh scores: pruned weights may now score high
        new = select_masks({"w": score}, s, "unstructured", current=current)["w"]
        if current is not None:
            assert not (new & ~current["w"]).any()
        assert int((~new).sum()) == math.floor(s * new.numel() + 0.5)
        current = {"w": new}


def test_ties_are_broken_deterministically() -> None:
    scores = {"a": torch.ones(6, 10), "b": torch.ones(4, 5)}
    first = select_masks(scores, 0.3, "unstructured")
    second = select_masks({k: v.clone() for k, v in scores.items()}, 0.3, "unstructured")
    assert all(torch.equal(first[n], second[n]) for n in scores)
    assert _pruned(first) == 24


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_on_linear_and_conv_keeps_the_n_largest_of_every_m_along_inputs(
    n: int, m: int, gen: torch.Generator
) -> None:
    linear = torch.randn(6, 4 * m, generator=gen)
    conv = torch.randn(5, 2 * m, 3, 2, generator=gen)
    masks = select_masks({"fc": linear, "conv": conv}, 1 - n / m, {"n": n, "m": m})
    for name, score in (("fc", linear), ("conv", conv)):
        counts = _nm_groups(masks[name], m)
        assert torch.all(counts == n)
        # every kept weight beats every pruned weight of its group
        assert torch.equal(masks[name], nm_topk_mask(score, n, m))
    # the oracle against topk written out for the permuted (out, kh, kw, in) layout
    moved = conv.permute(0, 2, 3, 1).reshape(-1, m)
    top = torch.zeros_like(moved, dtype=torch.bool).scatter_(1, moved.topk(n, dim=1).indices, True)
    assert torch.equal(nm_topk_mask(conv, n, m), top.reshape(5, 3, 2, 2 * m).permute(0, 3, 1, 2))


def test_nm_gradual_then_full_pattern_with_pruned_weights_kept_pruned(gen: torch.Generator) -> None:
    score = torch.randn(8, 16, generator=gen)
    half = select_masks({"w": score}, 0.25, {"n": 2, "m": 4})["w"]
    assert int((~half).sum()) == 32
    assert torch.all(_nm_groups(half, 4) >= 2)  # never beyond the pattern
    assert torch.all(_nm_groups(half, 4) == 3)  # the lowest rank of each group goes first
    later = torch.randn(8, 16, generator=gen)
    full = select_masks({"w": later}, 0.5, {"n": 2, "m": 4}, current={"w": half})["w"]
    assert not (full & ~half).any()
    assert torch.all(_nm_groups(full, 4) == 2)
    prior = torch.rand(8, 16, generator=gen) < 0.5  # arbitrary earlier zeros: groups may end below N
    forced = select_masks({"w": later}, 0.5, {"n": 2, "m": 4}, current={"w": prior})["w"]
    assert not (forced & ~prior).any() and torch.all(_nm_groups(forced, 4) <= 2)


def test_nm_needs_divisible_inputs() -> None:
    with pytest.raises(ValueError, match=r"conv \(4, 6, 3, 3\).*multiple of 4"):
        select_masks({"conv": torch.randn(4, 6, 3, 3)}, 0.5, {"n": 2, "m": 4})


def test_blocks_that_do_not_divide(gen: torch.Generator) -> None:
    r, c = 3, 4
    score = torch.randn(7, 2, 5, generator=gen)  # 2-D view (7, 10): tiles 3x4 with edges 1 row, 2 cols
    spec = {"blocks": [r, c]}
    groups = group_scores(score, spec)
    sizes = group_sizes(score.shape, spec)
    view = score.reshape(7, 10)
    expected, expected_sizes = [], []
    for i in range(0, 7, r):
        for j in range(0, 10, c):
            tile = view[i : i + r, j : j + c]
            expected.append(tile.mean().item())
            expected_sizes.append(tile.numel())
    assert torch.allclose(groups, torch.tensor(expected), atol=1e-6)
    assert sizes.tolist() == expected_sizes and int(sizes.sum()) == score.numel()
    mask = select_masks({"w": score}, 0.5, spec)["w"].reshape(7, 10)
    for i in range(0, 7, r):
        for j in range(0, 10, c):
            tile = mask[i : i + r, j : j + c]
            assert tile.all() or not tile.any()
    # whole tiles: the pruned weight count is the reachable total closest to 35
    assert abs(int((~mask).sum()) - 35) <= max(expected_sizes) // 2


def test_channels_prune_whole_output_rows(gen: torch.Generator) -> None:
    conv = torch.randn(10, 3, 3, 3, generator=gen)
    mask = select_masks({"conv": conv}, 0.3, "channels")["conv"]
    rows = mask.reshape(10, -1)
    assert torch.all(rows.all(dim=1) | ~rows.any(dim=1))
    assert int((~rows.all(dim=1)).sum()) == 3
    means = conv.reshape(10, -1).mean(dim=1)
    assert means[~rows[:, 0]].max() <= means[rows[:, 0]].min()
    assert torch.equal(expand(rows[:, 0], conv.shape, "channels"), mask)


def test_a_partly_pruned_group_stays_pruned(gen: torch.Generator) -> None:
    score = torch.randn(6, 8, generator=gen)
    current = torch.ones(6, 8, dtype=torch.bool)
    current[2, 5] = False  # one weight of row 2 pruned earlier
    mask = select_masks(
        {"w": score + 100 * (torch.arange(6) == 2)[:, None]}, 0.0, "channels", current={"w": current}
    )
    assert not mask["w"][2].any() and mask["w"][[0, 1, 3, 4, 5]].all()


def test_specs_are_validated() -> None:
    assert as_structure({"n": 2, "m": 4}).sparsity == 0.5
    assert as_structure({"blocks": [1, 4]}).blocks == (1, 4)
    for bad in ({"n": 5, "m": 4}, {"blocks": [0, 4]}, "filters", {"n": 2, "m": 4, "dim": 1}):
        with pytest.raises(ValidationError):
            as_structure(bad)
    with pytest.raises(ValueError, match="NaN"):
        select_masks({"w": torch.tensor([1.0, float("nan")])}, 0.5)


# ---------------------------------------------------------------- the one N:M rule, at every entry point

NM_RECIPE = """\
version: 1
modifiers:
  - type: {type}
    params: [fc1.weight]
    final_sparsity: {final}
    structure: {{n: {n}, m: {m}}}
"""


class DuckPruning(Modifier):
    """A third-party pruner whose N:M structure is plain data: only the recipe's cross-check sees it."""

    prunes: ClassVar[bool] = True
    params: list[str]
    final_sparsity: float
    structure: dict[str, int]

    def parameter_patterns(self) -> list[str]:
        return list(self.params)


def _recipe_verdict(tmp_path: Path, kind: str, n: int, m: int, final: float) -> str | None:
    """The message at modifiers[0].structure when the recipe is loaded; None when it loads."""
    path = tmp_path / f"{kind}.yaml"
    path.write_text(NM_RECIPE.format(type=kind, n=n, m=m, final=final))
    try:
        load_recipe(path)
    except RecipeError as err:
        assert [i.path for i in err.issues] == ["modifiers[0].structure"], str(err)
        return err.issues[0].message
    return None


def _python_verdict(n: int, m: int, final: float) -> str | None:
    """The message of the Pydantic error when the pruner is built in Python; None when it builds."""
    try:
        MagnitudePruning(params=["fc1.weight"], final_sparsity=final, structure={"n": n, "m": m})
    except ValidationError as err:
        [error] = err.errors()
        assert error["loc"][0] == "structure"
        return error["msg"].removeprefix("Value error, ")
    return None


@pytest.mark.parametrize(
    ("n", "m", "final", "message"),
    [
        (2, 4, 0.5, None),
        (1, 3, 0.667, None),  # within NM_TOLERANCE of 2/3
        (1, 3, 0.66, "final_sparsity must be 1 - N/M = 0.666667 for 1:3 structure (within 0.001), got 0.66"),
        (2, 4, 0.7, "final_sparsity must be 1 - N/M = 0.5 for 2:4 structure (within 0.001), got 0.7"),
        (4, 4, 0.0, "N:M structure needs 0 < N < M, got 4:4 (it keeps every weight: a sparsity of 0)"),
        (5, 4, 0.5, "N:M structure needs 0 < N < M, got 5:4"),
        (0, 4, 0.5, "N:M structure needs 0 < N < M, got 0:4"),
    ],
)
def test_nm_rule_is_the_same_in_python_and_in_recipes(
    tmp_path: Path, n: int, m: int, final: float, message: str | None
) -> None:
    registry.register("modifiers", "DuckPruning", DuckPruning)
    try:
        assert nm_problem(n, m, final) == message
        assert _python_verdict(n, m, final) == message
        assert _recipe_verdict(tmp_path, "MagnitudePruning", n, m, final) == message
        assert _recipe_verdict(tmp_path, "DuckPruning", n, m, final) == message
    finally:
        registry.unregister("modifiers", "DuckPruning")


def test_a_bad_structure_gets_only_its_own_form_s_message() -> None:
    with pytest.raises(ValidationError) as err:
        as_structure({"n": 5, "m": 4})
    assert [e["msg"] for e in err.value.errors()] == ["Value error, N:M structure needs 0 < N < M, got 5:4"]
    with pytest.raises(ValidationError, match=r"expected 'unstructured', 'channels', \{blocks: \[r, c\]\}"):
        as_structure({"rows": 2})


def _explicit_layout(shape: tuple[int, ...], spec) -> list[list[int]]:
    """Each group's flat positions by explicit loops (the module's definitions)."""
    pos = torch.arange(math.prod(shape)).reshape(shape)
    if spec == "unstructured":
        return [[p] for p in range(pos.numel())]
    if isinstance(spec, dict) and "n" in spec:
        m = spec["m"]
        if pos.dim() == 1:
            return [pos[g : g + m].tolist() for g in range(0, len(pos), m)]
        out = []
        for o in range(shape[0]):
            for rest in itertools.product(*[range(s) for s in shape[2:]]):
                line = pos[(o, slice(None), *rest)]
                out += [line[g : g + m].tolist() for g in range(0, shape[1], m)]
        return out
    view = pos.reshape(shape[0], -1)
    if spec == "channels":
        return [row.tolist() for row in view]
    r, c = spec["blocks"]
    return [
        view[i : i + r, j : j + c].flatten().tolist()
        for i in range(0, view.shape[0], r)
        for j in range(0, view.shape[1], c)
    ]


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((7, 2, 5), {"blocks": [3, 4]}),  # edge tiles of 1 row and 2 columns
        ((6, 8), {"blocks": [2, 3]}),
        ((5, 1), {"blocks": [2, 2]}),
        ((5, 8, 3, 2), {"n": 2, "m": 4}),  # conv: groups along in for each (out, kh, kw)
        ((3, 12), {"n": 1, "m": 3}),
        ((12,), {"n": 2, "m": 4}),
        ((4, 3, 3, 3), "channels"),
        ((5, 3), "unstructured"),
    ],
)
def test_group_layout_is_each_groups_positions(shape: tuple[int, ...], spec) -> None:
    layout = group_layout(shape, spec)
    groups = [[p for p in row if p >= 0] for row in layout.tolist()]
    assert groups == _explicit_layout(shape, spec)
    assert sorted(p for g in groups for p in g) == list(range(math.prod(shape)))  # a partition
