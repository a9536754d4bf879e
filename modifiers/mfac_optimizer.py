"""MFACOptimizer: train with the M-FAC optimizer (paper 4.2) over a window of the run.

Within [start, end) the modifier swaps the session's training optimizer for a ``MaskedMFAC`` over
its ``params`` and hands the training optimizer back at ``end`` (or in ``finalize``). Where pruning
masks exist, the M-FAC window holds only the unmasked coordinates, so its memory (m x kept values)
and the time of a step shrink with the density.

Parameters outside ``params`` are frozen while M-FAC is active (their gradients are dropped after
each step); leave ``params`` unset to train every trainable parameter with M-FAC.

Order with ``LearningRate``: a learning-rate schedule sets the lr of ``session.optimizer`` at its
``before_step``. List it *after* this modifier so that, at the step where M-FAC is swapped in, the
schedule already acts on M-FAC (and, at ``end``, on the training optimizer it hands back to).

``shard: true`` splits the window by coordinates over the ranks of a torch.distributed run (each
rank keeps m x kept/P values; see compressor/mfac/sharded.py). It applies only where
torch.distributed is initialized with a world size > 1; elsewhere the window is whole, so the same
recipe runs on one process. Sharded, the optimizer's ``state_dict`` is a collective: every rank must
build the checkpoint (rank 0 writes it); the state loads at any world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, PrivateAttr, field_validator

from compressor.mfac import SlidingFisherInverse
from compressor.mfac.sharded import Group, check_shard, sliding_window
from compressor.modifier import Modifier

if TYPE_CHECKING:
    from compressor.session import Session

WINDOW_KEY = "mfac_window"  # as in compressor.mfac.MFAC.state_dict
MASKS_KEY = "mfac_masks"

#: Per parameter: None (no mask, or nothing masked off) or (kept count, checksum of the kept indices).
Fingerprint = list[tuple[int, int] | None]


class MaskedMFAC(torch.optim.Optimizer):
    """``compressor.mfac.MFAC`` whose window holds only the coordinates that masks keep.

    Args:
        params: parameters or parameter groups, all of one floating dtype and on one device.
        lr, num_grads, damp, weight_decay, momentum: as in ``compressor.mfac.MFAC``.
        masks: parameter -> bool tensor of its shape (True: kept), read live at every step (for
            example the buffers of a ``compressor.masks.MaskSet``). Parameters without one are dense.
        shard, process_group: as in ``compressor.mfac.MFAC``: the window sharded by coordinates over
            torch.distributed ranks (the masks, and so the kept coordinates, must match on every rank).

    Each step gathers the kept gradient coordinates (weight decay folded in: g = grad + wd * p)
    into one vector, runs ``SlidingFisherInverse.update_mul`` on it, applies momentum
    v = mu * v + (1 - mu) * u over the kept coordinates and scatters ``-lr * v`` back: masked
    coordinates get no update (they are left bit for bit as they are). With no masks it computes
    exactly what ``MFAC`` computes.

    When the masks change (a fingerprint, the count and a checksum of the kept indices of each
    mask, is compared at every ``step``), the window is rebuilt over the new set of coordinates:
    **the gradients of the old window are dropped** and the window fills again from empty. The
    momentum of coordinates kept by both the old and the new masks is carried over; newly kept
    coordinates start from zero.

    ``state_dict`` holds the window (``mfac_window``), the momentum and the mask fingerprint
    (``mfac_masks``); ``load_state_dict`` needs the masks to be those the state was saved with.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        num_grads: int = 1024,
        damp: float = 1e-5,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
        *,
        shard: bool = False,
        process_group: Group = None,
    ) -> None:
        _check_hyper(lr=lr, weight_decay=weight_decay, momentum=momentum)
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
            raise ValueError(f"num_grads must be an integer >= 1, got {num_grads!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < math.inf:
            raise ValueError(f"damp must be a finite number > 0, got {damp!r}")
        self._building = True
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self._building = False
        self.num_grads, self.damp = num_grads, float(damp)
        self._shard = {"shard": shard, "process_group": process_group}
        check_shard(shard, process_group)
        flat = self._params()
        kinds = {(p.dtype, p.device) for p in flat}
        if len(kinds) != 1:
            found = sorted(map(str, kinds))
            raise ValueError(f"MaskedMFAC needs all parameters on one device with one dtype, got {found}")
        self._dtype, self._device = kinds.pop()
        if self._dtype not in (torch.float32, torch.float64):
            raise ValueError(f"MaskedMFAC supports float32 and float64 parameters, got {self._dtype}")
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
        self.rebuilds = 0  # how many times the masks changed under the window
        self._rebuild(self._current_fingerprint())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the window is built over a fixed set of parameters."""
        if not getattr(self, "_building", False):
            raise ValueError("MaskedMFAC cannot add parameter groups after construction")
        _check_hyper(**{k: v for k, v in param_group.items() if k in ("lr", "weight_decay", "momentum")})
        super().add_param_group(param_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def dim(self) -> int:
        """Coordinates the window covers: the kept entries of masked parameters plus all others."""
        return 0 if self.window is None else self.window.dim

    # ------------------------------------------------------------------ masks

    def _current_fingerprint(self) -> Fingerprint:
        return [None if mask is None else _mask_fingerprint(mask) for mask in self._masks]

    def _rebuild(self, fingerprint: Fingerprint) -> None:
        """Index the kept coordinates of ``fingerprint``'s masks; a fresh, empty window over them."""
        old_index = self._index
        params = self._params()
        index: list[torch.Tensor | None] = []
        for p, mask, mark in zip(params, self._masks, fingerprint, strict=True):
            dense = mask is None or mark is None or mark[0] == p.numel()
            index.append(None if dense else mask.reshape(-1).nonzero().squeeze(1))
        self._index, self._fingerprint = index, fingerprint
        for p, old, new in zip(params, old_index, index, strict=True):
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                self.state[p]["momentum_buffer"] = _reindex(buf, old, new, p)
        dim = sum(p.numel() if idx is None else idx.numel() for p, idx in zip(params, index, strict=True))
        self.window = (
            sliding_window(dim, self.num_grads, self.damp, self._device, self._dtype, **self._shard)
            if dim
            else None
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
        """One M-FAC step over the kept coordinates; ``closure`` is optional."""
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
                    raise RuntimeError("MaskedMFAC does not support sparse gradients")
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                idx = self._index[at]
                at += 1
                if idx is None:
                    if wd:
                        grad = grad.add(p, alpha=wd)
                    pieces.append(grad.reshape(-1))
                else:
                    g = grad.reshape(-1).index_select(0, idx)
                    if wd:
                        g = g.add(p.reshape(-1).index_select(0, idx), alpha=wd)
                    pieces.append(g)
        step = self.window.update_mul(torch.cat(pieces))
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

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Standard optimizer state (momentum) plus the window and the mask fingerprint."""
        state = super().state_dict()
        state[WINDOW_KEY] = None if self.window is None else self.window.state_dict()
        state[MASKS_KEY] = [None if mark is None else list(mark) for mark in self._fingerprint]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the masks must be those it was saved with (ValueError otherwise)."""
        state_dict = dict(state_dict)
        if WINDOW_KEY not in state_dict or MASKS_KEY not in state_dict:
            raise ValueError(f"not a MaskedMFAC state dict: '{WINDOW_KEY}' or '{MASKS_KEY}' is missing")
        window, marks = state_dict.pop(WINDOW_KEY), state_dict.pop(MASKS_KEY)
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


def _mask_fingerprint(mask: torch.Tensor) -> tuple[int, int] | None:
    """None when nothing is masked off; else (kept count, a hash-weighted sum of the kept indices)."""
    kept = mask.reshape(-1).nonzero().squeeze(1)
    if kept.numel() == mask.numel():
        return None
    # Knuth's multiplicative hash, reduced to 32 bits: a sum of < 2**31 of them fits in int64.
    checksum = int(((kept * 2654435761) & 0xFFFFFFFF).sum()) if kept.numel() else 0
    return kept.numel(), checksum


def _reindex(
    buf: torch.Tensor, old: torch.Tensor | None, new: torch.Tensor | None, p: torch.Tensor
) -> torch.Tensor:
    """A momentum buffer over ``old`` kept indices moved onto ``new`` ones (zeros where newly kept)."""
    if old is None:
        full = buf.reshape(-1)
    else:
        full = torch.zeros(p.numel(), dtype=buf.dtype, device=buf.device).index_copy_(0, old, buf)
    return full.reshape(p.shape).clone() if new is None else full.index_select(0, new)


def _distributed() -> bool:
    """Whether this process is one of several ranks of an initialized torch.distributed run."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_hyper(**values: float) -> None:
    """lr >= 0, weight_decay >= 0, 0 <= momentum < 1, all finite numbers."""
    limits = {"lr": (0.0, math.inf), "weight_decay": (0.0, math.inf), "momentum": (0.0, 1.0)}
    for name, value in values.items():
        low, high = limits[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not (low <= value < high):
            raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value}")


class MFACOptimizer(Modifier):
    """Swap in the M-FAC optimizer over [start, end); masked coordinates stay out of its window.

    Memory: ``num_grads`` x (kept weights) values of the parameters' dtype, plus three
    ``num_grads`` x ``num_grads`` float64 matrices. Its whole state (window, momentum, mask
    fingerprint) is in ``state_dict``, so a resumed run continues exactly; the optimizer is
    re-created and the state applied in ``initialize`` (the model, masks included, must be
    restored first, as the trainer does).
    """

    type: Literal["MFACOptimizer"] = "MFACOptimizer"
    lr: float = Field(gt=0, allow_inf_nan=False, description="step size (> 0)")
    num_grads: int = Field(1024, ge=1, description="m, the number of gradients in the window")
    damp: float = Field(1e-5, gt=0, allow_inf_nan=False, description="dampening lambda > 0 of the Fisher")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="L2, folded into the gradient")
    momentum: float = Field(0.0, ge=0, lt=1, description="mu in [0, 1): v = mu v + (1 - mu) F^-1 g")
    params: list[str] | None = Field(
        None, min_length=1, description="exact names, globs or re: patterns; None: all trainable parameters"
    )
    shard: bool = Field(
        False, strict=True, description="shard the window over torch.distributed ranks (world size > 1 only)"
    )

    _names: list[str] = PrivateAttr(default_factory=list)
    _optimizer: MaskedMFAC | None = PrivateAttr(default=None)
    _pending: dict[str, Any] | None = PrivateAttr(default=None)
    _logged_dim: int | None = PrivateAttr(default=None)

    @field_validator("num_grads", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("num_grads must be an integer >= 1, got a boolean")
        return value

    def parameter_patterns(self) -> list[str]:
        return list(self.params or [])

    def gradient_bytes(self, num_params: int) -> int:
        """The window: num_grads float32 gradients of the selected (at most all) weights; sharded over
        P ranks, this rank's num_grads x ceil(num_params / P)."""
        ranks = dist.get_world_size() if self.shard and _distributed() else 1
        return 4 * self.num_grads * -(-num_params // ranks)

    @property
    def optimizer(self) -> MaskedMFAC | None:
        """The M-FAC optimizer while it is active, else None."""
        return self._optimizer

    def initialize(self, session: Session) -> None:
        names = session.match(self.params) if self.params is not None else list(session.params)
        self._names = [n for n in names if session.params[n].requires_grad]
        if not self._names:
            raise ValueError(f"{self.type}: none of the selected parameters is trainable")
        self._sync(session)

    def before_step(self, session: Session) -> None:
        self._sync(session)

    def after_step(self, session: Session) -> None:
        if self._optimizer is None:
            return
        if len(self._names) < len(session.params):  # frozen while M-FAC is active: drop their grads
            chosen = set(self._names)
            for name, p in session.params.items():
                if name not in chosen:
                    p.grad = None
        if self._optimizer.dim != self._logged_dim:
            self._logged_dim = self._optimizer.dim
            session.log("mfac_window_dim", self._optimizer.dim)

    def finalize(self, session: Session) -> None:
        self._deactivate(session)
        self._pending = None

    def _sync(self, session: Session) -> None:
        """Active exactly when start <= step < end; apply a pending (resumed) state on activation."""
        start, end = session.window(self)
        inside = start <= session.step and (end is None or session.step < end)
        if not inside:
            self._deactivate(session)
            self._pending = None
            return
        if self._optimizer is None:
            masks = {session.params[n]: session.masks.mask(n) for n in self._names if n in session.masks}
            self._optimizer = MaskedMFAC(
                [session.params[n] for n in self._names],
                lr=self.lr,
                num_grads=self.num_grads,
                damp=self.damp,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                masks=masks,
                shard=self.shard and _distributed(),
            )
            session.swap_optimizer(self._optimizer)
        if self._pending is not None:
            if self._pending.get("active") and self._pending.get("optimizer") is not None:
                self._optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None

    def _deactivate(self, session: Session) -> None:
        if self._optimizer is not None:
            if session.optimizer is self._optimizer:
                session.swap_optimizer(None)
            self._optimizer = None

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            return dict(self._pending)
        active = self._optimizer is not None
        return {
            "active": active,
            "optimizer": self._optimizer.state_dict() if active else None,
            "logged_dim": self._logged_dim,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep ``state`` until the optimizer is re-created (``initialize`` or ``before_step``)."""
        self._pending = dict(state) if state else None
        self._logged_dim = state.get("logged_dim") if state else None
