"""Keep torch from holding a process group past ``destroy_process_group`` (the rank abort at exit).

``torch.distributed.nn.functional`` declares its collectives with ``group=group.WORLD`` as a default
argument, and Python evaluates a default once, when the module is first imported. Nothing imports
it until ``torch._dynamo`` is imported, which the first ``torch.optim.Optimizer`` of a process
does. So a process that creates its group and then its first optimizer (any torchrun training
script, ``MFAC(shard=True)``, ``compressor run``) stores the live default group in ten function
defaults. ``destroy_process_group`` then frees nothing: the group, its gloo worker threads
(``pt_gloo_runloop``) and its socket loop (``gloo_tcp_loop``) live on until interpreter teardown,
where a rank can die with "terminate called without an active exception" (SIGABRT) after its work
is done, when a worker thread still finishes or frees work while the interpreter is torn down
(``tests/soak/exit_abort.py`` reproduces it in about half its rounds without this binding).
Imported while no group exists, the defaults are None (the default group at call time), and
``destroy_process_group`` frees the group and joins its threads; where the group came first,
``bind_group_defaults`` puts None in place of the group it finds in those defaults.
"""

from __future__ import annotations

import inspect

import torch.distributed as dist


def bind_group_defaults() -> None:
    """Make ``torch.distributed.nn.functional``'s default groups None (the default group at call time).

    Imports the module if no one has; where it was imported while a group existed, the live group
    in its defaults is replaced by None, which means the same group at every call but no longer
    holds it past ``destroy_process_group``. Idempotent. Called at import of
    ``compressor.mfac.sharded``, by ``ShardedSlidingFisherInverse`` (so ``MFAC(shard=True)`` in a
    script that created its group first is covered) and before ``compressor`` creates a group.
    """
    if not dist.is_available():
        return
    import torch.distributed.nn.functional as collectives

    for value in list(vars(collectives).values()):
        if not inspect.isfunction(value):
            continue
        function = inspect.unwrap(value)  # the collectives carry decorators
        if function.__module__ != collectives.__name__:
            continue
        defaults = function.__defaults__
        if defaults and any(isinstance(d, dist.ProcessGroup) for d in defaults):
            function.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in defaults)


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
