"""Run a recipe's modifiers inside the Hugging Face ``Trainer``: ``CompressionCallback``.

One line added to a Trainer::

    from compressor.integrations.hf import CompressionCallback

    trainer = Trainer(model, args, train_dataset=train, callbacks=[CompressionCallback("recipe.yaml")])
    trainer.train()

The callback drives a ``compressor.Session`` with the Trainer's own model, optimizer, learning-rate
scheduler, gradient accumulation and gradient clipping. Only the recipe's ``modifiers`` are used
(its ``train`` section, if any, is ignored: the ``TrainingArguments`` say how to train).

Steps and epochs. One session step is one optimizer step of the Trainer (``state.global_step``): with
``gradient_accumulation_steps: k`` a step is k micro-batches. An epoch in a modifier's ``start`` /
``end`` is the Trainer's epoch in optimizer steps, ``ceil(len(train_dataloader) / k)`` (the Trainer's
``num_update_steps_per_epoch``; ``max_steps`` when the data has no length), and a modifier whose
``end`` is omitted ends at ``max_steps``.

Trainer events used (transformers >= 4.45 has them all; this package asks for >= 4.47):

- ``on_init_end`` (the Trainer is built): the recipe is checked against the model's parameter names
  and the pruned parameters get their mask buffers (``<param>_mask``, ``compressor.core.masks``) now, so
  that a checkpoint the Trainer loads when resuming fills them.
- ``on_train_begin`` (optimizer, scheduler and train dataloader exist; a resumed checkpoint is
  loaded): the session is built and initialized; resuming, its state is restored.
- ``on_pre_optimizer_step`` (gradients accumulated and clipped, before ``optimizer.step()``):
  ``session.before_step()``, where pruning updates happen (M-FAC pruning samples its gradients here).
- ``on_optimizer_step`` (right after ``optimizer.step()``, before the scheduler steps and the
  gradients are zeroed): ``session.after_step()``, which re-applies every mask, so the pruned
  weights are exactly zero after every optimizer step.
- ``on_step_end`` at ``max_steps`` and ``on_train_end``: ``session.finalize()`` (a pruning update
  that falls on the last step fires there; at ``max_steps`` it comes before the Trainer saves the
  last checkpoint).

A ``LearningRate`` modifier sets the learning rate at ``before_step`` on the steps of its window (and
at its end), over the Trainer's scheduler, whose value applies again on the next step after that.

Gradients for M-FAC pruning come from the Trainer's train dataloader: its dataset and its collate
function (after the Trainer removed the columns the model does not take), drawn in the sampler's own
seeded order. The default task is ``ModelLossTask``: ``model(**batch).loss``, as Hugging Face models
compute it given ``labels``; give ``task=`` for anything else.

Checkpoints. The masks are buffers of the model, so the Trainer's checkpoint (``model.safetensors``)
holds them; the session's state (step, each modifier's last update) goes into the checkpoint's
``trainer_state.json`` (``stateful_callbacks``, the Trainer's mechanism for callback state).
``trainer.train(resume_from_checkpoint=...)`` restores both: the same masks, the same later updates.
The callback must be given to ``Trainer(callbacks=[...])`` for that (the mask buffers must exist
when the Trainer loads the checkpoint), and ``restore_callback_states_from_checkpoint`` left False
(the callback restores its own state; the Trainer would re-create it without its recipe).

After training the masks stay as buffers (``callback.session.masks``); ``save_pretrained`` writes
them as ``<param>_mask`` tensors, which ``from_pretrained`` reports as unexpected keys. Call
``callback.session.masks.remove()`` first for a plain Hugging Face checkpoint (the zeros stay).

Not hosted (``UnsupportedModifierError`` when the callback is built): modifiers that swap the
optimizer (``MFACOptimizer``: the Trainer steps, schedules and checkpoints its own optimizer) or
rebuild the model (``StructuredPruning``: the Trainer's optimizer holds the old parameters). Run those
with ``compressor run`` or ``compressor.Session`` in your own loop.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.masks import MASK_SUFFIX
from compressor.core.modifier import Modifier
from compressor.core.params import match_params, normalize, tied_aliases
from compressor.core.quantized import attach
from compressor.lifecycle.session import Session
from compressor.models.pretrained import INSTALL_HINT, MissingExtraError
from compressor.recipe import Recipe, load_recipe, parse_recipe
from compressor.tasks import ModelLossTask, Task

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as err:  # the hf extra is not installed
    raise MissingExtraError(
        f"compressor.integrations.hf needs transformers, which is not installed: {INSTALL_HINT}"
    ) from err

__all__ = ["CallbackError", "CompressionCallback", "UnsupportedModifierError"]

logger = logging.getLogger(__name__)

#: The Trainer events the session's steps hang on (transformers' newer events).
_EVENTS = ("on_pre_optimizer_step", "on_optimizer_step")

#: Modifiers (registry type) that swap the training optimizer.
_SWAPS_OPTIMIZER = {"MFACOptimizer"}


class CallbackError(CompressorError, ValueError):
    """The Trainer cannot run the recipe as set up (a resume without the callback's state, a
    callback added too late to restore masks, a missing model or optimizer, ...)."""


class UnsupportedModifierError(CallbackError):
    """A modifier the Trainer cannot host: it swaps the optimizer or rebuilds the model."""


def _unsupported(modifier: Modifier, index: int) -> str | None:
    """Why the Trainer cannot host ``modifier`` (the recipe's ``modifiers[index]``), or None."""
    where = f"modifiers[{index}] ({modifier.type})"
    if modifier.type in _SWAPS_OPTIMIZER:
        return (
            f"{where} swaps the optimizer for its own, which CompressionCallback cannot host: "
            "the Trainer steps, schedules and checkpoints the optimizer it created. Remove it from the "
            "recipe to train with the Trainer's optimizer, or run the recipe with `compressor run` or "
            "compressor.Session in your own training loop."
        )
    if modifier.restructures:
        return (
            f"{where} removes channels and rebuilds the model's layers, which CompressionCallback cannot "
            "host: the Trainer's optimizer and checkpoints hold the old parameters. Prune the channels "
            "before building the Trainer (`compressor run`, or compressor.Session on the model), then "
            "fine-tune the smaller model with the Trainer."
        )
    return None


def _read_recipe(
    recipe: Any, overrides: dict[str, str] | None
) -> tuple[Recipe, Callable[[dict[str, tuple[int, ...]], dict[str, str]], Recipe] | None]:
    """(the recipe, a function re-reading it with ``param_names=`` and ``aliases=``, the checks
    against a model).

    ``recipe``: a Recipe, a path to a recipe file (``str`` or ``os.PathLike``), or YAML text (a
    ``str`` holding a newline). RecipeError (with file:line:col) for a missing or invalid recipe.
    """
    if isinstance(recipe, Recipe):
        if overrides:
            raise TypeError("overrides apply to a recipe file or text, not to a Recipe object")
        return recipe, None
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and "\n" not in recipe):
        path = os.fspath(recipe)
        return load_recipe(path, overrides), lambda names, aliases: load_recipe(
            path, overrides, names, aliases
        )
    if isinstance(recipe, str):
        text = recipe
        return (
            parse_recipe(text, "<recipe text>", overrides),
            lambda names, aliases: parse_recipe(text, "<recipe text>", overrides, names, aliases),
        )
    raise TypeError(f"recipe must be a path, YAML text or a compressor Recipe, got {type(recipe).__name__}")


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or ``optimizer`` itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _steps_per_epoch(train_dataloader: Any, accumulation: int, max_steps: int) -> int:
    """Optimizer steps per epoch, as the Trainer counts them: ceil(batches / accumulation), at least
    1; ``max_steps`` when the dataloader has no length (an iterable dataset)."""
    try:
        batches = len(train_dataloader)
    except (TypeError, NotImplementedError):
        return max(1, max_steps)
    return max(1, batches // accumulation + int(batches % accumulation > 0))


def _add_mask_buffers(model: torch.nn.Module, names: list[str]) -> None:
    """Give each parameter in ``names`` (normalized) an all-True bool ``<leaf>_mask`` buffer, as
    ``MaskSet`` does (which keeps existing ones), without its gradient hooks."""
    raw = {normalize(n): n for n, _ in model.named_parameters()}
    for name in names:
        owner, _, leaf = raw[name].rpartition(".")
        module = model.get_submodule(owner)
        param = getattr(module, leaf)
        if leaf + MASK_SUFFIX not in module._buffers:
            mask = torch.ones(param.shape, dtype=torch.bool, device=param.device)
            module.register_buffer(leaf + MASK_SUFFIX, mask, persistent=True)


class CompressionCallback(TrainerCallback, ExportableState):
    """A ``transformers.TrainerCallback`` that runs a recipe's modifiers inside ``Trainer.train()``.

    Args:
        recipe: a recipe file (path), recipe YAML text (a ``str`` with a newline) or a
            ``compressor.recipe.Recipe``; only its ``modifiers`` are used.
        task: how the gradient sampler feeds batches of the train dataloader to the model and takes
            their mean loss (``compressor.tasks.Task``); default ``ModelLossTask``
            (``model(**batch).loss``).
        overrides: recipe variables to replace (``{"target": "0.8"}``, as ``--set``), for a file or text.
        metrics: optional callback(step, name, value) receiving what the modifiers log (sparsity ...).

    Attributes:
        session: the ``compressor.Session`` of the current (or last) ``train()``, None before it: its
            ``masks`` (``global_sparsity()``, ``sparsities()``, ``remove()``) and ``step``.
        metrics: ``(step, name, value)`` of everything the modifiers logged, in order; each step's
            values also go to ``trainer.state.log_history`` as ``compression/<name>``.

    Raises (all ``CompressorError``): RecipeError for a recipe file not found or invalid (at
    construction) or whose patterns match no parameter of the model (when the Trainer is built);
    UnsupportedModifierError for a modifier the Trainer cannot host; CallbackError for a resume
    the callback cannot restore.
    """

    def __init__(
        self,
        recipe: str | os.PathLike[str] | Recipe,
        *,
        task: Task | None = None,
        overrides: dict[str, str] | None = None,
        metrics: Callable[[int, str, float], None] | None = None,
    ) -> None:
        missing = [e for e in _EVENTS if not hasattr(TrainerCallback, e)]
        if missing:
            raise MissingExtraError(
                f"CompressionCallback needs a transformers Trainer with the {' and '.join(missing)} "
                f"events (transformers >= 4.45): {INSTALL_HINT} --upgrade"
            )
        self._recipe, self._reread = _read_recipe(recipe, overrides)
        problems = [p for i, m in enumerate(self._recipe.modifiers) if (p := _unsupported(m, i))]
        if problems:
            raise UnsupportedModifierError("\n".join(problems))
        if task is not None and not isinstance(task, Task):
            raise TypeError(f"task must be a compressor.tasks.Task, got {type(task).__name__}")
        if self._recipe.train is not None:
            warnings.warn(
                "CompressionCallback: the recipe's train section is ignored (the TrainingArguments say "
                "how to train); only its modifiers run",
                UserWarning,
                stacklevel=2,
            )
        self.task: Task = task if task is not None else ModelLossTask()
        self.session: Session | None = None
        self.metrics: list[tuple[int, str, float]] = []
        self._on_metric = metrics
        self._pending: dict[int, dict[str, float]] = {}
        self._prepared: torch.nn.Module | None = None  # the model given mask buffers at on_init_end
        self._running = False  # a session is between initialize() and finalize()

    # ------------------------------------------------------------------ Trainer events

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """The Trainer is built: check the recipe against the model, add the mask buffers."""
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise CallbackError(
                "CompressionCallback restores its own state when resuming; leave "
                "TrainingArguments(restore_callback_states_from_checkpoint=False): the Trainer would "
                "re-create the callback without its recipe"
            )
        if model is not None:
            self._prepare(model)

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        """Build the session on the Trainer's model, optimizer and train dataloader; restore it when
        resuming (``state.global_step > 0``)."""
        if model is None or optimizer is None:
            raise CallbackError("CompressionCallback needs the Trainer's model and optimizer at train begin")
        resuming = state.global_step > 0
        saved = self._saved_state(state) if resuming else None
        if resuming and self._prepared is not model and self._pruned_names(model):
            raise CallbackError(
                "resuming: the masks could not be restored from the checkpoint, because the model had no "
                "mask buffers when the Trainer loaded it. Pass the callback to Trainer(callbacks=[...]) "
                "(not add_callback after it is built) and the model as Trainer(model=...)"
            )
        self._prepare(model)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = _steps_per_epoch(train_dataloader, accumulation, state.max_steps)
        self.metrics = []
        self._pending = {}
        session = Session(
            copy.deepcopy(self._recipe.modifiers),  # fresh modifier state for every train() call
            model,
            _base_optimizer(optimizer),
            steps_per_epoch=steps_per_epoch,
            total_epochs=state.max_steps / steps_per_epoch,
            data=train_dataloader,
            task=self.task,
            metrics=self._record,
        )
        if saved is not None:
            session.load_state_dict(saved)
            if session.step != state.global_step:
                raise CallbackError(
                    f"resuming at step {state.global_step}, but the checkpoint's compression state is at "
                    f"step {session.step}"
                )
        session.initialize()
        self.session = session
        self._running = True
        self._check_optimizer()
        logger.info(
            "CompressionCallback: %d modifiers, %d masked tensors, %d steps per epoch, from step %d",
            len(session.modifiers),
            len(session.masks),
            steps_per_epoch,
            session.step,
        )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Gradients are accumulated and clipped: the modifiers' ``before_step`` (pruning updates)."""
        session = self._live()
        if session is None:
            return
        session.before_step()
        self._check_optimizer()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The optimizer stepped: the modifiers' ``after_step``, then every mask is re-applied."""
        session = self._live()
        if session is not None:
            session.after_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Check the step count; at ``max_steps`` finalize before the Trainer saves its last checkpoint."""
        session = self._live()
        if session is None:
            return
        if session.step != state.global_step:
            raise CallbackError(
                f"the compression session is at step {session.step} but the Trainer at {state.global_step}: "
                "did the Trainer skip the on_pre_optimizer_step / on_optimizer_step events, or was the "
                "optimizer stepped outside its loop?"
            )
        if state.global_step >= state.max_steps:
            self._finalize()
        self._flush(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Training ended (at ``max_steps`` or stopped early): finalize if not done yet."""
        if self._live() is not None:
            self._finalize()
        self._flush(state)

    # ------------------------------------------------------------------ state in the checkpoint

    def state(self) -> dict[str, Any]:
        """What the Trainer writes into ``trainer_state.json`` at each checkpoint (``ExportableState``):
        the session's state (step and each modifier's run-time state; the masks are in the model)."""
        session = None if self.session is None else self.session.state_dict()
        if session is not None:
            try:
                json.dumps(session)
            except (TypeError, ValueError) as err:
                kinds = ", ".join(m.type for m in self.session.modifiers)  # type: ignore[union-attr]
                raise CallbackError(
                    f"a modifier's checkpoint state is not JSON ({err}); modifiers: {kinds}"
                ) from None
        return {"args": {}, "attributes": {"session": session}}

    def _saved_state(self, state: Any) -> dict[str, Any]:
        """The session state in the resumed checkpoint's ``trainer_state.json``; CallbackError if none."""
        name = type(self).__name__
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(name)
        if isinstance(saved, list):
            raise CallbackError(f"the checkpoint holds {len(saved)} {name} states; use one per Trainer")
        session = saved.get("attributes", {}).get("session") if isinstance(saved, dict) else None
        if not isinstance(session, dict):
            raise CallbackError(
                f"resuming at step {state.global_step} from a checkpoint without compression state (it was "
                "saved without CompressionCallback, or before its first step): start a new run from the "
                "checkpoint's model (from_pretrained(checkpoint_dir)) instead of resume_from_checkpoint"
            )
        return session

    # ------------------------------------------------------------------ helpers

    def _pruned_names(self, model: torch.nn.Module) -> list[str]:
        """Normalized names of the parameters the recipe's pruners select (PatternError if none)."""
        names = [normalize(n) for n, _ in model.named_parameters()]
        pruned: list[str] = []
        for modifier in self._recipe.modifiers:
            if modifier.prunes:
                pruned += match_params(modifier.parameter_patterns(), names)
        return list(dict.fromkeys(pruned))

    def _prepare(self, model: torch.nn.Module) -> None:
        """Check the recipe against ``model`` (re-read with its parameter names: RecipeError at the
        recipe's line) and add the mask buffers, once per model."""
        if self._prepared is model:
            return
        if not isinstance(model, torch.nn.Module):
            raise CallbackError(f"the Trainer's model is a {type(model).__name__}, not a torch.nn.Module")
        if self._reread is not None:
            shapes = {normalize(n): tuple(p.shape) for n, p in model.named_parameters()}
            self._recipe = self._reread(shapes, tied_aliases(model.named_parameters(remove_duplicate=False)))
        _add_mask_buffers(model, self._pruned_names(model))
        for modifier in self._recipe.modifiers:  # quantization buffers, for the same reason
            attach(model, modifier.model_buffers(model))
        self._prepared = model

    def _live(self) -> Session | None:
        """The session while it runs (None once finalized, or when no train() began)."""
        return self.session if self._running else None

    def _finalize(self) -> None:
        assert self.session is not None
        self._running = False
        self.session.finalize()

    def _check_optimizer(self) -> None:
        session = self.session
        if session is not None and session.optimizer is not session.base_optimizer:
            raise UnsupportedModifierError(
                "a modifier swapped the training optimizer, which CompressionCallback cannot host (the "
                "Trainer steps its own); run this recipe with `compressor run` or compressor.Session"
            )

    def _record(self, step: int, name: str, value: float) -> None:
        self.metrics.append((step, name, value))
        self._pending.setdefault(step, {})[f"compression/{name}"] = value
        if self._on_metric is not None:
            self._on_metric(step, name, value)

    def _flush(self, state: Any) -> None:
        """Append the metrics logged since the last flush to ``state.log_history``, one entry per step."""
        for step in sorted(self._pending):
            state.log_history.append({**self._pending[step], "step": step})
        self._pending = {}
