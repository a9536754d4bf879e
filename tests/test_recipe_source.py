"""YAML loading with positions: YAML 1.2 floats and booleans, duplicate keys, syntax errors."""

from __future__ import annotations

import pytest

from compressor.recipe.errors import RecipeError, RecipeIssue, format_path
from compressor.recipe.source import MAX_DEPTH, dump_yaml, load_scalar, load_source


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


# Every PyYAML failure is a positioned RecipeIssue, never an exception of yaml's own (issue 26):
# the mutation fuzz of tests/test_recipe_fuzz.py found the first of these, a tag on a mapping key.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # a tag on a key: yaml's ConstructorError escaped from the key's construction
            "m:\n  - type: X\n    !!python/object:os.system ls: 3\n",
            "r.yaml:3:5: m[0]: invalid mapping key: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object:os.system'",
        ),
        (  # a collection tag on a scalar key: an unhashable [] (TypeError) before
            "a:\n  !!seq foo: 1\n",
            "r.yaml:2:3: a: invalid mapping key: expected a sequence node, but found scalar",
        ),
        (  # the constructors' own exceptions: ValueError, KeyError, AttributeError
            "a: !!int abc\n",
            "r.yaml:1:4: a: cannot read 'abc' as !!int: invalid literal for int() with base 10: 'abc'",
        ),
        (
            "a: !!float x\n",
            "r.yaml:1:4: a: cannot read 'x' as !!float: could not convert string to float: 'x'",
        ),
        ("a: !!bool maybe\n", "r.yaml:1:4: a: cannot read 'maybe' as !!bool"),
        ("a: !!timestamp soon\n", "r.yaml:1:4: a: cannot read 'soon' as !!timestamp"),
        ("a: 2001-13-45\n", "r.yaml:1:4: a: cannot read '2001-13-45' as !!timestamp: month must be in 1..12"),
        (
            "!!int x: 1\n",
            "r.yaml:1:1: <root>: invalid mapping key: cannot read 'x' as !!int: invalid literal "
            "for int() with base 10: 'x'",
        ),
        (  # more digits than Python converts (sys.get_int_max_str_digits): ValueError
            "a: " + "9" * 5000 + "\n",
            "r.yaml:1:4: a: cannot read '9999999999999999999999999999999999999...' (5000 characters) "
            "as !!int: too many digits",
        ),
        (  # merge keys: ConstructorError from flatten_mapping
            "a:\n  <<: 5\n  b: 1\n",
            "r.yaml:2:7: a: merge key (<<): expected a mapping or list of mappings for merging, "
            "but found scalar",
        ),
        (
            "a:\n  <<: [1]\n",
            "r.yaml:2:8: a: merge key (<<): expected a mapping for merging, but found scalar",
        ),
        (  # a mapping merged into itself: PyYAML copies its keys in again
            "a: &x\n  <<: *x\n  b: 1\n",
            "r.yaml:3:3: a.b: duplicate key 'b' (first at line 3, column 3)",
        ),
        (  # ReaderError: at the character's line and column, on one line
            "a: 1\nb: x\x01y\n",
            "r.yaml:2:5: <root>: YAML syntax error: unacceptable character '\\x01' (#x0001): "
            "special characters are not allowed",
        ),
    ],
)
def test_every_yaml_error_is_a_positioned_issue(text: str, expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_source(text, "r.yaml")
    assert str(err.value) == expected


def test_a_failed_anchor_is_reported_at_each_alias_not_as_recursive() -> None:
    with pytest.raises(RecipeError) as err:
        load_source("a: &x !!int abc\nb: *x\n", "r.yaml")
    assert [i.path for i in err.value.issues] == ["a", "b"]
    assert all("cannot read 'abc' as !!int" in i.message for i in err.value.issues)


def test_an_issue_is_one_line_whatever_the_keys_and_values_hold() -> None:
    issue = RecipeIssue("r.yaml", 2, 3, "m[0].a\nb", "unknown key 'a\\nb'; \u202egnp.exe \ud800 é 🚀")
    assert str(issue) == "r.yaml:2:3: m[0].a\\nb: unknown key 'a\\nb'; \\u202egnp.exe \\ud800 é 🚀"
    with pytest.raises(RecipeError) as err:
        load_source('a:\n  "x\\ny": 1\n  "x\\ny": 2\n', "r.yaml")
    assert str(err.value).splitlines() == [
        "r.yaml:3:3: a.x\\ny: duplicate key 'x\\ny' (first at line 2, column 3)"
    ]


def test_deep_nesting_stops_at_max_depth_where_it_goes_too_deep() -> None:
    # the root mapping is level 1, its value level 2, ...; keys and scalars count as a level too
    sequences, mappings = "a: " + "[" * 5000 + "]" * 5000, "a: " + "{a: " * 300 + "1" + "}" * 300
    for text, col in ((sequences, 4 + MAX_DEPTH - 1), (mappings, 4 + (MAX_DEPTH - 2) * 4 + 1)):
        with pytest.raises(RecipeError) as err:
            load_source(text, "r.yaml")
        assert [str(i) for i in err.value.issues] == [
            f"r.yaml:1:{col}: <root>: YAML nested too deeply (more than {MAX_DEPTH} levels)"
        ]
    block = "".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5))
    with pytest.raises(RecipeError, match=rf"r.yaml:{MAX_DEPTH}:\d+: <root>: YAML nested too deeply"):
        load_source(block, "r.yaml")
    load_source("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))  # the root mapping is a level


def test_aliases_nesting_deeper_than_the_text_are_refused_too() -> None:
    chain = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, MAX_DEPTH + 5))
    with pytest.raises(RecipeError, match=r"^r.yaml:1:10: a\d+(\[0\])+: YAML nested too deeply"):
        load_source(chain, "r.yaml")
