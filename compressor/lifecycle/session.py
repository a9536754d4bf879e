"""The lifecycle: a recipe's modifiers driven around any PyTorch training loop.

A ``Session`` counts optimizer steps and calls each modifier's hooks around them::

    session = Session(recipe, model, optimizer, steps_per_epoch=len(loader))
    optimizer = session.wrap(optimizer)          # the same optimizer; its step() now runs the hooks
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    session.finalize()

or, without the wrapper, ``session.before_step(); optimizer.step(); session.after_step()``.
With gradient accumulation, call the hooks only on the micro-batches that step the optimizer and
count ``steps_per_epoch`` in optimizer steps. Hooks called out of order raise ``LifecycleError``.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.masks import MaskSet
from compressor.core.modifier import Modifier, to_step
from compressor.core.params import match_params, normalize, tied_aliases
from compressor.core.quantized import attach
from compressor.lifecycle.sampling import GradientSampler
from compressor.tasks import Task, as_task


class LifecycleError(CompressorError, RuntimeError):
    """A hook was called out of order (for example after_step without before_step)."""


class Session:
    """Runs ``modifiers`` (a Recipe or a list of Modifier) around ``optimizer``'s steps on ``model``.

    Args:
        recipe: a ``compressor.recipe.Recipe`` (its ``modifiers`` are used) or a list of modifiers.
        model: the model being compressed (DDP-wrapped models work: "module." prefixes are ignored).
        optimizer: the training optimizer (a modifier may swap it; ``session.optimizer`` is current).
        steps_per_epoch: optimizer steps per epoch; converts epoch positions into steps.
        total_epochs: length of training, for modifiers whose ``end`` is None (optional).
        data: a Dataset (or a DataLoader: its dataset and collate_fn) for modifiers that sample
            gradients; its batches are what ``task`` reads. Under DDP give every rank the whole set:
            sampling is collective, each rank computes its share of the rows and all gather the same
            m (``compressor.lifecycle.sampling``).
        loss_fn: loss(output, target) for those modifiers: shorthand for
            ``task=ClassificationTask(loss_fn)`` ((input, target) batches; default cross entropy).
        task: a ``compressor.tasks.Task`` instead (dict batches, a model that returns its own loss,
            ...); give ``task`` or ``loss_fn``, not both. ``session.task`` is the one in use.
        metrics: optional callback(step, name, value) receiving what modifiers log.
    """

    def __init__(
        self,
        recipe: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        steps_per_epoch: int,
        total_epochs: float | None = None,
        data: torch.utils.data.Dataset | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metrics: Callable[[int, str, float], None] | None = None,
        task: Task | None = None,
    ) -> None:
        modifiers = recipe if isinstance(recipe, (list, tuple)) else getattr(recipe, "modifiers", None)
        if modifiers is None or not all(isinstance(m, Modifier) for m in modifiers):
            raise TypeError("recipe must be a compressor Recipe or a list of Modifier objects")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
        self.modifiers: list[Modifier] = list(modifiers)
        self.model = model
        self.optimizer = optimizer
        self.base_optimizer = optimizer  # the training optimizer; a modifier may swap in another
        self.steps_per_epoch = steps_per_epoch
        self.total_epochs = total_epochs
        self.params: dict[str, torch.nn.Parameter] = {normalize(n): p for n, p in model.named_parameters()}
        #: each alias of a tied parameter -> its name in ``params`` (``tied_aliases``)
        self.aliases: dict[str, str] = tied_aliases(model.named_parameters(remove_duplicate=False))
        self.task = as_task(task, loss_fn)
        self.task.prepare(model)  # before masks: a task's reference copy of the model stays plain
        self.masks = MaskSet(model, self._pruned_names())
        for modifier in self.modifiers:  # before a checkpoint is loaded: it fills them
            attach(model, modifier.model_buffers(model))
        self.sampler = GradientSampler(model, data, task=self.task) if data is not None else None
        self.step = 0
        self._metrics = metrics
        self._wrapped: tuple[torch.optim.Optimizer, Callable[..., Any]] | None = None  # see wrap()
        self._state = "new"  # new -> ready <-> stepping -> finalized

    @classmethod
    def from_recipe(
        cls,
        path: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        overrides: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Session:
        """Load and validate a recipe file against ``model``'s parameter names, then build a session."""
        from compressor.recipe import load_recipe

        shapes = {normalize(n): tuple(p.shape) for n, p in model.named_parameters()}
        return cls(load_recipe(path, overrides=overrides, param_names=shapes), model, optimizer, **kwargs)

    # ------------------------------------------------------------------ positions

    @property
    def epoch(self) -> float:
        """Epochs completed so far, as a float (steps / steps_per_epoch)."""
        return self.step / self.steps_per_epoch

    @property
    def total_steps(self) -> int | None:
        """Length of training in optimizer steps, when ``total_epochs`` is known."""
        return None if self.total_epochs is None else to_step(self.total_epochs, self.steps_per_epoch)

    def to_step(self, position: Any) -> int:
        """A modifier position (epoch float or {step: N}) as an optimizer step."""
        return to_step(position, self.steps_per_epoch)

    def window(self, modifier: Modifier) -> tuple[int, int | None]:
        """``modifier``'s window in this session's steps: (start_step, end_step), active on
        [start_step, end_step); end_step None when ``end`` is omitted and ``total_epochs`` unknown.
        Delegates to ``Modifier.resolve_window`` (WindowError when end is before start)."""
        return modifier.resolve_window(self)

    # ------------------------------------------------------------------ hooks

    def initialize(self) -> None:
        """Call every modifier's ``initialize``; implied by the first ``before_step``."""
        if self._state != "new":
            raise LifecycleError(f"initialize() called twice (session is {self._state})")
        for modifier in self.modifiers:  # every window first: a bad one fails before any side effect
            modifier.resolve_window(self)
        for modifier in self.modifiers:
            modifier.initialize(self)
        self._state = "ready"

    def before_step(self) -> None:
        """Before ``optimizer.step()``: gradients are in ``.grad``; pruning updates happen here."""
        if self._state == "new":
            self.initialize()
        if self._state == "stepping":
            raise LifecycleError("before_step() called twice without after_step()")
        if self._state == "finalized":
            raise LifecycleError("before_step() called after finalize()")
        self._state = "stepping"
        for modifier in self.modifiers:
            modifier.before_step(self)

    def after_step(self) -> None:
        """After ``optimizer.step()``: the modifiers' hooks, then the masks are applied (once per step,
        here: modifiers do not apply them) and the step counter advances."""
        if self._state != "stepping":
            raise LifecycleError(f"after_step() without before_step() (session is {self._state})")
        for modifier in self.modifiers:
            modifier.after_step(self)
        self.masks.apply()
        self.step += 1
        self._state = "ready"

    def optimizer_step(self, closure: Callable[[], Any] | None = None) -> Any:
        """before_step(), the current optimizer's step(closure), after_step()."""
        self.before_step()
        try:
            step = self._unhooked_step(self.optimizer)
            result = step(closure) if closure is not None else step()
        except BaseException:
            self._state = "ready"
            raise
        self.after_step()
        return result

    def finalize(self) -> None:
        """Call every modifier's ``finalize``; the masks stay (bake them in with ``masks.remove()``)."""
        if self._state == "stepping":
            raise LifecycleError("finalize() called between before_step() and after_step()")
        if self._state == "finalized":
            raise LifecycleError("finalize() called twice")
        if self._state == "new":
            self.initialize()
        for modifier in self.modifiers:
            modifier.finalize(self)
        self.masks.apply()
        self._state = "finalized"

    def wrap(self, optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
        """The optimizer the session was built with, whose ``step()`` now runs the session's hooks.

        The very same object is returned, its ``step`` replaced on the instance: ``isinstance``,
        ``param_groups``, ``state_dict``, step hooks and torch's LR schedulers (created before or after
        ``wrap``) work on it as before. ``step(closure)`` calls ``before_step()``, steps the session's
        current optimizer, then ``after_step()``. While a modifier has swapped in another optimizer
        (``MFACOptimizer``), that one is stepped instead: a scheduler keeps setting the learning rate of
        this optimizer's groups, which the swapped-in one does not read (it has its own, set by the
        recipe). Wrapping twice returns the same object, wrapped once.
        """
        base = self.base_optimizer
        if optimizer is not None and optimizer is not base:
            raise ValueError("wrap() takes the optimizer the session was built with")
        if self._wrapped is None or self._wrapped[0] is not base:
            self._wrapped = (base, base.step)  # its step as it is now (an LR scheduler may have patched it)
            base.step = types.MethodType(_hooked_step(self), base)  # type: ignore[method-assign]
        return base

    def _unhooked_step(self, optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
        """``optimizer``'s step without the session's hooks (``wrap`` replaced the base optimizer's)."""
        if self._wrapped is not None and self._wrapped[0] is optimizer:
            return self._wrapped[1]
        return optimizer.step

    # ------------------------------------------------------------------ services for modifiers

    def swap_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Make ``optimizer`` the one that steps (None: hand back to the base optimizer)."""
        self.optimizer = self.base_optimizer if optimizer is None else optimizer

    def log(self, name: str, value: float) -> None:
        """Record a metric at the current step (passed to the ``metrics`` callback)."""
        if self._metrics is not None:
            self._metrics(self.step, name, float(value))

    def match(self, patterns: Iterable[str]) -> list[str]:
        """Parameter names (normalized) selected by ``patterns``; PatternError when one matches nothing."""
        return match_params(list(patterns), list(self.params), self.aliases)

    def _pruned_names(self) -> list[str]:
        names: list[str] = []
        for modifier in self.modifiers:
            if modifier.prunes:
                for name in self.match(modifier.parameter_patterns()):
                    if name not in names:
                        names.append(name)
        tied = {owner: alias for alias, owner in self.aliases.items() if owner in names}
        for owner, alias in tied.items():
            warnings.warn(
                f"{owner} is also {alias} (tied weights, one tensor): pruning it prunes {alias} too",
                UserWarning,
                stacklevel=3,
            )
        return [n for n in self.params if n in names]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step counter and each modifier's run-time state (masks live in the model's state_dict)."""
        return {"step": self.step, "modifiers": [m.state_dict() for m in self.modifiers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` before training continues; the recipe must list the same modifiers."""
        saved = state.get("modifiers", [])
        if len(saved) != len(self.modifiers):
            raise ValueError(
                f"checkpoint has {len(saved)} modifier states, the recipe has {len(self.modifiers)}"
            )
        self.step = int(state["step"])
        for modifier, mod_state in zip(self.modifiers, saved, strict=True):
            modifier.load_state_dict(mod_state)


def _hooked_step(session: Session) -> Callable[..., Any]:
    """The ``step`` that ``Session.wrap`` puts on its optimizer: the session's hooks around a step."""

    def step(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]  # what torch's LR schedulers check
        return session.optimizer_step(closure)

    # An LR scheduler wraps ``step`` to see that it ran (setting ``_opt_called``, as above) and warns
    # when ``step`` was replaced after it; this step does the scheduler's part itself.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return step
