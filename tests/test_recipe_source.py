"""YAML loading with positions: YAML 1.2 floats and booleans, duplicate keys, syntax errors."""

from __future__ import annotations

import pytest

from compressor.recipe.errors import RecipeError, RecipeIssue, format_path
from compressor.recipe.source import dump_yaml, load_scalar, load_source


def test_exponent_floats_load_as_floats() -> None:
    src = load_source("a: 1e-5\nb: 1E-5\nc: .5\nd: 5.\ne: -2.5e3\nf: 10\ng: 1_000\n")
    assert src.data == {"a": 1e-5, "b": 1e-5, "c": 0.5, "d": 5.0, "e": -2500.0, "f": 10, "g": 1000}
    assert all(isinstance(src.data[k], float) for k in "abcde")
    assert isinstance(src.data["f"], int)


def test_only_true_false_are_booleans() -> None:
    src = load_source("a: true\nb: False\nc: yes\nd: on\ne: no\n")
    assert src.data == {"a": True, "b": False, "c": "yes", "d": "on", "e": "no"}


def test_positions_of_values_and_keys_are_one_based() -> None:
    src = load_source("version: 1\nmodifiers:\n  - type: X\n    final_sparsity: 0.9\n")
    assert src.values[("modifiers", 0, "final_sparsity")] == (4, 21)
    assert src.keys[("modifiers", 0, "final_sparsity")] == (4, 5)
    assert src.values[("modifiers", 0)] == (3, 5)
    assert src.position(("modifiers", 0, "missing")) == (3, 5)  # falls back to the parent


def test_duplicate_key_is_an_error_at_the_second_key() -> None:
    with pytest.raises(RecipeError) as err:
        load_source("a: 1\nb:\n  c: 1\n  c: 2\n", "r.yaml")
    assert str(err.value) == "r.yaml:4:3: b.c: duplicate key 'c' (first at line 3, column 3)"


def test_syntax_error_has_line_and_column() -> None:
    with pytest.raises(RecipeError) as err:
        load_source("a: 1\nb: [1, 2\n", "r.yaml")
    assert str(err.value) == (
        "r.yaml:3:1: <root>: YAML syntax error: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 2, column 4)"
    )


def test_unsafe_tags_are_refused() -> None:
    with pytest.raises(RecipeError) as err:
        load_source("a: !!python/object/apply:os.system [echo hi]\n", "r.yaml")
    assert (
        str(err.value)
        == "r.yaml:1:4: a: unsupported YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'"
    )
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        load_source("a: !!python/name:os.system\n")


def test_recursive_alias_and_alias_bomb_are_refused() -> None:
    with pytest.raises(RecipeError, match="recursive alias"):
        load_source("a: &x [*x]\n")
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdef", "bcdefg", strict=True)
    )
    with pytest.raises(RecipeError, match="recipe too large"):
        load_source(bomb)


def test_scalars_and_dump_round_trip() -> None:
    assert load_scalar("0.9") == 0.9 and load_scalar("1e-4") == 1e-4 and load_scalar("abc") == "abc"
    data = {"a": "1e-5", "b": 1e-5, "c": "yes", "d": [1, 2.5], "e": {"x": True}}
    assert load_source(dump_yaml(data)).data == data


def test_issue_format() -> None:
    assert format_path(("modifiers", 0, "final_sparsity")) == "modifiers[0].final_sparsity"
    assert format_path(()) == "<root>"
    assert str(RecipeIssue("r.yaml", 3, 7, "", "boom")) == "r.yaml:3:7: <root>: boom"
    error = RecipeError([RecipeIssue("r", 5, 1, "b", "two"), RecipeIssue("r", 2, 9, "a", "one")])
    assert str(error) == "r:2:9: a: one\nr:5:1: b: two"


def test_unquoted_expression_in_flow_mapping_gets_a_hint() -> None:
    with pytest.raises(RecipeError) as caught:
        load_source("optimizer: {type: SGD, lr: ${lr}}\n", "r.yaml")
    assert str(caught.value).startswith("r.yaml:1:")
    assert 'quote a ${...} value, e.g. lr: "${lr}"' in str(caught.value)
