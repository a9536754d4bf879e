"""Code a recipe names ("package.module:factory" in ``train.model``, ``train.data``, ``train.task``),
run only if allowed.

A recipe is a file people download and share, so importing and calling the code it names is the
choice of the person who runs it, never of the recipe (as ``trust_remote_code`` is in transformers):

    compressor run|export ... --allow-import MODULE      (repeatable) MODULE and its submodules
    compressor run|export ... --trust-recipe-code        any module the recipe names
    engine.run(..., allow_imports=["mypkg"])             the same in Python (True: any module)

Built-in names (``digits-mlp``, ``mnist``, ...) need no opt-in. A refused import is a RecipeError at
the field's FILE:LINE:COL, raised before anything is imported; ``compressor validate`` lists the
imports a recipe would need.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from compressor.core.factories import PRETRAINED_PREFIX, is_factory, pretrained_problem, split_factory
from compressor.recipe.errors import Path, RecipeError, RecipeIssue, format_path

if TYPE_CHECKING:
    from compressor.recipe.schema import Recipe

#: The recipe fields that may name a factory.
FACTORY_FIELDS: tuple[Path, ...] = (("train", "model"), ("train", "data"), ("train", "task"))

#: Which imports a recipe may make: True (any), False or () (none), or module names, each allowing
#: itself and its submodules ("mypkg" allows "mypkg.models"; "mypkg.models:build" allows that one factory).
AllowImports = bool | Iterable[str]


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
    src = recipe.source
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
