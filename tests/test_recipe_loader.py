"""Loading end to end: --set overrides, resolved YAML round trip, the validate command, optimizers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import Field

from compressor.core import registry
from compressor.core.modifier import Modifier, StepPosition
from compressor.recipe import RecipeError, load_recipe, parse_recipe, resolved_yaml, validate_command
from compressor.recipe.loader import optimizer_issues


class Gradual(Modifier):
    prunes: ClassVar[bool] = True
    params: list[str] = Field(min_length=1)
    init_sparsity: float = 0.0
    final_sparsity: float

    def parameter_patterns(self) -> list[str]:
        return list(self.params)


@pytest.fixture(autouse=True)
def modifiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    registry.register("modifiers", "Gradual", Gradual)
    yield
    registry.unregister("modifiers", "Gradual")


RECIPE = """\
version: 1
variables:
  epochs: 12
  target: 0.9
  lr: 1e-5
  tag: run-${epochs}e
train:
  model: digits-cnn
  data: digits
  epochs: ${epochs}
  optimizer: {type: SGD, lr: "${lr}", momentum: 0.9}
modifiers:
  - type: Gradual
    params: ["re:.*conv.*weight", fc1.weight]
    start: 1
    end: ${epochs - 3}
    init_sparsity: ${round(target / 2, 2)}
    final_sparsity: ${target}
  - type: Gradual
    params: [fc2.weight]
    start: {step: 0}
    end: {step: 50}
    final_sparsity: .5
"""


def test_variables_and_expressions_are_substituted() -> None:
    recipe = parse_recipe(RECIPE, "r.yaml")
    assert recipe.variables == {"epochs": 12, "target": 0.9, "lr": 1e-5, "tag": "run-12e"}
    assert recipe.train is not None and recipe.train.epochs == 12.0
    assert recipe.train.optimizer.lr == 1e-5 and isinstance(recipe.train.optimizer.lr, float)
    first, second = recipe.modifiers
    assert isinstance(first, Gradual) and (first.start, first.end) == (1.0, 9.0)
    assert (first.init_sparsity, first.final_sparsity) == (0.45, 0.9)
    assert second.start == StepPosition(step=0) and second.final_sparsity == 0.5  # type: ignore[attr-defined]


def test_set_overrides_a_variable_before_substitution() -> None:
    recipe = parse_recipe(RECIPE, "r.yaml", overrides={"epochs": "20", "target": "0.8"})
    assert recipe.variables["epochs"] == 20 and recipe.variables["tag"] == "run-20e"
    assert recipe.modifiers[0].end == 17.0 and recipe.modifiers[0].final_sparsity == 0.8  # type: ignore[attr-defined]


def test_set_unknown_name_is_an_error_at_variables() -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(RECIPE, "r.yaml", overrides={"epoch": "3"})
    assert str(err.value) == (
        "r.yaml:2:1: variables.epoch: --set epoch=3: unknown variable 'epoch'; did you mean 'epochs'? "
        "(variables: epochs, target, lr, tag)"
    )


def test_set_value_that_breaks_a_rule_is_reported_where_it_is_used() -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(RECIPE, "r.yaml", overrides={"target": "1.5", "lr": "[1, 2]"})
    assert str(err.value).splitlines() == [
        "r.yaml:5:3: variables.lr: --set lr=[1, 2]: expected a number, a string or true/false",
        "r.yaml:18:21: modifiers[0].final_sparsity: final_sparsity must be in [0, 1), got 1.5",
    ]


def test_refused_expression_in_a_recipe_runs_nothing(tmp_path: Path) -> None:
    text = RECIPE.replace("${target}\n", "${open('pwned', 'w')}\n").replace(
        "${epochs - 3}", "${epochs.__class__}"
    )
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    assert str(err.value).splitlines() == [
        "r.yaml:16:10: modifiers[0].end: attribute access ('.__class__') is not allowed",
        "r.yaml:18:21: modifiers[0].final_sparsity: calling 'open' is not allowed; "
        "functions: min, max, round, abs, int, float",
    ]
    assert not (tmp_path / "pwned").exists()


def test_resolved_yaml_round_trips() -> None:
    recipe = parse_recipe(RECIPE.replace("tag: run-", "tag: $${literal}-"), "r.yaml")
    text = resolved_yaml(recipe)
    assert "${" not in text.replace("$${", "")
    again = parse_recipe(text, "recipe.yaml")
    assert again.model_dump() == recipe.model_dump()
    assert again.variables["tag"] == "${literal}-12e"
    assert resolved_yaml(again) == text


def test_load_recipe_reads_a_file_and_never_parses_its_argument_as_yaml() -> None:
    Path("r.yaml").write_text(RECIPE)
    assert len(load_recipe("r.yaml").modifiers) == 2
    with pytest.raises(RecipeError) as err:
        load_recipe("version: 1\nmodifiers: []\n")
    assert str(err.value).endswith("<root>: recipe file not found; to parse YAML text use parse_recipe()")


def test_validate_command(capsys: pytest.CaptureFixture[str]) -> None:
    Path("r.yaml").write_text(RECIPE)
    assert validate_command("r.yaml", ["epochs=6"]) == 0
    assert capsys.readouterr().out == "ok: r.yaml (2 modifiers)\n"
    assert validate_command(Path("r.yaml"), {"epochs": "6"}) == 0  # the CLI passes a parsed mapping
    assert capsys.readouterr().out == "ok: r.yaml (2 modifiers)\n"
    assert validate_command("r.yaml", ["epochs=3", "bad"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "r.yaml:1:1: <root>: --set 'bad': expected name=value",
        "r.yaml:16:10: modifiers[0].end: end (epoch 0) is before start (epoch 1)",
    ]


def test_one_set_parser_for_run_validate_and_python() -> None:
    from typer.testing import CliRunner

    from compressor.cli import app
    from compressor.recipe import SetError, parse_sets

    assert parse_sets([" epochs =6", "tag=a=b", "empty="]) == {"epochs": "6", "tag": "a=b", "empty": ""}
    with pytest.raises(SetError) as err:
        parse_sets(["epochs=3", "bad", "=1"])
    assert str(err.value) == "--set 'bad': expected name=value\n--set '=1': expected name=value"
    assert err.value.parsed == {"epochs": "3"}
    Path("r.yaml").write_text(RECIPE)
    run = CliRunner().invoke(app, ["run", "r.yaml", "--set", "bad", "-o", "out"])
    assert run.exit_code == 1 and run.output == "--set 'bad': expected name=value\n"
    validate = CliRunner().invoke(app, ["validate", "r.yaml", "--set", "epochs=3", "--set", "bad"])
    assert validate.exit_code == 1 and validate.output.splitlines() == [  # every problem, as from Python
        "r.yaml:1:1: <root>: --set 'bad': expected name=value",
        "r.yaml:16:10: modifiers[0].end: end (epoch 0) is before start (epoch 1)",
    ]


def test_unknown_optimizer_kwargs_are_caught_by_validate_and_build(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Path("r.yaml").write_text(RECIPE.replace("momentum: 0.9", "momentom: 0.9"))
    recipe = load_recipe("r.yaml")  # free at load time
    assert validate_command("r.yaml") == 1
    assert capsys.readouterr().err.startswith(
        "r.yaml:11:39: train.optimizer.momentom: "
        "optimizer SGD has no argument 'momentom'; did you mean 'momentum'?"
    )
    with pytest.raises(ValueError, match="has no argument 'momentom'"):
        recipe.train.optimizer.build([torch.nn.Parameter(torch.zeros(2))])  # type: ignore[union-attr]


def test_optimizer_is_built_with_its_kwargs() -> None:
    recipe = parse_recipe(RECIPE)
    optimizer = recipe.train.optimizer.build([torch.nn.Parameter(torch.zeros(2))])  # type: ignore[union-attr]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["lr"] == 1e-5
    issue = optimizer_issues(parse_recipe(RECIPE.replace("type: SGD", "type: Adamw")))[0]
    assert (issue.line, issue.col, issue.path) == (11, 21, "train.optimizer.type")
    assert issue.message.startswith("unknown optimizer 'Adamw'; did you mean 'AdamW'")


def test_variable_errors_point_at_the_variable() -> None:
    text = RECIPE.replace("target: 0.9", "target: ${loop}\n  loop: ${target}")
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    assert str(err.value) == "r.yaml:4:11: variables.target: variable cycle: target -> loop -> target"
