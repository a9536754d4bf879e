"""bench/quality.py's bookkeeping: parts saved per seed set merge into one report with the right numbers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (bench/ is scripts, not a package)


def _shot(loss: float, accuracy: float) -> dict[str, float]:
    return {"loss": loss, "accuracy": accuracy}


def test_seed_sets_merge_and_tables_show_means_and_paired_wins(tmp_path):
    sparsities = [0.5, 0.9]
    by_seed = {
        0: {("dense", 0.0): 0.10, ("magnitude", 0.5): 0.11, ("magnitude", 0.9): 0.20, ("M-FAC x", 0.5): 0.12},
        1: {("dense", 0.0): 0.30, ("magnitude", 0.5): 0.31, ("magnitude", 0.9): 0.40, ("M-FAC x", 0.5): 0.30},
    }
    for seed, losses in by_seed.items():
        rows = {key: [_shot(loss, 0.9)] for key, loss in losses.items()}
        rows[("M-FAC x", 0.9)] = [_shot(losses[("magnitude", 0.9)] - 0.05, 0.95)]  # better on both seeds
        quality.save_part(tmp_path, "a", [seed], rows)
    parts = quality.load_parts(tmp_path)
    assert parts["a"]["seeds"] == [0, 1]
    assert [r["loss"] for r in parts["a"]["rows"][("magnitude", 0.9)]] == [0.20, 0.40]

    text = quality.write_report(tmp_path, parts, sparsities)
    assert (tmp_path / "quality.md").read_text() == text
    assert (tmp_path / "quality_oneshot.png").read_bytes()[:4] == b"\x89PNG"
    lines = text.splitlines()
    loss_table = lines[lines.index(next(line for line in lines if "test loss" in line)) :]
    loss_row = next(line for line in loss_table if line.startswith("| magnitude |"))
    assert "0.2100 ± 0.1414" in loss_row  # 50%: mean of 0.11 and 0.31
    assert "0.3000 ± 0.1414" in loss_row  # 90%: mean 0.30, sample std of (0.20, 0.40)
    paired = next(line for line in lines if line.startswith("| M-FAC x |") and "/2)" in line)
    assert "(1/2)" in paired  # 50%: better than magnitude on seed 1 only
    assert "0.0500 ± 0.0000 (2/2)" in paired  # 90%: better by 0.05 on both seeds
    assert "Not run (time): m=256 R=16." in text


def test_the_optimizer_sweep_picks_the_lowest_held_out_loss(tmp_path):
    runs = [
        ({"lr": 0.1}, {"loss": 0.5, "held_out_loss": 0.30, "accuracy": 0.9, "step_s": 1.0, "iter_s": 1.0}),
        ({"lr": 0.01}, {"loss": 0.9, "held_out_loss": 0.20, "accuracy": 0.8, "step_s": 1.0, "iter_s": 1.0}),
    ]
    quality.save_part(tmp_path, "d", [0], {"SGD": runs})
    sweep = quality.load_parts(tmp_path)["d"]["rows"]
    assert quality.best_settings(sweep) == {"SGD": {"lr": 0.01}}  # by held-out loss, not train loss
    defaults = quality.best_settings({})
    assert defaults["M-FAC m=512"] == quality.REFERENCE_MFAC
    table = "\n".join(quality._sweep_table(sweep))
    assert "| SGD | lr 0.01 (chosen) |" in table and "| SGD | lr 0.1 |" in table
