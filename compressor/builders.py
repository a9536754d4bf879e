"""What a recipe's ``train`` section builds: its data, model and task (for runs and exporters).

Factories (``"package.module:factory"``) are imported only when the run allows them
(``compressor.recipe.imports.check_imports``, before any import); every failure is a RecipeError at
the field's FILE:LINE:COL, never a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from compressor.core.factories import ZooError, call_factory, import_factory, is_factory
from compressor.data.builtin import DataBundle, load_data
from compressor.models.builtin import build_model
from compressor.recipe import AllowImports, Recipe, RecipeError, check_imports
from compressor.recipe.errors import Path
from compressor.tasks import Task, TaskError
from compressor.tasks import build_task as builtin_task


@contextmanager
def reported_at(recipe: Recipe, path: Path) -> Iterator[None]:
    """Turn a ZooError (unknown name, failed import, factory that raised) into a RecipeError at ``path``."""
    try:
        yield
    except ZooError as err:
        raise RecipeError([recipe.source.issue(path, str(err))]) from err


def build_train(recipe: Recipe, allow_imports: AllowImports = ()) -> tuple[DataBundle, nn.Module]:
    """The data and the freshly built model of ``recipe.train``, seeded by ``train.seed``.

    Factories are imported only when ``allow_imports`` permits them (``check_imports``, before any
    import); every failure is a RecipeError at the field's FILE:LINE:COL, never a traceback.
    """
    train = recipe.train
    if train is None:
        raise RecipeError(
            [recipe.source.issue((), "the recipe has no 'train' section naming model and data")]
        )
    check_imports(recipe, allow_imports)
    with reported_at(recipe, ("train", "data")):
        bundle = load_data(train.data, seed=train.seed)
    with reported_at(recipe, ("train", "model")):
        model = build_model(train.model, bundle.input_shape, bundle.num_classes, seed=train.seed)
    return bundle, model


def build_task(recipe: Recipe, allow_imports: AllowImports = ()) -> Task:
    """The task of ``recipe.train`` (``compressor.tasks``): a built-in by name, or a factory's.

    A ``"package.module:factory"`` is imported only when ``allow_imports`` permits it and called as
    ``factory(loss=train.loss)`` if it takes ``loss``, else ``factory()``; it must return a
    ``compressor.tasks.Task``. Every failure is a RecipeError at ``train.task`` (or ``train.loss``).
    """
    train = recipe.train
    if train is None:
        raise RecipeError([recipe.source.issue((), "the recipe has no 'train' section")])
    check_imports(recipe, allow_imports)
    if not is_factory(train.task):
        field = ("train", "loss") if train.task == "classification" else ("train", "task")
        try:
            return builtin_task(train.task, train.loss, train.task_options)
        except TaskError as err:
            raise RecipeError([recipe.source.issue(field, str(err))]) from None
    with reported_at(recipe, ("train", "task")):
        unknown = _unaccepted(import_factory(train.task, "task"), train.task_options)
        if unknown:
            raise ZooError(f"task factory {train.task!r} takes no option {', '.join(map(repr, unknown))}")
        task = call_factory(train.task, "task", {"loss": train.loss, **train.task_options})
    if not isinstance(task, Task):
        message = f"task factory {train.task!r} returned {type(task).__name__}, not a compressor.tasks.Task"
        raise RecipeError([recipe.source.issue(("train", "task"), message)])
    return task


def _unaccepted(factory: Any, options: dict[str, Any]) -> list[str]:
    """The names in ``options`` that ``factory``'s signature does not take (none when it takes
    ``**kwargs`` or has no signature)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [name for name in options if name not in named]
