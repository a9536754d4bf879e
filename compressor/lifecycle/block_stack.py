"""Which selected layers lie in a stack of blocks that chain, so that calibration can replay blocks.

A stack is the children of one ``nn.ModuleList`` (a transformer's layers). It chains when, on a
calibration call, every block runs once, in list order, each reading the previous block's output as
its first argument and the very same other arguments (attention mask, position tensors): then the
inputs of block k+1 are block k's outputs on the cached inputs of block k, and ``Calibration.walk``
replays blocks instead of running whole forwards. State a block mutates (a transformers key/value
cache, which a decoder grows on every call) is left out of the cached inputs (``replayable``), and
the plan is taken only when block 0, run again on its cached inputs, gives its output to the bit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def block_plan(
    model: nn.Module,
    modules: dict[str, nn.Module],
    stages: list[list[str]],
    one_call: Callable[[], None],
    evaluating: Callable[[], AbstractContextManager[None]],
) -> list[tuple[list[nn.Module], int] | None]:
    """Per stage: (the stack's blocks, the index of the block holding it) when its modules lie in
    a stack whose blocks chain (module doc), else None (a stage outside the stack); all None when
    the selected layers lie in several stacks, the blocks do not chain, or stages run out of the
    stack's order."""
    parent_of: dict[int, nn.Module] = {}
    for module in model.modules():
        for child in module.children():
            parent_of.setdefault(id(child), module)

    def stack_of(module: nn.Module) -> tuple[nn.ModuleList, nn.Module] | None:
        found = None
        node = module
        while id(node) in parent_of:  # the outermost ModuleList child above the module
            parent = parent_of[id(node)]
            if isinstance(parent, nn.ModuleList):
                found = (parent, node)
            node = parent
        return found

    where = [stack_of(modules[names[0]]) for names in stages]
    lists = {id(w[0]): w[0] for w in where if w is not None}
    if len(lists) != 1:
        return [None] * len(stages)
    stack = next(iter(lists.values()))
    blocks = list(stack)
    if not chained(blocks, one_call, evaluating):
        return [None] * len(stages)
    index = {id(b): i for i, b in enumerate(blocks)}
    plan: list[tuple[list[nn.Module], int] | None] = []
    last = -1
    for names, w in zip(stages, where, strict=True):
        if w is None:  # outside the stack (a pooler, a head): captured by partial forwards
            plan.append(None)
            continue
        if not all(stack_of(modules[n]) == w for n in names) or index[id(w[1])] < last:
            return [None] * len(stages)
        last = index[id(w[1])]
        plan.append((blocks, last))
    return plan


def replayable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """A block's inputs to cache for replay: key/value caches (objects with ``get_seq_length``,
    state the block appends to) replaced by None; everything else as it is."""

    def plain(value: Any) -> Any:
        return None if callable(getattr(value, "get_seq_length", None)) else value

    return [plain(a) for a in args], {k: plain(v) for k, v in kwargs.items()}


def _hidden(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def chained(
    blocks: list[nn.Module],
    one_call: Callable[[], None],
    evaluating: Callable[[], AbstractContextManager[None]],
) -> bool:
    """Whether, on one calibration call, every block runs once, in list order, each reading the
    previous block's output as its first argument and the same other arguments, and block 0 run
    again on its ``replayable`` inputs gives the same output (``evaluating``: the calibration's
    eval-mode context)."""
    seen: list[tuple[int, tuple[Any, ...], dict[str, Any], Any]] = []

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append((i, args, dict(kwargs), None))

        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
            j, a, k, _ = seen[-1]
            if j == i:
                seen[-1] = (j, a, k, output)

        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        one_call()
    finally:
        for h in handles:
            h.remove()
    if [s[0] for s in seen] != list(range(len(blocks))):
        return False
    for (_, args, kwargs, out), (_, nargs, nkwargs, _) in itertools.pairwise(seen):
        hidden = _hidden(out)
        if not args or not isinstance(hidden, torch.Tensor) or not nargs or nargs[0] is not hidden:
            return False
        if len(args) != len(nargs) or any(a is not b for a, b in zip(args[1:], nargs[1:], strict=True)):
            return False
        if kwargs.keys() != nkwargs.keys() or any(kwargs[k] is not nkwargs[k] for k in kwargs):
            return False
    _, args, kwargs, out = seen[0]
    cached_args, cached_kwargs = replayable(args, kwargs)
    try:
        with evaluating(), torch.no_grad():
            again = _hidden(blocks[0](*cached_args, **cached_kwargs))
    except Exception:  # any failure to replay means: do not replay
        return False
    return isinstance(again, torch.Tensor) and torch.equal(again, _hidden(out))
