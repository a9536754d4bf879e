"""How the flattened d-vector is cut into Fisher blocks and the blocks into pages of columns.

F is block-diagonal over consecutive runs of B coordinates; the last block may be shorter. The
blocks fall into at most two *segments* of equal-sized blocks (the full blocks, then the short
tail). Work is done one *page* at a time: a page is a run of whole blocks, or, for a block wider
than a page, a run of its columns. Pages bound the size of temporaries and are the unit that is
streamed to an accelerator when the gradients live elsewhere.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """``blocks`` consecutive blocks of ``size`` columns, starting at column ``start``."""

    start: int
    blocks: int
    size: int


@dataclass(frozen=True)
class Page:
    """Blocks ``b0:b1`` of a segment, restricted to their columns ``c0:c1`` (0:size for whole blocks)."""

    b0: int
    b1: int
    c0: int
    c1: int

    def columns(self, seg: Segment) -> slice:
        """The page's columns in the flattened d-vector (contiguous by construction)."""
        first = seg.start + self.b0 * seg.size + self.c0
        last = seg.start + (self.b1 - 1) * seg.size + self.c1
        return slice(first, last)


def segments(d: int, block_size: int | None) -> list[Segment]:
    """Split d coordinates into blocks of ``block_size`` (None: one block of d)."""
    size = d if block_size is None else min(block_size, d)
    full = d // size
    segs = [Segment(0, full, size)]
    if d - full * size:
        segs.append(Segment(full * size, 1, d - full * size))
    return segs


def groups(seg: Segment, page_cols: int | None) -> list[list[Page]]:
    """Pages of ``seg`` grouped so that each group covers the same blocks.

    A group of one page holds whole blocks; a group of several pages splits one wide block by
    columns (its Gram matrix is summed over the group's pages). ``page_cols`` None: one page.
    """
    if page_cols is None or page_cols >= seg.blocks * seg.size:
        return [[Page(0, seg.blocks, 0, seg.size)]]
    if seg.size <= page_cols:
        per = page_cols // seg.size
        return [[Page(b, min(b + per, seg.blocks), 0, seg.size)] for b in range(0, seg.blocks, per)]
    return [
        [Page(b, b + 1, c, min(c + page_cols, seg.size)) for c in range(0, seg.size, page_cols)]
        for b in range(seg.blocks)
    ]


def page_of_rows(t: torch.Tensor, seg: Segment, page: Page) -> torch.Tensor:
    """View of the page's columns of ``t`` (r, d) as (blocks, r, columns)."""
    cols = t[:, page.columns(seg)]
    return cols.unflatten(1, (page.b1 - page.b0, page.c1 - page.c0)).transpose(0, 1)


def page_of_factor(w: torch.Tensor, page: Page) -> torch.Tensor:
    """View of the page in a segment's stored factor ``w`` (blocks, m, size)."""
    return w[page.b0 : page.b1, :, page.c0 : page.c1]


def locate(segs: list[Segment], dim: int, index: int, name: str) -> tuple[tuple[int, int], int]:
    """((segment, block), column within the block) of the flattened coordinate ``index`` of
    ``segs`` (over ``dim`` coordinates); ValueError naming ``name`` when it is not an int in [0, dim)."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < dim:
        raise ValueError(f"{name} must be an int in [0, {dim}), got {index!r}")
    index = int(index)
    for s, seg in enumerate(segs):
        if index < seg.start + seg.blocks * seg.size:
            b, c = divmod(index - seg.start, seg.size)
            return (s, b), c
    raise AssertionError("unreachable: segments cover [0, d)")
