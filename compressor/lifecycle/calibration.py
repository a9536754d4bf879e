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
The model runs in eval mode without gradients, and its mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn

from compressor.core import distributed
from compressor.lifecycle.sampling import fetch_batch
from compressor.tasks import Task, TaskError, unpack_data


class CalibrationError(ValueError):
    """A module never ran on the calibration data, or the data cannot calibrate."""


class _StopForwardError(Exception):
    """Raised by a capture hook to end the forward pass at the captured module."""


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
        seen = 0

        def take(_module: nn.Module, args: tuple[Any, ...]) -> None:
            nonlocal seen
            x = args[0]
            rows = x.detach().reshape(-1, x.shape[-1])
            keep = self._tokens(x)
            if keep is not None:
                rows = rows[keep]
            seen += rows.shape[0]
            consume(rows)
            if stop:
                raise _StopForwardError

        handle = module.register_forward_pre_hook(take)
        try:
            with self._eval():
                for call in self.calls():
                    with suppress(_StopForwardError):
                        call()
        finally:
            handle.remove()
        if seen == 0:
            raise CalibrationError("the module never ran on the calibration batches")
        return seen

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


def _call(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a mapping, ``model(*x)`` for a tuple, else ``model(x)``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)
