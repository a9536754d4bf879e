"""``train.device``: the schema's spellings, how each resolves with and without (mocked) GPUs, in one
process and under torchrun, and the messages when the device asked for is not there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor import engine
from compressor.cli import app
from compressor.core.distributed import Context
from compressor.engine import RunError, resolve_device
from compressor.recipe import RecipeError, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_magnitude.yaml"
ONE = Context(0, 1, torch.device("cpu"), owns_group=False)
NCCL = Context(1, 2, torch.device("cuda", 1), owns_group=True)  # rank 1 of 2, joined with nccl
GLOO = Context(1, 2, torch.device("cpu"), owns_group=True)


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make torch see ``count`` GPUs (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _recipe(device: str | None) -> str:
    """The digits recipe with ``device:`` (or without it) in its train section."""
    text = RECIPE.read_text()
    if device is None:
        return text
    return text.replace("train:\n", f"train:\n  device: {device}\n", 1)


@pytest.mark.parametrize(
    ("count", "spec", "expected"),
    [
        (0, "auto", "cpu"),
        (0, "cpu", "cpu"),
        (2, "auto", "cuda:0"),
        (2, "cpu", "cpu"),
        (2, "cuda", "cuda:0"),
        (2, "cuda:1", "cuda:1"),
    ],
)
def test_one_process_resolves_as_the_recipe_says(monkeypatch, count, spec, expected):
    _gpus(monkeypatch, count)
    assert resolve_device(spec, ONE) == torch.device(expected)


@pytest.mark.parametrize(
    ("count", "spec", "message"),
    [
        (0, "cuda", r"'cuda' asks for a GPU, but .*; use auto or cpu"),
        (0, "cuda:0", r"'cuda:0' asks for a GPU, but"),
        (2, "cuda:2", r"'cuda:2': there is no such GPU; torch sees 2 \(cuda:0 to cuda:1\)"),
        (2, "cuda:99999999999999999999", r"'cuda:99999999999999999999' is not a device torch can use: "),
    ],
)
def test_one_process_refuses_a_missing_gpu(monkeypatch, count, spec, message):
    _gpus(monkeypatch, count)
    with pytest.raises(RunError, match=message):
        resolve_device(spec, ONE)


@pytest.mark.parametrize(
    ("ctx", "spec", "expected"),
    [
        (NCCL, "auto", "cuda:1"),
        (NCCL, "cuda", "cuda:1"),
        (GLOO, "auto", "cpu"),
        (GLOO, "cpu", "cpu"),
    ],
)
def test_under_torchrun_each_rank_keeps_its_own_device(monkeypatch, ctx, spec, expected):
    _gpus(monkeypatch, 2 if ctx is NCCL else 0)
    assert resolve_device(spec, ctx) == torch.device(expected)


@pytest.mark.parametrize(
    ("ctx", "spec", "message"),
    [
        (NCCL, "cuda:0", r"names one GPU, but under torchrun each rank computes on its own"),
        (NCCL, "cpu", r"joined with nccl.*CUDA_VISIBLE_DEVICES= torchrun"),
        (GLOO, "cuda", r"'cuda' asks for a GPU per rank, but"),
    ],
)
def test_under_torchrun_a_device_the_ranks_cannot_use_is_refused(monkeypatch, ctx, spec, message):
    _gpus(monkeypatch, 2 if ctx is NCCL else 0)
    with pytest.raises(RunError, match=message):
        resolve_device(spec, ctx)


def test_schema_default_and_spellings():
    assert parse_recipe(_recipe(None), file="r.yaml").train.device == "auto"
    for spec in ("auto", "cpu", "cuda", "cuda:3"):
        assert parse_recipe(_recipe(spec), file="r.yaml").train.device == spec


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:x", '"cuda:"', "mps", "0", "cuda:1.5"])
def test_unknown_spelling_is_a_recipe_error_at_its_line(spec):
    with pytest.raises(RecipeError) as info:
        parse_recipe(_recipe(spec), file="r.yaml")
    text = str(info.value)
    assert "r.yaml:8:11: train.device:" in text, text
    assert "expected auto, cpu, cuda or cuda:N" in text


def test_run_computes_on_the_gpu_when_there_is_one(monkeypatch, tmp_path):
    """With a (mocked) GPU and no device in the recipe, the model goes to cuda:0 (stopped right there)."""
    _gpus(monkeypatch, 1)
    moved: list[torch.device] = []

    class StopError(Exception):
        pass

    def to(self, *args, **kwargs):
        moved.append(torch.device(args[0]))
        raise StopError

    monkeypatch.setattr(torch.nn.Module, "to", to)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_recipe(None))
    with pytest.raises(StopError):
        engine.run(recipe, tmp_path / "out", progress=False)
    assert moved == [torch.device("cuda", 0)]


def test_cli_names_the_recipe_line_when_cuda_is_absent(monkeypatch, tmp_path):
    _gpus(monkeypatch, 0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_recipe("cuda"))
    result = CliRunner().invoke(app, ["run", str(recipe), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{recipe}:8:11: train.device: 'cuda' asks for a GPU, but" in result.output
    assert "Traceback" not in result.output
