"""How n items (gradient rows, window coordinates) split over the ranks of a process group."""

from __future__ import annotations


def shard_range(dim: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the coordinates of ``rank`` when ``dim`` is split over ``world_size`` ranks.

    The first ``dim % world_size`` ranks get ``ceil(dim / world_size)`` coordinates, the others
    ``floor(dim / world_size)`` (0 when dim < world_size).
    """
    base, extra = divmod(dim, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
