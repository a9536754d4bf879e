"""Every recipe in recipes/ validates against its own model, and the fast ones run end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli import app
from compressor.core.params import normalize
from compressor.data import load_data
from compressor.models import build_model
from compressor.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"mnist_mfac_gradual.yaml", "mnist_mfac_oneshot.yaml", "mnist_gmp_gradual.yaml"} <= names
    assert "mnist_mfac_optimizer.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_against_its_model(path, tmp_path):
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0
    recipe = load_recipe(path)
    data = load_data(recipe.train.data)
    model_name = recipe.train.model
    if model_name.startswith("hf:") and importlib.util.find_spec(model_name[3:]) is None:
        # the MiniLM package (the minilm extra) is not in CI's install: a tiny BERT sentence
        # encoder has the same parameter names (auto_model.encoder.layer.N...), two layers of them
        from hf_tiny import sentence_encoder_dir

        model_name = f"hf:{sentence_encoder_dir(tmp_path / 'tiny', ['def f(x): return x'])}"
    model = build_model(model_name, data.input_shape, data.num_classes)
    names = [normalize(n) for n, _ in model.named_parameters()]
    load_recipe(path, param_names=names)  # every pattern selects something of the model


def test_digits_mfac_oneshot_runs(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", str(ROOT / "recipes" / "digits_mfac_oneshot.yaml"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"]["global"] == pytest.approx(0.8, abs=1e-3)
    assert summary["eval"]["accuracy"] > 0.85
