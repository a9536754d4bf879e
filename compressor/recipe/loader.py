"""Load a recipe: YAML with positions -> variables and ``${...}`` -> schema -> cross-field rules.

Every problem found is collected and raised together as one RecipeError, each at its file:line:col.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from compressor.core import registry
from compressor.core.errors import CompressorError
from compressor.core.modifier import Modifier
from compressor.recipe.cross_field import cross_field_problems
from compressor.recipe.errors import Path, RecipeError, RecipeIssue, format_path
from compressor.recipe.expressions import (
    FUNCTIONS,
    ExpressionError,
    Variables,
    escape,
    has_expression,
    render,
)
from compressor.recipe.imports import factory_imports, how_to_allow, spec_problems
from compressor.recipe.schema import Recipe, validate_modifier
from compressor.recipe.source import Source, dump_yaml, load_scalar, load_source

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def load_recipe(
    path: str | os.PathLike[str],
    overrides: dict[str, str] | None = None,
    param_names: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> Recipe:
    """Read and validate the recipe FILE at ``path`` (never YAML text: see ``parse_recipe``).

    ``overrides`` (``--set name=value``) replace variables before substitution; ``param_names`` (the
    model's ``named_parameters`` names) turn on the checks that every ``params`` pattern matches;
    given as a mapping of names to shapes, also the modifiers' checks of the selected shapes (a
    quantizer's group size that does not divide a row). ``aliases`` (``core.params.tied_aliases`` of
    the model): a pattern naming only the alias of a tied weight (GPT-2's ``lm_head.weight``) is
    reported naming the tensor to select.
    """
    file = str(path)
    where = FilePath(path)
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = "; to parse YAML text use parse_recipe()" if "\n" in file or ": " in file else ""
        raise RecipeError([RecipeIssue(file, 1, 1, "<root>", f"recipe file not found{hint}")]) from None
    except IsADirectoryError:
        raise RecipeError([RecipeIssue(file, 1, 1, "<root>", "is a directory, not a recipe file")]) from None
    except UnicodeDecodeError as err:
        message = f"not UTF-8 text (byte {err.start})"
        raise RecipeError([RecipeIssue(file, 1, 1, "<root>", message)]) from None
    except OSError as err:
        raise RecipeError([RecipeIssue(file, 1, 1, "<root>", f"cannot read: {err.strerror}")]) from None
    return parse_recipe(text, file, overrides, param_names, aliases)


def parse_recipe(
    text: str,
    file: str = "<string>",
    overrides: dict[str, str] | None = None,
    param_names: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> Recipe:
    """Validate recipe YAML ``text``; ``file`` names it in error messages. See ``load_recipe``."""
    src = load_source(text, file)
    if not isinstance(src.data, dict):
        got = "an empty file" if src.data is None else _a(type(src.data).__name__)
        raise RecipeError([src.issue((), f"expected a mapping with 'version' and 'modifiers', got {got}")])
    issues: list[RecipeIssue] = []
    failed: list[Path] = []  # values already reported: schema errors at or below them are dropped
    data = dict(src.data)
    variables = _variables(src, overrides or {}, issues, failed)
    if variables is not None:
        data["variables"] = variables.values_in_order()
    for key, value in src.data.items():
        if key != "variables":
            data[key] = _substitute(value, (key,), variables or Variables({}), src, issues, failed)
    _check_finite(data, (), src, issues, failed)
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        issues += [i for path, i in _schema_issues(err, data, src) if not _under(path, failed)]
    items = list(enumerate(recipe.modifiers)) if recipe else _valid_items(data.get("modifiers"))
    issues += [
        src.issue(path, message) for path, message in cross_field_problems(items, param_names, aliases)
    ]
    issues += [src.issue(path, message) for path, message in spec_problems(data) if not _under(path, failed)]
    if issues:
        raise RecipeError(issues)
    assert recipe is not None
    recipe._source = src
    return recipe


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe as YAML with every variable substituted and every default written out (for recipe.yaml)."""
    data = recipe.model_dump(mode="json")
    if data.get("train") is None:
        data.pop("train", None)
    return dump_yaml(_escape(data))


def optimizer_issues(recipe: Recipe) -> list[RecipeIssue]:
    """Problems ``train.optimizer`` will hit when built (unknown class, unknown keyword arguments)."""
    if recipe.train is None:
        return []
    src = recipe.source
    base: Path = ("train", "optimizer")
    optimizer = recipe.train.optimizer
    try:
        problems = optimizer.check_kwargs()
    except ValueError as err:
        return [src.issue((*base, "type"), str(err))]
    return [src.issue((*base, name), message, key=True) for name, message in problems.items()]


class SetError(CompressorError, ValueError):
    """``--set`` items that are not ``name=value``; ``parsed`` holds the items that were."""

    def __init__(self, messages: list[str], parsed: dict[str, str]) -> None:
        super().__init__(messages, parsed)  # args stay picklable: SetError(messages, parsed)
        self.messages = messages
        self.parsed = parsed

    def __str__(self) -> str:
        return "\n".join(self.messages)


def parse_sets(items: Iterable[str] | None) -> dict[str, str]:
    """``--set`` items ``"name=value"`` -> {name: value} (the value is parsed later, as YAML, by the loader).

    SetError names every item without ``=`` or without a name; its ``parsed`` holds the others.
    """
    parsed: dict[str, str] = {}
    messages: list[str] = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            messages.append(f"--set {item!r}: expected name=value")
        else:
            parsed[name.strip()] = value
    if messages:
        raise SetError(messages, parsed)
    return parsed


def validate_command(path: str | os.PathLike[str], sets: Sequence[str] | Mapping[str, str] = ()) -> int:
    """``compressor validate RECIPE [--set name=value ...]``: prints "ok: ..." (returns 0) or errors (1).

    ``sets`` are ``"name=value"`` strings, or a mapping already split. Also checks the optimizer's
    kwargs, and lists the factories the recipe would import (``compressor.recipe.imports``).
    """
    issues: list[RecipeIssue] = []
    try:
        overrides = dict(sets) if isinstance(sets, Mapping) else parse_sets(sets)
    except SetError as err:
        overrides = err.parsed
        issues += [RecipeIssue(str(path), 1, 1, "<root>", message) for message in err.messages]
    try:
        recipe = load_recipe(path, overrides)
        issues += optimizer_issues(recipe)
    except RecipeError as err:
        issues += err.issues
    if issues:
        print(RecipeError(issues), file=sys.stderr)
        return 1
    print(f"ok: {path} ({len(recipe.modifiers)} modifiers)")
    _print_imports(recipe)
    return 0


def _print_imports(recipe: Recipe) -> None:
    """One ``imports: spec (field, line N)`` line per factory, and how to allow them."""
    found = factory_imports(recipe)
    for item in found:
        print(f"imports: {item}")
    if found:
        print(f"to run it, allow them: {how_to_allow(item.module for item in found)}")


# --- variables and substitution -------------------------------------------------------------------


def _variables(
    src: Source, overrides: dict[str, str], issues: list[RecipeIssue], failed: list[Path]
) -> Variables | None:
    """Resolved variables (overrides applied, failures reported); None when ``variables`` is not a mapping."""
    raw = src.data.get("variables", {})
    if not isinstance(raw, dict):
        for name in overrides:
            issues.append(
                src.issue(("variables",), f"--set {name}: the recipe's variables are not a mapping")
            )
        return None
    table: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(name, str) and _NAME.match(name) and name not in FUNCTIONS:
            table[name] = value
        else:
            message = f"invalid variable name {name!r}: use letters, digits and _, starting with a letter"
            if name in FUNCTIONS:
                message = f"invalid variable name {name!r}: it is a function of ${{...}} expressions"
            issues.append(src.issue(("variables", name), message, key=True))
            failed.append(("variables", name))
    _apply_overrides(src, table, overrides, issues)
    variables = Variables(table)
    variables.resolve_all()
    for name, message in variables.errors.items():
        note = " (value from --set)" if name in overrides else ""
        issues.append(src.issue(("variables", name), message + note))
        failed.append(("variables", name))
    return variables


def _apply_overrides(
    src: Source, table: dict[str, Any], overrides: dict[str, str], issues: list[RecipeIssue]
) -> None:
    """Replace variables by ``--set`` values, parsed as YAML scalars; unknown names are errors."""
    for name, text in overrides.items():
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(table) or "none"
            message = f"--set {name}={text}: unknown variable {name!r}{hint} (variables: {known})"
            line, col = src.position(("variables",), key=True)
            issues.append(RecipeIssue(src.file, line, col, format_path(("variables", name)), message))
            continue
        try:
            value = load_scalar(text)
        except Exception:
            value = None
        if not isinstance(value, (bool, int, float, str)):
            message = f"--set {name}={text}: expected a number, a string or true/false"
            issues.append(src.issue(("variables", name), message, key=True))
            continue
        table[name] = value


def _substitute(
    value: Any,
    path: Path,
    variables: Variables,
    src: Source,
    issues: list[RecipeIssue],
    failed: list[Path],
) -> Any:
    """``value`` with every ``${...}`` in its strings replaced; failures recorded at their path."""
    if isinstance(value, dict):
        return {k: _substitute(v, (*path, k), variables, src, issues, failed) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, (*path, i), variables, src, issues, failed) for i, v in enumerate(value)]
    if not (isinstance(value, str) and has_expression(value)):
        return value
    try:
        return render(value, variables.lookup)
    except ExpressionError as err:
        failed.append(path)
        if not err.reported:
            issues.append(src.issue(path, str(err)))
        return value


def _check_finite(value: Any, path: Path, src: Source, issues: list[RecipeIssue], failed: list[Path]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        issues.append(src.issue(path, f"non-finite number ({value}) is not allowed"))
        failed.append(path)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, (*path, key), src, issues, failed)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite(item, (*path, index), src, issues, failed)


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


# --- schema errors -> issues ----------------------------------------------------------------------


def _under(path: Path, prefixes: list[Path]) -> bool:
    return any(path[: len(p)] == p for p in prefixes)


def _data_path(loc: tuple[Any, ...], data: Any, kind: str) -> Path:
    """The part of a Pydantic ``loc`` that names real keys and indices (union tags are skipped)."""
    out: list[str | int] = []
    node = data
    for n, part in enumerate(loc):
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_list or (isinstance(node, dict) and part in node):
            node = node[part]
        elif n == len(loc) - 1 and kind == "missing":
            node = None
        else:
            continue
        out.append(part)
    return tuple(out)


def _schema_issues(err: ValidationError, data: Any, src: Source) -> list[tuple[Path, RecipeIssue]]:
    """One issue per data path; several errors at one path (union branches) are joined."""
    grouped: dict[Path, list[dict[str, Any]]] = {}
    for error in err.errors(include_url=False):
        grouped.setdefault(_data_path(error["loc"], data, error["type"]), []).append(error)
    out = []
    for path, errors in grouped.items():
        messages = list(dict.fromkeys(_message(path, e, data) for e in errors))
        message = messages[0] if len(messages) == 1 else "no accepted form matches: " + "; ".join(messages)
        kind = errors[0]["type"]
        if kind == "extra_forbidden":
            issue = src.issue(path, message, key=True)
        elif kind == "missing":
            parent = path[:-1]
            line, col = src.position(parent, key=bool(parent) and parent in src.keys)
            issue = RecipeIssue(src.file, line, col, format_path(path), message)
        else:
            issue = src.issue(path, message)
        out.append((path, issue))
    return out


def _message(path: Path, error: dict[str, Any], data: Any) -> str:
    kind, message, value = error["type"], error["msg"], error["input"]
    if kind == "extra_forbidden" and path:
        allowed = _allowed_keys(path[:-1], data)
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {path[-1]!r}{hint}{listed}"
    if kind == "missing" and message == "Field required":
        return f"missing required key {path[-1]!r}" if path else "missing required key"
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    if kind.startswith("modifier_") or kind == "missing" or "got" in message:
        return message
    shown = repr(value)
    return f"{message}, got {shown}" if len(shown) <= 60 else f"{message}, got {_a(type(value).__name__)}"


def _a(noun: str) -> str:
    """``"a list"``, ``"an int"``."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _allowed_keys(path: Path, data: Any) -> list[str]:
    """Field names of the model that validates the mapping at ``path`` ([] when unknown)."""
    annotation: Any = Recipe
    node = data
    for part in path:
        model = _model_of(annotation, node)
        if isinstance(part, int):
            args = get_args(annotation)
            annotation = args[0] if args else None
        elif model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        else:
            return []
        node = node[part] if isinstance(node, (dict, list)) else None
    model = _model_of(annotation, node)
    return [f.alias or name for name, f in model.model_fields.items()] if model else []


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The single BaseModel inside ``annotation`` (Optional, Annotated, ...); modifiers by their ``type``."""
    found: list[type[BaseModel]] = []
    stack = [annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            found.append(item)
        else:
            stack.extend(get_args(item))
    if len(found) != 1:
        return None
    if found[0] is Modifier and isinstance(node, dict) and isinstance(node.get("type"), str):
        try:
            cls = registry.get("modifiers", node["type"])
        except Exception:
            return found[0]
        return cls if isinstance(cls, type) and issubclass(cls, Modifier) else found[0]
    return found[0]


def _valid_items(items: Any) -> list[tuple[int, Modifier]]:
    """``modifiers`` items that validate on their own, unknown keys dropped (for the cross-field rules)."""
    if not isinstance(items, list):
        return []
    out = []
    for index, item in enumerate(items):
        model, errors = validate_modifier(index, item)
        unknown = [e["loc"][1] for e in errors if e["type"].type == "extra_forbidden" and len(e["loc"]) == 2]
        if model is None and errors and len(unknown) == len(errors) and isinstance(item, dict):
            model, _ = validate_modifier(index, {k: v for k, v in item.items() if k not in unknown})
        if model is not None:
            out.append((index, model))
    return out
