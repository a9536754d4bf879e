"""Mutation fuzz of recipes (issue 26): `compressor validate` and `compressor run` on broken recipes.

Hypothesis starts from the small shipped recipes (``recipes/digits_*`` and ``recipes/mnist_*``, and two
one-epoch digits recipes for runs) and applies one to four mutations: keys renamed, deleted,
duplicated or added (typos, unicode, numbers, null, tags); values replaced by other types, huge or
non-finite numbers (1e308, 10**400, 5000 digits, -0, nan, inf), unicode (bidirectional overrides,
zero-width characters, emoji, lone surrogates both escaped and raw), deep nesting, anchors, aliases
and alias bombs, YAML tags on keys and values (``!!python/object/apply`` that would create a
sentinel file, ``!!binary``, custom tags), ``${...}`` expressions (refused names, attribute access,
calls, huge powers, deep parentheses); document directives; and raw text edits (truncation,
inserted characters and YAML punctuation, broken indentation). For every mutant:

- `validate` and `run` exit with status 0 or 1, never with a traceback;
- every error line is ``FILE:LINE:COL: path: message``, the line and column inside the file;
- nothing runs the recipe's code or writes outside the run's ``--output`` folder: no sentinel file
  appears, the working folder holds only the recipe (and the output folder after a run), and the
  checkout's root and ``recipes/`` are unchanged.

Runs are expensive, so the run test mostly makes gentle mutants (values of the right kind, keys
added), runs every mutant that validation refuses (it stops at the same point, in milliseconds) and
of the valid ones only those that stay cheap (digits data, at most 2 epochs, no number in a modifier
above 1000); the others are counted as hypothesis events (``--hypothesis-show-statistics``). Runs
draw no plots and build no kernels (``COMPRESSOR_KERNELS=off``).

How many examples: the hypothesis profile of tests/conftest.py. ``COMPRESSOR_FUZZ=ci`` (the default)
runs 300 validate examples and 30 run examples, the same ones every time (derandomized, so CI is not
flaky); ``COMPRESSOR_FUZZ=slow`` runs 3000 and 300, fresh ones each time:

    COMPRESSOR_FUZZ=slow .venv/bin/python -m pytest -q tests/test_recipe_fuzz.py --hypothesis-show-statistics

A failure prints the mutated recipe and a ``@reproduce_failure`` line that replays it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compressor.cli import app
from compressor.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    p.name: p.read_text()
    for pattern in ("digits_*.yaml", "mnist_*.yaml")
    for p in sorted((ROOT / "recipes").glob(pattern))
}

#: One-epoch digits recipes for the run test: a few seconds each when a mutant stays valid.
RUN_RECIPES = {
    "run_magnitude.yaml": """\
version: 1
variables:
  epochs: 1
  target: 0.5
train:
  model: digits-mlp
  data: digits
  epochs: ${epochs}
  batch_size: 256
  seed: 0
  optimizer: {type: SGD, lr: 0.1, momentum: 0.9}
modifiers:
  - type: MagnitudePruning
    params: ["re:fc\\\\d\\\\.weight"]
    start: 0
    end: ${epochs}
    init_sparsity: 0.1
    final_sparsity: ${target}
    update_every: 0.5
""",
    "run_mfac.yaml": """\
version: 1
variables:
  epochs: 1
train:
  model: digits-mlp
  data: digits
  epochs: ${epochs}
  batch_size: 128
  optimizer: {type: SGD, lr: 0.1}
modifiers:
  - type: MFACPruning
    params: ["fc1.weight", "fc2.weight"]
    start: 0.5
    final_sparsity: 0.5
    num_grads: 16
    block_size: 64
  - type: LearningRate
    kind: constant
    value: 0.05
    start: 0
""",
}

#: Replaced by the path of a file that must never appear (code run by a tag or an expression would
#: create it); it lies outside every folder a command may write.
SENTINEL = "{sentinel}"

VALIDATE_EXAMPLES = settings.default.max_examples
RUN_EXAMPLES = max(10, VALIDATE_EXAMPLES // 10)

# ------------------------------------------------------------------------------- what to insert

KEYS = sorted(
    {
        k
        for text in (*RECIPES.values(), *RUN_RECIPES.values())
        for k in re.findall(r"^[ -]*(\w+):", text, re.M)
    }
    | {"init_from", "task", "task_options", "grad_accum", "eval_every", "device", "loss", "kwargs", "step"}
)
#: Characters that break or disguise text: line breaks YAML or Python know, controls, bidi
#: overrides, zero-width, BOM, emoji, lone surrogates (UTF-8 cannot encode them).
ODD_CHARS = [
    "\n", "\r", "\t", "\x00", "\x01", "\x7f", "\x85", "\u2028", "\u2029", "\u202e", "\u200b", "\ufeff",
    "\u00e9", "\U0001f680", "\ud800", "\udfff", ":", "#", "&", "*", "!", "%", "@", "`", "|", ">", "'", '"',
    "{", "}", "[", "]", ",", "?", "-", "$", "\\",
]  # fmt: skip
ANY_CHAR = st.characters(exclude_categories=()) | st.sampled_from(ODD_CHARS)
TEXT = st.text(ANY_CHAR, max_size=12)

NUMBERS = [
    "0", "-0", "-0.0", "1", "-1", "1e308", "-1e308", "1e309", "1e-400", "5e-324", "10**400", "1" + "0" * 400,
    "9" * 5000, "18446744073709551616", "-9223372036854775809", ".nan", ".NaN", ".inf", "-.inf", "+.inf",
    "0x1F", "0o17", "0b101", "1_000", "1:30", "+.5", "5.", "1e5", "0.9999999999999999999", "2001-12-14",
    "2001-13-45", "2001-12-14t21:59:43.10-05:00", "true", "False", "yes", "off", "~", "null", "''",
]  # fmt: skip
TAGGED = [
    f'!!python/object/apply:os.system ["touch {SENTINEL}"]',
    f'!!python/object/apply:subprocess.call [["touch", "{SENTINEL}"]]',
    f'!!python/object/new:builtins.open ["{SENTINEL}", "w"]',
    f"!!python/object/apply:builtins.exec [\"open('{SENTINEL}', 'w')\"]",
    "!!python/object:argparse.Namespace {a: 1}",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "!!binary aGVsbG8=",
    '!!binary "###"',
    "!!binary \u00e9",
    "!!set {a: null}",
    "!!omap [{a: 1}, {b: 2}]",
    "!!pairs [{a: 1}]",
    "!custom value",
    "!custom {a: 1}",
    "!<tag:example.com,2000:app/x> 1",
    "!!int abc",
    "!!int 0x1F",
    "!!float abc",
    "!!float .inf",
    "!!bool maybe",
    "!!timestamp soon",
    "!!timestamp 2001-12-14",
    "!!str 1.5",
    "!!null x",
    "!!seq {a: 1}",
    "!!map [1]",
    "!!merge x",
    "!!str [1, 2]",
]
KEY_TAGS = [
    "!!python/object:os.system ls",
    f"!!python/object/apply:os.system [touch {SENTINEL}]",
    "!!python/name:os.system",
    "!!binary aGVsbG8=",
    "!!int abc",
    "!!int 12",
    "!!seq foo",
    "!!map foo",
    "!!null ''",
    "!!float .nan",
    "!!timestamp 2001-12-14",
    "!!timestamp never",
    "!custom key",
]
#: Values that name code or files: factories (imported only with --allow-import), paths outside.
NAMES = [
    "os:system",
    "subprocess:call",
    "builtins:exec",
    "sentinel_module:factory",
    "hf:/nonexistent",
    "digits-cnn",
    "mnist-cnn",
    "cuda:99999999999999999999",
    "cuda:1",
    "../outside",
    SENTINEL,
    "~/outside",
    "/dev/null",
    "/proc/self/mem",
    "re:(",
    "re:(a+)+$",
    "*",
    "",
]
EXPRESSION_ATOMS = [
    "epochs", "target", "seed", "nope", "_x", "__class__", "1e308", "10**400", "9**9**9", "2**1024", "0",
    "-0", "1/0", "1 % 0", "x.y", "'a'", '"s"', "[1]", "{1: 2}", "lambda: 1", "(x := 1)", "not 1",
    f"__import__('os').system('touch {SENTINEL}')", f"open('{SENTINEL}', 'w')", "min", "max(1, 2)",
    "round(1.5, 999)", "int(1e308)", "float('nan')", "abs(-1)", "(", ")", "}", "${epochs}", "$${x}",
    "epochs if 1 else 2", "1 < 2", "[i for i in (1,)]", "epochs.__class__", "getattr(1, 'x')",
]  # fmt: skip


def _scalar(value: Any) -> str:
    """``value`` as YAML flow text (JSON is YAML); floats in YAML's spellings."""
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    return json.dumps(value)


def _quoted(text: str, style: int) -> str:
    """``text`` as a YAML scalar: escaped double-quoted, raw double-quoted, single-quoted or plain."""
    if style == 0:
        return json.dumps(text)  # \\uXXXX escapes: lone surrogates reach the loader as characters
    if style == 1:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'  # raw: UTF-8 may refuse it
    if style == 2:
        return "'" + text.replace("'", "''") + "'"
    return text


expressions = st.recursive(
    st.sampled_from(EXPRESSION_ATOMS) | st.integers(-(10**6), 10**6).map(str) | st.floats().map(repr),
    lambda inner: st.one_of(
        st.tuples(
            inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "<<", "&", "and", "=="]), inner
        ).map(" ".join),
        inner.map(lambda e: f"({e})"),
        st.tuples(
            st.sampled_from(["min", "max", "round", "abs", "int", "float", "exec", "eval", "getattr"]),
            st.lists(inner, max_size=3),
        ).map(lambda call: f"{call[0]}({', '.join(call[1])})"),
    ),
    max_leaves=8,
) | st.sampled_from([10, 100, 300, 1000]).map(lambda n: "(" * n + "1" + ")" * n)


@st.composite
def expression_values(draw: st.DrawFn) -> str:
    expr = draw(expressions)
    text = draw(st.sampled_from(["${%s}", "x${%s}y", "${%s}${%s}", "$${%s}", "${%s", "${epochs}${%s}"]))
    return _quoted(text.replace("%s", expr), draw(st.integers(0, 3)))


def _nested(depth: int, kind: int) -> str:
    if kind == 0:
        return "[" * depth + "]" * depth
    if kind == 1:
        return "{a: " * depth + "1" + "}" * depth
    return "[1, " * depth + "1" + "]" * depth


def _bomb(width: int, depth: int) -> str:
    """An alias bomb in one flow value: level i repeats level i - 1 ``width`` times (width**depth)."""
    levels = ["&b0 [" + ", ".join(["lol"] * width) + "]"]
    levels += [f"&b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]" for i in range(1, depth + 1)]
    return "[" + ", ".join(levels) + "]"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)

values = st.one_of(
    st.sampled_from(NUMBERS),
    st.integers().map(str),
    st.floats().map(_scalar),
    st.sampled_from(TAGGED),
    st.sampled_from(NAMES).map(json.dumps),
    st.tuples(TEXT, st.integers(0, 3)).map(lambda t: _quoted(*t)),
    expression_values(),
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.tuples(st.sampled_from([1, 10, 97, 98, 99, 100, 300, 2000]), st.integers(0, 2)).map(
        lambda t: _nested(*t)
    ),
    st.tuples(st.integers(2, 10), st.integers(1, 7)).map(lambda t: _bomb(*t)),
    st.sampled_from(
        ["&r [*r]", "&r {a: *r}", "*undefined", "{<<: 5}", "{<<: [1]}", "[", "{", "|", ">", "- 1", ""]
    ),
)

keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k[:-1] or "x"),  # a typo
    st.sampled_from(KEYS).map(lambda k: k + "\u200b"),
    st.sampled_from(KEY_TAGS),
    st.sampled_from(
        ["1", "-1", "1.5", ".nan", "null", "~", "true", "''", "<<", "*undefined", "? [a]", "[a, b]"]
    ),
    st.tuples(TEXT, st.integers(0, 3)).map(lambda t: _quoted(*t)),
)

#: Values a recipe could hold: most mutants made with these still validate, so that runs exercise
#: the engine (seeds, batch sizes, windows in steps, schedules) and not only the loader.
PLAUSIBLE = [
    "0", "-0", "1", "2", "3", "0.5", "0.25", "0.99", "1.5", "-1", "1e-8", "1e308", "1e400", "128", "1797",
    "1798", "100000000000", "18446744073709551615", "18446744073709551616", "9223372036854775807",
    "-9223372036854775808", "true", "false", "null", "[]", "{}", "{step: 0}", "{step: 3}", "{step: 7}",
    "{step: 100000000000}", "{step: -1}", "{step: 1.5}", "[0.5, 1]", "[[0.2, 0.5], [0.6, 0.9]]",
    "MagnitudePruning", "ConstantPruning", "MFACPruning", "MFACOptimizer", "LearningRate",
    "StructuredPruning", "Quantization", "SparseGPTPruning", "WandaPruning", "cubic", "linear", "constant",
    "cosine", "step", "linear_warmup", "2:4", "4:8", "1:1", "channel", "cpu", "auto", "cuda", "digits",
    "digits-mlp", "digits-cnn", "mnist-cnn", "SGD", "Adam", "AdamW", "MFAC", "fc1.weight", "fc2.weight",
    "fc1.bias",
    '"re:fc\\\\d\\\\.weight"', "'*'", "[fc1.weight]", "[fc1.weight, fc1.weight]", "'re:.*'",
    '"${epochs}"', '"${epochs - 1}"', '"${epochs * 2}"', '"${epochs / 3}"', '"${target / 2}"',
    '"${round(epochs / 2, 1)}"', '"${max(epochs, 2)}"', '"${min(epochs, 0)}"', '"${int(epochs)}"',
    '"${epochs ** 2}"', '"${-epochs}"', '"${epochs % 1}"', '"${seed}"', '"run-${epochs}"',
]  # fmt: skip
plausible_values = st.sampled_from(PLAUSIBLE) | st.integers(-2, 300).map(str) | st.floats(0, 2).map(repr)
_SMALL = st.integers(0, 3).map(str) | st.sampled_from(["0.5", "1.5", "-0", '"${epochs}"', '"${epochs / 2}"'])
_FRACTION = st.floats(0, 1).map(repr) | st.sampled_from(
    ["0", "-0", "0.5", "0.99", "1", '"${target}"', "1e-8"]
)
_HUGE = st.sampled_from(["18446744073709551615", "9223372036854775807", "100000000000", "1e308", "-1", "0"])
_POSITION = _SMALL | st.sampled_from(["{step: 0}", "{step: 3}", "{step: 7}", "{step: 100000000000}", "1e-8"])
#: Values of the same kind as the key's own, so that mutants often stay valid.
KEY_VALUES: dict[str, st.SearchStrategy[str]] = {
    "version": st.sampled_from(["1", "1.0", "2", "0", '"1"']),
    "epochs": _SMALL,
    "target": _FRACTION,
    "seed": _SMALL | _HUGE,
    "batch_size": st.sampled_from(["1", "32", "1797", "1798", "9223372036854775807", "0"]),
    "start": _POSITION,
    "end": _POSITION,
    "update_every": _POSITION | _HUGE,
    "init_sparsity": _FRACTION,
    "final_sparsity": _FRACTION,
    "lr": _FRACTION | _HUGE,
    "momentum": _FRACTION,
    "value": _FRACTION,
    "num_grads": st.sampled_from(["1", "2", "16", "64", "{0.3: 8, 0.5: 16}", "0"]),
    "block_size": st.sampled_from(["1", "2", "63", "64", "1000", "0"]),
    "type": st.sampled_from(["MagnitudePruning", "ConstantPruning", "MFACPruning", "LearningRate"]),
    "kind": st.sampled_from(["constant", "cosine", "step", "linear_warmup", "linear"]),
    "model": st.sampled_from(["digits-mlp", "digits-cnn"]),
    "data": st.just("digits"),
    "params": st.sampled_from(["[fc1.weight]", "['*']", '["re:fc\\\\d\\\\.weight"]', "[fc1.bias]"]),
}


@st.composite
def value_for(draw: st.DrawFn, key: str) -> str:
    """A value of the kind ``key`` holds (sometimes any plausible one)."""
    if key in KEY_VALUES and draw(st.integers(0, 3), label="same kind") > 0:
        return draw(KEY_VALUES[key], label="value")
    return draw(plausible_values, label="value")


# ------------------------------------------------------------------------------- the mutations

_ENTRY = re.compile(r"^(?P<indent> *)(?P<dash>- )?(?P<key>[^\s#:\-][^:#]*?):(?P<value>(?: .*)?)$")
_ITEM = re.compile(r"^(?P<indent> *)- (?P<value>[^:#]*)$")


def _entries(lines: list[str], with_value: bool = False) -> list[int]:
    out = []
    for i, line in enumerate(lines):
        m = _ENTRY.match(line)
        if (m and (not with_value or m["value"].strip())) or (with_value and _ITEM.match(line)):
            out.append(i)
    return out


def _set_value(line: str, value: str) -> str:
    m = _ENTRY.match(line)
    if m:
        return f"{m['indent']}{m['dash'] or ''}{m['key']}: {value}"
    m = _ITEM.match(line)
    assert m is not None
    return f"{m['indent']}- {value}"


def _sibling(line: str, key: str, value: str) -> str:
    """A ``key: value`` line to follow the entry ``line``: in its mapping, or its first child when
    ``line`` opens a block (``train:``)."""
    m = _ENTRY.match(line)
    assert m is not None
    child = m["dash"] or not m["value"].strip()
    return f"{m['indent']}{'  ' if child else ''}{key}: {value}"


Mutation = Callable[[st.DataObject, str], str]


def _on_lines(
    data: st.DataObject,
    text: str,
    pick: Callable[[list[str]], list[int]],
    edit: Callable[[list[str], int], None],
) -> str:
    lines = text.split("\n")
    chosen = pick(lines)
    if not chosen:
        return _insert_text(data, text)
    index = data.draw(st.sampled_from(chosen), label="line")
    edit(lines, index)
    return "\n".join(lines)


def replace_value(data: st.DataObject, text: str) -> str:
    value = data.draw(values, label="value")
    return _on_lines(
        data, text, lambda ls: _entries(ls, True), lambda ls, i: ls.__setitem__(i, _set_value(ls[i], value))
    )


def replace_plausible(data: st.DataObject, text: str) -> str:
    def edit(lines: list[str], i: int) -> None:
        m = _ENTRY.match(lines[i])
        lines[i] = _set_value(lines[i], data.draw(value_for(m["key"].strip() if m else "")))

    return _on_lines(data, text, lambda ls: _entries(ls, True), edit)


def insert_plausible(data: st.DataObject, text: str) -> str:
    key = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(value_for(key))

    return _on_lines(data, text, _entries, lambda ls, i: ls.insert(i + 1, _sibling(ls[i], key, value)))


def replace_key(data: st.DataObject, text: str) -> str:
    key = data.draw(keys, label="key")

    def edit(lines: list[str], i: int) -> None:
        m = _ENTRY.match(lines[i])
        assert m is not None
        lines[i] = f"{m['indent']}{m['dash'] or ''}{key}:{m['value']}"

    return _on_lines(data, text, _entries, edit)


def insert_entry(data: st.DataObject, text: str) -> str:
    key, value = data.draw(keys, label="key"), data.draw(values, label="value")

    return _on_lines(data, text, _entries, lambda ls, i: ls.insert(i + 1, _sibling(ls[i], key, value)))


def delete_line(data: st.DataObject, text: str) -> str:
    return _on_lines(data, text, _entries, lambda ls, i: ls.pop(i))


def duplicate_line(data: st.DataObject, text: str) -> str:
    return _on_lines(data, text, _entries, lambda ls, i: ls.insert(i, ls[i]))


def reindent(data: st.DataObject, text: str) -> str:
    shift = data.draw(st.sampled_from([-4, -2, -1, 1, 2, 3, "\t", " \t"]), label="indent")

    def edit(lines: list[str], i: int) -> None:
        if isinstance(shift, str):
            lines[i] = shift + lines[i].lstrip(" ")
        elif shift < 0:
            lines[i] = lines[i][min(-shift, len(lines[i]) - len(lines[i].lstrip(" "))) :]
        else:
            lines[i] = " " * shift + lines[i]

    return _on_lines(data, text, lambda ls: list(range(len(ls))), edit)


def anchor_and_alias(data: st.DataObject, text: str) -> str:
    lines = text.split("\n")
    found = _entries(lines, True)
    if len(found) < 2:
        return _insert_text(data, text)
    first = data.draw(st.sampled_from(found[:-1]), label="anchor")
    second = data.draw(st.sampled_from([i for i in found if i > first]), label="alias")
    if data.draw(st.booleans(), label="alias before anchor"):
        first, second = second, first
    m = _ENTRY.match(lines[first]) or _ITEM.match(lines[first])
    assert m is not None
    lines[first] = _set_value(lines[first], "&a " + m["value"].strip())
    alias = data.draw(st.sampled_from(["*a", "[*a, *a]", "{<<: *a}", "*a *a"]), label="alias text")
    lines[second] = _set_value(lines[second], alias)
    return "\n".join(lines)


def wrap_document(data: st.DataObject, text: str) -> str:
    head = data.draw(
        st.sampled_from(
            [
                "",
                "%YAML 1.1\n---\n",
                "%YAML 1.3\n---\n",
                "%YAML 2.0\n---\n",
                "---\n",
                "--- !!map\n",
                "--- !!seq\n",
                "%TAG ! tag:yaml.org,2002:python/object/apply:\n---\n",
                "--- !!python/object/apply:os.system\n",
                "\ufeff",
            ]
        ),
        label="head",
    )
    tail = data.draw(st.sampled_from(["", "...\n", "---\na: 1\n", "\n---\n", "\n#", "\x00"]), label="tail")
    return head + text + tail


def _insert_text(data: st.DataObject, text: str) -> str:
    at = data.draw(st.integers(0, len(text)), label="at")
    piece = data.draw(TEXT | st.sampled_from(ODD_CHARS), label="inserted")
    return text[:at] + piece + text[at:]


def truncate(data: st.DataObject, text: str) -> str:
    return text[: data.draw(st.integers(0, len(text)), label="cut at")]


def delete_range(data: st.DataObject, text: str) -> str:
    at = data.draw(st.integers(0, len(text)), label="at")
    return text[:at] + text[at + data.draw(st.integers(1, 20), label="length") :]


#: Mutations that keep the text YAML and often a valid recipe.
GENTLE: list[Mutation] = [replace_plausible, replace_plausible, replace_plausible, insert_plausible]
MUTATIONS: list[Mutation] = [
    *GENTLE,
    replace_value,
    replace_value,
    replace_value,
    replace_key,
    replace_key,
    insert_entry,
    insert_entry,
    delete_line,
    duplicate_line,
    reindent,
    anchor_and_alias,
    wrap_document,
    _insert_text,
    truncate,
    delete_range,
]


def mutate(data: st.DataObject, text: str, mutations: list[Mutation] = MUTATIONS, most: int = 4) -> str:
    chosen = data.draw(st.lists(st.sampled_from(mutations), min_size=1, max_size=most), label="mutations")
    for mutation in chosen:
        text = mutation(data, text)
    return text


# ------------------------------------------------------------------------------- the properties


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _checkout() -> dict[str, Any]:
    """What a command could touch in the checkout: its root entries and recipes/."""
    skip = {".pytest_cache", ".hypothesis", ".ruff_cache", "runs", "out", ".git"}  # other tools' folders
    return {"root": sorted(set(os.listdir(ROOT)) - skip), "recipes": _snapshot(ROOT / "recipes")}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the examples' working folders; the checkout is compared before and after them all."""
    before = _checkout()
    base = tmp_path_factory.mktemp("fuzz")
    yield base
    assert _checkout() == before, "a mutated recipe changed the checkout"


class Example:
    """One mutant in a fresh working folder: ``work/recipe.yaml``, and ``outside/`` for the sentinel."""

    count = 0

    def __init__(self, base: Path, text: str) -> None:
        Example.count += 1
        root = base / f"example{Example.count}"
        self.work, self.outside = root / "work", root / "outside"
        self.work.mkdir(parents=True)
        self.outside.mkdir()
        self.sentinel = self.outside / "sentinel"
        self.text = text.replace(SENTINEL, str(self.sentinel))
        self.recipe = self.work / "recipe.yaml"
        self.recipe.write_bytes(self.text.encode("utf-8", "surrogatepass"))
        note(f"recipe:\n{self.text}")

    def invoke(self, args: list[str]) -> Any:
        """``compressor ARGS`` in-process, in the working folder; warnings kept off stderr."""
        cwd = Path.cwd()
        os.chdir(self.work)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return CliRunner().invoke(app, args)
        finally:
            os.chdir(cwd)

    def check(self, result: Any, command: str, output: Path | None = None) -> None:
        """The properties every command must keep; ``output``: the only folder it may write."""
        note(f"{command}: exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}")
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{command} raised {result.exception!r}"
        )
        assert result.exit_code in (0, 1)
        assert "Traceback" not in result.stdout + result.stderr
        if result.exit_code == 1:
            self.check_positions(result.stderr)
        assert not self.sentinel.exists(), "the recipe ran code"
        assert sorted(p.name for p in self.outside.iterdir()) == [], "a file appeared outside the work folder"
        made = {p for p in self.work.rglob("*") if p != self.recipe}
        allowed = {p for p in made if output is not None and (p == output or output in p.parents)}
        assert made == allowed, f"{command} wrote outside its output folder: {sorted(made - allowed)}"

    def check_positions(self, stderr: str) -> None:
        """Every error line is FILE:LINE:COL: ..., inside the file."""
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines, "exit status 1 without a message"
        prefix = re.compile(re.escape(str(self.recipe)) + r":(\d+):(\d+): \S")
        last_line = len(self.text.splitlines()) + 1
        for line in lines:
            m = prefix.match(line)
            assert m, f"an error without FILE:LINE:COL: {line!r}"
            assert 1 <= int(m[1]) <= last_line and 1 <= int(m[2]) <= len(self.text) + 1, line


def _cheap(recipe_path: Path) -> str | None:
    """Why running this valid recipe would be too slow for the test (None: it is cheap)."""
    try:
        recipe = load_recipe(recipe_path)
    except RecipeError:
        return "invalid"
    train = recipe.train
    if train is None:
        return None  # run refuses it at once
    if train.data != "digits" or train.model not in ("digits-mlp", "digits-cnn"):
        return "other model or data"
    if train.epochs > 2 or train.batch_size < 32 or train.grad_accum > 4:
        return "long training"
    numbers: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append(abs(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for modifier in recipe.modifiers:
        walk(modifier.model_dump())
    return "large numbers in a modifier" if any(n > 1000 for n in numbers) else None


@settings(max_examples=VALIDATE_EXAMPLES)
@given(name=st.sampled_from(sorted(RECIPES)), data=st.data())
def test_validate_never_tracebacks_and_positions_every_error(
    sandbox: Path, name: str, data: st.DataObject
) -> None:
    example = Example(sandbox, mutate(data, RECIPES[name]))
    result = example.invoke(["validate", str(example.recipe)])
    example.check(result, "validate")
    event(f"validate exit {result.exit_code}")
    if result.exit_code == 0:
        assert result.stdout.startswith(f"ok: {example.recipe} ")


@settings(max_examples=RUN_EXAMPLES)
@given(name=st.sampled_from(sorted(RUN_RECIPES)), data=st.data())
def test_run_never_tracebacks_and_writes_only_its_output(
    sandbox: Path, name: str, data: st.DataObject, monkeypatch_module: pytest.MonkeyPatch
) -> None:
    gentle = data.draw(st.integers(0, 3), label="gentle") > 0  # mostly mutants that may still run
    text = mutate(data, RUN_RECIPES[name], GENTLE, 2) if gentle else mutate(data, RUN_RECIPES[name])
    example = Example(sandbox, text)
    checked = example.invoke(["validate", str(example.recipe)])
    example.check(checked, "validate")
    if checked.exit_code == 0:
        why = _cheap(example.recipe)
        if why is not None:
            event(f"run skipped: {why}")
            return
    output = example.work / "out"
    result = example.invoke(["run", str(example.recipe), "--output", str(output), "--no-progress"])
    example.check(result, "run", output)
    event(f"run exit {result.exit_code} after validate exit {checked.exit_code}")
    if checked.exit_code == 1:
        assert result.exit_code == 1, "run accepted a recipe that validate refused"
    if result.exit_code == 0:
        assert result.stdout.rstrip().splitlines()[-1].startswith("done: ")


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    """Runs use the PyTorch path of M-FAC (no kernel build: minutes of CPU, files in ~/.cache) and draw
    no plots (two thirds of a one-epoch run; they read metrics.csv, not the recipe)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSOR_KERNELS", "off")
        patch.setattr("compressor.engine.summary.plot_run", lambda *args, **kwargs: None)
        yield patch
