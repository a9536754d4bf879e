"""OBS saliencies and removal vectors of masks under a structure, over the M-FAC inverse Fisher of
the remaining weights of several parameters (the math of ``MFACPruning``'s sub-steps).

The remaining (unmasked) weights of all pruned parameters are concatenated into one vector of d
coordinates. ``RemainingFisher`` is F^-1 over it: one blocked inverse (``FisherInverse`` or the
streamed ``BlockFisherInverse``) over all d coordinates, or one full inverse per parameter;
``FisherPart`` says which inverse holds a parameter's remaining weights and from which coordinate
on. Per parameter, ``obs_scores`` gives every weight its OBS saliency under the mask structure and
``obs_removal_vector`` the vector u of the weights removed, whose IHVP dw = -F^-1 u
(``compressor.mfac.obs.obs_update``) is the OBS update of the removal:

- unstructured (and N:M with more than ``MAX_NM_SUBSETS`` subsets per group): weight by weight,
  rho_q = w_q^2 / (2 [F^-1]_qq) and u_q = w_q / [F^-1]_qq;
- a group structure (blocks): rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2, given to every weight of the
  group, and u_Q = ([F^-1]_QQ)^-1 w_Q for every removed group Q;
- N:M: in every group of M the subset Q of M-N weights with the smallest joint saliency gets it,
  the other weights +inf (kept).

The formulas are those of ``compressor.mfac.obs``; weights and results are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from compressor.mfac import BlockFisherInverse, FisherInverse
from compressor.mfac.obs import group_obs, nm_best_subsets, removal_vector, saliencies
from compressor.sparsity.patterns import NM, Structure, group_layout

#: N:M with more candidate subsets per group than this is scored weight by weight instead.
MAX_NM_SUBSETS = 256

#: Either form of the (blocked) inverse Fisher.
Inverse = FisherInverse | BlockFisherInverse


@dataclass(frozen=True)
class FisherPart:
    """The inverse Fisher holding one parameter's remaining weights, from coordinate ``offset`` on."""

    fi: Inverse | None  # None: the parameter has no remaining weight (per-parameter mode)
    offset: int
    diag: torch.Tensor | None  # diag(F^-1) of ``fi``, float64, on the compute device


class RemainingFisher:
    """F^-1 over the concatenated remaining weights (d coordinates): one blocked inverse, or one
    per parameter (``spans``: each inverse's [start, end) coordinates)."""

    def __init__(
        self, fis: list[Inverse | None], spans: list[tuple[int, int]], parts: list[FisherPart]
    ) -> None:
        self.dim = spans[-1][1] if spans else 0
        self._fis, self._spans, self._parts = fis, spans, parts

    @classmethod
    def woodbury(
        cls,
        grads: torch.Tensor,
        sizes: list[int],
        damp: float,
        block_size: int | None,
        device: torch.device,
        storage_dtype: torch.dtype | None = None,
    ) -> RemainingFisher:
        """FisherInverse over the (m, d) rows: blocked, or one full block per parameter (None);
        its factor stored in ``storage_dtype`` (None: the rows' dtype). ``sizes``: remaining weights
        per parameter (summing to d); ``damp``: lambda."""
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        if block_size is None:
            fis = [
                FisherInverse(grads[:, a:b], damp, None, device=device, storage_dtype=storage_dtype)
                if b > a
                else None
                for a, b in pairwise(starts)
            ]
            parts = [FisherPart(fi, 0, _diag(fi, device)) for fi in fis]
            return cls(fis, list(pairwise(starts)), parts)
        fi = FisherInverse(grads, damp, block_size, device=device, storage_dtype=storage_dtype)
        return cls.blocked(fi, sizes, device)

    @classmethod
    def blocked(cls, fi: Inverse, sizes: list[int], device: torch.device) -> RemainingFisher:
        """One blocked inverse over the concatenated remaining weights (either form)."""
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        diag = _diag(fi, device)
        return cls([fi], [(0, starts[-1])], [FisherPart(fi, a, diag) for a in starts[:-1]])

    streamed = blocked

    def part(self, i: int) -> FisherPart:
        """The part holding parameter ``i``'s remaining weights."""
        return self._parts[i]

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x (d,) over the concatenated remaining weights."""
        out = torch.zeros_like(x)
        for fi, (a, b) in zip(self._fis, self._spans, strict=True):
            if fi is not None:
                out[a:b] = fi.mul(x[a:b])
        return out


def _diag(fi: Inverse | None, device: torch.device) -> torch.Tensor | None:
    return None if fi is None else fi.diag().to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------------- scores and removals


def per_weight(structure: Structure) -> bool:
    """Scored and removed weight by weight: unstructured, or N:M with too many subsets to enumerate."""
    return structure == "unstructured" or (
        isinstance(structure, NM) and math.comb(structure.m, structure.m - structure.n) > MAX_NM_SUBSETS
    )


def _grouped(
    layout: torch.Tensor, coord: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot of each group: Fisher coordinate (-1: pruned or padding), weight, and whether it is real."""
    slot = layout >= 0
    safe = layout.clamp(min=0)
    return coord[safe].masked_fill(~slot, -1), w[safe], slot


def obs_scores(
    part: FisherPart, coord: torch.Tensor, w: torch.Tensor, structure: Structure, shape: torch.Size
) -> torch.Tensor:
    """OBS saliency of each weight of one parameter (flat (numel,), float64; pruned weights: 0).

    ``coord``: each weight's coordinate in ``part.fi`` (-1: pruned); ``w``: the flat float64
    weights; ``shape``: the parameter's. A group's saliency goes to each of its weights; for N:M the
    best subset of each group gets its saliency, the others +inf (kept).
    """
    alive = coord >= 0
    out = torch.zeros(w.numel(), dtype=torch.float64, device=w.device)
    if part.fi is None or not alive.any():
        return out
    if per_weight(structure):
        out[alive] = saliencies(w[alive], part.diag[coord[alive]])
        return out
    layout = group_layout(shape, structure).to(w.device)
    gcoord, gw, slot = _grouped(layout, coord, w)
    if isinstance(structure, NM):
        choice = nm_best_subsets(part.fi, gcoord, gw, structure.n, alive=gcoord >= 0)
        chosen = layout.gather(1, choice.slots)  # (g, M-N) flat positions
        out.fill_(math.inf)
        out[chosen.reshape(-1)] = choice.saliency.unsqueeze(1).expand_as(chosen).reshape(-1)
        return out
    saliency = group_obs(part.fi, gcoord, gw, valid=gcoord >= 0).saliency
    out[layout[slot]] = saliency.unsqueeze(1).expand_as(layout)[slot]
    return out


def obs_removal_vector(
    part: FisherPart,
    coord: torch.Tensor,
    w: torch.Tensor,
    removed: torch.Tensor,
    structure: Structure,
    shape: torch.Size,
) -> torch.Tensor:
    """u over this parameter's remaining weights (in order, float64): u_Q = ([F^-1]_QQ)^-1 w_Q for
    each removed group Q (u_q = w_q / [F^-1]_qq weight by weight); dw = -F^-1 u is the OBS update.

    ``removed``: flat bool, the weights removed now (``coord``, ``w``, ``shape`` as ``obs_scores``).
    """
    size = int((coord >= 0).sum())
    u = torch.zeros(size, dtype=torch.float64, device=w.device)
    if part.fi is None:
        return u
    if per_weight(structure):
        c = coord[removed]
        u[c - part.offset] = removal_vector(w[removed], part.diag[c])
        return u
    layout = group_layout(shape, structure).to(w.device)
    gcoord, gw, slot = _grouped(layout, coord, w)
    hit = removed[layout.clamp(min=0)] & slot
    rows = hit.any(dim=1)
    if rows.any():
        gcoord, gw, valid = gcoord[rows], gw[rows], hit[rows]
        x = group_obs(part.fi, gcoord, gw, valid=valid).u
        u[gcoord[valid] - part.offset] = x[valid]
    return u
