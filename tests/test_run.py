"""`compressor run` end to end on the embedded digits data: files, resume after SIGKILL, CLI errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.core.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "digits_magnitude.yaml"
CLI = str(Path(sys.executable).with_name("compressor"))

SLOW_MODEL = '''
import time
from compressor.models import build_model

def factory(input_shape, num_classes):
    """digits-mlp whose forward sleeps a little, so a run can be killed in the middle."""
    model = build_model("digits-mlp", input_shape, num_classes)
    inner = model.forward
    def forward(x):
        time.sleep(0.004)
        return inner(x)
    model.forward = forward
    return model
'''


def _masks(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)["model"]
    return {k: v for k, v in state.items() if k.endswith("_mask")}


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(RECIPE), "--output", str(out), "--set", "epochs=6"])
    assert result.exit_code == 0, result.output
    assert "global sparsity 80.0%" in result.output
    for name in ("checkpoint.pt", "recipe.yaml", "recipe.raw.yaml", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "accuracy.png", "sparsity.png", "layer_sparsity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"]["global"] == pytest.approx(0.8, abs=1e-3)
    assert set(summary["sparsity"]["per_parameter"]) == {"fc1.weight", "fc2.weight"}
    assert summary["eval"]["accuracy"] > 0.85 and summary["eval"]["loss"] > 0
    assert summary["wall_time_s"] > 0 and summary["steps"] == 6 * 23
    masks = _masks(out / "checkpoint.pt")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) / total == pytest.approx(0.8, abs=1e-3)
    assert "epochs: 6" in (out / "recipe.yaml").read_text()  # resolved, with the --set value
    assert "${epochs}" in (out / "recipe.raw.yaml").read_text()


def test_killed_run_resumes_to_identical_masks_and_metrics(tmp_path):
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.read_text().replace("model: digits-mlp", "model: slowmodel:factory"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [CLI, "run", str(recipe), "--no-progress", "--allow-import", "slowmodel"]
    done = subprocess.run([*args, "--output", str(whole)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    victim = subprocess.Popen([*args, "--output", str(cut)], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if (cut / "checkpoint.pt").exists() and load_checkpoint(cut / "checkpoint.pt")["epoch"] >= 4:
                break
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] < 10

    resumed = subprocess.run(
        [CLI, "run", "--resume", str(cut), "--no-progress", "--allow-import", "slowmodel"],
        env=env,
        capture_output=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = _masks(whole / "checkpoint.pt"), _masks(cut / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(whole / "metrics.csv") == _metrics(cut / "metrics.csv")
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((cut / "summary.json").read_text())
    assert sa["eval"] == sb["eval"] and sa["sparsity"] == sb["sparsity"]


def test_resume_refuses_a_different_recipe(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(RECIPE), "-o", str(out), "--set", "epochs=6"]).exit_code == 0
    changed = tmp_path / "changed.yaml"
    changed.write_text(RECIPE.read_text().replace("target: 0.8", "target: 0.7"))
    refused = runner.invoke(app, ["run", str(changed), "--resume", str(out)])
    assert refused.exit_code == 1 and "differs from the recipe of the run" in refused.output
    allowed = runner.invoke(app, ["run", str(changed), "--resume", str(out), "--allow-recipe-change"])
    assert allowed.exit_code == 0, allowed.output


def test_user_errors_exit_1_with_a_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("final_sparsity: ${target}", "final_sparsity: 1.5"))
    for args in (
        ["run", str(bad), "-o", str(tmp_path / "x")],
        ["validate", str(bad)],
        ["run", str(tmp_path / "missing.yaml")],
        ["run", "--resume", str(tmp_path / "nothing")],
        ["run", str(RECIPE), "--set", "nope=1", "-o", str(tmp_path / "y")],
        ["inspect", str(tmp_path / "missing.pt")],
    ):
        done = subprocess.run([CLI, *args], capture_output=True, text=True)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr and done.stderr.strip(), args
    out = subprocess.run([CLI, "validate", str(bad)], capture_output=True, text=True).stderr
    lines = bad.read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "final_sparsity" in text)
    col = lines[line - 1].index("1.5") + 1
    assert (
        out.strip()
        == f"{bad}:{line}:{col}: modifiers[0].final_sparsity: Input should be less than 1, got 1.5"
    )


def test_recipe_errors_found_only_by_run_name_their_line(tmp_path):
    """What validate cannot see (a window placed in steps, the optimizer's arguments unchecked by
    parsing, a missing train section) stops `run` before training, at FILE:LINE:COL (issue 26)."""
    text = RECIPE.read_text()
    cases = {  # name: (recipe, where the error points (the first line holding it), message)
        "window": (
            text.replace("start: 2", "start: {step: 1000}"),
            "${epochs - 3}",
            "modifiers[0].end: MagnitudePruning: end (epoch 3 = step 69) is before start (step 1000) "
            "at 23 steps per epoch",
        ),
        "kwargs": (
            text.replace("momentum: 0.9", "momentom: 0.9"),
            "momentom",
            "train.optimizer.momentom: optimizer SGD has no argument 'momentom'; did you mean 'momentum'? "
            "(accepts: lr, momentum, ",  # the rest depends on torch's version
        ),
        "train": (
            text[: text.index("train:")] + text[text.index("modifiers:") :],
            "version",  # the root mapping starts there
            "<root>: the recipe has no 'train' section, which `compressor run` needs",
        ),
    }
    for name, (recipe_text, token, message) in cases.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(recipe_text)
        out = tmp_path / name
        result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--set", "epochs=6"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), name
        line, held = next((i, t) for i, t in enumerate(recipe_text.splitlines(), 1) if token in t)
        (error,) = result.stderr.strip().splitlines()
        assert error.startswith(f"{recipe}:{line}:{held.index(token) + 1}: {message}"), name
        assert not (out / "checkpoint.pt").exists()


def test_extreme_but_valid_settings_run(tmp_path):
    """The largest seed and batch size the schema takes, and a window ending 1e11 steps after training
    (its update steps are not listed), run to the end (issue 26: tracebacks before)."""
    recipe = tmp_path / "extreme.yaml"
    recipe.write_text(
        RECIPE.read_text()
        .replace("seed: 0", "seed: 18446744073709551615")
        .replace("batch_size: 64", "batch_size: 9223372036854775807")
        .replace("start: 2", "start: 0")
        .replace("end: ${epochs - 3}", "end: {step: 100000000000}")
    )
    with pytest.warns(UserWarning, match="comes after the end of training"):
        result = CliRunner().invoke(
            app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--set", "epochs=1"]
        )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 1


def test_validate_and_inspect(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(RECIPE)])
    assert ok.exit_code == 0 and "ok:" in ok.output
    table = runner.invoke(app, ["inspect", str(RECIPE)])
    assert table.exit_code == 0 and "MagnitudePruning" in table.output and "80.0%" in table.output
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", str(RECIPE), "-o", str(out), "--set", "epochs=6"]).exit_code == 0
    report = runner.invoke(app, ["inspect", str(out / "checkpoint.pt")])
    assert report.exit_code == 0 and "fc1.weight" in report.output and "all weights" in report.output


STEP_RECIPE = """version: 1
train: {{model: digits-mlp, data: digits, epochs: 3, batch_size: 64, optimizer: {{type: SGD, lr: 0.1}}}}
modifiers:
  - type: MagnitudePruning
    params: ["fc1.weight"]
    start: {start}
    end: {end}
    final_sparsity: 0.8
"""


def test_inspect_places_step_positions_by_steps_per_epoch(tmp_path):
    """A recipe in steps needs --steps-per-epoch (else one positioned error, no traceback); with it,
    its table is the table of the same recipe in epochs (step / steps per epoch)."""
    steps, epochs = tmp_path / "steps.yaml", tmp_path / "epochs.yaml"
    steps.write_text(STEP_RECIPE.format(start="{step: 3}", end="{step: 23}"))
    epochs.write_text(STEP_RECIPE.format(start=0.3, end=2.3))
    runner = CliRunner()
    refused = runner.invoke(app, ["inspect", str(steps)])
    assert refused.exit_code == 1
    assert f"{steps}:6:12: modifiers[0].start: step 3" in refused.output
    assert "--steps-per-epoch" in refused.output
    assert "Traceback" not in refused.output
    env = {"COLUMNS": "200"}
    placed = runner.invoke(app, ["inspect", str(steps), "--steps-per-epoch", "10"], env=env)
    same = runner.invoke(app, ["inspect", str(epochs)], env=env)
    assert placed.exit_code == 0 == same.exit_code, placed.output
    rows = [line for line in placed.output.splitlines() if "%" in line]
    assert len(rows) == 4 and rows == [line for line in same.output.splitlines() if "%" in line]
    assert len({row.split()[-2] for row in rows}) == 4  # the schedule moves: a shifted position would show
    zero = runner.invoke(app, ["inspect", str(steps), "--steps-per-epoch", "0"])
    assert zero.exit_code == 2 and "steps-per-epoch" in zero.output


def test_damaged_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["run", str(RECIPE), "-o", str(out), "--set", "epochs=6"]).exit_code == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError):
        load_checkpoint(out / "checkpoint.pt")
    done = subprocess.run([CLI, "run", "--resume", str(out)], capture_output=True, text=True)
    assert done.returncode == 1 and "truncated or tampered" in done.stderr


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "accum.yaml"
    recipe.write_text(RECIPE.read_text().replace("  batch_size: 64\n", "  batch_size: 32\n  grad_accum: 2\n"))
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(out), "--set", "epochs=6"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 * 23  # 45 batches of 32 per epoch -> 23 optimizer steps
    assert summary["sparsity"]["global"] == pytest.approx(0.8, abs=1e-3)


GREEDY = '''
from typing import Literal
from compressor.core.modifier import Modifier

class Greedy(Modifier):
    """Claims to need a petabyte of gradients."""
    type: Literal["Greedy"] = "Greedy"
    needs_gradients = True
    params: list[str]
    def parameter_patterns(self):
        return self.params
    def gradient_bytes(self, num_params):
        return num_params * 2**40
'''


def test_memory_preflight_stops_before_training(tmp_path, monkeypatch):
    from compressor.core import registry
    from compressor.engine import run

    (tmp_path / "greedy.py").write_text(GREEDY)
    monkeypatch.syspath_prepend(str(tmp_path))
    from greedy import Greedy

    registry.register("modifiers", "Greedy", Greedy)
    try:
        recipe = tmp_path / "greedy.yaml"
        recipe.write_text(RECIPE.read_text() + "  - type: Greedy\n    params: [fc1.weight]\n")
        with pytest.raises(MemoryError, match=r"modifiers\[1\] \(Greedy\) over 8,192 weights needs about"):
            run(recipe, tmp_path / "run", progress=False)
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
    finally:
        registry.unregister("modifiers", "Greedy")


def test_eval_every_evaluates_on_its_epochs_and_after_the_last(tmp_path):
    text = RECIPE.read_text().replace("  batch_size: 64\n", "  batch_size: 64\n  eval_every: 2\n")
    assert "eval_every: 2" in text
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(
        app, ["run", str(recipe), "--output", str(tmp_path / "run"), "--set", "epochs=5"]
    )
    assert result.exit_code == 0, result.output
    rows = _metrics(tmp_path / "run" / "metrics.csv")
    evaluated = sorted({float(r["epoch"]) for r in rows if r["split"] == "eval" and r["name"] == "accuracy"})
    assert evaluated == [2.0, 4.0, 5.0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"]["accuracy"] == pytest.approx(
        next(
            float(r["value"])
            for r in rows
            if r["split"] == "eval" and r["name"] == "accuracy" and r["epoch"] == "5.0"
        )
    )
