"""Schema and cross-field rules: each bad recipe gives the exact ``FILE:LINE:COL: path: message`` line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from compressor.core import registry
from compressor.core.modifier import Modifier
from compressor.recipe import RecipeError, load_recipe


class NMStructure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int
    m: int


class FakePruning(Modifier):
    """Has the fields the cross-field rules look for (duck typing), without compressor.sparsity.pruner."""

    prunes: ClassVar[bool] = True
    params: list[str] = Field(min_length=1)
    init_sparsity: float = 0.0
    final_sparsity: float | None = None
    structure: Literal["unstructured"] | NMStructure = "unstructured"

    def parameter_patterns(self) -> list[str]:
        return list(self.params)


class FakeTuning(Modifier):
    scale: float = Field(1.0, gt=0)


@pytest.fixture(autouse=True)
def modifiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    registry.register("modifiers", "FakePruning", FakePruning)
    registry.register("modifiers", "FakeTuning", FakeTuning)
    yield
    registry.unregister("modifiers", "FakePruning")
    registry.unregister("modifiers", "FakeTuning")


def errors(text: str, **kwargs: object) -> list[str]:
    """The error lines of recipe ``text`` written to r.yaml (in the test's tmp_path)."""
    Path("r.yaml").write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe("r.yaml", **kwargs)  # type: ignore[arg-type]
    return str(err.value).splitlines()


TRAIN = """\
train:
  model: digits-cnn
  data: digits
  epochs: 4
  optimizer: {type: SGD, lr: 0.1}
"""


def test_good_recipe_loads() -> None:
    Path("r.yaml").write_text("version: 1\n" + TRAIN + "modifiers:\n  - type: FakeTuning\n")
    recipe = load_recipe("r.yaml")
    assert recipe.train is not None and recipe.train.batch_size == 64
    assert isinstance(recipe.modifiers[0], FakeTuning)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "version: 2\nmodifiers: []\n",
            "r.yaml:1:10: version: unsupported recipe version 2; this compressor reads version 1",
        ),
        ("modifiers: []\n", "r.yaml:1:1: version: missing required key 'version'"),
        ("version: 1\n", "r.yaml:1:1: modifiers: missing required key 'modifiers'"),
        (
            "version: 1\nmodifiers: []\nmodifers: []\n",
            "r.yaml:3:1: modifers: unknown key 'modifers'; did you mean 'modifiers'? "
            "(allowed: version, variables, train, modifiers)",
        ),
        ("version: 1\nmodifiers: {}\n", "r.yaml:2:12: modifiers: Input should be a valid list, got {}"),
        ("", "r.yaml:1:1: <root>: expected a mapping with 'version' and 'modifiers', got an empty file"),
        ("- 1\n", "r.yaml:1:1: <root>: expected a mapping with 'version' and 'modifiers', got a list"),
        (
            "version: 1\nvariables: {x: [1]}\nmodifiers: []\n",
            "r.yaml:2:16: variables.x: a variable must be a number, a string or true/false, got [1]",
        ),
        (
            "version: 1\nvariables: {_x: 1}\nmodifiers: []\n",
            "r.yaml:2:13: variables._x: invalid variable name '_x': use letters, digits and _, "
            "starting with a letter",
        ),
        (
            "version: 1\nvariables: {big: .inf}\nmodifiers: []\n",
            "r.yaml:2:18: variables.big: non-finite number (inf) is not allowed",
        ),
    ],
)
def test_top_level_rules(text: str, line: str) -> None:
    assert errors(text) == [line]


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            ("  epochs: 4\n", "  epochs: -1\n"),
            "r.yaml:5:11: train.epochs: Input should be greater than or equal to 0, got -1",
        ),
        (("  epochs: 4\n", "  epochs: four\n"), "r.yaml:5:11: train.epochs: expected a number, got 'four'"),
        (
            ("  epochs: 4\n", "  epochs: 4\n  batch_size: 0\n"),
            "r.yaml:6:15: train.batch_size: Input should be greater than or equal to 1, got 0",
        ),
        (
            ("  epochs: 4\n", "  epochs: 4\n  batch_size: true\n"),
            "r.yaml:6:15: train.batch_size: expected a number, got True",
        ),
        (
            ("  epochs: 4\n", "  epochs: 4\n  grad_accum: 0\n"),
            "r.yaml:6:15: train.grad_accum: Input should be greater than or equal to 1, got 0",
        ),
        (
            ("  epochs: 4\n", "  epochs: 4\n  eval_every: -1\n"),
            "r.yaml:6:15: train.eval_every: Input should be greater than or equal to 1, got -1",
        ),
        (
            ("  epochs: 4\n", "  epochs: 4\n  eval_every: 0.5\n"),
            "r.yaml:6:15: train.eval_every: Input should be a valid integer, "
            "got a number with a fractional part",
        ),
        (
            ("  epochs: 4\n", "  epochs: 4\n  seed: 1.5\n"),
            "r.yaml:6:9: train.seed: Input should be a valid integer, got a number with a fractional part",
        ),
        (  # seeds torch.manual_seed refuses (it takes -2**63 to 2**64 - 1): a traceback at run time before
            ("  epochs: 4\n", "  epochs: 4\n  seed: 18446744073709551616\n"),
            "r.yaml:6:9: train.seed: Input should be less than or equal to 18446744073709551615, "
            "got 18446744073709551616",
        ),
        (  # a batch size DataLoader cannot take (itertools.islice stops at sys.maxsize)
            ("  epochs: 4\n", "  epochs: 4\n  batch_size: 9223372036854775808\n"),
            "r.yaml:6:15: train.batch_size: Input should be less than or equal to 9223372036854775807, "
            "got 9223372036854775808",
        ),
        (
            ("  data: digits\n", "  data: 7\n"),
            "r.yaml:4:9: train.data: Input should be a valid string, got 7",
        ),
        (("  data: digits\n", ""), "r.yaml:2:1: train.data: missing required key 'data'"),
        (
            ("  epochs: 4\n", "  epochs: 4\n  epoch: 4\n"),
            "r.yaml:6:3: train.epoch: unknown key 'epoch'; did you mean 'epochs'? "
            "(allowed: model, data, epochs, batch_size, seed, optimizer, loss, task, task_options, "
            "grad_accum, max_grad_norm, eval_every, eval_at_start, device, init_from)",
        ),
        (("lr: 0.1}", "lr: 0}"), "r.yaml:6:30: train.optimizer.lr: Input should be greater than 0, got 0"),
        (
            ("{type: SGD, lr: 0.1}", "{type: SGD}"),
            "r.yaml:6:3: train.optimizer.lr: missing required key 'lr'",
        ),
    ],
)
def test_train_rules(change: tuple[str, str], line: str) -> None:
    text = "version: 1\n" + TRAIN.replace(*change) + "modifiers: []\n"
    assert errors(text) == [line]


def test_optimizer_kwargs_are_free_at_load_time() -> None:
    text = "version: 1\n" + TRAIN.replace("lr: 0.1}", "lr: 0.1, momentum: 0.9, betas: [0.9, 0.99]}")
    Path("r.yaml").write_text(text + "modifiers: []\n")
    optimizer = load_recipe("r.yaml").train.optimizer  # type: ignore[union-attr]
    assert optimizer.kwargs == {"momentum": 0.9, "betas": [0.9, 0.99]}
    assert optimizer.model_dump() == {"type": "SGD", "lr": 0.1, "momentum": 0.9, "betas": [0.9, 0.99]}


MODIFIER = """\
version: 1
modifiers:
  - type: FakePruning
    params: [fc1.weight]
    start: 1
    end: 3
    final_sparsity: 0.5
"""


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (
            ("type: FakePruning", "type: FakePrunning"),
            "r.yaml:3:11: modifiers[0].type: unknown modifier 'FakePrunning'; did you mean 'FakePruning'",
        ),
        (
            ("    params: [fc1.weight]\n", "    params: [fc1.weight]\n    bogus: 1\n"),
            "r.yaml:5:5: modifiers[0].bogus: unknown key 'bogus' "
            "(allowed: type, start, end, params, init_sparsity, final_sparsity, structure)",
        ),
        (
            ("    start: 1\n", "    start: -1\n"),
            "r.yaml:5:12: modifiers[0].start: expected an epoch (a number >= 0) or {step: N}, got -1",
        ),
        (
            ("    start: 1\n", "    start: {step: -5}\n"),
            "r.yaml:5:12: modifiers[0].start: step must be an integer >= 0, got -5",
        ),
        (
            ("    params: [fc1.weight]\n", "    params: []\n"),
            "r.yaml:4:13: modifiers[0].params: "
            "List should have at least 1 item after validation, not 0, got []",
        ),
        (
            ("    params: [fc1.weight]\n", ""),
            "r.yaml:3:5: modifiers[0].params: missing required key 'params'",
        ),
        (
            ("    end: 3\n", "    end: 0.5\n"),
            "r.yaml:6:10: modifiers[0].end: end (epoch 0.5) is before start (epoch 1)",
        ),
        (
            ("    start: 1\n    end: 3\n", "    start: {step: 9}\n    end: {step: 2}\n"),
            "r.yaml:6:10: modifiers[0].end: end (step 2) is before start (step 9)",
        ),
        (
            ("final_sparsity: 0.5", "final_sparsity: 1.0"),
            "r.yaml:7:21: modifiers[0].final_sparsity: final_sparsity must be in [0, 1), got 1",
        ),
        (
            ("final_sparsity: 0.5", "final_sparsity: -0.1"),
            "r.yaml:7:21: modifiers[0].final_sparsity: final_sparsity must be in [0, 1), got -0.1",
        ),
        (
            ("    end: 3\n", "    end: 3\n    init_sparsity: -0.2\n"),
            "r.yaml:7:20: modifiers[0].init_sparsity: init_sparsity must be >= 0, got -0.2",
        ),
        (
            ("    end: 3\n", "    end: 3\n    init_sparsity: 0.7\n"),
            "r.yaml:7:20: modifiers[0].init_sparsity: init_sparsity (0.7) must be <= final_sparsity (0.5)",
        ),
        (("    end: 3\n", "    end: 3\n    structure: {n: 2, m: 4}\n"), None),
        (
            ("    end: 3\n", "    end: 3\n    structure: {n: 1, m: 4}\n"),
            "r.yaml:7:16: modifiers[0].structure: "
            "final_sparsity must be 1 - N/M = 0.75 for 1:4 structure (within 0.001), got 0.5",
        ),
        (
            ("    end: 3\n", "    end: 3\n    structure: {n: 4, m: 4}\n"),
            "r.yaml:7:16: modifiers[0].structure: "
            "N:M structure needs 0 < N < M, got 4:4 (it keeps every weight: a sparsity of 0)",
        ),
        (
            ("    end: 3\n", "    end: 3\n    structure: {n: 0, m: 4}\n"),
            "r.yaml:7:16: modifiers[0].structure: N:M structure needs 0 < N < M, got 0:4",
        ),
    ],
)
def test_modifier_rules(change: tuple[str, str], line: str | None) -> None:
    text = MODIFIER.replace(*change)
    if line is None:
        Path("r.yaml").write_text(text)
        load_recipe("r.yaml")
        return
    got = errors(text)
    if "unknown modifier" in line:  # the registry also lists every installed modifier after this
        assert len(got) == 1 and got[0].startswith(line) and "(known: " in got[0]
    else:
        assert got == [line]


def test_missing_type_and_non_mapping_items() -> None:
    got = errors("version: 1\nmodifiers:\n  - {start: 1}\n  - 3\n")
    assert (
        got[0].startswith("r.yaml:3:5: modifiers[0].type: missing 'type' (known: ")
        and "FakePruning" in got[0]
    )
    assert got[1] == "r.yaml:4:5: modifiers[1]: expected a mapping with a 'type' key, got 3"


OVERLAP = """\
version: 1
modifiers:
  - type: FakePruning
    params: [fc1.weight, "conv*"]
    start: 0
    end: 4
    final_sparsity: 0.5
  - type: FakePruning
    params: [fc2.weight, "conv*"]
    start: 3
    final_sparsity: 0.5
"""


def test_pruners_overlapping_on_one_pattern() -> None:
    assert errors(OVERLAP) == [
        "r.yaml:9:26: modifiers[1].params[1]: pattern 'conv*' also pruned by modifiers[0] "
        "(FakePruning, epoch 0 to epoch 4), overlapping epoch 3 to end of training"
    ]


def test_pruners_overlapping_on_one_parameter_with_param_names() -> None:
    text = OVERLAP.replace('"conv*"]\n    start: 3', '"re:conv1\\\\..*"]\n    start: 3')
    names = ["conv1.weight", "conv1.bias", "fc1.weight", "fc2.weight"]
    assert errors(text, param_names=names) == [
        "r.yaml:9:26: modifiers[1].params[1]: 'conv1.bias', 'conv1.weight' also pruned by modifiers[0] "
        "(FakePruning, epoch 0 to epoch 4), overlapping epoch 3 to end of training"
    ]


def test_disjoint_windows_and_non_pruners_do_not_clash() -> None:
    Path("r.yaml").write_text(OVERLAP.replace("start: 3", "start: 4"))
    load_recipe("r.yaml")
    Path("r.yaml").write_text(OVERLAP.replace("end: 4", "end: 1").replace("start: 3", "start: {step: 2}"))
    load_recipe("r.yaml")  # epochs against steps: left to the session, which knows steps per epoch


def test_unmatched_pattern_names_the_closest_parameters() -> None:
    got = errors(
        MODIFIER.replace("[fc1.weight]", "[fc1.weight, fc9.weight]"),
        param_names=["fc1.weight", "fc1.bias", "conv.weight"],
    )
    assert len(got) == 1
    assert got[0].startswith("r.yaml:4:26: modifiers[0].params[1]: ")
    assert all(name in got[0] for name in ("fc9.weight", "fc1.weight", "fc1.bias", "conv.weight"))


def test_all_errors_are_reported_together_in_file_order() -> None:
    text = (
        "version: 1\n"
        "variables: {epochs: 4}\n"
        + TRAIN.replace("epochs: 4\n", "epochs: ${epoch}\n").replace("lr: 0.1}", "lr: -1}")
        + "color: red\n"
        "modifiers:\n"
        "  - type: FakePruning\n"
        "    params: [fc1.weight]\n"
        "    start: 3\n"
        "    end: 1\n"
        "    final_sparsity: 1.5\n"
        "    oops: 1\n"
        "  - type: FakeTuning\n"
        "    scale: 0\n"
    )
    assert errors(text) == [
        "r.yaml:6:11: train.epochs: unknown variable 'epoch'; did you mean 'epochs'? (variables: epochs)",
        "r.yaml:7:30: train.optimizer.lr: Input should be greater than 0, got -1",
        "r.yaml:8:1: color: unknown key 'color' (allowed: version, variables, train, modifiers)",
        # the Modifier base refuses end < start while validating the item, so the loader's own
        # range check of final_sparsity (this fake modifier has no bounds on it) does not run
        "r.yaml:13:10: modifiers[0].end: end (epoch 1) is before start (epoch 3)",
        "r.yaml:15:5: modifiers[0].oops: unknown key 'oops' "
        "(allowed: type, start, end, params, init_sparsity, final_sparsity, structure)",
        "r.yaml:17:12: modifiers[1].scale: Input should be greater than 0, got 0",
    ]
