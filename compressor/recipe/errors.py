"""Recipe errors that point at the file, line and column: ``FILE:LINE:COL: path.to.field: message``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from compressor.core.errors import CompressorError

#: A path into the recipe data: mapping keys (str) and list indices (int), e.g. ("modifiers", 0, "end").
Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """``("modifiers", 0, "final_sparsity")`` -> ``"modifiers[0].final_sparsity"``; ``()`` -> ``"<root>"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


@dataclass(frozen=True)
class RecipeIssue:
    """One problem in a recipe; ``line`` and ``col`` are 1-based, ``path`` is dotted (``format_path``)."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        path, message = _printable(self.path or "<root>"), _printable(self.message)
        return f"{self.file}:{self.line}:{self.col}: {path}: {message}"


def _printable(text: str) -> str:
    """``text`` on one line, as the terminal will show it: each character ``str.isprintable`` refuses
    (line breaks, control and bidirectional-override characters, lone surrogates) written as its
    escape (``\\n``, ``\\x01``, ``\\u202e``), so that a key or value cannot break or disguise the line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RecipeError(CompressorError):
    """Every problem found in one recipe, sorted by position; ``str()`` gives one line per issue."""

    def __init__(self, issues: Iterable[RecipeIssue]) -> None:
        unique = dict.fromkeys(issues)
        self.issues: list[RecipeIssue] = sorted(unique, key=lambda i: (i.file, i.line, i.col, i.path))
        super().__init__(self.issues)  # args stay picklable: RecipeError(issues)

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
