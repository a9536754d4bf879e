"""The M-FAC optimizer (paper section 4.2): preconditioned SGD with the dynamic algorithm.

At each step, over all parameters flattened into one d-vector:

    g = grad + weight_decay * p          (weight decay folded into the gradient)
    window.update(g);  u = F^-1 g        (one ``update_mul``: two passes over the window)
    v = mu * v + (1 - mu) * u            (optional momentum, an average of preconditioned steps)
    p = p - lr * v

With ``shard=True`` the window is a ``ShardedSlidingFisherInverse`` (sharded.py): each rank of a
torch.distributed group keeps m x d/P of it, and the step above is computed with one all-reduce of m
numbers and one all-gather of d values. Every rank then applies the same full update to its replica.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import _checks
from .sharded import Group, sliding_window

WINDOW_KEY = "mfac_window"


class MFAC(torch.optim.Optimizer):
    """Second-order optimizer over a sliding window of the last ``num_grads`` gradients.

    Args:
        params: parameters or parameter groups, all of one floating dtype and on one device.
            ``lr``, ``weight_decay`` and ``momentum`` may differ between groups; the window
            (one Fisher over all parameters) and ``num_grads``/``damp`` are shared.
        lr: step size.
        num_grads: m, the window length.
        damp: the dampening lambda > 0 of F.
        weight_decay: L2 coefficient, added to the gradient before it enters the window.
        momentum: mu in [0, 1); 0 disables momentum.
        shard: shard the window by coordinates over the ranks of ``process_group`` (needs an
            initialized torch.distributed group, else RuntimeError; world size 1 works and gives
            the unsharded result). False (the default) is the single-process optimizer.
        process_group: the group to shard over (shard=True only); None: the default group.

    A parameter whose ``.grad`` is None contributes a zero gradient (plus weight decay); a step
    where no parameter has a gradient does nothing. Memory: the window, m x d values (sharded over P
    ranks: m x ceil(d / P) per rank).

    Sharded (``shard=True``), every rank must call ``step``, ``state_dict`` and ``load_state_dict``
    (they are collectives) and the gradients must be the same on every rank, as DistributedDataParallel
    makes them (``opt.window.check_inputs = True`` checks it at each step, for debugging). The updates
    are then bitwise identical on every rank and equal to the unsharded ones to float32 rounding.
    ``state_dict`` holds the whole window in the unsharded form, so it loads at any world size,
    sharded or not.

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
        shard: bool = False,
        process_group: Group = None,
    ) -> None:
        _check_hyper(lr=lr, weight_decay=weight_decay, momentum=momentum)
        self._building = True
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self._building = False
        self.num_grads = _checks.check_positive_int(num_grads, "num_grads")
        self.damp = _checks.check_damp(damp)
        flat = self._params()
        kinds = {(p.dtype, p.device) for p in flat}
        if len(kinds) != 1:
            found = sorted(map(str, kinds))
            raise ValueError(f"MFAC needs all parameters on one device with one dtype, got {found}")
        dtype, device = kinds.pop()
        if dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"MFAC supports float32 and float64 parameters, got {dtype}")
        dim = sum(p.numel() for p in flat)
        self.window = sliding_window(
            dim, num_grads, damp, device, dtype, shard=shard, process_group=process_group
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the window's dimension is fixed once built."""
        if not getattr(self, "_building", False):
            raise ValueError("MFAC cannot add parameter groups after construction (the window size is fixed)")
        _check_hyper(**{k: v for k, v in param_group.items() if k in ("lr", "weight_decay", "momentum")})
        super().add_param_group(param_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One M-FAC step; ``closure`` (re-evaluating the loss with gradients) is optional."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        if all(p.grad is None for p in params):
            return loss
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients")
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                pieces.append(grad.reshape(-1))
        step = self.window.update_mul(torch.cat(pieces))
        offset = 0
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                u = step[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if mu:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    u = state["momentum_buffer"].mul_(mu).add_(u, alpha=1.0 - mu)
                p.add_(u, alpha=-group["lr"])
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state plus the window (``mfac_window``), for an exact resume.

        Sharded, a collective that gathers the whole (m, d) window on every rank (transient memory)."""
        state = super().state_dict()
        state[WINDOW_KEY] = self.window.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict`` of an MFAC over parameters of the same shapes (any world size)."""
        state_dict = dict(state_dict)
        window = state_dict.pop(WINDOW_KEY, None)
        if window is None:
            raise ValueError(f"not an MFAC state dict: the '{WINDOW_KEY}' entry is missing")
        super().load_state_dict(state_dict)
        self.window.load_state_dict(window)


def _check_hyper(**values: float) -> None:
    """lr >= 0, weight_decay >= 0, 0 <= momentum < 1, all finite numbers."""
    limits = {"lr": (0.0, math.inf), "weight_decay": (0.0, math.inf), "momentum": (0.0, 1.0)}
    for name, value in values.items():
        low, high = limits[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not (low <= value < high):
            raise ValueError(f"{name} must be in [{low:g}, {high:g}), got {value}")
