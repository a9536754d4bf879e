"""Keep torch from holding a process group past ``destroy_process_group`` (the rank abort at exit).

``torch.distributed.nn.functional`` declares its collectives with ``group=group.WORLD`` as a default
argument, and Python evaluates a default once, when the module is first imported. Nothing imports
it until ``torch._dynamo`` is imported, which the first ``torch.optim.Optimizer`` of a process
does. So a process that creates its group and then its first optimizer (any torchrun training
script, ``MFAC(shard=True)``, ``compressor run``) stores the live default group in ten function
defaults. ``destroy_process_group`` then frees nothing: the group, its gloo worker threads
(``pt_gloo_runloop``) and its socket loop (``gloo_tcp_loop``) live on until interpreter teardown,
where a rank can die with "terminate called without an active exception" (SIGABRT) after its work
is done. Imported while no group exists, the defaults are None (the default group at call time),
and ``destroy_process_group`` frees the group and joins its threads.
"""

from __future__ import annotations

import torch.distributed as dist


def bind_group_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` now, while (we hope) no group exists; idempotent.

    Called at import of ``compressor.mfac.sharded`` and before ``compressor`` creates a group.
    A process that created its group before importing ``compressor`` is beyond its reach.
    """
    if dist.is_available() and not dist.is_initialized():
        import torch.distributed.nn.functional  # noqa: F401


def group_threads() -> list[str]:
    """Names of this process's native threads that belong to a gloo process group (Linux; [] elsewhere)."""
    names = []
    try:
        from pathlib import Path

        for task in Path("/proc/self/task").iterdir():
            name = (task / "comm").read_text().strip()
            if name.startswith(("pt_gloo", "gloo_")):
                names.append(name)
    except OSError:
        return []
    return sorted(names)
