"""Kept coordinates of masked parameters, for an M-FAC window over the unmasked weights only."""

from __future__ import annotations

import torch

#: Per parameter: None (no mask, or nothing masked off) or (kept count, checksum of the kept indices).
Fingerprint = list[tuple[int, int] | None]


def mask_fingerprint(mask: torch.Tensor) -> tuple[int, int] | None:
    """None when nothing is masked off; else (kept count, a hash-weighted sum of the kept indices)."""
    kept = mask.reshape(-1).nonzero().squeeze(1)
    if kept.numel() == mask.numel():
        return None
    # Knuth's multiplicative hash, reduced to 32 bits: a sum of < 2**31 of them fits in int64.
    checksum = int(((kept * 2654435761) & 0xFFFFFFFF).sum()) if kept.numel() else 0
    return kept.numel(), checksum


def kept_index(
    p: torch.Tensor, mask: torch.Tensor | None, mark: tuple[int, int] | None
) -> torch.Tensor | None:
    """The flat indices (k,) of ``p`` that ``mask`` keeps; None when every coordinate is kept."""
    if mask is None or mark is None or mark[0] == p.numel():
        return None
    return mask.reshape(-1).nonzero().squeeze(1)


def reindex(
    buf: torch.Tensor, old: torch.Tensor | None, new: torch.Tensor | None, p: torch.Tensor
) -> torch.Tensor:
    """A per-parameter buffer over ``old`` kept indices moved onto ``new`` ones (zeros where newly kept)."""
    if old is None:
        full = buf.reshape(-1)
    else:
        full = torch.zeros(p.numel(), dtype=buf.dtype, device=buf.device).index_copy_(0, old, buf)
    return full.reshape(p.shape).clone() if new is None else full.index_select(0, new)
