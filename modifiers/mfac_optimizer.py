"""MFACOptimizer: train with the M-FAC optimizer (paper 4.2) over a window of the run.

Within [start, end) the modifier swaps the session's training optimizer for a
``compressor.mfac.MFAC`` over its ``params``, given the session's masks, and hands the training
optimizer back at ``end`` (or in ``finalize``). Where pruning masks exist, the M-FAC window holds
only the unmasked coordinates, so its memory (m x kept values) and the time of a step shrink with
the density.

``lr`` is not SGD's: the step lr * F^-1 g has a length of about lr * m / |g| (m = ``num_grads``; the
derivation is in ``compressor.mfac.optim``), so the useful lr scales with |g| / m. For steps of
length s take lr ~ s * |g| / m; the optimizer warns once when its first steps are below 1e-5 of the
parameters' norm (fine-tuning all-MiniLM-L6-v2 at m = 64 wanted lr 1e-2, where the paper's 1e-4
barely moved it).

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

``storage_dtype: bfloat16`` (or ``float16``) keeps the window in half precision: half the memory
of the window, the products accumulated in the parameters' dtype (see ``compressor.mfac.MFAC``).
bfloat16 is the safer choice (float32's exponent range); float16 is stored with a power-of-two
scale per gradient so that it neither overflows nor underflows, and keeps 3 more mantissa bits.
Not with ``shard: true`` yet. Measured cost: bench/results/half_precision.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, PrivateAttr, field_validator, model_validator

from compressor.core.modifier import Modifier
from compressor.mfac import MFAC

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


#: ``storage_dtype`` values and their torch dtypes (null: the parameters' dtype).
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _distributed() -> bool:
    """Whether this process is one of several ranks of an initialized torch.distributed run."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MFACOptimizer(Modifier):
    """Swap in the M-FAC optimizer over [start, end); masked coordinates stay out of its window.

    Memory: ``num_grads`` x (kept weights) values of ``storage_dtype`` (null: the parameters' dtype;
    bfloat16 or float16 halve it, plus ``num_grads`` scales), plus three
    ``num_grads`` x ``num_grads`` float64 matrices. Its whole state (window, momentum, mask
    fingerprint) is in ``state_dict``, so a resumed run continues exactly; the optimizer is
    re-created and the state applied in ``initialize`` (the model, masks included, must be
    restored first, as the trainer does).
    """

    type: Literal["MFACOptimizer"] = "MFACOptimizer"
    lr: float = Field(
        gt=0, allow_inf_nan=False, description="step size (> 0); the step's length is about lr * m / |g|"
    )
    num_grads: int = Field(1024, ge=1, description="m, the number of gradients in the window")
    damp: float = Field(1e-5, gt=0, allow_inf_nan=False, description="dampening lambda > 0 of the Fisher")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="L2, folded into the gradient")
    momentum: float = Field(0.0, ge=0, lt=1, description="mu in [0, 1): v = mu v + (1 - mu) F^-1 g")
    params: list[str] | None = Field(
        None, min_length=1, description="exact names, globs or re: patterns; None: all trainable parameters"
    )
    count_scaling: bool = Field(
        False, strict=True, description="F = damp I + G^T G / min(count, m): no oversized steps while filling"
    )
    shard: bool = Field(
        False, strict=True, description="shard the window over torch.distributed ranks (world size > 1 only)"
    )
    storage_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="dtype of the stored window: bfloat16/float16 halve its memory; null: the parameters'",
    )

    _names: list[str] = PrivateAttr(default_factory=list)
    _optimizer: MFAC | None = PrivateAttr(default=None)
    _pending: dict[str, Any] | None = PrivateAttr(default=None)
    _logged_dim: int | None = PrivateAttr(default=None)

    @field_validator("num_grads", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("num_grads must be an integer >= 1, got a boolean")
        return value

    @model_validator(mode="after")
    def _half_not_sharded(self) -> MFACOptimizer:
        if self.shard and self.storage_dtype in ("bfloat16", "float16"):
            raise ValueError("storage_dtype bfloat16/float16 is not supported with shard: true yet")
        return self

    def parameter_patterns(self) -> list[str]:
        return list(self.params or [])

    def gradient_bytes(self, num_params: int) -> int:
        """The window: num_grads gradients (float32, or ``storage_dtype``) of the selected (at most all)
        weights; sharded over P ranks, this rank's num_grads x ceil(num_params / P)."""
        ranks = dist.get_world_size() if self.shard and _distributed() else 1
        size = 4 if self.storage_dtype is None else STORAGE_DTYPES[self.storage_dtype].itemsize
        return size * self.num_grads * -(-num_params // ranks)

    @property
    def optimizer(self) -> MFAC | None:
        """The M-FAC optimizer while it is active, else None."""
        return self._optimizer

    def initialize(self, session: Session) -> None:
        super().initialize(session)
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
        """Swapped in exactly while ``active`` (start <= step < end); apply a pending (resumed) state on
        activation."""
        if not self.active(session.step):
            self._deactivate(session)
            self._pending = None
            return
        if self._optimizer is None:
            masks = {session.params[n]: session.masks.mask(n) for n in self._names if n in session.masks}
            self._optimizer = MFAC(
                [session.params[n] for n in self._names],
                lr=self.lr,
                num_grads=self.num_grads,
                damp=self.damp,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                masks=masks,
                count_scaling=self.count_scaling,
                shard=self.shard and _distributed(),
                storage_dtype=None if self.storage_dtype is None else STORAGE_DTYPES[self.storage_dtype],
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
