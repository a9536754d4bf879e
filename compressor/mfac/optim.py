"""The M-FAC optimizer (paper section 4.2): preconditioned SGD with the dynamic algorithm.

At each step, over all parameters flattened into one d-vector:

    g = grad + weight_decay * p          (weight decay folded into the gradient)
    window.update(g);  u = F^-1 g        (one ``update_mul``: two passes over the window)
    v = mu * v + (1 - mu) * u            (optional momentum, an average of preconditioned steps)
    p = p - lr * v

With ``shard=True`` the window is a ``ShardedSlidingFisherInverse`` (sharded.py): each rank of a
torch.distributed group keeps m x d/P of it, and the step above is computed with one all-reduce of m
numbers and one all-gather of d values. Every rank then applies the same full update to its replica.

The step's length, and so the useful lr (F = damp I + G^T G / m over the window's rows g_i, with
K = m damp I + G G^T, m x m): the push-through identity F^-1 G^T = m G^T K^-1 gives, for g = g_k in
the window (the current gradient always is),

    g . F^-1 g = m (1 - m damp [K^-1]_kk) <= m,   so |F^-1 g| >= (m / |g|) (1 - m damp [K^-1]_kk),

and |F^-1 g| = |g| / (|g|^2 / m + damp) exactly when the window's gradients are orthogonal (about so
when d >> m and noise dominates them; correlated ones make the step longer, not shorter). So while
|g|^2 / m >> damp the step has a length of about m / |g|: proportional to m and inversely
proportional to the gradient's norm, where SGD's is |g|. An lr does not carry over from SGD, Adam or
another m: for steps of length s, lr ~ s |g| / m (all-MiniLM-L6-v2 fine-tuning at m = 64, |g| ~ 9:
|F^-1 g| ~ 7; the paper's lr 1e-4 barely moved it, 1e-2 did best). Only when |g|^2 / m << damp is it
SGD with lr / damp. ``MFAC`` warns once when its first steps are too small to move the parameters
(``SMALL_STEP_RATIO``).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import _checks
from ._kept import Fingerprint, kept_index, mask_fingerprint, reindex
from .dynamic import SlidingFisherInverse
from .sharded import Group, check_shard, sliding_window

WINDOW_KEY = "mfac_window"
MASKS_KEY = "mfac_masks"

#: The step-size check: MFAC warns once (UserWarning) when the median over its first
#: STEP_CHECK_STEPS steps of lr * |F^-1 g| / |p| (the update without momentum against the norm of
#: all its parameters) is below SMALL_STEP_RATIO. At 1e-5 per step, a thousand steps move the
#: parameters by at most 1% of their norm even if every step points the same way (a random walk:
#: 0.03%). In the fine-tuning study of bench/quality_minilm.py (part j: all-MiniLM-L6-v2, m = 64,
#: |g| ~ 9, so |F^-1 g| ~ 7; |p| ~ 2e2 estimated from a 22.7M-parameter encoder's weights of rms
#: ~0.045) the paper's lr 1e-4 (a ratio of ~3e-6: warned) left the embeddings at cosine 0.9997 to
#: the dense ones after 125 steps, lr 1e-3 (~3e-5) moved them to 0.974, and the best lr, 1e-2, took
#: steps of ~3e-4; AdamW's useful lrs took first steps of ~2e-4 to 2e-3 (lr * sqrt(d) / |p|).
SMALL_STEP_RATIO = 1e-5
STEP_CHECK_STEPS = 10


class MFAC(torch.optim.Optimizer):
    """Second-order optimizer over a sliding window of the last ``num_grads`` gradients.

    Args:
        params: parameters or parameter groups, all of one floating dtype and on one device.
            ``lr``, ``weight_decay`` and ``momentum`` may differ between groups; the window
            (one Fisher over all parameters) and ``num_grads``/``damp`` are shared.
        lr: step size. The step lr * F^-1 g has a length of about lr * m / |g| (module docstring),
            not lr * |g| as in SGD: for steps of length s take lr ~ s * |g| / m. It warns once if
            the first steps are below ``SMALL_STEP_RATIO`` of the parameters' norm.
        num_grads: m, the window length.
        damp: the dampening lambda > 0 of F.
        weight_decay: L2 coefficient, added to the gradient before it enters the window.
        momentum: mu in [0, 1); 0 disables momentum.
        shard: shard the window by coordinates over the ranks of ``process_group`` (needs an
            initialized torch.distributed group, else RuntimeError; world size 1 works and gives
            the unsharded result). False (the default) is the single-process optimizer.
        process_group: the group to shard over (shard=True only); None: the default group.
        count_scaling: F = damp*I + G^T G / n with n the gradients in the window so far (min(count,
            m)) instead of m: no oversized steps while the window fills (the reference's later
            ``fix_scaling``). False (the default) is the paper's 1/m.
        masks: parameter -> bool tensor of its shape (True: kept), read live at every step (for
            example the buffers of a ``compressor.masks.MaskSet``). The window then holds only the
            kept coordinates: memory and time linear in the density (paper, sparse fine-tuning).
            Masked coordinates get no update (left bit for bit as they are). Parameters without a
            mask are dense. With ``shard=True`` the masks must match on every rank.
        storage_dtype: the dtype the window is kept in; None: the parameters' dtype. torch.bfloat16
            or torch.float16 halve the window's memory (the largest part of M-FAC's): each gradient
            is rounded (with a power-of-two scale per slot, so float16 cannot overflow or underflow)
            as it enters the window, and the products upcast it a page at a time and accumulate in
            the parameters' dtype, G G^T in float64 (see ``SlidingFisherInverse``). Not yet with
            ``shard=True`` (ValueError).

    A parameter whose ``.grad`` is None contributes a zero gradient (plus weight decay); a step
    where no parameter has a gradient does nothing. Memory: the window, m x d values (sharded over P
    ranks: m x ceil(d / P) per rank).

    Sharded (``shard=True``), every rank must call ``step``, ``state_dict`` and ``load_state_dict``
    (they are collectives) and the gradients must be the same on every rank, as DistributedDataParallel
    makes them (``opt.window.check_inputs = True`` checks it at each step, for debugging). The updates
    are then bitwise identical on every rank and equal to the unsharded ones to float32 rounding.
    ``state_dict`` holds the whole window in the unsharded form, so it loads at any world size,
    sharded or not.

    When the masks change (a fingerprint, the count and a checksum of the kept indices of each
    mask, is compared at every ``step``), the window is rebuilt over the new set of coordinates:
    **the gradients of the old window are dropped** and it fills again from empty. The momentum of
    coordinates kept by both the old and the new masks is carried over; newly kept ones start at 0.
    ``rebuilds`` counts these; ``dim`` is the number of coordinates the window covers.

    Example::

        opt = MFAC(model.parameters(), lr=1e-3, num_grads=512)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        num_grads: int = 1024,
        damp: float = 1e-5,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        *,
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
        count_scaling: bool = False,
        shard: bool = False,
        process_group: Group = None,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        _check_hyper(lr=lr, weight_decay=weight_decay, momentum=momentum)
        self._building = True
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self._building = False
        self.num_grads = _checks.check_positive_int(num_grads, "num_grads")
        self.damp = _checks.check_damp(damp)
        check_shard(shard, process_group)
        self._window_options = dict(
            shard=shard, process_group=process_group, count_scaling=count_scaling, storage_dtype=storage_dtype
        )
        flat = self._params()
        kinds = {(p.dtype, p.device) for p in flat}
        if len(kinds) != 1:
            found = sorted(map(str, kinds))
            raise ValueError(f"MFAC needs all parameters on one device with one dtype, got {found}")
        self._dtype, self._device = kinds.pop()
        if self._dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"MFAC supports float32 and float64 parameters, got {self._dtype}")
        _checks.check_storage_dtype(storage_dtype, self._dtype)
        if shard and _checks.is_reduced(_checks.check_storage_dtype(storage_dtype, self._dtype), self._dtype):
            raise ValueError(
                f"storage_dtype {storage_dtype} is not supported with shard=True yet; use one or the other"
            )
        self._masked = masks is not None
        by_id = {id(p): m for p, m in (masks or {}).items()}
        self._masks: list[torch.Tensor | None] = [by_id.pop(id(p), None) for p in flat]
        if by_id:
            raise ValueError(f"masks given for {len(by_id)} tensor(s) that are not among the parameters")
        for p, mask in zip(flat, self._masks, strict=True):
            if mask is not None and (mask.dtype != torch.bool or mask.shape != p.shape):
                raise ValueError(f"a mask must be a bool tensor of its parameter's shape {tuple(p.shape)}")
        self._index: list[torch.Tensor | None] = [None] * len(flat)
        self._fingerprint: Fingerprint = [None] * len(flat)
        self.window: SlidingFisherInverse | None = None
        self.rebuilds = 0
        self._rebuild(self._current_fingerprint())
        #: the step-size check (``_check_step_size``): each group's lr as constructed, and per step
        #: (lr * |u| / |p|, |g|, |u|) until STEP_CHECK_STEPS steps are in (then None: checked)
        self._set_lrs = [group["lr"] for group in self.param_groups]
        self._first_steps: list[tuple[float, float, float]] | None = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the window's dimension is fixed once built."""
        if not getattr(self, "_building", False):
            raise ValueError("MFAC cannot add parameter groups after construction (the window size is fixed)")
        _check_hyper(**{k: v for k, v in param_group.items() if k in ("lr", "weight_decay", "momentum")})
        super().add_param_group(param_group)

    def constructor_kwargs(self) -> dict[str, Any]:
        """The keyword arguments this optimizer was built with, besides ``params``.

        ``MFAC(groups, **opt.constructor_kwargs())`` builds it again over other tensors (each group
        keeps its own lr, weight_decay and momentum); ``masks`` is keyed by the current parameters.
        Channel surgery rebuilds it so when the parameters change shape.
        """
        masks = {p: m for p, m in zip(self._params(), self._masks, strict=True) if m is not None}
        return {
            **{k: self.defaults[k] for k in ("lr", "weight_decay", "momentum")},
            "num_grads": self.num_grads,
            "damp": self.damp,
            "masks": masks if self._masked else None,
            **self._window_options,
        }

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def dim(self) -> int:
        """Coordinates the window covers: the kept entries of masked parameters plus all others."""
        return 0 if self.window is None else self.window.dim

    # ------------------------------------------------------------------ masks

    def _current_fingerprint(self) -> Fingerprint:
        return [None if mask is None else mask_fingerprint(mask) for mask in self._masks]

    def _rebuild(self, fingerprint: Fingerprint) -> None:
        """Index the kept coordinates of ``fingerprint``'s masks; a fresh, empty window over them."""
        old_index, params = self._index, self._params()
        index = [kept_index(p, m, mark) for p, m, mark in zip(params, self._masks, fingerprint, strict=True)]
        self._index, self._fingerprint = index, fingerprint
        for p, old, new in zip(params, old_index, index, strict=True):
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                self.state[p]["momentum_buffer"] = reindex(buf, old, new, p)
        dim = sum(p.numel() if idx is None else idx.numel() for p, idx in zip(params, index, strict=True))
        if dim == 0 and self._masked:  # everything masked off: nothing to train
            self.window = None
            return
        self.window = sliding_window(
            dim, self.num_grads, self.damp, self._device, self._dtype, **self._window_options
        )

    def sync_masks(self) -> bool:
        """Rebuild the window if the masks changed since it was built; returns whether it did."""
        fingerprint = self._current_fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._rebuild(fingerprint)
        self.rebuilds += 1
        return True

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One M-FAC step over the kept coordinates; ``closure`` (re-evaluating the loss) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sync_masks()
        params = self._params()
        if self.window is None or all(p.grad is None for p in params):
            return loss
        pieces, at = [], 0
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                idx = self._index[at]
                at += 1
                if idx is None:
                    pieces.append((grad.add(p, alpha=wd) if wd else grad).reshape(-1))
                else:
                    g = grad.reshape(-1).index_select(0, idx)
                    pieces.append(g.add(p.reshape(-1).index_select(0, idx), alpha=wd) if wd else g)
        flat_grad = torch.cat(pieces)
        step = self.window.update_mul(flat_grad)
        if self._first_steps is not None:
            self._check_step_size(flat_grad, step)
        offset, at = 0, 0
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                idx = self._index[at]
                at += 1
                n = p.numel() if idx is None else idx.numel()
                u = step[offset : offset + n]
                offset += n
                if idx is None:
                    u = u.view_as(p)
                if mu:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(u)
                    u = state["momentum_buffer"].mul_(mu).add_(u, alpha=1.0 - mu)
                if idx is None:
                    p.add_(u, alpha=-group["lr"])
                elif p.is_contiguous():
                    p.view(-1).index_add_(0, idx, u, alpha=-group["lr"])
                else:  # e.g. channels_last: scatter into a dense update of the logical layout
                    full = torch.zeros(p.numel(), dtype=p.dtype, device=p.device).index_copy_(0, idx, u)
                    p.add_(full.view(p.shape), alpha=-group["lr"])
        return loss

    def _check_step_size(self, grad: torch.Tensor, step: torch.Tensor) -> None:
        """Record lr * |u| / |p| for this step (u = F^-1 g, ``step``, over the window's coordinates);
        after STEP_CHECK_STEPS steps, warn once if their median is below SMALL_STEP_RATIO.

        The lr of each group is the largest of its current lr, its ``initial_lr`` (torch's LR
        schedulers) and the lr it was built with, so that a warm-up from about 0 does not count as
        too small. With ``count_scaling`` the step is scaled by m / min(count, m), to what it will be
        once the window is full. Steps where |p| or |g| is 0 or a norm not finite are not counted; with
        every lr 0 the check ends (no step was asked for).
        """
        records, window = self._first_steps, self.window
        if records is None or window is None:
            return
        lrs = [
            max(group["lr"], group.get("initial_lr", 0.0), set_lr)
            for group, set_lr in zip(self.param_groups, self._set_lrs, strict=True)
        ]
        if max(lrs) <= 0.0:
            self._first_steps = None
            return
        update2, p2, offset, at = 0.0, 0.0, 0, 0
        for group, lr in zip(self.param_groups, lrs, strict=True):
            n = 0
            for p in group["params"]:
                idx = self._index[at]
                at += 1
                n += p.numel() if idx is None else idx.numel()
                p2 += _norm(p) ** 2
            update2 += (lr * _norm(step[offset : offset + n])) ** 2
            offset += n
        if window.count_scaling:
            update2 *= (self.num_grads / max(1, min(window.count, self.num_grads))) ** 2
        grad_norm, step_norm = _norm(grad), _norm(step)
        if not (p2 > 0.0 and grad_norm > 0.0 and math.isfinite(p2 + update2 + grad_norm + step_norm)):
            return
        records.append((math.sqrt(update2 / p2), grad_norm, step_norm))
        if len(records) < STEP_CHECK_STEPS:
            return
        self._first_steps = None
        ratio, g, u = (statistics.median(r[k] for r in records) for k in range(3))
        if ratio >= SMALL_STEP_RATIO:
            return
        lr = max(lrs)
        low, high = (lr * target / ratio if ratio > 0 else math.inf for target in (1e-4, 1e-3))
        warnings.warn(
            f"MFAC: over its first {len(records)} steps lr * |F^-1 g| / |p| had a median of {ratio:.1e} "
            f"(below {SMALL_STEP_RATIO:g}): at lr={lr:g} the updates barely move the parameters. "
            f"|F^-1 g| is about m / |g| for g in the window, not |g| as in SGD (here m={self.num_grads}, "
            f"median |g| = {g:.3g}, median |F^-1 g| = {u:.3g}), so the useful lr scales with |g| / m: "
            f"lr ~ {low:.0e} to {high:.0e} takes steps of 1e-4 to 1e-3 of |p| (tune it on held-out data)",
            UserWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state plus the window (``mfac_window``) and, with masks, their
        fingerprint (``mfac_masks``), for an exact resume.

        Sharded, a collective that gathers the whole (m, d) window on every rank (transient memory)."""
        state = super().state_dict()
        state[WINDOW_KEY] = None if self.window is None else self.window.state_dict()
        if self._masked:
            state[MASKS_KEY] = [None if mark is None else list(mark) for mark in self._fingerprint]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of an MFAC over parameters of the same shapes (any world size);
        with masks, they must be those the state was saved with (ValueError otherwise)."""
        state_dict = dict(state_dict)
        if WINDOW_KEY not in state_dict or (self._masked and MASKS_KEY not in state_dict):
            keys = f"'{WINDOW_KEY}'" + (f" or '{MASKS_KEY}'" if self._masked else "")
            raise ValueError(f"not an MFAC state dict: {keys} is missing")
        window = state_dict.pop(WINDOW_KEY)
        marks = state_dict.pop(MASKS_KEY, None)
        if self._masked:
            saved = [None if mark is None else (int(mark[0]), int(mark[1])) for mark in marks]
            self.sync_masks()
            if saved != self._fingerprint:
                raise ValueError(
                    "the masks differ from those the M-FAC state was saved with; restore the model "
                    "(its mask buffers) from the same checkpoint before the optimizer state"
                )
        super().load_state_dict(state_dict)
        if self.window is not None:
            self.window.load_state_dict(window)


def _norm(t: torch.Tensor) -> float:
    """The Euclidean norm of ``t``'s values, summed in float64."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def _check_hyper(**values: float) -> None:
    """lr >= 0, weight_decay >= 0, 0 <= momentum < 1, all finite numbers."""
    limits = {"lr": (0.0, math.inf), "weight_decay": (0.0, math.inf), "momentum": (0.0, 1.0)}
    for name, value in values.items():
        low, high = limits[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not (low <= value < high):
            raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value}")
