"""The built-in training loop behind ``compressor run``: a recipe's ``train`` section, its modifiers,
checkpoints every epoch, and the files of a run.

The output folder holds checkpoint.pt, recipe.yaml (resolved), recipe.raw.yaml, metrics.csv,
summary.json and PNG plots. A run killed at any point resumes from its last checkpoint
(``resume=True``) and ends with the same masks and metrics as an uninterrupted run: the data
order of each epoch comes from (seed, epoch), and the RNG states are checkpointed.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import zoo
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .params import normalize
from .recipe import Recipe, parse_recipe, resolved_yaml
from .report import MetricsLog, Progress, plot_run, write_summary
from .sampling import preflight
from .session import Session
from .structure import resume_shapes

LOSSES = {"cross_entropy": torch.nn.functional.cross_entropy}


class RunError(ValueError):
    """A user error in how a run was asked for (bad recipe for a run, resume mismatch)."""


@dataclass
class RunFiles:
    """The files of a run folder."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def raw_recipe(self) -> Path:
        return self.root / "recipe.raw.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
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
) -> dict[str, Any]:
    """Train and compress as the recipe says; returns the summary (also written to summary.json)."""
    files = RunFiles(Path(output))
    raw_text = _recipe_text(files, recipe_path, resume, allow_recipe_change)
    source = str(recipe_path) if recipe_path is not None else str(files.raw_recipe)
    first = parse_recipe(raw_text, file=source, overrides=overrides)
    if first.train is None:
        raise RunError(f"{source}: the recipe has no 'train' section, which `compressor run` needs")
    train = first.train
    torch.manual_seed(train.seed)
    bundle = zoo.load_data(train.data, seed=train.seed)
    model = zoo.build_model(train.model, bundle.input_shape, bundle.num_classes, seed=train.seed)
    names = [normalize(n) for n, _ in model.named_parameters()]
    recipe: Recipe = parse_recipe(raw_text, file=source, overrides=overrides, param_names=names)
    loss_fn = LOSSES.get(train.loss)
    if loss_fn is None:
        raise RunError(f"train.loss: unknown loss {train.loss!r}; known: {', '.join(LOSSES)}")
    optimizer = build_optimizer(train.optimizer, model.parameters())
    batches_per_epoch = math.ceil(len(bundle.train) / train.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / train.grad_accum)
    files.root.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(files.metrics)
    session = Session(
        recipe,
        model,
        optimizer,
        steps_per_epoch=steps_per_epoch,
        total_epochs=train.epochs,
        data=bundle.train,
        loss_fn=loss_fn,
        metrics=lambda step, name, value: log.log(step, step / steps_per_epoch, "train", name, value),
    )
    _preflight(recipe, session)
    start_epoch, elapsed = 0, 0.0
    if resume:
        start_epoch, elapsed = _restore(files, session, model)
        log.truncate_after(session.step)
    else:
        log.reset()
        files.raw_recipe.write_text(raw_text)
        files.recipe.write_text(resolved_yaml(recipe))
    total_steps = session.total_steps
    epochs = math.ceil(train.epochs)
    began = time.perf_counter() - elapsed
    with Progress(total_steps, enabled=progress) as bar:
        for epoch in range(start_epoch, epochs):
            _train_epoch(session, bundle, train, epoch, loss_fn, log, bar)
            metrics = evaluate(model, bundle.test, loss_fn)
            log.log(session.step, session.epoch, "eval", "loss", metrics["loss"])
            log.log(session.step, session.epoch, "eval", "accuracy", metrics["accuracy"])
            log.log(session.step, session.epoch, "eval", "sparsity", session.masks.global_sparsity())
            shown = {"eval_loss": metrics["loss"], "eval_accuracy": metrics["accuracy"]}
            bar.epoch_done(epoch + 1, epochs, shown, session.masks.global_sparsity())
            _checkpoint(files, session, model, epoch + 1, time.perf_counter() - began, raw_text, recipe)
            if total_steps is not None and session.step >= total_steps:
                break
    session.finalize()
    final = evaluate(model, bundle.test, loss_fn)
    summary = _summary(session, log, final, time.perf_counter() - began)
    write_summary(files.summary, summary)
    plot_run(files.metrics, files.root, summary["sparsity"]["per_parameter"])
    return summary


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
            suggestion="lower num_grads, use block_size, or select fewer parameters",
        )


def _train_epoch(
    session: Session, bundle: Any, train: Any, epoch: int, loss_fn: Any, log: MetricsLog, bar: Any
) -> None:
    """One pass over the training data, in an order fixed by (seed, epoch)."""
    model = session.model
    model.train()
    order = torch.Generator().manual_seed(train.seed * 1_000_003 + epoch)
    loader = DataLoader(bundle.train, batch_size=train.batch_size, shuffle=True, generator=order)
    total_steps = session.total_steps
    batches = list(loader)
    for first in range(0, len(batches), train.grad_accum):
        if total_steps is not None and session.step >= total_steps:
            return
        group = batches[first : first + train.grad_accum]
        session.optimizer.zero_grad()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in group:
            out = model(x)
            loss = loss_fn(out, y)
            (loss * len(y) / sum(len(b[1]) for b in group)).backward()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        session.before_step()
        session.optimizer.step()
        session.after_step()
        log.log(session.step, session.epoch, "train", "loss", loss_sum / seen)
        log.log(session.step, session.epoch, "train", "accuracy", correct / seen)
        bar.update(
            session.step, loss=loss_sum / seen, acc=correct / seen, sparsity=session.masks.global_sparsity()
        )


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, loss_fn: Any, batch_size: int = 512) -> dict[str, float]:
    """Mean loss and accuracy (fraction) of ``model`` on ``data``, in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    total, correct, seen = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size):
        out = model(x)
        total += float(loss_fn(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return {"loss": total / seen, "accuracy": correct / seen}


def _checkpoint(
    files: RunFiles, session: Session, model: Any, epoch: int, elapsed: float, raw: str, recipe: Recipe
) -> None:
    """Everything to resume, plus the resolved recipe so that the checkpoint alone rebuilds the model."""
    save_checkpoint(
        files.checkpoint,
        {
            "model": model.state_dict(),
            "optimizer": session.base_optimizer.state_dict(),  # a swapped-in one saves itself
            "session": session.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,
            "elapsed": elapsed,
            "recipe_sha256": hashlib.sha256(raw.encode()).hexdigest(),
            "recipe": resolved_yaml(recipe),
        },
    )


def _restore(files: RunFiles, session: Session, model: Any) -> tuple[int, float]:
    state = load_checkpoint(files.checkpoint)
    resume_shapes(session, state["model"])  # channel-pruned checkpoint: shrink the fresh model to it
    model.load_state_dict(state["model"])
    session.base_optimizer.load_state_dict(state["optimizer"])
    session.load_state_dict(state["session"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), float(state.get("elapsed", 0.0))


def _summary(session: Session, log: MetricsLog, final: dict[str, float], wall: float) -> dict[str, Any]:
    """Final eval, the dense model's eval (the last one before any pruning starts), sparsity, size, time."""
    compressing = [m for m in session.modifiers if m.prunes or m.restructures]
    first = min((session.window(m)[0] for m in compressing), default=None)
    dense = [r for r in log.rows() if r["split"] == "eval" and r["name"] == "accuracy"]
    dense = [r["value"] for r in dense if first is None or r["step"] <= first]
    return {
        "eval": {"accuracy": final["accuracy"], "loss": final["loss"]},
        "dense_eval_accuracy": dense[-1] if dense else None,
        "sparsity": {"global": session.masks.global_sparsity(), "per_parameter": session.masks.sparsities()},
        "parameters": sum(p.numel() for p in session.model.parameters()),
        "steps": session.step,
        "epochs": session.epoch,
        "wall_time_s": wall,
    }
