"""Code a recipe names ("package.module:factory" in ``train.model``, ``train.data``, ``train.task``),
run only if allowed.

A recipe is a file people download and share, so importing and calling the code it names is the
choice of the person who runs it, never of the recipe (as ``trust_remote_code`` is in transformers):

    compressor run|export ... --allow-import MODULE      (repeatable) MODULE and its submodules
    compressor run|export ... --trust-recipe-code        any module the recipe names
    trainer.run(..., allow_imports=["mypkg"])            the same in Python (True: any module)

Built-in names (``digits-mlp``, ``mnist``, ...) need no opt-in. A refused import is a RecipeError at
the field's FILE:LINE:COL, raised before anything is imported; ``compressor validate`` lists the
imports a recipe would need.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import Path, RecipeError, RecipeIssue, format_path
from .source import Source

if TYPE_CHECKING:
    from torch import nn

    from ..task import Task
    from ..zoo import DataBundle
    from .schema import Recipe

#: The recipe fields that may name a factory.
FACTORY_FIELDS: tuple[Path, ...] = (("train", "model"), ("train", "data"), ("train", "task"))

#: Which imports a recipe may make: True (any), False or () (none), or module names, each allowing
#: itself and its submodules ("mypkg" allows "mypkg.models"; "mypkg.models:build" allows that one factory).
AllowImports = bool | Iterable[str]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_SPEC = re.compile(rf"^({_DOTTED}):({_DOTTED})$")
SPEC_FORM = "'package.module:factory'"


#: The prefix of a pretrained transformers model (``hf:DIRECTORY`` or ``hf:installed_package``); it is
#: reserved, never read as a factory, and names data to read, not code to run (see compressor.hf_models).
PRETRAINED_PREFIX = "hf:"


def is_factory(name: str) -> bool:
    """Whether a model, data or task name is a factory string (it has a ':'), rather than a built-in name.

    ``hf:...`` names a pretrained model, not a factory.
    """
    return ":" in name and not name.startswith(PRETRAINED_PREFIX)


def is_path_source(source: str) -> bool:
    """Whether the SOURCE of ``hf:SOURCE`` is a path (a separator, or a leading '.' or '~'), not a package."""
    return "/" in source or "\\" in source or source.startswith((".", "~"))


def pretrained_problem(name: str) -> str | None:
    """Why ``hf:SOURCE`` is malformed (checked without touching the disk), or None when well formed."""
    source = name[len(PRETRAINED_PREFIX) :]
    if not source.strip():
        return f"{name!r} names no model; expected 'hf:DIRECTORY' or 'hf:installed_package'"
    if not is_path_source(source) and not re.fullmatch(_DOTTED, source):
        return (
            f"{name!r}: {source!r} is neither a directory (write 'hf:./{source}' for one in the current "
            "directory) nor an installed package name"
        )
    return None


def split_factory(spec: str) -> tuple[str, str]:
    """``"package.module:attr[.attr]"`` -> (module, attribute path); ValueError for any other text."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"{spec!r} is not a built-in name or {SPEC_FORM}")
    return match.group(1), match.group(2)


@dataclass(frozen=True)
class FactoryImport:
    """One factory string in a recipe and where it is: ``str()`` is ``"spec (field, line N)"``."""

    spec: str
    path: Path
    file: str
    line: int
    col: int

    @property
    def module(self) -> str:
        """The module that importing the factory runs."""
        return self.spec.partition(":")[0]

    @property
    def field(self) -> str:
        """The dotted recipe field, e.g. ``"train.model"``."""
        return format_path(self.path)

    def __str__(self) -> str:
        return f"{self.spec} ({self.field}, line {self.line})"


def _source(recipe: Recipe) -> Source:
    """Where the recipe's values came from (a placeholder for a recipe built in Python)."""
    return recipe._source or Source(file="<recipe>", data=None)


def _factory_values(train: Any) -> Iterator[tuple[Path, str]]:
    """(path, value) of every FACTORY_FIELDS value that is a factory string, in a train section or mapping."""
    for path in FACTORY_FIELDS:
        key = str(path[-1])
        value = train.get(key) if isinstance(train, Mapping) else getattr(train, key, None)
        if isinstance(value, str) and is_factory(value):
            yield path, value


def spec_problems(data: Any) -> list[tuple[Path, str]]:
    """(path, message) for each factory string that is not 'package.module:factory', and a malformed 'hf:'.

    ``data`` is the recipe's plain data (a mapping, variables substituted), so that these problems are
    reported together with the schema's.
    """
    train = data.get("train") if isinstance(data, Mapping) else None
    problems = []
    model = train.get("model") if isinstance(train, Mapping) else None
    if isinstance(model, str) and model.startswith(PRETRAINED_PREFIX):
        problem = pretrained_problem(model)
        if problem is not None:
            problems.append((("train", "model"), problem))
    for path, value in _factory_values(train):
        try:
            split_factory(value)
        except ValueError as err:
            problems.append((path, f"{err}, e.g. 'mypkg.models:build'"))
    return problems


def factory_imports(recipe: Recipe) -> list[FactoryImport]:
    """The factories the recipe names, in file order, with their positions (nothing is imported)."""
    src = _source(recipe)
    out = []
    for path, value in _factory_values(recipe.train):
        line, col = src.position(path)
        out.append(FactoryImport(value, path, src.file, line, col))
    return sorted(out, key=lambda item: (item.line, item.col))


def normalize_allowed(allow: AllowImports) -> Literal[True] | tuple[str, ...]:
    """``allow`` as True (any import) or a tuple of names; a lone string is one name, not its letters."""
    if isinstance(allow, bool):
        return True if allow else ()
    if isinstance(allow, str):
        return (allow,)
    return tuple(allow)


def is_allowed(spec: str, allow: AllowImports) -> bool:
    """Whether ``allow`` permits importing factory ``spec`` (see AllowImports)."""
    allowed = normalize_allowed(allow)
    if allowed is True:
        return True
    module = spec.partition(":")[0]
    return any(
        name in (spec, module) or module.startswith(name + ".") for name in allowed if isinstance(name, str)
    )


def how_to_allow(modules: Iterable[str]) -> str:
    """The flags and the keyword that allow ``modules``: for refusals and for ``compressor validate``."""
    names = list(dict.fromkeys(modules))
    flags = " ".join(f"--allow-import {name}" for name in names)
    return f"{flags} (or --trust-recipe-code); in Python allow_imports={names!r}"


def check_imports(recipe: Recipe, allow_imports: AllowImports = ()) -> None:
    """RecipeError at each factory ``allow_imports`` does not permit; imports nothing."""
    refused = [item for item in factory_imports(recipe) if not is_allowed(item.spec, allow_imports)]
    if not refused:
        return
    issues = [
        RecipeIssue(
            item.file,
            item.line,
            item.col,
            item.field,
            f"the recipe asks to import module {item.module!r} and call {item.spec!r}; a recipe runs "
            f"code only when you allow it: {how_to_allow([item.module])}",
        )
        for item in refused
    ]
    raise RecipeError(issues)


@contextmanager
def reported_at(recipe: Recipe, path: Path) -> Iterator[None]:
    """Turn a ZooError (unknown name, failed import, factory that raised) into a RecipeError at ``path``."""
    from ..zoo import ZooError

    try:
        yield
    except ZooError as err:
        raise RecipeError([_source(recipe).issue(path, str(err))]) from err


def build_train(recipe: Recipe, allow_imports: AllowImports = ()) -> tuple[DataBundle, nn.Module]:
    """The data and the freshly built model of ``recipe.train``, seeded by ``train.seed``.

    Factories are imported only when ``allow_imports`` permits them (``check_imports``, before any
    import); every failure is a RecipeError at the field's FILE:LINE:COL, never a traceback.
    """
    from .. import zoo

    train = recipe.train
    if train is None:
        raise RecipeError(
            [_source(recipe).issue((), "the recipe has no 'train' section naming model and data")]
        )
    check_imports(recipe, allow_imports)
    with reported_at(recipe, ("train", "data")):
        bundle = zoo.load_data(train.data, seed=train.seed)
    with reported_at(recipe, ("train", "model")):
        model = zoo.build_model(train.model, bundle.input_shape, bundle.num_classes, seed=train.seed)
    return bundle, model


def build_task(recipe: Recipe, allow_imports: AllowImports = ()) -> Task:
    """The task of ``recipe.train`` (``compressor.task``): a built-in by name, or a factory's.

    A ``"package.module:factory"`` is imported only when ``allow_imports`` permits it and called as
    ``factory(loss=train.loss)`` if it takes ``loss``, else ``factory()``; it must return a
    ``compressor.task.Task``. Every failure is a RecipeError at ``train.task`` (or ``train.loss``).
    """
    from .. import zoo
    from ..task import Task, TaskError
    from ..task import build_task as builtin_task

    train = recipe.train
    if train is None:
        raise RecipeError([_source(recipe).issue((), "the recipe has no 'train' section")])
    check_imports(recipe, allow_imports)
    if not is_factory(train.task):
        field = ("train", "loss") if train.task == "classification" else ("train", "task")
        try:
            return builtin_task(train.task, train.loss, train.task_options)
        except TaskError as err:
            raise RecipeError([_source(recipe).issue(field, str(err))]) from None
    with reported_at(recipe, ("train", "task")):
        unknown = _unaccepted(zoo._import_factory(train.task, "task"), train.task_options)
        if unknown:
            raise zoo.ZooError(f"task factory {train.task!r} takes no option {', '.join(map(repr, unknown))}")
        task = zoo._call_factory(train.task, "task", {"loss": train.loss, **train.task_options})
    if not isinstance(task, Task):
        message = f"task factory {train.task!r} returned {type(task).__name__}, not a compressor.task.Task"
        raise RecipeError([_source(recipe).issue(("train", "task"), message)])
    return task


def _unaccepted(factory: Any, options: dict[str, Any]) -> list[str]:
    """The names in ``options`` that ``factory``'s signature does not take (none when it takes
    ``**kwargs`` or has no signature)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [name for name in options if name not in named]
