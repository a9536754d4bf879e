"""The built-in tasks by recipe name (``train.task``) and the losses ``train.loss`` may name.

``classification`` and ``model-loss`` are in ``compressor.tasks.base``; ``contrastive`` in
``compressor.tasks.contrastive``, imported only when named (retrieval metrics, tokenization).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from compressor.tasks.base import LOSSES, ClassificationTask, ModelLossTask, Task, TaskError


def _contrastive(loss_fn: Callable[..., torch.Tensor] | None, **options: Any) -> Task:
    from compressor.tasks.contrastive import ContrastiveTask  # only when named

    return ContrastiveTask(**options)


#: Built-in tasks by recipe name: name -> factory(loss_fn, **options) -> Task.
BUILTIN: dict[str, Callable[..., Task]] = {
    "classification": lambda loss_fn, **options: ClassificationTask(loss_fn, **options),
    "model-loss": lambda loss_fn, **options: ModelLossTask(**options),
    "contrastive": _contrastive,
}


def loss_by_name(name: str) -> Callable[..., torch.Tensor]:
    """The loss ``train.loss`` names; TaskError listing the known ones otherwise."""
    if name not in LOSSES:
        raise TaskError(f"train.loss: unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def build_task(name: str, loss: str = "cross_entropy", options: Mapping[str, Any] | None = None) -> Task:
    """The built-in task ``name``: ``classification`` (with the loss named ``loss``), ``model-loss``
    or ``contrastive`` (``compressor.tasks.contrastive``), given the keyword ``options`` its class
    takes (``train.task_options``; e.g. ``max_length`` for contrastive); TaskError otherwise.

    A ``"package.module:factory"`` is resolved by ``compressor.recipe.build_task``, which checks the
    recipe's import opt-in first.
    """
    if name not in BUILTIN:
        raise TaskError(
            f"unknown task {name!r} (built-ins: {', '.join(BUILTIN)}; or 'package.module:factory')"
        )
    loss_fn = loss_by_name(loss) if name == "classification" else None
    try:
        return BUILTIN[name](loss_fn, **dict(options or {}))
    except TypeError as exc:  # an option the task does not take
        raise TaskError(f"task {name!r}: bad task_options: {exc}") from None
