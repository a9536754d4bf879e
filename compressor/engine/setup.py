"""A run set up: the recipe read (rank 0) and validated, then data, model, task, optimizer, metrics
log and session built on every rank, before the first collective of training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.builders import build_task, build_train
from compressor.core import distributed
from compressor.core.checkpoint import seed_rngs
from compressor.core.errors import CompressorError
from compressor.core.modifier import WindowError
from compressor.core.params import normalize, tied_aliases
from compressor.core.preflight import preflight
from compressor.data.builtin import DataBundle
from compressor.engine.device import check_world, recipe_device
from compressor.engine.files import RunError, RunFiles, recipe_text
from compressor.engine.init_weights import load_initial_weights
from compressor.engine.report import MetricsLog
from compressor.lifecycle.session import Session
from compressor.recipe import AllowImports, Recipe, RecipeError, TrainSection, parse_recipe
from compressor.recipe.loader import optimizer_issues
from compressor.surgery.channels import check_rebuildable
from compressor.tasks import Task, unpack_data


@dataclass
class RunState:
    """What the training loop of a run works on, built by ``setup`` (and ``_start`` on resume)."""

    files: RunFiles
    raw_text: str
    recipe: Recipe
    train: TrainSection
    bundle: DataBundle
    model: torch.nn.Module
    session: Session
    task: Task
    log: Any  # MetricsLog on rank 0, NoLog elsewhere
    device: torch.device
    start_epoch: int = 0
    elapsed: float = 0.0  # seconds of training before this process (resume)


class NoLog:
    """The metrics log of ranks other than 0: writes nothing."""

    def close(self) -> None:
        pass

    def log(self, *args: Any) -> None:
        pass

    def truncate_after(self, step: int, rows: int | None = None) -> None:
        pass


def setup(
    ctx: distributed.Context,
    files: RunFiles,
    recipe_path: str | Path | None,
    overrides: dict[str, str] | None,
    resume: bool,
    allow_recipe_change: bool,
    allow_imports: AllowImports = (),
) -> RunState:
    """The recipe read (by rank 0) and everything built from it, on every rank.

    Everything that may fail on a user error happens here, before the first collective of
    training: every rank learns of an error on any rank, so that none waits for a failed one.
    """
    raw_text = distributed.on_main(lambda: recipe_text(files, recipe_path, resume, allow_recipe_change))
    source = str(recipe_path) if recipe_path is not None else str(files.raw_recipe)
    state: RunState | None = None
    error: Exception | None = None
    try:
        state = build_run(ctx, files, raw_text, source, overrides, allow_imports, init=not resume)
    except Exception as exc:
        error = exc
    distributed.agree(error)
    assert state is not None
    return state


def build_run(
    ctx: distributed.Context,
    files: RunFiles,
    raw_text: str,
    source: str,
    overrides: dict[str, str] | None,
    allow_imports: AllowImports = (),
    *,
    init: bool = True,
) -> RunState:
    """Data, model, validated recipe, optimizer, metrics log and session of a run (not resumed yet).

    ``init``: load ``train.init_from``'s weights into the fresh model (a resumed run does not: its
    own checkpoint replaces them).
    """
    first = parse_recipe(raw_text, file=source, overrides=overrides)
    if first.train is None:
        message = "the recipe has no 'train' section, which `compressor run` needs"
        raise RecipeError([first.source.issue((), message)])
    issues = optimizer_issues(first)  # as validate reports them: at their line, before anything is built
    if issues:
        raise RecipeError(issues)
    train = first.train
    device = recipe_device(first, ctx)
    seed_rngs(train.seed)  # the same on every rank: data and model built alike; forked in _start
    bundle, model = build_train(first, allow_imports)
    if init:
        load_initial_weights(first, model)
    model.to(device)
    task = build_task(first, allow_imports)
    probe_task(first, task, model, bundle.train, device)
    shapes = {normalize(n): tuple(p.shape) for n, p in model.named_parameters()}
    aliases = tied_aliases(model.named_parameters(remove_duplicate=False))
    recipe: Recipe = parse_recipe(
        raw_text, file=source, overrides=overrides, param_names=shapes, aliases=aliases
    )
    check_world(recipe, train.batch_size, ctx.world_size)
    optimizer = build_optimizer(train.optimizer, model.parameters())
    if any(m.restructures for m in recipe.modifiers):
        check_rebuildable(optimizer)  # channel surgery rebuilds it: refuse now, not after the surgery
    batches_per_epoch = -(-len(unpack_data(bundle.train, task)[0]) // train.batch_size)  # ceil, in ints
    steps_per_epoch = -(-batches_per_epoch // train.grad_accum)
    if ctx.rank == 0:
        files.root.mkdir(parents=True, exist_ok=True)
    log: Any = MetricsLog(files.metrics) if ctx.rank == 0 else NoLog()
    session = Session(
        recipe,
        model,
        optimizer,
        steps_per_epoch=steps_per_epoch,
        total_epochs=train.epochs,
        data=bundle.train,
        task=task,
        metrics=lambda step, name, value: log.log(step, step / steps_per_epoch, "train", name, value),
    )
    check_windows(recipe, session)
    preflight_gradients(recipe, session)
    if device.type == "cpu" and any(m.needs_gradients for m in recipe.modifiers):
        from compressor.mfac import kernels  # a first run compiles them: overlap that with training

        kernels.build_in_background("cpu")
    return RunState(files, raw_text, recipe, train, bundle, model, session, task, log, device)


def check_windows(recipe: Recipe, session: Session) -> None:
    """Place every modifier's window in the run's steps now, so that one that ends before it starts
    once epochs are counted in steps (``start: {step: 5000}``, ``end: 3`` at 23 steps per epoch)
    stops the run before training, as a RecipeError at that line."""
    issues = []
    for index, modifier in enumerate(recipe.modifiers):
        try:
            modifier.resolve_window(session)
        except WindowError as err:
            field = "end" if modifier.end is not None else "start"
            issues.append(recipe.source.issue(("modifiers", index, field), str(err)))
    if issues:
        raise RecipeError(issues)


def preflight_gradients(recipe: Recipe, session: Session) -> None:
    """Stop before training when the gradient buffers of second-order modifiers cannot fit."""
    for index, modifier in enumerate(recipe.modifiers):
        patterns = modifier.parameter_patterns()
        selected = session.match(patterns) if patterns else list(session.params)
        count = sum(session.params[n].numel() for n in selected)
        layerwise = getattr(modifier, "memory_estimate", None)  # (bytes, what they are) from the shapes
        if layerwise is not None:
            needed, held = layerwise({n: tuple(session.params[n].shape) for n in selected})
            what = f"modifiers[{index}] ({modifier.type}) over {count:,} weights, {held},"
        else:
            needed, what = (
                modifier.gradient_bytes(count),
                f"modifiers[{index}] ({modifier.type}) over {count:,} weights",
            )
        preflight(
            what,
            needed,
            suggestion="lower num_grads, use block_size (below num_grads: the streamed Fisher), or "
            "select fewer parameters",
            gathered=getattr(modifier, "gathers_rows", lambda: True)(),  # streamed: all-reduced sums
        )


def build_optimizer(section: Any, params: Any) -> torch.optim.Optimizer:
    """The recipe's ``train.optimizer``: a registered optimizer or any ``torch.optim`` class."""
    try:
        return section.build(params)
    except ValueError as exc:
        raise RunError(str(exc)) from exc


def probe_task(recipe: Recipe, task: Task, model: torch.nn.Module, data: Any, device: torch.device) -> None:
    """Prepare the task with the model (``Task.prepare``), then run it once on a batch of the first
    training sample (eval mode, no gradients) so that a batch the task cannot read, or a model it
    cannot call, stops the run before training starts, as a RecipeError at ``train.task``. Touches no
    RNG and no batch-norm statistics."""
    dataset, collate = unpack_data(data, task)
    if len(dataset) == 0:
        task.prepare(model)
        return
    was_training = model.training
    model.eval()
    try:
        task.prepare(model)
        with torch.no_grad():
            batch = task.to_device(collate([dataset[0]]), device)
            task.loss(task.forward(model, batch), batch)
            task.batch_size(batch)
    except Exception as exc:
        name = recipe.train.task if recipe.train is not None else "classification"
        detail = str(exc) if isinstance(exc, CompressorError) else f"{type(exc).__name__}: {exc}"
        message = f"task {name!r} cannot run the model on the training data: {detail}"
        source = recipe.source
        raise RecipeError([source.issue(("train", "task"), message)]) from exc
    finally:
        model.train(was_training)
