"""Safe YAML loading that remembers where every value and key came from.

Differences from PyYAML's YAML 1.1 ``safe_load`` (closer to YAML 1.2, which users expect):

- floats: ``1e-5``, ``1E5``, ``.5`` and ``5.`` are floats (1.1 reads ``1e-5`` as a string);
- booleans: only ``true``/``false`` (any case style); ``yes``, ``no``, ``on``, ``off`` stay strings;
- duplicate keys are errors, and so are non-scalar keys and recursive aliases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from compressor.recipe.errors import Path, RecipeError, RecipeIssue, format_path

_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
#: Upper bound on constructed values, so alias bombs ("billion laughs") cannot exhaust memory.
MAX_NODES = 200_000
#: Deepest nesting of sequences and mappings: far beyond any recipe, well within Python's recursion limit
#: for every later step (substitution, validation, messages).
MAX_DEPTH = 100


_Table = dict[str, list[tuple[str, re.Pattern[str]]]]


def _loader_resolvers() -> _Table:
    """PyYAML's implicit resolvers with the float and bool rules replaced (order kept: float before int)."""
    table: _Table = {}
    for first, entries in yaml.resolver.Resolver.yaml_implicit_resolvers.items():
        table[first] = [
            (tag, _FLOAT_RE if tag == _FLOAT else regexp) for tag, regexp in entries if tag != _BOOL
        ]
    for first in "tTfF":
        table.setdefault(first, []).insert(0, (_BOOL, _BOOL_RE))
    return {first: entries for first, entries in table.items() if entries}


def _dumper_resolvers() -> _Table:
    """YAML 1.1 rules plus the wider floats: a string either reader would not read as a string is quoted."""
    standard = yaml.resolver.Resolver.yaml_implicit_resolvers
    table = {first: list(entries) for first, entries in standard.items()}
    for first in "+-.0123456789":
        table.setdefault(first, []).insert(0, (_FLOAT, _FLOAT_RE))
    return table


class _TooDeepError(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(mark)
        self.mark = mark


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with the recipe's float and bool rules, composing at most MAX_DEPTH levels."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self._depth >= MAX_DEPTH:  # stop here, not at Python's recursion limit (~330 levels)
            raise _TooDeepError(self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class RecipeDumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as ``"1e-5"`` or ``"yes"``, so YAML 1.1 and 1.2 readers agree."""


RecipeLoader.yaml_implicit_resolvers = _loader_resolvers()
RecipeDumper.yaml_implicit_resolvers = _dumper_resolvers()


@dataclass
class Source:
    """Plain data loaded from YAML plus 1-based (line, col) positions of every node and mapping key.

    ``values[path]`` is where the value at ``path`` starts; ``keys[path]`` is where its mapping key starts.
    """

    file: str
    data: Any
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: Path, key: bool = False) -> tuple[int, int]:
        """Position of the value (or key) at ``path``, else of its nearest ancestor; (1, 1) as last resort."""
        for n in range(len(path), -1, -1):
            found = (self.keys if key and n == len(path) else self.values).get(path[:n])
            if found is not None:
                return found
        return (1, 1)

    def issue(self, path: Path, message: str, key: bool = False) -> RecipeIssue:
        """A RecipeIssue at ``path`` (at its key when ``key``)."""
        line, col = self.position(path, key)
        return RecipeIssue(self.file, line, col, format_path(path), message)


def _mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Turns a composed node graph into plain data, recording positions and collecting issues."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.loader = RecipeLoader("")
        self.issues: list[RecipeIssue] = []
        self.count = 0

    def build(self, node: Node, path: Path, ancestors: tuple[int, ...] = ()) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise RecipeError([self._issue(node, path, f"recipe too large (more than {MAX_NODES} values)")])
        self.source.values[path] = _mark(node)
        if id(node) in ancestors:
            self.issues.append(self._issue(node, path, "recursive alias"))
            return None
        if len(ancestors) >= MAX_DEPTH:  # aliases nest deeper than the text (&b [*a], &c [*b], ...)
            raise RecipeError(
                [self._issue(node, path, f"YAML nested too deeply (more than {MAX_DEPTH} levels)")]
            )
        if isinstance(node, ScalarNode):
            ok, value = self._scalar(node)
            if not ok:
                self.issues.append(self._issue(node, path, value))
            return value if ok else None
        inner = (*ancestors, id(node))
        if node.tag not in (_SEQ, _MAP):
            self.issues.append(self._issue(node, path, f"unsupported YAML tag {node.tag!r}"))
            return None
        if isinstance(node, SequenceNode):
            return [self.build(item, (*path, i), inner) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            return self._mapping(node, path, inner)
        self.issues.append(self._issue(node, path, f"unsupported YAML node {type(node).__name__}"))
        return None

    def _scalar(self, node: ScalarNode) -> tuple[bool, Any]:
        """(True, value) of a scalar node, or (False, why it cannot be read).

        PyYAML's constructors raise more than YAMLError on bad input (``!!int abc``: ValueError,
        ``!!bool maybe``: KeyError, ``!!timestamp x``: AttributeError, an int of more than 4300
        digits: ValueError): every one is the recipe's fault, reported at the node.
        """
        try:
            return True, self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            message = getattr(err, "problem", None) or str(err)
        except Exception as err:  # the constructors' own errors on bad text; see above
            message = _unreadable(node, err)
        self.loader.recursive_objects.pop(node, None)  # left behind by the failure: not recursive
        return False, message

    def _mapping(self, node: MappingNode, path: Path, inner: tuple[int, ...]) -> dict[Any, Any]:
        try:
            self.loader.flatten_mapping(node)  # resolves ``<<`` merge keys
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or node.start_mark
            line, col = mark.line + 1, mark.column + 1
            message = f"merge key (<<): {err.problem or 'invalid merge'}"
            self.issues.append(RecipeIssue(self.source.file, line, col, format_path(path), message))
            return {}
        except RecursionError:
            self.issues.append(self._issue(node, path, "merge keys (<<) nested too deeply"))
            return {}
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.issues.append(self._issue(key_node, path, "mapping keys must be plain scalars"))
                continue
            ok, key = self._scalar(key_node)
            if ok and not _hashable(key):
                ok, key = False, f"unsupported YAML tag {key_node.tag!r}"
            if not ok:
                self.issues.append(self._issue(key_node, path, f"invalid mapping key: {key}"))
                continue
            sub = (*path, key)
            if key in out:
                first = self.source.keys[sub]
                message = f"duplicate key {key!r} (first at line {first[0]}, column {first[1]})"
                self.issues.append(self._issue(key_node, sub, message))
                continue
            self.source.keys[sub] = _mark(key_node)
            out[key] = self.build(value_node, sub, inner)
        return out

    def _issue(self, node: Node, path: Path, message: str) -> RecipeIssue:
        line, col = _mark(node)
        return RecipeIssue(self.source.file, line, col, format_path(path), message)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _unreadable(node: ScalarNode, err: Exception) -> str:
    """Why the scalar ``node`` (``!!int abc``, ``!!timestamp 2001-13-45``, ...) cannot be read."""
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    shown = f"{text!r}" + (f" ({len(node.value)} characters)" if len(node.value) > 40 else "")
    if isinstance(err, ValueError) and "integer string conversion" in str(err):
        return f"cannot read {shown} as {tag}: too many digits"
    detail = f": {err}" if isinstance(err, ValueError) and str(err) else ""
    return f"cannot read {shown} as {tag}{detail}"


def _reader_issue(text: str, file: str, err: yaml.reader.ReaderError) -> RecipeIssue:
    """A character YAML does not allow (control characters, ...), at its line and column."""
    position = max(0, min(err.position, len(text)))
    line = text.count("\n", 0, position) + 1
    col = position - (text.rfind("\n", 0, position) + 1) + 1
    code = err.character if isinstance(err.character, int) else ord(str(err.character)[:1] or " ")
    message = f"YAML syntax error: unacceptable character {chr(code)!r} (#x{code:04x}): {err.reason}"
    return RecipeIssue(file, line, col, "<root>", message)


def load_source(text: str, file: str = "<string>") -> Source:
    """Safe-load one YAML document with positions; RecipeError on syntax errors or duplicate keys."""
    source = Source(file=file, data=None)
    loader: RecipeLoader | None = None
    try:
        loader = RecipeLoader(text)  # refuses control characters (ReaderError) at once
        node = loader.get_single_node()  # yaml.compose(text), keeping the loader for its position
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark or err.context_mark, err.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = err.problem or err.context or "invalid YAML"
        if err.problem and err.context and context:
            message += f" ({err.context} at line {context.line + 1}, column {context.column + 1})"
        lines = text.splitlines()
        if 0 < line <= len(lines) and "${" in lines[line - 1]:
            message += '; inside [...] or {...} quote a ${...} value, e.g. lr: "${lr}"'
        raise RecipeError([RecipeIssue(file, line, col, "<root>", f"YAML syntax error: {message}")]) from None
    except (_TooDeepError, RecursionError) as err:
        mark = err.mark if isinstance(err, _TooDeepError) or loader is None else loader.get_mark()
        message = f"YAML nested too deeply (more than {MAX_DEPTH} levels)"
        raise RecipeError([RecipeIssue(file, mark.line + 1, mark.column + 1, "<root>", message)]) from None
    except yaml.reader.ReaderError as err:
        raise RecipeError([_reader_issue(text, file, err)]) from None
    except yaml.YAMLError as err:
        raise RecipeError([RecipeIssue(file, 1, 1, "<root>", f"invalid YAML: {err}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return source
    builder = _Builder(source)
    source.data = builder.build(node, ())
    if builder.issues:
        raise RecipeError(builder.issues)
    return source


def load_scalar(text: str) -> Any:
    """Parse one ``--set`` value with the recipe's YAML rules (``0.9`` -> float, ``abc`` -> str)."""
    return yaml.load(text, Loader=RecipeLoader)


def dump_yaml(data: Any) -> str:
    """YAML text for plain data, readable back by ``load_source`` to the same values."""
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False, allow_unicode=True, default_flow_style=None)
