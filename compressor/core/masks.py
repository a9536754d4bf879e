"""Pruning masks kept inside the model, so a checkpoint carries them and a resume restores them exactly.

Each selected parameter ``<module>.<leaf>`` gets a persistent bool buffer ``<module>.<leaf>_mask``
(True: kept, False: pruned) on its owning module, so ``model.state_dict()`` holds it. Masked
weights are held at exact zero by the usual trio: zeroed when a mask is set, masked gradients
zeroed by a tensor hook, and ``apply()`` after every optimizer step (momentum and weight decay
move zeroed weights otherwise).

A model restored from a checkpoint needs its MaskSet created *before* ``load_state_dict`` (the mask
keys must exist); ``mask_names(state_dict)`` lists the parameters that have one.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compressor.core.params import normalize

MASK_SUFFIX = "_mask"


@dataclass
class _Entry:
    module: nn.Module
    leaf: str
    param: nn.Parameter
    hook: RemovableHandle | None

    @property
    def buffer(self) -> str:
        return self.leaf + MASK_SUFFIX

    @property
    def mask(self) -> torch.Tensor:
        return self.module._buffers[self.buffer]


def mask_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Normalized names of the parameters whose ``<name>_mask`` entry is in ``state_dict``."""
    return [
        normalize(key[: -len(MASK_SUFFIX)])
        for key in state_dict
        if key.endswith(MASK_SUFFIX) and key[: -len(MASK_SUFFIX)] in state_dict
    ]


class MaskSet:
    """One bool mask per selected parameter, stored as a persistent buffer next to it.

    Args:
        model: the model, possibly wrapped (``module.`` / ``_orig_mod.`` prefixes).
        names: parameter names, normalized or not. A bool buffer of the right shape that already
            exists (from an earlier MaskSet) is kept; otherwise the mask starts all True.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        raw = {normalize(n): n for n, _ in model.named_parameters()}
        self._entries: dict[str, _Entry] = {}
        for name in dict.fromkeys(normalize(n) for n in names):
            if name not in raw:
                close = difflib.get_close_matches(name, list(raw), n=3, cutoff=0.0)
                raise KeyError(f"no parameter {name!r} in the model; closest: {close}")
            owner, _, leaf = raw[name].rpartition(".")
            module = model.get_submodule(owner)
            param = getattr(module, leaf)
            self._entries[name] = _Entry(module, leaf, param, None)
            self._ensure_buffer(name, self._entries[name])
        for entry in self._entries.values():
            if entry.param.requires_grad:
                entry.hook = entry.param.register_hook(self._grad_hook(entry))
        self.apply()

    @staticmethod
    def _ensure_buffer(name: str, entry: _Entry) -> None:
        existing = getattr(entry.module, entry.buffer, None)
        reusable = entry.buffer in entry.module._buffers and existing is not None
        if reusable and existing.dtype == torch.bool and existing.shape == entry.param.shape:
            return
        if existing is not None:
            raise ValueError(f"cannot add mask {entry.buffer!r} for {name!r}: the module already has one")
        mask = torch.ones(entry.param.shape, dtype=torch.bool, device=entry.param.device)
        entry.module.register_buffer(entry.buffer, mask, persistent=True)

    @staticmethod
    def _grad_hook(entry: _Entry):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(~entry.mask, 0)

        return hook

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[normalize(name)]
        except KeyError:
            raise KeyError(f"{name!r} has no mask; masked parameters: {list(self._entries)}") from None

    @property
    def names(self) -> list[str]:
        """Normalized names of the masked parameters, in model order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return normalize(name) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def mask(self, name: str) -> torch.Tensor:
        """The live bool mask of ``name`` (param shape; True: kept). Do not modify; use ``set``."""
        return self._entry(name).mask

    @torch.no_grad()
    def set(self, name: str, mask: torch.Tensor) -> None:
        """Store ``mask`` (bool, param shape) for ``name`` and zero the masked weights and grads."""
        entry = self._entry(name)
        if mask.shape != entry.param.shape:
            raise ValueError(
                f"mask for {name!r}: shape {tuple(mask.shape)}, param {tuple(entry.param.shape)}"
            )
        entry.mask.copy_(mask.to(device=entry.mask.device, dtype=torch.bool))
        self._zero(entry)

    @staticmethod
    def _zero(entry: _Entry) -> None:
        off = ~entry.mask
        entry.param.masked_fill_(off, 0)
        if entry.param.grad is not None:
            entry.param.grad.masked_fill_(off, 0)

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero every masked weight (call after each optimizer step)."""
        for entry in self._entries.values():
            entry.param.masked_fill_(~entry.mask, 0)

    def sparsity(self, name: str) -> float:
        """Fraction of the entries of ``name`` that are masked off, in [0, 1]."""
        mask = self._entry(name).mask
        return 1.0 - mask.sum().item() / max(1, mask.numel())

    def sparsities(self) -> dict[str, float]:
        """``sparsity`` of every masked parameter, by normalized name."""
        return {name: self.sparsity(name) for name in self._entries}

    def global_sparsity(self) -> float:
        """Fraction of masked-off entries over all the selected parameters together."""
        total = sum(e.mask.numel() for e in self._entries.values())
        kept = sum(int(e.mask.sum().item()) for e in self._entries.values())
        return 1.0 - kept / total if total else 0.0

    @torch.no_grad()
    def remove(self) -> None:
        """Apply the masks one last time, detach the hooks and delete the buffers (for export)."""
        for entry in self._entries.values():
            self._zero(entry)
            if entry.hook is not None:
                entry.hook.remove()
            del entry.module._buffers[entry.buffer]
        self._entries = {}
