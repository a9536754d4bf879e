"""The sampler's share of m gradients per rank, and the memory preflight at a world size."""

from __future__ import annotations

import pytest

from compressor.preflight import PreflightError, preflight
from compressor.sampling import shard


@pytest.mark.parametrize(("m", "world"), [(7, 2), (8, 2), (5, 3), (2, 4), (1, 1), (64, 5)])
def test_shares_cover_m_rows_once_the_first_ranks_one_more(m, world):
    shares = [shard(m, world, r) for r in range(world)]
    rows = [row for first, count in shares for row in range(first, first + count)]
    assert rows == list(range(m))  # every row once, in rank order
    counts = [count for _, count in shares]
    assert counts == sorted(counts, reverse=True) and max(counts) - min(counts) <= 1


def test_preflight_counts_the_ranks_on_one_host():
    gib = 1 << 30
    preflight("x", 4 * gib, budget=10 * gib, world_size=1)
    preflight("x", 4 * gib, budget=10 * gib, world_size=4, local_ranks=1)  # 4 * 1.25 = 5 GiB
    with pytest.raises(PreflightError, match=r"2 ranks on this host"):
        preflight("x", 4 * gib, budget=10 * gib, world_size=2, local_ranks=2)  # 2 * 4 * 1.5 = 12 GiB
