"""``compressor run``: train and compress as a recipe says, resumable at any point.

The output folder holds checkpoint.pt, recipe.yaml (resolved), recipe.raw.yaml, metrics.csv,
summary.json and PNG plots. A run killed at any point resumes from its last checkpoint
(``resume=True``) and ends with the same masks and metrics as an uninterrupted run: the data
order of each epoch comes from (seed, epoch), and the RNG states are checkpointed.

Under torchrun the same loop runs DDP-style on P ranks: the global batch stays ``train.batch_size``
(each rank takes batch_size / P of it), gradient sampling and evaluation are sharded, and rank 0
writes every file. A checkpoint resumes at any world size with the same masks, model and optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from compressor.core import distributed
from compressor.core.checkpoint import fork_rank_rngs, load_checkpoint
from compressor.engine import checkpoints
from compressor.engine.device import wrap_ddp
from compressor.engine.evaluation import evaluate_sharded
from compressor.engine.files import RunFiles
from compressor.engine.loop import train_epoch
from compressor.engine.report import Progress
from compressor.engine.setup import RunState, setup
from compressor.engine.summary import write_run_summary
from compressor.recipe import AllowImports, resolved_yaml
from compressor.tasks import ClassificationTask


def run(
    recipe_path: str | Path | None,
    output: str | Path,
    *,
    overrides: dict[str, str] | None = None,
    resume: bool = False,
    allow_recipe_change: bool = False,
    progress: bool = True,
    allow_imports: AllowImports = (),
) -> dict[str, Any]:
    """Train and compress as the recipe says; returns the summary (also written to summary.json).

    ``allow_imports``: the modules whose "package.module:factory" the recipe's ``train.model`` or
    ``train.data`` may import and call (a name allows its submodules too), or True for any; by
    default none, and such a recipe is refused with a RecipeError (see ``compressor.recipe.imports``).

    Under torchrun (``torchrun --nproc_per_node=N -m compressor.cli run ...``, or this function
    called by every rank) it joins the process group (see ``compressor.core.distributed``) and trains
    DDP-style; every rank returns the same summary. Files are written by rank 0 only.
    """
    with distributed.distributed() as ctx:
        return _run(ctx, recipe_path, output, overrides, resume, allow_recipe_change, progress, allow_imports)


def _run(
    ctx: distributed.Context,
    recipe_path: str | Path | None,
    output: str | Path,
    overrides: dict[str, str] | None,
    resume: bool,
    allow_recipe_change: bool,
    progress: bool,
    allow_imports: AllowImports = (),
) -> dict[str, Any]:
    files = RunFiles(Path(output))
    state = setup(ctx, files, recipe_path, overrides, resume, allow_recipe_change, allow_imports)
    ctx = dataclasses.replace(ctx, device=state.device)  # the rank's device, as train.device says
    try:
        _start(state, ctx, resume)
        return _train(state, ctx, progress)
    finally:
        state.log.close()  # the CSV handle (every row is already flushed)


def _start(state: RunState, ctx: distributed.Context, resume: bool) -> None:
    """On resume, load the checkpoint into the run (every rank); else start the run's files afresh."""
    files = state.files
    if resume:
        saved = distributed.on_main(lambda: load_checkpoint(files.checkpoint))
        error: Exception | None = None
        try:
            state.start_epoch, state.elapsed = checkpoints.restore(saved, state.session, state.model, ctx)
        except Exception as exc:
            error = exc
        distributed.agree(error)
        rows = saved.get("metrics_rows")
        del saved
        state.log.truncate_after(state.session.step, rows=rows)
    else:
        fork_rank_rngs(ctx.rank)  # setup seeded every rank alike: from here each draws its own numbers
        if ctx.rank == 0:
            state.log.reset()
            files.raw_recipe.write_text(state.raw_text)
            files.recipe.write_text(resolved_yaml(state.recipe))


def _train(state: RunState, ctx: distributed.Context, progress: bool) -> dict[str, Any]:
    """The epochs from ``state.start_epoch`` on, then finalize, the final eval and the summary."""
    session, model, bundle, train, log = state.session, state.model, state.bundle, state.train, state.log
    net = wrap_ddp(model, ctx)
    total_steps = session.total_steps
    epochs = math.ceil(train.epochs)
    began = time.perf_counter() - state.elapsed
    with Progress(total_steps, enabled=progress and ctx.rank == 0, quiet=ctx.rank != 0) as bar:
        if train.eval_at_start and session.step == 0:
            _log_eval(state, ctx)  # the dense figures of a pretrained model, before any pruning
        for epoch in range(state.start_epoch, epochs):
            train_epoch(session, bundle, train, epoch, state.task, log, bar, net=net, ctx=ctx)
            last = epoch + 1 == epochs or (total_steps is not None and session.step >= total_steps)
            shown: dict[str, float | None] = {"eval_loss": None}
            if isinstance(state.task, ClassificationTask):
                shown["eval_accuracy"] = None
            if last or (epoch + 1) % train.eval_every == 0:
                shown = _log_eval(state, ctx)
            bar.epoch_done(epoch + 1, epochs, shown, session.masks.global_sparsity())
            elapsed = time.perf_counter() - began
            checkpoints.save(state.files, session, model, epoch + 1, elapsed, state.raw_text, state.recipe)
            if last:
                break
    session.finalize()
    # what modifiers did in finalize (a last pruning update, quantization at the end of training,
    # every one-shot step of an `epochs: 0` run) belongs in the checkpoint that export reads
    done = max(state.start_epoch, min(epochs, math.ceil(session.epoch)))
    elapsed = time.perf_counter() - began
    checkpoints.save(state.files, session, model, done, elapsed, state.raw_text, state.recipe)
    final = evaluate_sharded(model, bundle.test, state.task, ctx)
    wall = time.perf_counter() - began
    world = ctx.world_size
    summary = distributed.on_main(lambda: write_run_summary(state.files, session, log, final, wall, world))
    distributed.barrier()
    return summary


def _log_eval(state: RunState, ctx: distributed.Context) -> dict[str, float | None]:
    """Evaluate on the test split and log the loss, the task's metrics (accuracy, ...) and sparsity;
    the values the bar shows."""
    session, log = state.session, state.log
    metrics = evaluate_sharded(state.model, state.bundle.test, state.task, ctx)
    for name, value in metrics.items():
        log.log(session.step, session.epoch, "eval", name, value)
    log.log(session.step, session.epoch, "eval", "sparsity", session.masks.global_sparsity())
    return {f"eval_{name}": value for name, value in metrics.items()}
