"""``train.init_from``: start a run from the model weights of another run's checkpoint.

Only the weights are taken (the checkpoint's ``model``): not its optimizer, schedule position, masks
or RNG state, so the run starts at step 0 with a fresh optimizer, as from a pretrained model. Every
tensor of the model must be in the checkpoint with the same shape, and nothing else may be there
(a channel-pruned or quantized checkpoint does not fit a freshly built model); any problem is a
RecipeError at ``train.init_from``'s line, before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compressor.core.checkpoint import CheckpointError, load_checkpoint
from compressor.recipe import Recipe, RecipeError

#: How many names of each kind a "does not fit" message lists.
SHOWN = 3


def load_initial_weights(recipe: Recipe, model: torch.nn.Module) -> Path | None:
    """Load ``recipe.train.init_from``'s model weights into ``model``; the file's path, or None
    when the recipe names none. The path is taken from the current directory (``~`` expanded)."""
    train = recipe.train
    if train is None or train.init_from is None:
        return None
    path = Path(train.init_from).expanduser()

    def fail(message: str) -> RecipeError:
        return RecipeError([recipe.source.issue(("train", "init_from"), message)])

    if not path.is_file():
        where = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise fail(
            f"{train.init_from!r} {where} (looked at {path.absolute()}); expected the checkpoint.pt "
            "written by `compressor run` (run that recipe first)"
        )
    try:
        saved = load_checkpoint(path)
    except CheckpointError as err:
        raise fail(str(err)) from err
    weights = saved.get("model")
    if not isinstance(weights, dict):
        raise fail(f"{path}: the checkpoint holds no model weights")
    problem = fit_problem(weights, model.state_dict())
    if problem is not None:
        raise fail(f"{path} does not fit the model {train.model!r}: {problem}")
    model.load_state_dict(weights)
    return path


def fit_problem(weights: dict[str, Any], own: dict[str, torch.Tensor]) -> str | None:
    """Why ``weights`` cannot be loaded into a model whose state dict is ``own``; None when it can."""
    missing = [name for name in own if name not in weights]
    extra = [name for name in weights if name not in own]
    shapes = [
        f"{name} {tuple(getattr(weights[name], 'shape', ()))} in the checkpoint, "
        f"{tuple(tensor.shape)} in the model"
        for name, tensor in own.items()
        if name in weights
        and (not isinstance(weights[name], torch.Tensor) or weights[name].shape != tensor.shape)
    ]
    parts = []
    for what, names in (("missing", missing), ("not in the model", extra), ("other shapes", shapes)):
        if names:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            parts.append(f"{len(names)} {what}: {', '.join(names[:SHOWN])}{more}")
    return "; ".join(parts) if parts else None
