"""Parameter names: wrapper prefixes stripped, and recipe patterns resolved to names.

Recipes name parameters as the user's model names them (``fc1.weight``), whatever wraps the model
at run time: DDP adds ``module.``, ``torch.compile`` adds ``_orig_mod.``. Both are stripped from
names and from exact/glob patterns before matching.

Patterns:
    ``fc1.weight``        an exact name
    ``layer*.weight``     a shell glob (fnmatch, case-sensitive)
    ``re:.*conv.*``       a regular expression that must match the whole name
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from compressor.core.errors import CompressorError

#: Prefixes added by wrappers: DDP / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
REGEX_PREFIX = "re:"


class PatternError(CompressorError, ValueError):
    """A parameter pattern that matches nothing (or is not a valid regex); names the closest names."""

    def __init__(
        self,
        pattern: str,
        closest: list[str],
        reason: str = "matches no parameter",
        tied_to: str | None = None,
    ) -> None:
        self.pattern = pattern
        self.closest = list(closest)
        self.tied_to = tied_to  # the listed name, when the pattern matches only a tied alias of it
        hint = f"; closest names: {', '.join(repr(c) for c in self.closest)}" if self.closest else ""
        super().__init__(f"parameter pattern {pattern!r} {reason}{hint}")


def normalize(name: str) -> str:
    """``name`` without its leading wrapper prefixes: ``module._orig_mod.fc.weight`` -> ``fc.weight``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate over normalized names for one pattern; PatternError for a bad regex."""
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX) :])
        except re.error as err:
            raise PatternError(pattern, [], f"is not a valid regular expression ({err})") from None
        return lambda name: regex.fullmatch(name) is not None
    glob = normalize(pattern)
    return lambda name: name == glob or fnmatch.fnmatchcase(name, glob)


def tied_aliases(named: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Each alias of a tied parameter -> the name it is listed under: over
    ``model.named_parameters(remove_duplicate=False)``, a later name of the same tensor maps to the
    first (GPT-2's ``lm_head.weight`` -> ``transformer.wte.weight``). Names are normalized."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in named:
        name = normalize(name)
        owner = first.setdefault(id(param), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def match_params(
    patterns: Iterable[str], names: Iterable[str], aliases: Mapping[str, str] | None = None
) -> list[str]:
    """The normalized names matched by any pattern, in model order, without duplicates.

    Raises PatternError for a pattern that matches nothing, naming the 3 closest names; when it
    matches only ``aliases`` of tied parameters (see ``tied_aliases``), it names the tensor's listed
    name instead, and says that selecting it changes both.
    """
    ordered = list(dict.fromkeys(normalize(n) for n in names))
    hit: set[str] = set()
    for pattern in patterns:
        matches = _matcher(pattern)
        found = {name for name in ordered if matches(name)}
        if not found:
            tied = {alias: owner for alias, owner in (aliases or {}).items() if matches(alias)}
            if tied:
                alias, owner = next(iter(tied.items()))
                reason = (
                    f"matches only {alias!r}, which is tied to {owner!r} (one tensor, listed under that "
                    f"name): select {owner!r} (pruning it changes both)"
                )
                raise PatternError(pattern, [], reason, tied_to=owner)
            body = pattern[len(REGEX_PREFIX) :] if pattern.startswith(REGEX_PREFIX) else normalize(pattern)
            raise PatternError(pattern, difflib.get_close_matches(body, ordered, n=3, cutoff=0.0))
        hit |= found
    return [name for name in ordered if name in hit]
