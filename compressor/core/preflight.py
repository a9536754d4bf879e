"""The memory preflight: stop before training when a step's estimated memory cannot fit.

Second-order modifiers say how many bytes of gradients they will hold (``Modifier.gradient_bytes``);
the run compares that with the memory the process can still take, before the first step.
"""

from __future__ import annotations

import os

from compressor.core import distributed
from compressor.core.errors import CompressorError


class PreflightError(CompressorError, MemoryError):
    """The estimated memory of a step does not fit; raised before training starts."""


def available_bytes() -> int:
    """Memory the process can still take (MemAvailable on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def preflight(
    what: str,
    needed: int,
    budget: int | None = None,
    suggestion: str = "",
    *,
    world_size: int | None = None,
    local_ranks: int | None = None,
    gathered: bool = True,
) -> None:
    """Raise PreflightError when the host's need exceeds 90% of ``budget`` (default: available memory).

    ``needed`` is one process's estimate. Under torch.distributed (``world_size`` P > 1, default:
    the current group's) every rank holds the full gathered (m, d) buffer like a single process,
    plus its share of the rows before the gather (at most ceil(m / P) rows, bounded here by
    ``needed / P``); the ``local_ranks`` ranks on this host (default: torchrun's LOCAL_WORLD_SIZE)
    share its memory, so the check is ``local_ranks * needed * (1 + 1/P)`` against the budget.
    ``gathered=False``: nothing is gathered (the streamed block Fisher: each rank holds its own
    d * B sums, all-reduced in place), so the check is ``local_ranks * needed``.
    """
    budget = available_bytes() if budget is None else budget
    world = distributed.world_size() if world_size is None else world_size
    local = (distributed.local_world_size() if local_ranks is None else local_ranks) if world > 1 else 1
    share = 1 + 1 / world if gathered else 1.0
    total = needed if world <= 1 else int(local * needed * share)
    if total > 0.9 * budget:
        hint = f"; {suggestion}" if suggestion else ""
        ranks = f" ({local} ranks on this host, {_human(total / local)} each)" if local > 1 else ""
        raise PreflightError(
            f"{what} needs about {_human(total)}{ranks} but only {_human(budget)} is available{hint}"
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
