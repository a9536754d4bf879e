"""Factory strings ("package.module:factory") and the names of pretrained models ("hf:SOURCE").

A recipe's ``train.model``, ``train.data`` and ``train.task`` name a built-in, a pretrained
transformers model (``hf:DIRECTORY`` or ``hf:installed_package``: data to read, never code) or a
factory to import and call. This module parses those names, and imports and calls a factory once
the caller has checked that the person running the recipe allows it (``compressor.recipe.imports``).
Every failure is a ``ZooError`` naming what failed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

from compressor.core.errors import CompressorError


class ZooError(CompressorError, ValueError):
    """A model or data name that cannot be used: unknown, a factory that fails to import or raises."""


_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_SPEC = re.compile(rf"^({_DOTTED}):({_DOTTED})$")
SPEC_FORM = "'package.module:factory'"


#: The prefix of a pretrained transformers model (``hf:DIRECTORY`` or ``hf:installed_package``); it is
#: reserved, never read as a factory, and names data to read, not code to run
#: (see compressor.models.pretrained).
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


def known(name: str, table: dict[str, Any], kind: str) -> str:
    """``name`` if it is a built-in; ZooError listing the built-ins and the closest match otherwise."""
    if name in table:
        return name
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ZooError(
        f"unknown {kind} {name!r}{hint} (built-ins: {', '.join(sorted(table))}; "
        "or give 'package.module:factory')"
    )


def import_factory(spec: str, kind: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attr[.attr]"``; ZooError naming what failed."""
    try:
        module_name, attr_path = split_factory(spec)
    except ValueError as err:
        raise ZooError(f"{kind} {err}") from None
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise ZooError(
            f"{kind} {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as err:
            raise ZooError(f"{kind} {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from err
    if not callable(obj):
        raise ZooError(f"{kind} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def call_factory(spec: str, kind: str, kwargs: dict[str, Any]) -> Any:
    """Import factory ``spec`` and call it with the ``kwargs`` it accepts; ZooError if it raises."""
    factory = import_factory(spec, kind)
    try:
        return call_accepted(factory, kwargs)
    except Exception as err:
        raise ZooError(f"{kind} factory {spec!r} raised {type(err).__name__}: {err}") from err


def call_accepted(factory: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call ``factory`` with those of ``kwargs`` its signature accepts (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): call it bare
        return factory()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return factory(**kwargs)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return factory(**{k: v for k, v in kwargs.items() if k in named})
