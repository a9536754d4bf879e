"""Oracles and helpers that only tests use (kept out of the package)."""

from __future__ import annotations

import io

import torch
from rich.console import Console, RenderableType


def render_text(renderable: RenderableType, width: int = 100) -> str:
    """Plain text of a rich renderable (no colour codes), to assert on what a table shows."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def nm_topk_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Oracle: bool mask (score shape) keeping the n largest of every m consecutive weights along
    input channels (dim 1; dim 0 for 1-D), by topk over each group, independent of compressor."""
    moved = score.movedim(1, -1) if score.dim() >= 2 else score
    groups = moved.contiguous().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    keep = keep.reshape(moved.shape)
    return keep.movedim(-1, 1) if score.dim() >= 2 else keep
