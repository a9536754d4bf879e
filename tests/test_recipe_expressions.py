"""``${...}``: restricted arithmetic, refusals that execute nothing, interpolation, variable cycles."""

from __future__ import annotations

import builtins
import time
from pathlib import Path

import pytest

from compressor.recipe.expressions import ExpressionError, Variables, evaluate, render

VARS = {"epochs": 12, "target": 0.9, "arch": "cnn", "flag": True}


def lookup(name: str) -> object:
    return Variables(VARS).lookup(name)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("${epochs - 3}", 9),
        ("${epochs / 4}", 3.0),
        ("${epochs // 5}", 2),
        ("${epochs % 5}", 2),
        ("${2 ** 10}", 1024),
        ("${-epochs}", -12),
        ("${+target}", 0.9),
        ("${(epochs + 3) * 2}", 30),
        ("${min(epochs, 3, 5)}", 3),
        ("${max(1, target)}", 1),
        ("${round(target * 100)}", 90),
        ("${round(2.567, 2)}", 2.57),
        ("${abs(-3)}", 3),
        ("${int(epochs * target)}", 10),
        ("${float(epochs)}", 12.0),
        ("${1e-5 * 2}", 2e-5),
        ("${arch}", "cnn"),
        ("${flag}", True),
    ],
)
def test_arithmetic(text: str, value: object) -> None:
    assert render(text, lookup) == value


def test_interpolation_in_longer_text_and_escape() -> None:
    assert render("runs/${arch}-${epochs}e-${target}", lookup) == "runs/cnn-12e-0.9"
    assert render("cost $${epochs}", lookup) == "cost ${epochs}"
    assert render("no expression", lookup) == "no expression"


def test_eval_and_exec_are_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert render("${max(epochs, 2) ** 2 - 4}", lookup) == 140


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${epochs.__class__}", "attribute access ('.__class__') is not allowed"),
        ("${__builtins__}", "name '__builtins__' is not allowed (names starting with '_' are reserved)"),
        ("${__import__('os').system('touch pwned')}", "attribute access ('.system') is not allowed"),
        (
            "${__import__('os')}",
            "calling '__import__' is not allowed; functions: min, max, round, abs, int, float",
        ),
        (
            "${open('pwned', 'w')}",
            "calling 'open' is not allowed; functions: min, max, round, abs, int, float",
        ),
        ("${eval('1')}", "calling 'eval' is not allowed; functions: min, max, round, abs, int, float"),
        ("${(lambda: open('pwned', 'w'))()}", "lambda is not allowed"),
        ("${lambda: 1}", "lambda is not allowed"),
        ("${[open('pwned', 'w')][0]}", "subscripts ([...]) are not allowed"),
        ("${[x for x in (1, 2)]}", "comprehensions are not allowed"),
        ("${'abc'}", "string literals are not allowed"),
        ("${epochs and 1}", "boolean operators (and, or) are not allowed"),
        ("${epochs > 1}", "comparisons are not allowed"),
        ("${1 if epochs else 2}", "conditional expressions are not allowed"),
        ("${True}", "True is not allowed in expressions (numbers only)"),
        ("${max(epochs, key=abs)}", "max() takes positional arguments only"),
        ("${min(epochs)}", "min() takes 2 or more arguments, got 1"),
        ("${arch + 1}", "variable 'arch' is 'cnn', not a number"),
        (
            "${epoch}",
            "unknown variable 'epoch'; did you mean 'epochs'? (variables: epochs, target, arch, flag)",
        ),
        ("${1 / 0}", "division by zero in '1 / 0'"),
        ("${}", "empty ${}"),
        ("${epochs", "unterminated '${' in '${epochs'"),
        ("${1 +}", "invalid expression '1 +': invalid syntax"),
    ],
)
def test_refused_with_a_message(text: str, message: str) -> None:
    with pytest.raises(ExpressionError) as err:
        render(text, lookup)
    assert str(err.value) == message


def test_refused_calls_execute_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for text in [
        "${open('pwned', 'w')}",
        "${__import__('os').system('touch pwned')}",
        "${(lambda: open('pwned', 'w'))()}",
        "${[open('pwned', 'w')][0]}",
        "${epochs + open('pwned', 'w')}",  # refused before the left operand is evaluated
    ]:
        with pytest.raises(ExpressionError):
            render(text, lookup)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["${9**9**9}", "${10 ** 400}", "${10.0 ** 400}", "${2 ** 2000 * 0}"])
def test_huge_powers_are_refused_quickly(text: str) -> None:
    began = time.perf_counter()
    with pytest.raises(ExpressionError, match="number too large"):
        render(text, lookup)
    assert time.perf_counter() - began < 0.5


def test_non_finite_results_are_refused() -> None:
    with pytest.raises(ExpressionError, match=r"result is not finite \(inf\)"):
        evaluate("1e308 * 10", lookup)


def test_variables_reference_variables() -> None:
    variables = Variables({"epochs": 10, "end": "${epochs - 2}", "half": "${end / 2}", "name": "e${end}"})
    assert variables.resolve_all() == {"epochs": 10, "end": 8, "half": 4.0, "name": "e8"}
    assert variables.errors == {}


def test_variable_cycles_are_reported_once() -> None:
    variables = Variables({"a": "${b + 1}", "b": "${c}", "c": "${a}", "d": "${a}", "e": 1})
    assert variables.resolve_all() == {"e": 1}
    assert variables.errors == {"a": "variable cycle: a -> b -> c -> a"}
    self_loop = Variables({"x": "${x}"})
    self_loop.resolve_all()
    assert self_loop.errors == {"x": "variable cycle: x -> x"}
