"""``${...}`` expressions: restricted arithmetic over recipe variables, evaluated without ``eval``.

The text is parsed with ``ast.parse(mode="eval")``; the whole tree is checked against a whitelist
(numbers, variable names, ``+ - * / // % **``, unary ``+ -``, parentheses, and positional calls to
``min max round abs int float``) before anything is evaluated, and evaluation walks those nodes only.
Numbers are bounded (|x| < 2**1024), so ``9**9**9`` is refused instead of hanging.

A string that is exactly one ``${expr}`` becomes the value (a number, or the variable's own value);
``${...}`` inside longer text is interpolated as text; ``$${`` is a literal ``${``.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from compressor.core.errors import CompressorError

#: Longest accepted expression, in characters.
MAX_LENGTH = 500
#: Largest accepted magnitude, in bits (2**1024 ~ 1.8e308, the float limit).
MAX_BITS = 1024
ALLOWED = "numbers, variables, + - * / // % **, parentheses, and calls to min, max, round, abs, int, float"

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
#: name -> (function, fewest arguments, most arguments or None for any number).
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "min": (min, 2, None),
    "max": (max, 2, None),
    "round": (round, 1, 2),
    "abs": (abs, 1, 1),
    "int": (int, 1, 1),
    "float": (float, 1, 1),
}
_SYMBOLS = {"Not": "not", "Invert": "~", "LShift": "<<", "RShift": ">>", "BitOr": "|", "BitXor": "^"}
_SYMBOLS |= {"BitAnd": "&", "MatMult": "@"}
_REFUSED: dict[type[ast.AST], str] = {
    ast.Subscript: "subscripts ([...]) are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.BoolOp: "boolean operators (and, or) are not allowed",
    ast.Compare: "comparisons are not allowed",
    ast.IfExp: "conditional expressions are not allowed",
    ast.JoinedStr: "string literals are not allowed",
    ast.NamedExpr: "assignments (:=) are not allowed",
}


class ExpressionError(CompressorError, ValueError):
    """A ``${...}`` that cannot be evaluated; ``reported`` marks a failure already reported elsewhere."""

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


#: Looks a variable up by name; raises ExpressionError when there is none.
Lookup = Callable[[str], Any]


def _check(node: ast.AST) -> None:
    """Refuse anything outside the whitelist, before evaluating any of it."""
    if isinstance(node, ast.Expression):
        _check(node.body)
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or value is None:
            raise ExpressionError(f"{value} is not allowed in expressions (numbers only)")
        if isinstance(value, complex):
            raise ExpressionError("complex numbers are not allowed")
        if not isinstance(value, (int, float)):
            raise ExpressionError("string literals are not allowed")
        _bounded(value)
    elif isinstance(node, ast.Name):
        if node.id.startswith("_"):
            raise ExpressionError(f"name {node.id!r} is not allowed (names starting with '_' are reserved)")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise ExpressionError(f"operator {_symbol(node.op)} is not allowed; allowed: {ALLOWED}")
        _check(node.left)
        _check(node.right)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ExpressionError(f"operator {_symbol(node.op)} is not allowed; allowed: {ALLOWED}")
        _check(node.operand)
    elif isinstance(node, ast.Call):
        _check_call(node)
    elif isinstance(node, ast.Attribute):
        raise ExpressionError(f"attribute access ('.{node.attr}') is not allowed")
    else:
        message = _REFUSED.get(type(node), f"{type(node).__name__} is not allowed; allowed: {ALLOWED}")
        raise ExpressionError(message)


def _symbol(op: ast.AST) -> str:
    return repr(_SYMBOLS.get(type(op).__name__, type(op).__name__))


def _check_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name):
        _check(node.func)  # refuses lambda, attribute access, subscripts with their own message
        raise ExpressionError(f"calling {ast.unparse(node.func)!r} is not allowed")
    if node.func.id not in FUNCTIONS:
        raise ExpressionError(f"calling {node.func.id!r} is not allowed; functions: {', '.join(FUNCTIONS)}")
    if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ExpressionError(f"{node.func.id}() takes positional arguments only")
    _, fewest, most = FUNCTIONS[node.func.id]
    if len(node.args) < fewest or (most is not None and len(node.args) > most):
        count = f"{fewest}" if most == fewest else f"{fewest} or more" if most is None else f"{fewest}-{most}"
        raise ExpressionError(f"{node.func.id}() takes {count} arguments, got {len(node.args)}")
    for arg in node.args:
        _check(arg)


def _bounded(value: Any) -> Any:
    """``value`` if it is a finite number of at most MAX_BITS bits of magnitude."""
    if isinstance(value, complex):
        raise ExpressionError("result is a complex number")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ExpressionError("number too large (limit about 1e308)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ExpressionError(f"result is not finite ({value})")
    return value


def _number(value: Any, node: ast.AST) -> int | float:
    """``value`` as an operand: a number, not a bool or a string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    what = f"variable {node.id!r}" if isinstance(node, ast.Name) else ast.unparse(node)
    raise ExpressionError(f"{what} is {value!r}, not a number")


def _power(base: int | float, exponent: int | float) -> int | float:
    """base ** exponent, refused before computing when the result would exceed MAX_BITS."""
    if abs(base) > 1 and exponent > 0 and exponent * math.log2(abs(base)) > MAX_BITS:
        raise ExpressionError("number too large (limit about 1e308)")
    return base**exponent


class _Evaluator:
    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def run(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self.run(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in FUNCTIONS:
                raise ExpressionError(f"{node.id} is a function; call it, e.g. {node.id}(...)")
            return self.lookup(node.id)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](_number(self.run(node.operand), node.operand))
        if isinstance(node, ast.BinOp):
            left = _number(self.run(node.left), node.left)
            right = _number(self.run(node.right), node.right)
            if isinstance(node.op, ast.Pow):
                return _bounded(_power(left, right))
            return _bounded(_BINARY[type(node.op)](left, right))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # guaranteed by _check
        args = [_number(self.run(arg), arg) for arg in node.args]
        if (
            node.func.id == "round"
            and len(args) == 2
            and (not isinstance(args[1], int) or abs(args[1]) > 400)
        ):
            raise ExpressionError("round(x, n) needs an integer n with |n| <= 400")
        return _bounded(FUNCTIONS[node.func.id][0](*args))


def evaluate(expr: str, lookup: Lookup) -> Any:
    """Value of one expression (the text between ``${`` and ``}``); ExpressionError if refused or invalid."""
    text = expr.strip()
    if not text:
        raise ExpressionError("empty ${}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ExpressionError(f"invalid expression {text!r}: {err.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError(f"invalid expression {text!r}") from None
    _check(tree)
    try:
        return _Evaluator(lookup).run(tree)
    except ZeroDivisionError:
        raise ExpressionError(f"division by zero in {text!r}") from None
    except OverflowError:
        raise ExpressionError(f"number too large in {text!r}") from None
    except RecursionError:
        raise ExpressionError(f"expression nested too deeply: {text!r}") from None


def has_expression(text: str) -> bool:
    """Whether ``text`` contains ``${`` or the ``$${`` escape."""
    return "${" in text


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


_TOKEN = re.compile(r"\$\$\{|\$\{")


def render(text: str, lookup: Lookup) -> Any:
    """Substitute every ``${...}`` in ``text``; exactly one ``${expr}`` (and nothing else) gives its value."""
    pieces: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        if match.start() < pos:
            continue
        pieces.append(text[pos : match.start()])
        if match.group() == "$${":
            pieces.append("${")
            pos = match.end()
            continue
        close = text.find("}", match.end())
        if close < 0:
            raise ExpressionError(f"unterminated '${{' in {text!r}")
        value = evaluate(text[match.end() : close], lookup)
        if match.start() == 0 and close == len(text) - 1:
            return value
        pieces.append(_as_text(value))
        pos = close + 1
    pieces.append(text[pos:])
    return "".join(pieces)


def escape(text: str) -> str:
    """Inverse of ``render`` for plain text: ``${`` -> ``$${`` so it is kept literally."""
    return text.replace("${", "$${")


class Variables:
    """Lazily resolves variables whose values may themselves use ``${...}``; detects cycles.

    ``errors`` maps a variable name to the message of its failure (reported once, at that variable).
    """

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = dict(raw)
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self._failed: set[str] = set()
        self._stack: list[str] = []

    def resolve_all(self) -> dict[str, Any]:
        """Every variable's value (failed ones left out; see ``errors``)."""
        for name in self.raw:
            with contextlib.suppress(ExpressionError):
                self.lookup(name)
        return self.values_in_order()

    def values_in_order(self) -> dict[str, Any]:
        """The resolved values, in the order the variables were declared."""
        return {name: self.values[name] for name in self.raw if name in self.values}

    def lookup(self, name: str) -> Any:
        """The value of variable ``name``; ExpressionError naming the closest names if it is unknown."""
        if name in self.values:
            return self.values[name]
        if name in self._failed:
            raise ExpressionError(f"variable {name!r} is invalid", reported=True)
        if name not in self.raw:
            close = difflib.get_close_matches(name, list(self.raw), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(self.raw) or "none defined"
            raise ExpressionError(f"unknown variable {name!r}{hint} (variables: {known})")
        if name in self._stack:
            cycle = [*self._stack[self._stack.index(name) :], name]
            raise _CycleError(cycle)
        self._stack.append(name)
        try:
            raw = self.raw[name]
            value = render(raw, self.lookup) if isinstance(raw, str) else raw
        except _CycleError as cycle:
            if name != cycle.names[0]:
                raise
            self._fail(name, str(cycle))
            self._failed.update(cycle.names)
            raise ExpressionError(str(cycle), reported=True) from None
        except ExpressionError as err:
            if not err.reported:
                self._fail(name, str(err))
            self._failed.add(name)
            raise ExpressionError(f"variable {name!r} is invalid", reported=True) from None
        finally:
            self._stack.pop()
        self.values[name] = value
        return value

    def _fail(self, name: str, message: str) -> None:
        self.errors.setdefault(name, message)
        self._failed.add(name)


class _CycleError(ExpressionError):
    def __init__(self, names: list[str]) -> None:
        super().__init__("variable cycle: " + " -> ".join(names))
        self.names = names
