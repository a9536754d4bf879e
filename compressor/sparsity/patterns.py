"""Mask structures: which weights are pruned together, and how a group of weights is scored.

Specs (as in a recipe; ``as_structure`` validates a raw value):

    "unstructured"      each weight alone
    {blocks: [r, c]}    r x c tiles of the 2-D view (rows = output channels; columns = the rest:
                        ``in`` for Linear, ``in*kh*kw`` for Conv2d). Edge tiles may be smaller.
    {n: N, m: M}        N:M along input channels: of every M consecutive weights along ``in``
                        (dim 1; dim 0 for a 1-D tensor), the N largest are kept. Conv weights
                        (out, in, kh, kw) are grouped along ``in`` for each (out, kh, kw).
                        Also written as text, "N:M" (structure: "2:4").
    "channels"          whole output channels (rows of the 2-D view)

Groups are numbered in row-major order of the 2-D view (tiles, rows) or of the flattened tensor
(unstructured, N:M). ``group_layout`` is the one place that lays the groups out (it also serves the
OBS pruners, whose N:M groups are the groups of M themselves).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, model_validator


class Blocks(BaseModel):
    """Tiles of ``blocks = (rows, cols)`` weights of the 2-D view."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    blocks: tuple[int, int] = Field(description="tile size (rows, cols) of the (out, in*k*k) view")

    @model_validator(mode="after")
    def _positive(self) -> Blocks:
        if min(self.blocks) < 1:
            raise ValueError(f"block sides must be >= 1, got {list(self.blocks)}")
        return self


#: A final sparsity within this of 1 - n/m is the N:M pattern's own (0.667 for 1:3), and a target
#: within it gives an N:M parameter its full pattern, so every accepted final_sparsity ends at the pattern.
NM_TOLERANCE = 1e-3


def nm_problem(n: int, m: int, final_sparsity: float | None = None) -> str | None:
    """The one N:M rule (the structure's and the recipe's checks both call it): a message, or None.

    ``n:m`` needs 0 < n < m. n == m is refused: it keeps every weight, so a pruner with it prunes
    nothing (and a final sparsity of 0 says the same without a structure). ``final_sparsity``, when
    given, must be 1 - n/m within NM_TOLERANCE.
    """
    if not 0 < n < m:
        why = " (it keeps every weight: a sparsity of 0)" if n == m else ""
        return f"N:M structure needs 0 < N < M, got {n}:{m}{why}"
    if final_sparsity is not None and abs(final_sparsity - (1 - n / m)) > NM_TOLERANCE:
        return (
            f"final_sparsity must be 1 - N/M = {1 - n / m:g} for {n}:{m} structure "
            f"(within {NM_TOLERANCE:g}), got {final_sparsity:g}"
        )
    return None


#: "N:M" as text (a recipe variable can hold it: --set 'structure="2:4"').
_NM_TEXT = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


class NM(BaseModel):
    """N:M: keep ``n`` of every ``m`` consecutive weights along input channels (sparsity 1 - n/m)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = Field(description="weights kept per group, 0 < n < m")
    m: int = Field(description="group size along input channels")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        match = _NM_TEXT.fullmatch(data) if isinstance(data, str) else None
        return {"n": int(match[1]), "m": int(match[2])} if match else data

    @model_validator(mode="after")
    def _valid(self) -> NM:
        problem = nm_problem(self.n, self.m)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def sparsity(self) -> float:
        """The sparsity of the full pattern, 1 - n/m."""
        return 1.0 - self.n / self.m


STRUCTURE_FORMS = "'unstructured', 'channels', {blocks: [r, c]}, {n: N, m: M} or 'N:M'"


def _structure_form(spec: Any) -> str | None:
    """The form a spec is written in (its union tag), so that a bad spec gets that form's message only."""
    if isinstance(spec, str):
        return "nm" if _NM_TEXT.fullmatch(spec) else "name"
    if isinstance(spec, (Blocks, NM)):
        return "blocks" if isinstance(spec, Blocks) else "nm"
    if isinstance(spec, Mapping):
        return "blocks" if "blocks" in spec else "nm" if "n" in spec or "m" in spec else None
    return None


_Name = Annotated[Literal["unstructured", "channels"], Tag("name")]
Structure = Annotated[
    _Name | Annotated[Blocks, Tag("blocks")] | Annotated[NM, Tag("nm")],
    Discriminator(
        _structure_form, custom_error_type="structure", custom_error_message=f"expected {STRUCTURE_FORMS}"
    ),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Structure)


def as_structure(spec: Any) -> Structure:
    """A validated structure from a spec (a string, a dict or an already built one)."""
    return spec if isinstance(spec, (Blocks, NM)) else _ADAPTER.validate_python(spec)


def validate(name: str, shape: torch.Size | tuple[int, ...], spec: Any) -> None:
    """ValueError naming ``name`` and its shape when ``spec`` cannot apply to it (call at initialize)."""
    structure = as_structure(spec)
    if structure != "unstructured" and len(shape) == 0:
        raise ValueError(f"{name} {tuple(shape)}: a scalar cannot have structure {structure!r}")
    if isinstance(structure, NM):
        dim = 1 if len(shape) >= 2 else 0
        if shape[dim] % structure.m:
            raise ValueError(
                f"{name} {tuple(shape)}: {structure.n}:{structure.m} needs the input channels "
                f"(dim {dim} = {shape[dim]}) to be a multiple of {structure.m}"
            )


def group_layout(shape: torch.Size | tuple[int, ...], spec: Any) -> torch.Tensor:
    """Flat positions of each group's weights: int64 (num_groups, k), -1 padding short edge tiles.

    The one tile layout of every structure, in the module's group order: unstructured (numel, 1);
    N:M (numel / M, M), the M consecutive weights along input channels of each (out, kh, kw);
    channels (out, numel / out), the rows of the 2-D view; blocks (tiles, r * c), the r x c tiles
    of the 2-D view in row-major order, each tile's weights row-major, edge tiles padded with -1.
    """
    structure = as_structure(spec)
    numel = math.prod(shape)
    pos = torch.arange(numel).reshape(shape)
    if structure == "unstructured":
        return pos.reshape(-1, 1)
    if isinstance(structure, NM):
        moved = pos.movedim(1, -1) if pos.dim() >= 2 else pos
        return moved.reshape(-1, structure.m)
    view = pos.reshape(shape[0], -1)
    if structure == "channels":
        return view
    r, c = structure.blocks
    rows, cols = view.shape
    nr, nc = -(-rows // r), -(-cols // c)
    padded = torch.nn.functional.pad(view, (0, nc * c - cols, 0, nr * r - rows), value=-1)
    return padded.reshape(nr, r, nc, c).permute(0, 2, 1, 3).reshape(nr * nc, r * c)


def _nm_rank(score: torch.Tensor, structure: NM) -> torch.Tensor:
    """Rank (0 = smallest) of each weight within its group of M along input channels; score's shape.

    Ties: the lower index ranks lower (stable sort).
    """
    layout = group_layout(score.shape, structure).to(score.device)
    order = torch.argsort(score.reshape(-1)[layout], dim=1, stable=True)
    in_group = torch.empty_like(order)
    in_group.scatter_(1, order, torch.arange(structure.m, device=order.device).expand_as(order))
    rank = torch.empty(score.numel(), dtype=torch.int64, device=score.device)
    rank[layout.reshape(-1)] = in_group.reshape(-1)
    return rank.reshape(score.shape)


def group_sizes(shape: torch.Size | tuple[int, ...], spec: Any) -> torch.Tensor:
    """Number of weights in each selection group, int64 (num_groups,).

    N:M parameters are selected weight by weight (see ``group_scores``): all ones.
    """
    structure = as_structure(spec)
    if structure == "unstructured" or isinstance(structure, NM):
        return torch.ones(math.prod(shape), dtype=torch.int64)
    return (group_layout(shape, structure) >= 0).sum(dim=1)


def group_scores(score: torch.Tensor, spec: Any) -> torch.Tensor:
    """Score of each group (num_groups,): the mean of its weights' scores (-inf if any is -inf).

    For N:M each weight is its own group and its score is its rank within its group of M
    (0 = smallest), so a threshold prunes the lowest-ranked weights of every group first.
    """
    structure = as_structure(spec)
    if structure == "unstructured":
        return score.flatten()
    if isinstance(structure, NM):
        validate("score", score.shape, structure)
        return _nm_rank(score, structure).flatten().to(score.dtype)
    layout = group_layout(score.shape, structure).to(score.device)
    slot = layout >= 0
    values = score.reshape(-1)[layout.clamp(min=0)]
    pruned = torch.isneginf(values) & slot
    sums = values.masked_fill(pruned | ~slot, 0.0).sum(dim=1)
    return (sums / slot.sum(dim=1).to(score.dtype)).masked_fill(pruned.any(dim=1), -math.inf)


def expand(group_mask: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: Any) -> torch.Tensor:
    """Bool mask of ``shape`` from one bool per group (num_groups,)."""
    structure = as_structure(spec)
    group_mask = group_mask.bool()
    if structure == "unstructured" or isinstance(structure, NM):
        return group_mask.reshape(shape)
    layout = group_layout(shape, structure).to(group_mask.device)
    slot = layout >= 0
    out = torch.empty(math.prod(shape), dtype=torch.bool, device=group_mask.device)
    out[layout[slot]] = group_mask.unsqueeze(1).expand_as(layout)[slot]
    return out.reshape(shape)


def _prune_prefix(scores: torch.Tensor, sizes: torch.Tensor, need: int) -> torch.Tensor:
    """Bool (num_groups,): the lowest-scored groups whose total size is closest to ``need`` weights.

    Ties in score: the earlier group goes first. Groups scored -inf are always pruned. Between two
    equally close totals the larger is taken.
    """
    order = torch.argsort(scores, stable=True)
    totals = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes[order], 0)])
    gap = (totals - need).abs()
    count = int((gap == gap.min()).nonzero().max())
    count = max(count, int(torch.isneginf(scores).sum()))
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned[order[:count]] = True
    return pruned


def _select_nm(score: torch.Tensor, structure: NM, sparsity: float) -> torch.Tensor:
    """Kept-mask for one N:M parameter: the lowest-ranked weights first, the full pattern at 1 - n/m."""
    rank = group_scores(score, structure)
    flat = score.flatten()
    forced = torch.isneginf(flat)
    candidates = (~forced & (rank < structure.m - structure.n)).nonzero().flatten()
    if sparsity >= structure.sparsity - NM_TOLERANCE:
        take = candidates
    else:
        extra = max(0, math.floor(sparsity * flat.numel() + 0.5) - int(forced.sum()))
        by_score = torch.argsort(flat[candidates], stable=True)
        by_rank = by_score[torch.argsort(rank[candidates][by_score], stable=True)]
        take = candidates[by_rank[:extra]]
    pruned = forced.clone()
    pruned[take] = True
    return ~pruned.reshape(score.shape)


def _prepared(name: str, score: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
    """Float scores with -inf where ``current`` already prunes; ValueError on NaN."""
    out = score.detach().to(torch.float64 if score.dtype == torch.float64 else torch.float32)
    if torch.isnan(out).any():
        raise ValueError(f"scores of {name!r} contain NaN")
    if current is not None:
        if current.shape != score.shape:
            raise ValueError(f"mask of {name!r}: shape {tuple(current.shape)}, scores {tuple(score.shape)}")
        out = out.masked_fill(~current.to(device=out.device, dtype=torch.bool), -math.inf)
    return out


def select_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    structures: Mapping[str, Any] | Any = "unstructured",
    global_ranking: bool = True,
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Kept-masks (bool, param shapes; True: kept) pruning the lowest scores to ``sparsity``.

    Args:
        scores: per parameter, a score of its shape (higher: more important).
        sparsity: target fraction of weights that are zero, in [0, 1], counted in weights. Blocks
            and channels get the group count whose size is closest to the target.
        structures: a mapping with a spec (see the module) for every name in ``scores``, or one spec.
        global_ranking: one threshold over all parameters (True) or one per parameter.
        current: the masks now in force: their pruned weights stay pruned (monotone result).

    N:M parameters are always ranked on their own: their lowest-ranked weights go first and at
    sparsity >= 1 - n/m they get exactly the N:M pattern (never more than that, apart from weights
    ``current`` already prunes).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    per_name = isinstance(structures, Mapping) and bool(scores) and all(n in structures for n in scores)
    out: dict[str, torch.Tensor] = {}
    pool: list[tuple[str, Structure, torch.Tensor, torch.Tensor]] = []
    for name, score in scores.items():
        structure = as_structure(structures[name] if per_name else structures)
        validate(name, score.shape, structure)
        prepared = _prepared(name, score, None if current is None else current.get(name))
        if isinstance(structure, NM):
            out[name] = _select_nm(prepared, structure, sparsity)
        else:
            sizes = group_sizes(score.shape, structure).to(prepared.device)
            pool.append((name, structure, group_scores(prepared, structure), sizes))
    for members in [pool] if global_ranking else [[entry] for entry in pool]:
        if not members:
            continue
        sizes = torch.cat([entry[3] for entry in members])
        need = math.floor(sparsity * int(sizes.sum()) + 0.5)
        pruned = _prune_prefix(torch.cat([entry[2] for entry in members]), sizes, need)
        parts = pruned.split([len(entry[2]) for entry in members])
        for (name, structure, _, _), part in zip(members, parts, strict=True):
            out[name] = expand(~part, scores[name].shape, structure)
    return {name: out[name] for name in scores}
