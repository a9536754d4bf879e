"""``train.max_grad_norm``: the step's gradient clipped to a global L2 norm before the optimizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.core.checkpoint import load_checkpoint
from compressor.engine.loop import clip_gradients
from compressor.engine.report import read_metrics

RECIPE = """version: 1
train:
  model: digits-mlp
  data: digits
  epochs: 1
  batch_size: {batch}
  seed: 3
  optimizer: {{type: SGD, lr: {lr}}}
  {clip}
modifiers: []
"""


def _model_with_grads(gen: torch.Generator, scale: float) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3, bias=False))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale
    model[0].bias.grad = None  # a parameter without a gradient is left out, not an error
    return model


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_clip_gradients_scales_to_the_global_norm_by_hand(gen: torch.Generator, scale: float) -> None:
    model = _model_with_grads(gen, scale)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in before))
    limit = 0.5
    returned = clip_gradients(model, limit)
    assert returned == pytest.approx(norm, rel=1e-6)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    if norm > limit:  # every gradient scaled by the same factor, to the limit's norm
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a.double(), b.double() * (limit / norm), rtol=1e-5, atol=0)
        assert math.sqrt(sum(float((g.double() ** 2).sum()) for g in after)) == pytest.approx(limit, rel=1e-5)
    else:
        assert all(torch.equal(a, b) for b, a in zip(before, after, strict=True))


def test_no_limit_leaves_gradients_alone(gen: torch.Generator) -> None:
    model = _model_with_grads(gen, 1e3)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    before = [g.clone() for g in grads]
    assert clip_gradients(model, None) is None
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))


def _run(tmp_path: Path, name: str, lr: float, clip: str, batch: int = 4096) -> tuple[dict, list]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(batch=batch, lr=lr, clip=clip))
    out = tmp_path / name
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return load_checkpoint(out / "checkpoint.pt")["model"], read_metrics(out / "metrics.csv")


def _grad_norms(rows: list) -> list[float]:
    return [r["value"] for r in rows if r["split"] == "train" and r["name"] == "grad_norm"]


def test_a_clipped_step_is_the_unclipped_step_at_the_scaled_rate(tmp_path: Path) -> None:
    """One full-batch SGD step (no momentum): clipping to c is the plain step with lr * c / |g|,
    |g| the logged norm; a limit above |g| changes nothing, bit for bit, and logs the same |g|."""
    lr, limit = 0.5, 0.05
    clipped, rows = _run(tmp_path, "clipped", lr, f"max_grad_norm: {limit}")
    (norm,) = _grad_norms(rows)
    assert norm > limit  # else the case would not test clipping
    scaled, plain_rows = _run(tmp_path, "scaled", lr * limit / norm, "")
    assert _grad_norms(plain_rows) == []  # nothing logged without a limit
    for name in clipped:
        torch.testing.assert_close(clipped[name], scaled[name], rtol=1e-5, atol=1e-7)
    loose, loose_rows = _run(tmp_path, "loose", lr, f"max_grad_norm: {norm * 2}")
    plain, _ = _run(tmp_path, "plain", lr, "")
    assert all(torch.equal(loose[name], plain[name]) for name in plain)
    assert _grad_norms(loose_rows) == pytest.approx([norm], rel=1e-6)
    assert any(not torch.equal(clipped[name], plain[name]) for name in plain)


@pytest.mark.parametrize("value", ["0", "-1", ".inf", "abc"])
def test_a_bad_limit_is_a_positioned_recipe_error(tmp_path: Path, value: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(RECIPE.format(batch=64, lr=0.1, clip=f"max_grad_norm: {value}"))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1
    assert f"{recipe}:9:18: train.max_grad_norm" in result.output
    assert "Traceback" not in result.output
