"""A recipe's "package.module:factory" runs only with the opt-in of the person running it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli import app
from compressor.engine import run
from compressor.recipe import RecipeError, load_recipe

CLI = str(Path(sys.executable).with_name("compressor"))

#: A user module whose import leaves a mark, so a test can tell whether it was imported.
USER_MODULE = """
import pathlib

pathlib.Path(__file__).with_name("imported.txt").write_text("imported")

from compressor.models import build_model


def build(input_shape, num_classes):
    return build_model("digits-mlp", input_shape, num_classes)


def broken(input_shape, num_classes):
    raise RuntimeError("no weights for this model")
"""

RECIPE = """\
version: 1
train:
  data: digits
  model: "{model}"
  epochs: 1
  batch_size: 512
  optimizer: {{type: SGD, lr: 0.1}}
modifiers: []
"""
#: Line and column of the model value in RECIPE.
MODEL_AT = "4:10"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a fresh importable module in tmp_path (its import writes imported.txt there)."""
    name = f"recipe_factories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _recipe(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(model=model))
    return path


def test_a_factory_is_refused_without_opt_in_before_anything_is_imported(
    tmp_path: Path, user_module: str
) -> None:
    recipe = _recipe(tmp_path, f"{user_module}:build")
    with pytest.raises(RecipeError) as err:
        run(recipe, tmp_path / "out", progress=False)
    message = str(err.value)
    assert message.startswith(f"{recipe}:{MODEL_AT}: train.model: the recipe asks to import module ")
    assert f"--allow-import {user_module} (or --trust-recipe-code)" in message
    assert f"allow_imports=['{user_module}']" in message
    assert user_module not in sys.modules and not (tmp_path / "imported.txt").exists()
    assert not (tmp_path / "out").exists()


def test_os_system_is_refused_by_the_cli_with_its_position(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "os:system")
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(
        f"{recipe}:{MODEL_AT}: train.model: the recipe asks to import module 'os'"
    )
    assert "--allow-import os" in result.output


def test_an_allowed_factory_trains(tmp_path: Path, user_module: str) -> None:
    from compressor.builders import build_train

    recipe = _recipe(tmp_path, f"{user_module}:build")
    summary = run(recipe, tmp_path / "out", progress=False, allow_imports=[user_module])
    assert (tmp_path / "imported.txt").exists() and summary["steps"] == 3  # 1438 samples, batches of 512
    for allowed in (True, user_module, f"{user_module}:build"):
        assert build_train(load_recipe(recipe), allowed)[1].fc1.in_features == 64


def test_allow_rules() -> None:
    from compressor.recipe.imports import is_allowed

    assert is_allowed("mypkg.models:build", ["mypkg"]) and is_allowed("mypkg.models:build", "mypkg.models")
    assert is_allowed("mypkg.models:build", ["mypkg.models:build"]) and is_allowed("os:system", True)
    assert not is_allowed("mypkg.models:build", ["mypkg.models:other", "mypk", "models"])
    assert not is_allowed("mypkg:build", "mypkg.models") and not is_allowed("os:system", False)
    assert not is_allowed("os:system", ()) and not is_allowed("os:system", "o")  # a name, not its letters


def test_a_factory_that_raises_is_a_clean_cli_error(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "os:system")
    args = [CLI, "run", str(recipe), "-o", str(tmp_path / "out"), "--allow-import", "os"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(
        f"{recipe}:{MODEL_AT}: train.model: model factory 'os:system' raised TypeError: "
    )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{mod}:broken", "model factory '{mod}:broken' raised RuntimeError: no weights for this model"),
        ("{mod}:missing", "model '{mod}:missing': module '{mod}' has no attribute 'missing'"),
        (
            "{mod}_nope:build",
            "model '{mod}_nope:build': cannot import module '{mod}_nope' (ModuleNotFoundError",
        ),
        ("digits-mpl", "unknown model 'digits-mpl'; did you mean 'digits-mlp'?"),
    ],
)
def test_factory_failures_point_at_the_field(
    tmp_path: Path, user_module: str, model: str, message: str
) -> None:
    recipe = _recipe(tmp_path, model.format(mod=user_module))
    result = CliRunner().invoke(app, ["run", str(recipe), "--trust-recipe-code", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"{recipe}:{MODEL_AT}: train.model: {message.format(mod=user_module)}")


def test_validate_lists_the_imports_without_importing(tmp_path: Path, user_module: str) -> None:
    from compressor.recipe import factory_imports

    recipe = _recipe(tmp_path, f"{user_module}:build")
    recipe.write_text(recipe.read_text().replace("data: digits", f"data: {user_module}.data:load"))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"ok: {recipe} (0 modifiers)",
        f"imports: {user_module}.data:load (train.data, line 3)",
        f"imports: {user_module}:build (train.model, line 4)",
        f"to run it, allow them: --allow-import {user_module}.data --allow-import {user_module} "
        f"(or --trust-recipe-code); in Python allow_imports=['{user_module}.data', '{user_module}']",
    ]
    listed = [f"imports: {item}" for item in factory_imports(load_recipe(recipe))]
    assert listed == result.output.splitlines()[1:3]
    assert user_module not in sys.modules and not (tmp_path / "imported.txt").exists()
    plain = CliRunner().invoke(app, ["validate", str(_recipe(tmp_path, "digits-mlp"))])
    assert plain.exit_code == 0 and "imports" not in plain.output


@pytest.mark.parametrize("model", ["os:", ":system", "my-pkg:build", "os:system()"])
def test_malformed_factory_strings_are_load_errors(tmp_path: Path, model: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, model))
    assert str(err.value) == (
        f"{tmp_path / 'r.yaml'}:{MODEL_AT}: train.model: {model!r} is not a built-in name or "
        "'package.module:factory', e.g. 'mypkg.models:build'"
    )


def test_export_needs_the_same_opt_in(tmp_path: Path, user_module: str) -> None:
    recipe = _recipe(tmp_path, f"{user_module}:build")
    run(recipe, tmp_path / "out", progress=False, allow_imports=[user_module])
    checkpoint = tmp_path / "out" / "checkpoint.pt"
    sys.modules.pop(user_module)
    (tmp_path / "imported.txt").unlink()
    refused = CliRunner().invoke(app, ["export", str(checkpoint)])
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit), refused.output
    assert refused.output.startswith(f"{checkpoint} (recipe):4:10: train.model: the recipe asks to import")
    assert user_module not in sys.modules and not (tmp_path / "imported.txt").exists()
    allowed = CliRunner().invoke(app, ["export", str(checkpoint), "--allow-import", user_module])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "out" / "checkpoint.onnx").is_file()


def test_a_malformed_factory_string_is_reported_with_the_other_errors(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "os:")
    path.write_text(path.read_text().replace("epochs: 1", "epochs: -1"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert [(i.line, i.path) for i in err.value.issues] == [(4, "train.model"), (5, "train.epochs")]
