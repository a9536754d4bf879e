"""M-FAC pruning: Optimal-Brain-Surgeon saliencies and updates from a matrix-free inverse Fisher.

Each update prunes from the current sparsity s0 to the schedule's target s in ``num_recomputations``
sub-steps R, with densities interpolated geometrically, density_j = (1-s0) * ((1-s)/(1-s0))^(j/R).
Each sub-step:

1. samples m mini-batch gradients of the *remaining* weights at the current weights;
2. builds F^-1 over them, F = lambda*I + G^T G / m: blocks of ``block_size`` coordinates over the
   concatenated remaining weights of all parameters, or one full block per parameter
   (``block_size: null``). Two forms give the same F^-1 (``fisher``): the Woodbury form
   (``FisherInverse``) holds the m sampled rows and a factor as large, about 2 * m * d float32
   values; the streamed form (``BlockFisherInverse``) sums each block's B x B matrix G_b^T G_b as
   the gradients arrive in chunks of rows and holds d * B float64 values whatever m is. ``auto``
   (default) streams when the blocks are narrower than m (B < m), where it is the smaller. Under
   torch.distributed the Woodbury form gathers every rank's rows (m * d values); the streamed form
   sums each rank's own rows and all-reduces the d * B sums. By default (``relative_damp: true``)
   lambda = damp * mean(diag(G^T G / m)), ``damp`` times the mean empirical Fisher diagonal of this
   sub-step's gradients over all the remaining weights (one lambda for every block;
   ``compressor.mfac.obs.damping``), so one setting suits any gradient scale. ``relative_damp:
   false`` makes ``damp`` lambda itself (the paper's absolute dampening, default then 1e-5); when
   the Fisher's mean diagonal falls below damp / 10 (a model that fits its training data has tiny
   gradients) F^-1 ~ I / damp and the saliency is magnitude's, so a UserWarning says so once.
   The default 0.3 was chosen on held-out data (bench/quality.py, part h);
3. scores (``compressor.sparsity.obs_pruning``): unstructured w_q^2 / (2 [F^-1]_qq); for a group
   structure the group OBS saliency w_Q^T ([F^-1]_QQ)^-1 w_Q / 2, given to every weight of the
   group (``select_masks`` averages); for N:M, in every group of M the subset Q of M-N weights with
   the smallest joint saliency gets it and the other weights are kept;
4. selects masks (``select_masks``: global or per parameter), then moves the kept weights with
   one IHVP, dw = -F^-1 u, where u_Q = ([F^-1]_QQ)^-1 w_Q for every removed group Q (u_q =
   w_q / [F^-1]_qq unstructured), and sets the removed weights to exactly 0.

The sampler runs the model in eval mode (batch-norm uses its running statistics).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, PrivateAttr, StrictInt, field_validator, model_validator

from compressor.core import distributed
from compressor.mfac import BlockFisherInverse
from compressor.mfac.obs import damping, mean_fisher_diagonal, obs_update
from compressor.sparsity.obs_pruning import RemainingFisher, obs_removal_vector, obs_scores
from compressor.sparsity.patterns import select_masks
from compressor.sparsity.pruner import PruningModifier

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session

#: Default damp: lambda = RELATIVE_DAMP * mean(diag(G^T G / m)) (relative_damp: true).
RELATIVE_DAMP = 0.3
#: Default damp with relative_damp: false: lambda itself (the paper's).
ABSOLUTE_DAMP = 1e-5
#: Absolute mode warns once when mean(diag(G^T G / m)) < damp / WARN_RATIO.
WARN_RATIO = 10.0
#: The streamed Fisher is fed chunks of min(m, max(MIN_CHUNK_ROWS, B // 2)) gradient rows: at most
#: d * B / 2 float32 values (a quarter of the float64 sums) for B >= 16.
MIN_CHUNK_ROWS = 8


class MFACPruning(PruningModifier):
    """Gradual (or one-shot) OBS pruning with the static M-FAC inverse Fisher (paper 3.1 and 4.1)."""

    needs_gradients = True

    type: Literal["MFACPruning"] = "MFACPruning"
    num_grads: StrictInt | dict[float, StrictInt] = Field(
        64, description="gradients per sub-step, or {sparsity: count} (count used from that target on)"
    )
    grad_batch_size: int = Field(32, ge=1, description="samples per gradient (mini-batch size)")
    damp: float = Field(
        RELATIVE_DAMP,
        gt=0.0,
        allow_inf_nan=False,
        description="dampening of F: the fraction of mean(diag(G^T G / m)) added (relative_damp), "
        f"else lambda itself (default then {ABSOLUTE_DAMP:g})",
    )
    relative_damp: bool = Field(
        True, strict=True, description="lambda = damp * mean(diag(G^T G / m)) of each sub-step's gradients"
    )
    block_size: int | None = Field(
        128, ge=1, description="Fisher blocks over the remaining weights; null: one block per parameter"
    )
    num_recomputations: int = Field(
        1, ge=1, le=1000, description="sub-steps per update, each with fresh gradients"
    )
    grads_device: Literal["cpu", "cuda"] | None = Field(
        None,
        description="where the gradient buffer (streamed: the Fisher block sums) lives "
        "(default: the parameters' device)",
    )
    fisher: Literal["auto", "woodbury", "streamed"] = Field(
        "auto",
        description="how F^-1 is built: woodbury holds the m gradients and a factor (~2*m*d float32 "
        "values); streamed sums each block's B x B Fisher from chunks of gradients (d*B float64 "
        "values whatever m, needs block_size); auto: streamed when block_size < m, else woodbury",
    )

    storage_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Woodbury path: the dtype the factor W is stored in (null: the gradients', "
        "float32); bfloat16/float16 halve it, saliencies and masks unchanged (the diagonal is "
        "computed before rounding), updates move by ~3e-4 (bench/results/half_precision.md)",
    )

    _warned_damp: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _absolute_default(cls, data: Any) -> Any:
        """``relative_damp: false`` without a ``damp``: the absolute default, not the relative one."""
        if isinstance(data, dict) and data.get("relative_damp") is False and "damp" not in data:
            return {**data, "damp": ABSOLUTE_DAMP}
        return data

    @field_validator("num_grads")
    @classmethod
    def _check_num_grads(cls, value: int | dict[float, int]) -> int | dict[float, int]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"num_grads must be >= 1, got {value}")
            return value
        if not value:
            raise ValueError("a num_grads map needs at least the entry 0.0")
        bad = [k for k in value if not 0.0 <= k < 1.0]
        if bad:
            raise ValueError(f"num_grads map keys are sparsities in [0, 1), got {bad}")
        if 0.0 not in value:
            raise ValueError(f"a num_grads map needs an entry for 0.0 (the count at the start), got {value}")
        low = {k: v for k, v in value.items() if v < 1}
        if low:
            raise ValueError(f"num_grads counts must be >= 1, got {low}")
        return dict(sorted(value.items()))

    @model_validator(mode="after")
    def _streamed_needs_blocks(self) -> MFACPruning:
        if self.fisher == "streamed" and self.block_size is None:
            raise ValueError(
                "fisher: streamed needs a block_size (the d * B block sums); null needs woodbury"
            )
        return self

    # ------------------------------------------------------------------ settings helpers

    def grads_at(self, sparsity: float) -> int:
        """The number of gradients used by a sub-step whose target is ``sparsity``."""
        if isinstance(self.num_grads, int):
            return self.num_grads
        return next(v for k, v in reversed(self.num_grads.items()) if k <= sparsity + 1e-9)

    def max_grads(self) -> int:
        """The largest number of gradients any sub-step samples (for the memory preflight)."""
        return self.num_grads if isinstance(self.num_grads, int) else max(self.num_grads.values())

    def streamed(self, num_grads: int) -> bool:
        """True when a sub-step with ``num_grads`` gradients builds the streamed block Fisher."""
        if self.fisher == "auto":
            return self.block_size is not None and self.block_size < num_grads
        return self.fisher == "streamed"

    def chunk_rows(self, num_grads: int) -> int:
        """Gradient rows per chunk fed to the streamed Fisher."""
        return min(num_grads, max(MIN_CHUNK_ROWS, (self.block_size or 0) // 2))

    def gradient_bytes(self, num_params: int) -> int:
        """Bytes of the Fisher of the largest sub-step, as the path it takes needs them.

        Woodbury: the float32 gradient buffer (m x d) plus the factor W of FisherInverse (as large,
        or half with a half ``storage_dtype``).
        Streamed: the float64 block sums (about d * B) plus one float32 chunk of rows.
        """
        counts = self.num_grads.values() if isinstance(self.num_grads, dict) else [self.num_grads]
        return max(self._fisher_bytes(m, num_params) for m in counts)

    def gathers_rows(self) -> bool:
        """Whether some sub-step gathers the (m, d) rows over torch.distributed ranks (Woodbury);
        the streamed path all-reduces its block sums in place (``preflight(..., gathered=...)``)."""
        counts = self.num_grads.values() if isinstance(self.num_grads, dict) else [self.num_grads]
        return not all(self.streamed(m) for m in counts)

    def _storage_dtype(self) -> torch.dtype | None:
        """The torch dtype of ``storage_dtype`` (None: the gradients')."""
        return None if self.storage_dtype is None else getattr(torch, self.storage_dtype)

    def _fisher_bytes(self, num_grads: int, num_params: int) -> int:
        if not self.streamed(num_grads) or self.block_size is None:
            stored = 4 if self.storage_dtype is None else getattr(torch, self.storage_dtype).itemsize
            return (4 + stored) * num_grads * num_params  # float32 rows + the factor
        sums = BlockFisherInverse.bytes_needed(num_params, self.block_size) if num_params else 0
        return sums + 4 * self.chunk_rows(num_grads) * num_params

    def sub_targets(self, current: float, target: float) -> list[float]:
        """The R sparsities of the sub-steps from ``current`` to ``target`` (geometric in density)."""
        r = self.num_recomputations
        if target <= current or current >= 1.0:
            return [target]
        ratio = (1.0 - target) / (1.0 - current)
        out = [1.0 - (1.0 - current) * ratio ** (j / r) for j in range(1, r)]
        return [*out, target]

    # ------------------------------------------------------------------ hooks

    def initialize(self, session: Session) -> None:
        """Check that gradients can be sampled (the Session's data) where ``grads_device`` says."""
        super().initialize(session)
        if getattr(session, "sampler", None) is None:
            raise ValueError(f"{self.type} samples gradients: give the Session the training data (data=...)")
        if self.grads_device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{self.type}: grads_device is 'cuda' but no CUDA device is available")

    def update(self, session: Session) -> None:
        """Prune to the target at ``session.step`` in ``num_recomputations`` OBS sub-steps; log."""
        names = self._names
        target = self.target_at(session.step, session.steps_per_epoch)
        masks = {n: session.masks.mask(n) for n in names}
        total = sum(m.numel() for m in masks.values())
        current = 1.0 - sum(int(m.sum()) for m in masks.values()) / total
        lowest = min(session.masks.sparsity(n) for n in names)
        if target > lowest:  # else no parameter has anything left to prune
            for j, sparsity in enumerate(self.sub_targets(current, target), start=1):
                self._substep(session, names, sparsity, key=session.step * 1000 + j)
        kept = sum(int(session.masks.mask(n).sum()) for n in names)
        session.log("sparsity", 1.0 - kept / total)
        for name in names:
            session.log(f"sparsity/{name}", session.masks.sparsity(name))
        self._last_update = session.step

    def damping(self, grads: torch.Tensor) -> float:
        """lambda for this sub-step's (m, d) gradients (``compressor.mfac.obs.damping``).

        Absolute mode: warns (once) when the gradients' mean Fisher diagonal is below damp / 10.
        """
        scale = mean_fisher_diagonal(grads) if not (self.relative_damp or self._warned_damp) else 0.0
        self._warn_damp(scale)
        return damping(grads, self.damp, self.relative_damp)

    def damping_for(self, scale: float) -> float:
        """lambda from the mean Fisher diagonal ``scale`` = mean(diag(G^T G / m)) (as ``damping``)."""
        self._warn_damp(scale)
        if not self.relative_damp:
            return float(self.damp)
        return float(self.damp) * scale if scale > 0.0 else float(self.damp)

    def _warn_damp(self, scale: float) -> None:
        if not self.relative_damp and not self._warned_damp and scale < self.damp / WARN_RATIO:
            self._warned_damp = True
            warnings.warn(
                f"{self.type}: the sampled empirical Fisher's mean diagonal, mean(diag(G^T G / m)) = "
                f"{scale:.3g}, is below damp / {WARN_RATIO:g} (absolute damp {self.damp:g}): F^-1 is "
                "about I / damp and OBS ranks weights as magnitude pruning does. Use relative_damp: "
                f"true (lambda = damp * that mean; damp {RELATIVE_DAMP:g} by default) or a smaller damp.",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ one sub-step

    @torch.no_grad()
    def build_fisher(
        self,
        session: Session,
        names: list[str],
        current: dict[str, torch.Tensor],
        sizes: list[int],
        m: int,
        key: int,
    ) -> RemainingFisher:
        """F^-1 over the remaining weights (``current`` masks, ``sizes`` kept per parameter) from
        ``m`` gradients sampled at the current weights with the sampler's stream ``key``: the
        streamed block form or the Woodbury form (``streamed``)."""
        device = session.params[names[0]].device
        where = self.grads_device or device
        if self.streamed(m):
            fi = BlockFisherInverse(sum(sizes), self.block_size, dtype=torch.float64, device=where)
            rows = self.chunk_rows(m)
            for chunk in session.sampler.chunks(
                names, m, self.grad_batch_size, key=key, select=current, device=where, chunk_rows=rows
            ):
                fi.add(chunk)
            if distributed.world_size() > 1:
                fi.all_reduce()  # d * B sums instead of the m * d rows
            fi.damp = self.damping_for(fi.mean_fisher_diagonal())
            return RemainingFisher.streamed(fi, sizes, device)
        grads = session.sampler.sample(names, m, self.grad_batch_size, key=key, select=current, device=where)
        damp = self.damping(grads)
        return RemainingFisher.woodbury(grads, sizes, damp, self.block_size, device, self._storage_dtype())

    @torch.no_grad()
    def _substep(self, session: Session, names: list[str], sparsity: float, key: int) -> None:
        params = [session.params[n] for n in names]
        device = params[0].device
        current = {n: session.masks.mask(n).to(device=device, dtype=torch.bool) for n in names}
        alive = [current[n].reshape(-1) for n in names]
        sizes = [int(a.sum()) for a in alive]
        if sum(sizes) == 0:
            return
        fisher = self.build_fisher(session, names, current, sizes, self.grads_at(sparsity), key)
        # Per parameter: the coordinate of each flattened weight in its Fisher part (-1: pruned).
        coords = []
        for a, size in zip(alive, sizes, strict=True):
            c = torch.full((a.numel(),), -1, dtype=torch.int64, device=device)
            c[a] = torch.arange(size, device=device)
            coords.append(c)
        weights = [p.detach().reshape(-1).to(torch.float64) for p in params]
        parts = [fisher.part(i) for i in range(len(names))]
        local = [c + part.offset * (c >= 0) for c, part in zip(coords, parts, strict=True)]

        scores = {}
        for i, name in enumerate(names):
            saliency = obs_scores(parts[i], local[i], weights[i], self.structure, params[i].shape)
            scores[name] = saliency.reshape(params[i].shape)
        structures = dict.fromkeys(names, self.structure)
        new = select_masks(scores, sparsity, structures, self.global_ranking, current)

        # u over the concatenated remaining weights, then dw = -F^-1 u in one IHVP.
        u = torch.zeros(fisher.dim, dtype=torch.float64, device=device)
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        for i, name in enumerate(names):
            removed = alive[i] & ~new[name].to(device).reshape(-1)
            if not removed.any():
                continue
            u[starts[i] : starts[i + 1]] = obs_removal_vector(
                parts[i], local[i], weights[i], removed, self.structure, params[i].shape
            )
        dw = obs_update(fisher, u)
        for i, name in enumerate(names):
            moved = weights[i][alive[i]] + dw[starts[i] : starts[i + 1]]
            params[i].masked_scatter_(current[name], moved.to(params[i].dtype))
            session.masks.set(name, new[name])  # zeroes the removed weights exactly
