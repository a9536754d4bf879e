"""The built-in training loop behind ``compressor run``: a recipe's ``train`` section, its modifiers,
checkpoints every epoch, and the files of a run.

The output folder holds checkpoint.pt, recipe.yaml (resolved), recipe.raw.yaml, metrics.csv,
summary.json and PNG plots. A run killed at any point resumes from its last checkpoint
(``resume=True``) and ends with the same masks and metrics as an uninterrupted run: the data
order of each epoch comes from (seed, epoch), and the RNG states are checkpointed.

Under torchrun the same loop runs DDP-style on P ranks: the global batch stays ``train.batch_size``
(each rank takes batch_size / P of it), gradient sampling and evaluation are sharded, and rank 0
writes every file. A checkpoint resumes at any world size with the same masks, model and optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from . import distributed, zoo
from .channel_surgery import check_rebuildable, resume_shapes
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .errors import CompressorError
from .params import normalize
from .preflight import preflight
from .recipe import AllowImports, Recipe, RecipeError, build_task, build_train, parse_recipe, resolved_yaml
from .recipe.source import Source
from .report import MetricsLog, Progress, plot_run, write_summary
from .sampling import fetch_batch
from .session import Session
from .task import LOSSES as LOSSES  # re-exported: the losses ``train.loss`` may name
from .task import ClassificationTask, Task, unpack_data


class RunError(CompressorError, ValueError):
    """A user error in how a run was asked for (bad recipe for a run, resume mismatch)."""


@dataclass
class RunFiles:
    """The files of a run folder."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        """checkpoint.pt: model, masks, optimizer, schedule, RNG (every epoch)."""
        return self.root / "checkpoint.pt"

    @property
    def recipe(self) -> Path:
        """recipe.yaml: the resolved recipe."""
        return self.root / "recipe.yaml"

    @property
    def raw_recipe(self) -> Path:
        """recipe.raw.yaml: the recipe as given."""
        return self.root / "recipe.raw.yaml"

    @property
    def metrics(self) -> Path:
        """metrics.csv: long-format metrics."""
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        """summary.json: final accuracy, sparsity, wall time."""
        return self.root / "summary.json"


def build_optimizer(section: Any, params: Any) -> torch.optim.Optimizer:
    """The recipe's ``train.optimizer``: a registered optimizer or any ``torch.optim`` class."""
    try:
        return section.build(params)
    except ValueError as exc:
        raise RunError(str(exc)) from exc


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
    called by every rank) it joins the process group (see ``compressor.distributed``) and trains
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
    state = _setup(ctx, files, recipe_path, overrides, resume, allow_recipe_change, allow_imports)
    ctx = dataclasses.replace(ctx, device=state.device)  # the rank's device, as train.device says
    try:
        _start(state, ctx, resume)
        return _train(state, ctx, progress)
    finally:
        state.log.close()  # the CSV handle (every row is already flushed)


@dataclass
class RunState:
    """What the training loop of a run works on, built by ``_setup`` (and ``_start`` on resume)."""

    files: RunFiles
    raw_text: str
    recipe: Recipe
    train: Any  # the recipe's TrainSection
    bundle: zoo.DataBundle
    model: torch.nn.Module
    session: Session
    task: Task
    log: Any  # MetricsLog on rank 0, _NoLog elsewhere
    device: torch.device
    start_epoch: int = 0
    elapsed: float = 0.0  # seconds of training before this process (resume)


def _setup(
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
    raw_text = distributed.on_main(lambda: _recipe_text(files, recipe_path, resume, allow_recipe_change))
    source = str(recipe_path) if recipe_path is not None else str(files.raw_recipe)
    state: RunState | None = None
    error: Exception | None = None
    try:
        state = _build(ctx, files, raw_text, source, overrides, allow_imports)
    except Exception as exc:
        error = exc
    distributed.agree(error)
    assert state is not None
    return state


def _build(
    ctx: distributed.Context,
    files: RunFiles,
    raw_text: str,
    source: str,
    overrides: dict[str, str] | None,
    allow_imports: AllowImports = (),
) -> RunState:
    """Data, model, validated recipe, optimizer, metrics log and session of a run (not resumed yet)."""
    first = parse_recipe(raw_text, file=source, overrides=overrides)
    if first.train is None:
        raise RunError(f"{source}: the recipe has no 'train' section, which `compressor run` needs")
    train = first.train
    device = _recipe_device(first, ctx)
    torch.manual_seed(train.seed)
    bundle, model = build_train(first, allow_imports)
    model.to(device)
    task = build_task(first, allow_imports)
    _probe_task(first, task, model, bundle.train, device)
    names = [normalize(n) for n, _ in model.named_parameters()]
    recipe: Recipe = parse_recipe(raw_text, file=source, overrides=overrides, param_names=names)
    _check_world(recipe, train.batch_size, ctx.world_size)
    optimizer = build_optimizer(train.optimizer, model.parameters())
    if any(m.restructures for m in recipe.modifiers):
        check_rebuildable(optimizer)  # channel surgery rebuilds it: refuse now, not after the surgery
    batches_per_epoch = math.ceil(len(unpack_data(bundle.train, task)[0]) / train.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / train.grad_accum)
    if ctx.rank == 0:
        files.root.mkdir(parents=True, exist_ok=True)
    log: Any = MetricsLog(files.metrics) if ctx.rank == 0 else _NoLog()
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
    _preflight(recipe, session)
    if device.type == "cpu" and any(m.needs_gradients for m in recipe.modifiers):
        from .mfac import kernels  # a first run compiles them: overlap that with training

        kernels.build_in_background("cpu")
    return RunState(files, raw_text, recipe, train, bundle, model, session, task, log, device)


def _probe_task(recipe: Recipe, task: Task, model: torch.nn.Module, data: Any, device: torch.device) -> None:
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
        source = recipe._source or Source(file="<recipe>", data=None)
        raise RecipeError([source.issue(("train", "task"), message)]) from exc
    finally:
        model.train(was_training)


def resolve_device(spec: str, ctx: distributed.Context) -> torch.device:
    """The device that ``train.device`` (``spec``) names for this rank; RunError when it is not there.

    In one process: ``auto`` is the first GPU (``cuda:0``) when CUDA is available, else the CPU;
    ``cuda`` is ``cuda:0``; ``cuda:N`` that GPU; ``cpu`` the CPU. Under torchrun every rank computes
    on the device it joined the process group with (``ctx.device``: ``cuda:LOCAL_RANK`` with nccl,
    the CPU with gloo): ``auto`` is that device, ``cuda`` needs it to be a GPU and ``cpu`` the CPU,
    and ``cuda:N`` is refused (the ranks cannot all use one GPU).
    """
    if ctx.world_size > 1:
        return _rank_device(spec, ctx.device)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec if ":" in spec else "cuda:0")
    if not torch.cuda.is_available():
        raise RunError(f"{spec!r} asks for a GPU, but {_no_cuda_reason()}; use auto or cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RunError(f"{spec!r}: there is no such GPU; torch sees {count} (cuda:0 to cuda:{count - 1})")
    return device


def _rank_device(spec: str, device: torch.device) -> torch.device:
    """``resolve_device`` under torchrun: the rank's own ``device``, if ``spec`` allows it."""
    if spec.startswith("cuda:"):
        raise RunError(
            f"{spec!r} names one GPU, but under torchrun each rank computes on its own "
            "(cuda:LOCAL_RANK); use cuda or auto"
        )
    if spec == "cuda" and device.type != "cuda":
        raise RunError(f"'cuda' asks for a GPU per rank, but {_no_cuda_reason()}; use auto or cpu")
    if spec == "cpu" and device.type != "cpu":
        raise RunError(
            "'cpu' under torchrun, but the ranks joined with nccl, one GPU each; to train on the CPU, "
            "hide the GPUs (CUDA_VISIBLE_DEVICES= torchrun ...) so that they join with gloo, or use auto"
        )
    return device


def _no_cuda_reason() -> str:
    """Why torch sees no GPU, for messages."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "torch.cuda.is_available() is False (no GPU visible: driver, CUDA_VISIBLE_DEVICES?)"


def _recipe_device(recipe: Recipe, ctx: distributed.Context) -> torch.device:
    """``resolve_device`` of the recipe's ``train.device``; a RecipeError at that line when unusable."""
    assert recipe.train is not None
    try:
        return resolve_device(recipe.train.device, ctx)
    except RunError as err:
        source = recipe._source or Source(file="<recipe>", data=None)
        raise RecipeError([source.issue(("train", "device"), str(err))]) from None


def _start(state: RunState, ctx: distributed.Context, resume: bool) -> None:
    """On resume, load the checkpoint into the run (every rank); else start the run's files afresh."""
    files = state.files
    if resume:
        saved = distributed.on_main(lambda: load_checkpoint(files.checkpoint))
        error: Exception | None = None
        try:
            state.start_epoch, state.elapsed = _restore(saved, state.session, state.model, ctx)
        except Exception as exc:
            error = exc
        distributed.agree(error)
        del saved
        state.log.truncate_after(state.session.step)
    elif ctx.rank == 0:
        state.log.reset()
        files.raw_recipe.write_text(state.raw_text)
        files.recipe.write_text(resolved_yaml(state.recipe))


def _train(state: RunState, ctx: distributed.Context, progress: bool) -> dict[str, Any]:
    """The epochs from ``state.start_epoch`` on, then finalize, the final eval and the summary."""
    session, model, bundle, train, log = state.session, state.model, state.bundle, state.train, state.log
    net = _wrap(model, ctx)
    total_steps = session.total_steps
    epochs = math.ceil(train.epochs)
    began = time.perf_counter() - state.elapsed
    with Progress(total_steps, enabled=progress and ctx.rank == 0, quiet=ctx.rank != 0) as bar:
        if train.eval_at_start and session.step == 0:
            _log_eval(state, ctx)  # the dense figures of a pretrained model, before any pruning
        for epoch in range(state.start_epoch, epochs):
            _train_epoch(session, bundle, train, epoch, state.task, log, bar, net=net, ctx=ctx)
            last = epoch + 1 == epochs or (total_steps is not None and session.step >= total_steps)
            shown: dict[str, float | None] = {"eval_loss": None}
            if isinstance(state.task, ClassificationTask):
                shown["eval_accuracy"] = None
            if last or (epoch + 1) % train.eval_every == 0:
                shown = _log_eval(state, ctx)
            bar.epoch_done(epoch + 1, epochs, shown, session.masks.global_sparsity())
            elapsed = time.perf_counter() - began
            _checkpoint(state.files, session, model, epoch + 1, elapsed, state.raw_text, state.recipe)
            if last:
                break
    session.finalize()
    final = _evaluate(model, bundle.test, state.task, ctx)
    wall = time.perf_counter() - began
    world = ctx.world_size
    summary = distributed.on_main(lambda: _write_summary(state.files, session, log, final, wall, world))
    distributed.barrier()
    return summary


def _log_eval(state: RunState, ctx: distributed.Context) -> dict[str, float | None]:
    """Evaluate on the test split and log the loss, the task's metrics (accuracy, ...) and sparsity;
    the values the bar shows."""
    session, log = state.session, state.log
    metrics = _evaluate(state.model, state.bundle.test, state.task, ctx)
    for name, value in metrics.items():
        log.log(session.step, session.epoch, "eval", name, value)
    log.log(session.step, session.epoch, "eval", "sparsity", session.masks.global_sparsity())
    return {f"eval_{name}": value for name, value in metrics.items()}


def _write_summary(
    files: RunFiles, session: Session, log: Any, final: dict[str, float], wall: float, world: int
) -> dict[str, Any]:
    summary = _summary(session, log, final, wall)
    if world > 1:
        summary["world_size"] = world
    write_summary(files.summary, summary)
    plot_run(files.metrics, files.root, summary["sparsity"]["per_parameter"])
    return summary


class _NoLog:
    """The metrics log of ranks other than 0: writes nothing."""

    def close(self) -> None:
        pass

    def log(self, *args: Any) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


def _check_world(recipe: Recipe, batch_size: int, world: int) -> None:
    """RunError when the recipe cannot run DDP-style on ``world`` ranks."""
    if world <= 1:
        return
    if batch_size % world:
        raise RunError(
            f"train.batch_size {batch_size} is the global batch and must divide evenly over the "
            f"{world} ranks (each takes batch_size / {world}); use a multiple of {world}, "
            f"e.g. --set batch_size=... if the recipe has that variable"
        )
    shrinking = [m.type for m in recipe.modifiers if m.restructures]
    if shrinking:
        raise RunError(
            f"{', '.join(shrinking)} removes channels, which DDP does not support yet; "
            "run this recipe in one process (without torchrun)"
        )


def _wrap(model: torch.nn.Module, ctx: distributed.Context) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else ``model`` itself."""
    if ctx.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Buffers (batch-norm statistics) are synced at init, then copied from rank 0 where they are read
    # (sampling, eval, saving) rather than before every forward.
    sync = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if sync else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


def _recipe_text(files: RunFiles, recipe_path: str | Path | None, resume: bool, allow_change: bool) -> str:
    """The raw recipe text: the given file, or on resume the stored copy (refusing a changed recipe)."""
    if not resume:
        if recipe_path is None:
            raise RunError("a recipe file is needed (or --resume DIR to continue a run)")
        path = Path(recipe_path)
        if not path.is_file():
            raise RunError(f"{path}: no such recipe file")
        return path.read_text()
    if not files.checkpoint.is_file() or not files.raw_recipe.is_file():
        raise RunError(f"{files.root}: nothing to resume (no checkpoint.pt and recipe.raw.yaml)")
    stored = files.raw_recipe.read_text()
    if recipe_path is None:
        return stored
    given = Path(recipe_path).read_text()
    if given != stored and not allow_change:
        raise RunError(
            f"{recipe_path} differs from the recipe of the run in {files.root}; "
            "pass --allow-recipe-change to resume with it anyway"
        )
    return given


def _preflight(recipe: Recipe, session: Session) -> None:
    """Stop before training when the gradient buffers of second-order modifiers cannot fit."""
    for index, modifier in enumerate(recipe.modifiers):
        patterns = modifier.parameter_patterns()
        selected = session.match(patterns) if patterns else list(session.params)
        count = sum(session.params[n].numel() for n in selected)
        preflight(
            f"modifiers[{index}] ({modifier.type}) over {count:,} weights",
            modifier.gradient_bytes(count),
            suggestion="lower num_grads, use block_size (below num_grads: the streamed Fisher), or "
            "select fewer parameters",
            gathered=getattr(modifier, "gathers_rows", lambda: True)(),  # streamed: all-reduced sums
        )


def _train_epoch(
    session: Session,
    bundle: Any,
    train: Any,
    epoch: int,
    task: Task,
    log: Any,
    bar: Any,
    *,
    net: torch.nn.Module | None = None,
    ctx: distributed.Context | None = None,
) -> None:
    """One pass over the training data, in an order fixed by (seed, epoch).

    The order and the global batches are those of one process; with P ranks, rank r takes the
    r-th of P equal slices of every batch (a last, partial batch is split as evenly as possible)
    and DDP averages the gradients, each rank's loss weighted so that the step's gradient is the
    mean over the global batch, as in one process.

    ``task`` reads the batches: each batch's loss is its mean, weighted by its share of the step's
    samples (its sample count over the group's, under gradient accumulation; the rank's slice over
    the global batch under DDP), so the step's gradient is the mean over all the step's samples.
    The logged train loss and the task's metrics are over the samples of the step.
    """
    model = session.model
    net = model if net is None else net
    world, rank = (1, 0) if ctx is None else (ctx.world_size, ctx.rank)
    device = torch.device("cpu") if ctx is None else ctx.device
    model.train()
    data, collate = unpack_data(bundle.train, task)
    order = torch.Generator().manual_seed(train.seed * 1_000_003 + epoch)
    # Batches of indices drawn exactly as DataLoader(data, shuffle=True, generator=order) would.
    index_loader = DataLoader(range(len(data)), batch_size=train.batch_size, shuffle=True, generator=order)
    index_batches = list(index_loader)
    total_steps = session.total_steps
    for first in range(0, len(index_batches), train.grad_accum):
        if total_steps is not None and session.step >= total_steps:
            return
        group = index_batches[first : first + train.grad_accum]
        group_size = sum(len(b) for b in group)
        session.optimizer.zero_grad()
        loss_sum, seen = 0.0, 0
        sums: dict[str, float] = {}
        for i, indices in enumerate(group):
            mine = indices.tensor_split(world)[rank] if world > 1 else indices
            share = len(mine) * world  # the loss below is the global batch's mean, as in one process
            if share == 0:  # still run a sample with weight 0: DDP's all-reduce needs every rank
                mine = indices[:1]
            batch = task.to_device(fetch_batch(data, mine.tolist(), collate), device)
            sync = world == 1 or i == len(group) - 1
            with contextlib.nullcontext() if sync else net.no_sync():
                out = task.forward(net, batch)
                loss = task.loss(out, batch)
                (loss * share / group_size).backward()
            size = task.batch_size(batch)
            for name, value in task.metric_sums(out, batch).items():  # every key on every rank
                sums[name] = sums.get(name, 0) + (value if share else 0)
            if share:
                loss_sum += loss.item() * size
                seen += size
        if world > 1:
            loss_sum, seen, *values = distributed.all_sum([loss_sum, seen, *sums.values()])
            sums = dict(zip(sums, values, strict=True))
        session.before_step()
        session.optimizer.step()
        session.after_step()
        metrics = {"loss": loss_sum / seen, **task.metrics(sums, seen)}
        for name, value in metrics.items():
            log.log(session.step, session.epoch, "train", name, value)
        shown = {("acc" if name == "accuracy" else name): value for name, value in metrics.items()}
        bar.update(session.step, **shown, sparsity=session.masks.global_sparsity())


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, task: Any, batch_size: int = 512) -> dict[str, float]:
    """Mean loss over the samples of ``data`` and the task's metrics (classification: ``accuracy``,
    a fraction; contrastive: ``recall@1``, ``mrr@10``, ``mean_cosine`` over the whole split), in eval
    mode (mode restored). A task whose loss depends on the batch (in-batch negatives) is scored on
    batches of ``batch_size``.

    ``task``: a ``compressor.task.Task``, or a loss function (a classification task with that loss).
    ``data``: a Dataset, or a DataLoader (its dataset and collate_fn; batches of ``batch_size``).
    """
    task = task if isinstance(task, Task) else ClassificationTask(task)
    task.prepare(model)
    data, collate = unpack_data(data, task)
    total, sums, seen, kept = _eval_sums(model, data, task, collate, batch_size)
    return {"loss": total / seen, **task.metrics(sums, seen), **task.split_metrics(kept)}


@torch.no_grad()
def _eval_sums(
    model: torch.nn.Module, data: Any, task: Task, collate: Any, batch_size: int = 512
) -> tuple[float, dict[str, float], int, list[Any]]:
    """(summed loss, summed ``task.metric_sums``, samples, the batches' ``task.split_outputs``) of
    ``model`` over ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, seen = 0.0, 0
    sums: dict[str, float] = {}
    kept: list[Any] = []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        batch = task.to_device(batch, device)
        out = task.forward(model, batch)
        total += task.loss_sum(out, batch)
        for name, value in task.metric_sums(out, batch).items():
            sums[name] = sums.get(name, 0) + value
        seen += task.batch_size(batch)
        part = task.split_outputs(out, batch)
        if part is not None:
            kept.append(part)
    model.train(was_training)
    return total, sums, seen, kept


def _evaluate(model: torch.nn.Module, data: Any, task: Task, ctx: distributed.Context) -> dict[str, float]:
    """``evaluate``, sharded over the ranks (rank r takes samples r, r + P, ...), rank 0's buffers."""
    if ctx.world_size <= 1:
        return evaluate(model, data, task)
    distributed.broadcast_buffers(model)
    data, collate = unpack_data(data, task)
    part = Subset(data, range(ctx.rank, len(data), ctx.world_size))
    total, sums, seen, kept = _eval_sums(model, part, task, collate)
    total, seen, *values = distributed.all_sum([total, seen, *sums.values()])
    kept = [out for rank in distributed.all_gather_objects(kept) for out in rank]
    metrics = task.metrics(dict(zip(sums, values, strict=True)), seen)
    return {"loss": total / seen, **metrics, **task.split_metrics(kept)}


def _checkpoint(
    files: RunFiles, session: Session, model: Any, epoch: int, elapsed: float, raw: str, recipe: Recipe
) -> None:
    """Everything to resume, plus the resolved recipe so that the checkpoint alone rebuilds the model.

    Collective under torch.distributed: rank 0's buffers and every rank's RNG state are gathered,
    and rank 0 alone writes the file (atomically); an error there is raised on every rank.
    """
    distributed.broadcast_buffers(model)
    rngs = distributed.all_gather_objects(rng_state())
    state = {
        "model": model.state_dict(),
        "optimizer": session.base_optimizer.state_dict(),  # a swapped-in one saves itself
        "session": session.state_dict(),
        "rng": rngs[0],
        "epoch": epoch,
        "elapsed": elapsed,
        "recipe_sha256": hashlib.sha256(raw.encode()).hexdigest(),
        "recipe": resolved_yaml(recipe),
    }
    if len(rngs) > 1:
        state["rng_ranks"] = rngs  # per-rank RNG, restored when resuming at the same world size
    distributed.on_main(lambda: save_checkpoint(files.checkpoint, state))


def _restore(
    state: dict[str, Any], session: Session, model: Any, ctx: distributed.Context
) -> tuple[int, float]:
    """Load a checkpoint's state into a fresh model and session (any world size wrote it)."""
    resume_shapes(session, state["model"])  # channel-pruned checkpoint: shrink the fresh model to it
    model.load_state_dict(state["model"])
    session.base_optimizer.load_state_dict(state["optimizer"])
    session.load_state_dict(state["session"])
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == ctx.world_size:
        set_rng_state(ranks[ctx.rank])
    else:  # another world size: every rank continues from rank 0's state
        set_rng_state(state["rng"])
    return int(state["epoch"]), float(state.get("elapsed", 0.0))


def _summary(session: Session, log: MetricsLog, final: dict[str, float], wall: float) -> dict[str, Any]:
    """Final eval, the dense model's eval (the last one before any pruning starts), sparsity, size, time."""
    compressing = [m for m in session.modifiers if m.prunes or m.restructures]
    first = min((session.window(m)[0] for m in compressing), default=None)
    dense = _dense_eval(log.rows(), first)
    return {
        "eval": {**{k: v for k, v in final.items() if k != "loss"}, "loss": final["loss"]},
        "dense_eval": dense,
        "dense_eval_accuracy": dense.get("accuracy") if dense else None,
        "sparsity": {"global": session.masks.global_sparsity(), "per_parameter": session.masks.sparsities()},
        "parameters": sum(p.numel() for p in session.model.parameters()),
        "steps": session.step,
        "epochs": session.epoch,
        "wall_time_s": wall,
    }


def _dense_eval(rows: list[dict[str, Any]], first: int | None) -> dict[str, float] | None:
    """The metrics of the last evaluation at or before step ``first`` (the first compressing step;
    None: any), sparsity left out; None when there was none."""
    evals = [r for r in rows if r["split"] == "eval" and (first is None or r["step"] <= first)]
    if not evals:
        return None
    last = evals[-1]["step"]
    return {r["name"]: r["value"] for r in evals if r["step"] == last and r["name"] not in ("sparsity",)}
