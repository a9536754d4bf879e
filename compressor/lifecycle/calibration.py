"""Calibration inputs of a model's layers, layer by layer (the sequential order of GPTQ / SparseGPT).

A layer-wise method (GPTQ quantization; SparseGPT and Wanda pruning) needs statistics of each
layer's inputs X over a few calibration batches (H = 2 X X^T / n, ||x_j||, max |x_j|), taken after
the layers before it have been changed, so that a layer corrects the error of those before it.

``Calibration`` draws ``samples`` samples of a dataset once (seeded, without replacement), collates
them through the Task in batches, and

* ``stages(names)`` finds, in one model call, the order in which the named modules run and which of
  them read the very same input tensor (a transformer's query, key and value): those form a stage
  and share their statistics;
* ``capture(module, consume)`` calls the model on every input of every calibration batch (both
  sides of a pair: the task's ``example_inputs``) and hands each input of the
  stage's first module to ``consume`` (a (rows, features) view: leading dims flattened); the forward
  stops right there (the layers after it are not computed), so a stage costs a partial forward.

The caller quantizes (or prunes) a stage's modules before capturing the next, so each stage sees the
inputs of the already-changed model. Memory: one batch's activations plus what ``consume`` keeps (a
Hessian accumulator: features^2 float64), whatever the number of samples; no input is stored.

``walk(names)`` yields the stages with a ``capture`` each, the way layer-wise methods use them. When
the stages lie in the blocks of a stack (the children of one ``nn.ModuleList``, each called once per
forward, each reading the output of the one before: a transformer's layers), it replays blocks
instead of whole forwards: the inputs of the first block are cached for every calibration call,
each stage of a block is captured by running that block alone on the cache, and when the sweep
leaves a block, the cache is moved through it (the block's outputs become the next block's inputs,
computed with the block as changed). The inputs are those a full forward of the changed model gives,
at the cost of about two passes over the stack instead of one partial forward per stage; memory: one
block's inputs for every calibration sample (samples x tokens x hidden float32). Stages outside the
stack, or a model whose blocks do not chain that way, are captured by partial forwards.
The model runs in eval mode without gradients, and its mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compressor.core import distributed
from compressor.lifecycle.block_stack import block_plan, replayable
from compressor.lifecycle.sampling import fetch_batch
from compressor.tasks import Task, TaskError, unpack_data


class CalibrationSettings(BaseModel):
    """Calibration inputs of a layer-wise method, as a recipe gives them."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(256, ge=1, description="training samples drawn (seeded)")
    batch_size: int = Field(16, ge=1, description="samples per calibration batch")
    seed: int = Field(0, ge=0)


class CalibrationError(ValueError):
    """A module never ran on the calibration data, or the data cannot calibrate."""


class _StopForwardError(Exception):
    """Raised by a capture hook to end the forward pass at the captured module."""


@dataclass
class Stage:
    """Modules that read the same input (``names``, in run order) and how to capture that input:
    ``capture(consume)`` hands every calibration input of the stage's first module to ``consume``
    as (rows, features), padding left out, and returns the rows consumed."""

    names: list[str]
    capture: Callable[[Callable[[torch.Tensor], None]], int]
    replayed: bool = False  # captured by replaying its block (else by partial forwards)


@dataclass
class _Entry:
    """One calibration call's inputs to the current block, and that call's token mask."""

    args: list[Any]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None


@dataclass
class _Replay:
    """The cached inputs of block ``index`` of ``blocks`` for every calibration call."""

    blocks: list[nn.Module]
    index: int
    entries: list[_Entry] = field(default_factory=list)


class Calibration:
    """``samples`` samples of ``data`` (seeded) read by ``task``, for layer-wise statistics.

    Args:
        model: the model (a DDP wrapper is looked through).
        data: a Dataset (or DataLoader) whose samples ``task`` collates.
        task: how batches are collated, moved and fed to the model (``Task.forward``).
        samples: how many samples (all of them when the data has fewer).
        batch_size: samples per calibration batch.
        seed: the draw's seed (the global RNG is not touched).
    """

    def __init__(
        self, model: nn.Module, data: Any, task: Task, *, samples: int, batch_size: int, seed: int = 0
    ) -> None:
        if samples < 1 or batch_size < 1:
            raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
        self.model = distributed.unwrap(model)
        self.task = task
        self.data, self.collate = unpack_data(data, task)
        if len(self.data) == 0:
            raise CalibrationError("the calibration data is empty")
        generator = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(self.data), generator=generator)[: min(samples, len(self.data))]
        self.indices: list[int] = order.tolist()
        self.batch_size = batch_size

    @classmethod
    def of(cls, model: nn.Module, sampler: Any, settings: CalibrationSettings) -> Calibration:
        """The calibration of ``settings`` over a session's sampler (its data, task and collate)."""
        calibration = cls(
            model,
            sampler.data,
            sampler.task,
            samples=settings.samples,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )
        calibration.collate = sampler.collate
        return calibration

    @property
    def count(self) -> int:
        """Samples drawn."""
        return len(self.indices)

    def batches(self) -> Iterator[Any]:
        """The calibration batches, collated and moved to the model's device (the same every call)."""
        device = next(self.model.parameters()).device
        for start in range(0, len(self.indices), self.batch_size):
            batch = fetch_batch(self.data, self.indices[start : start + self.batch_size], self.collate)
            yield self.task.to_device(batch, device)

    def calls(self) -> Iterator[Callable[[], Any]]:
        """One model call per input of every batch: the task's ``example_inputs`` (both sides of a
        pair), each called as the exporters call it; a task without them: ``task.forward``."""
        for batch in self.batches():
            try:
                inputs = self.task.example_inputs(batch)
            except TaskError:
                self._mask = None
                yield lambda batch=batch: self.task.forward(self.model, batch)
                continue
            for x in inputs:
                mask = x.get("attention_mask") if isinstance(x, dict) else None
                self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                yield lambda x=x: _call(self.model, x)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which rows of ``x`` (leading dims flattened) are real tokens: the call's attention mask
        when x is (batch, sequence, features) of its shape; None (all rows) otherwise."""
        mask = getattr(self, "_mask", None)
        if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            return None
        return mask.reshape(-1).to(device=x.device) != 0

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def stages(self, modules: dict[str, nn.Module]) -> list[list[str]]:
        """The named modules in the order they first run on a calibration batch, grouped into
        stages of consecutive modules that read the same input tensor. A module called more than
        once per forward (shared weights) is a stage of its own. CalibrationError names a module
        that never runs."""
        first_input: dict[str, tuple[int, tuple[int, ...]]] = {}
        calls: dict[str, int] = dict.fromkeys(modules, 0)
        order: list[str] = []

        def hook(name: str) -> Callable[..., None]:
            def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
                calls[name] += 1
                if name not in first_input:
                    x = args[0] if args else None
                    key = (x.data_ptr(), tuple(x.shape)) if isinstance(x, torch.Tensor) else (id(x), ())
                    first_input[name] = key
                    order.append(name)

            return record

        # first of the hooks: a module's own input, before any pre-hook (input smoothing) changes it
        handles = [m.register_forward_pre_hook(hook(n), prepend=True) for n, m in modules.items()]
        try:
            with self._eval():
                next(self.calls())()
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in modules if n not in first_input]
        if missing:
            raise CalibrationError(
                f"{len(missing)} selected module(s) never ran on a calibration batch, e.g. {missing[0]!r}"
            )
        stages: list[list[str]] = []
        for name in order:
            last = stages[-1] if stages else None
            shared = (
                last is not None
                and calls[name] == 1
                and calls[last[0]] == 1
                and first_input[last[0]] == first_input[name]
            )
            if shared and last is not None:
                last.append(name)
            else:
                stages.append([name])
        self._calls = calls
        return stages

    @torch.no_grad()
    def capture(
        self, module: nn.Module, consume: Callable[[torch.Tensor], None], *, stop: bool = True
    ) -> int:
        """Run every calibration batch; each input of ``module`` goes to ``consume`` as (rows,
        features), leading dimensions flattened and padding tokens (the call's attention mask) left
        out. With ``stop`` the forward ends at ``module`` (use
        ``stop=False`` for a module called several times per forward). Returns the rows consumed."""
        seen = [0]
        handle = module.register_forward_pre_hook(self._taker(consume, seen, stop))
        try:
            with self._eval():
                for call in self.calls():
                    with suppress(_StopForwardError):
                        call()
        finally:
            handle.remove()
        return _counted(seen[0])

    def _taker(
        self, consume: Callable[[torch.Tensor], None], seen: list[int], stop: bool
    ) -> Callable[..., None]:
        """A forward pre-hook handing a module's input to ``consume`` as (rows, features), padding
        left out, counting rows in ``seen[0]``; with ``stop`` it ends the forward there."""

        def take(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            rows = x.detach().reshape(-1, x.shape[-1])
            keep = self._tokens(x)
            if keep is not None:
                rows = rows[keep]
            seen[0] += rows.shape[0]
            consume(rows)
            if stop:
                raise _StopForwardError

        return take

    @torch.no_grad()
    def observe(
        self, consumers: dict[nn.Module, Callable[[torch.Tensor, torch.Tensor | None], None]]
    ) -> None:
        """Run every calibration call once, handing each whole input of each module to its consumer
        as (rows, features) with the rows that are real tokens (None: all): whole forward passes,
        nothing stopped (statistics of the unchanged model)."""

        def take(consume: Callable[[torch.Tensor, torch.Tensor | None], None]) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                consume(x.detach().reshape(-1, x.shape[-1]), self._tokens(x))

            return hook

        handles = [m.register_forward_pre_hook(take(c)) for m, c in consumers.items()]
        try:
            with self._eval():
                for call in self.calls():
                    call()
        finally:
            for h in handles:
                h.remove()

    def walk(self, modules: dict[str, nn.Module]) -> Iterator[Stage]:
        """The stages of ``modules`` (``stages``) in run order, each with its ``capture``; change a
        stage's modules before asking for the next one (module doc: blocks are replayed when the
        model's layers chain)."""
        stages = self.stages(modules)
        plan = block_plan(self.model, modules, stages, self._one_call, self._eval)
        replay: _Replay | None = None
        for names, block in zip(stages, plan, strict=True):
            first = modules[names[0]]
            if block is None:
                once = self.called_once(names[0])
                yield Stage(
                    names, lambda consume, first=first, once=once: self.capture(first, consume, stop=once)
                )
                continue
            blocks, index = block
            if replay is None or replay.blocks is not blocks:
                replay = self._cache_inputs(blocks, index)
            self._advance(replay, index)
            yield Stage(
                names,
                lambda consume, first=first, replay=replay: self._replay_capture(replay, first, consume),
                replayed=True,
            )

    @torch.no_grad()
    def _cache_inputs(self, blocks: list[nn.Module], index: int) -> _Replay:
        """The inputs of ``blocks[index]`` for every calibration call (partial forwards)."""
        replay = _Replay(blocks, index)

        def take(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cached_args, cached_kwargs = replayable(args, kwargs)
            replay.entries.append(_Entry(cached_args, cached_kwargs, getattr(self, "_mask", None)))
            raise _StopForwardError

        handle = blocks[index].register_forward_pre_hook(take, with_kwargs=True)
        try:
            with self._eval():
                for call in self.calls():
                    with suppress(_StopForwardError):
                        call()
        finally:
            handle.remove()
        return replay

    @torch.no_grad()
    def _advance(self, replay: _Replay, index: int) -> None:
        """Move the cached inputs through the blocks before ``index`` (as they are now)."""
        with self._eval():
            while replay.index < index:
                block = replay.blocks[replay.index]
                for entry in replay.entries:
                    self._mask = entry.mask
                    out = block(*entry.args, **entry.kwargs)
                    entry.args[0] = out[0] if isinstance(out, (tuple, list)) else out
                replay.index += 1

    @torch.no_grad()
    def _replay_capture(
        self, replay: _Replay, module: nn.Module, consume: Callable[[torch.Tensor], None]
    ) -> int:
        """``capture`` by running the current block alone on every cached input."""
        seen = [0]
        block = replay.blocks[replay.index]
        handle = module.register_forward_pre_hook(self._taker(consume, seen, True))
        try:
            with self._eval():
                for entry in replay.entries:
                    self._mask = entry.mask
                    with suppress(_StopForwardError):
                        block(*entry.args, **entry.kwargs)
        finally:
            handle.remove()
        return _counted(seen[0])

    @torch.no_grad()
    def _one_call(self) -> None:
        """The first calibration call, in eval mode (for hooks that look at the model's structure)."""
        with self._eval():
            next(self.calls())()

    def called_once(self, name: str) -> bool:
        """Whether ``name`` ran once per forward in ``stages`` (so ``capture`` may stop there)."""
        return getattr(self, "_calls", {}).get(name, 1) == 1

    @contextmanager
    def _eval(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)


def _counted(seen: int) -> int:
    """``seen``, the rows a capture consumed; CalibrationError when there were none."""
    if seen == 0:
        raise CalibrationError("the module never ran on the calibration batches")
    return seen


def _call(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a mapping, ``model(*x)`` for a tuple, else ``model(x)``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)
