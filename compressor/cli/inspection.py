"""``compressor inspect``: a recipe's schedule per epoch, or the sparsity per tensor of a model file."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.table import Table

from compressor.core.checkpoint import load_checkpoint
from compressor.core.modifier import StepPosition, in_window
from compressor.core.schedules import sparsity_at
from compressor.recipe import load_recipe
from compressor.recipe.errors import RecipeError


def inspect_path(path: Path, epochs: float | None = None, steps_per_epoch: int | None = None) -> Table:
    """Dispatch on the file type: .yaml/.yml recipe, .pt checkpoint, .onnx model."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if suffix in (".yaml", ".yml"):
        return recipe_table(path, epochs, steps_per_epoch)
    if suffix == ".onnx":
        return onnx_table(path)
    return checkpoint_table(path)


def recipe_table(path: Path, epochs: float | None = None, steps_per_epoch: int | None = None) -> Table:
    """One row per epoch; per modifier its target sparsity if it prunes, else "active" on its window
    [start, end) ("one-shot" at start when start == end), as ``Modifier`` defines the window.

    Positions given in steps (``{step: N}``) are placed at N / ``steps_per_epoch`` epochs; without
    it they are a positioned ``RecipeError`` (the steps of an epoch depend on the data).
    """
    recipe = load_recipe(path)

    def at(position: float | StepPosition | None, default: float, where: tuple[str | int, ...]) -> float:
        if position is None:
            return default
        if not isinstance(position, StepPosition):
            return float(position)
        if steps_per_epoch is None:
            message = (
                f"step {position.step} cannot be placed in a table per epoch without the number of "
                "steps per epoch: pass --steps-per-epoch N (a run's metrics.csv gives step and epoch)"
            )
            raise RecipeError([recipe.source.issue(where, message)])
        return position.step / steps_per_epoch

    total = epochs if epochs is not None else (recipe.train.epochs if recipe.train is not None else None)
    if total is None:
        ends = [at(m.end, 0.0, ("modifiers", i, "end")) for i, m in enumerate(recipe.modifiers)]
        total = max([e for e in ends if e > 0], default=1.0)
    table = Table(title=f"{path}: schedule per epoch ({total:g} epochs)")
    table.add_column("epoch", justify="right")
    for index, modifier in enumerate(recipe.modifiers):
        table.add_column(f"[{index}] {modifier.type}", justify="right")
    for epoch in range(int(total) + 1):
        cells = [str(epoch)]
        for index, modifier in enumerate(recipe.modifiers):
            start = at(modifier.start, 0.0, ("modifiers", index, "start"))
            end = start if modifier.one_shot else at(modifier.end, total, ("modifiers", index, "end"))
            final = getattr(modifier, "final_sparsity", None)
            if final is None:
                once = start == end == epoch
                cells.append("one-shot" if once else "active" if in_window(epoch, start, end) else "-")
                continue
            kind = modifier.schedule
            if isinstance(kind, list):
                kind = [
                    (at(p.at, 0.0, ("modifiers", index, "schedule", j, "at")), p.sparsity)
                    for j, p in enumerate(kind)
                ]
            target = (
                sparsity_at(epoch, start, end, modifier.init_sparsity, final, kind) if epoch >= start else 0.0
            )
            cells.append(f"{target:.1%}" + (" (held)" if epoch > end else ""))
        table.add_row(*cells)
    return table


def _sparsity_rows(table: Table, tensors: list[tuple[str, torch.Tensor]]) -> Table:
    total = zeros = 0
    for name, t in tensors:
        n, z = t.numel(), int((t == 0).sum())
        total += n
        zeros += z
        table.add_row(name, "x".join(map(str, t.shape)), f"{n:,}", f"{z / max(n, 1):.1%}")
    table.add_row("[b]all weights", "", f"{total:,}", f"{zeros / max(total, 1):.1%}")
    return table


def _new_table(title: str) -> Table:
    table = Table(title=title)
    for column, justify in (("tensor", "left"), ("shape", "left"), ("size", "right"), ("sparsity", "right")):
        table.add_column(column, justify=justify)
    return table


def checkpoint_table(path: Path) -> Table:
    """Sparsity of every weight tensor (dim >= 2) of a checkpoint's model."""
    state = load_checkpoint(path)["model"]
    tensors = [(n, t) for n, t in state.items() if t.is_floating_point() and t.dim() >= 2]
    return _sparsity_rows(_new_table(f"{path}: sparsity per weight tensor"), tensors)


def onnx_table(path: Path) -> Table:
    """Sparsity of every constant with at least 2 dimensions of an ONNX model: initializers, sparse
    initializers (as written by ``compressor export --compress``) and Constant nodes."""
    import onnx

    from compressor.core.onnx_tensors import constant_tensors

    model = onnx.load(str(path))
    tensors = [(n, torch.from_numpy(a.copy())) for n, a in constant_tensors(model).items() if a.ndim >= 2]
    return _sparsity_rows(_new_table(f"{path}: sparsity per initializer"), tensors)
