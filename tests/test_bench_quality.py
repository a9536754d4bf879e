"""bench/quality.py's bookkeeping: parts saved per seed set merge into one report with the right numbers."""

from __future__ import annotations

from bench_scripts import load

quality = load("quality")


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


def test_damp_choices_are_the_lowest_held_out_loss(tmp_path):
    """Parts g and h: the structured damp with the lowest mean loss; M-FAC's averaged over sparsities."""
    g_rows = {
        "dense": [_shot(0.1, 0.9)],
        "magnitude": [_shot(0.5, 0.8)],
        "second_order damp=0.1": [_shot(0.14, 0.9), _shot(0.10, 0.9)],  # mean 0.12
        "second_order damp=1": [_shot(0.11, 0.9), _shot(0.12, 0.9)],  # mean 0.115: chosen
    }
    quality.save_part(tmp_path, "g", [0, 1], g_rows)
    h_rows = {"dense": [_shot(0.1, 0.9)]}
    for s in quality.DAMP_SPARSITIES:
        h_rows[f"magnitude {s:.0%}"] = [_shot(0.3, 0.9)]
        for damp, relative in quality.MFAC_DAMPS:
            loss = 0.2 if (damp, relative) == (0.03, True) else 0.25
            if (damp, relative) == (1e-5, False) and s == 0.9:
                loss = 0.12  # best at one sparsity only, worse on average
            h_rows[f"{quality._mfac_damp_label(damp, relative)} {s:.0%}"] = [_shot(loss, 0.9)]
    quality.save_part(tmp_path, "h", [0], h_rows)
    parts = quality.load_parts(tmp_path)
    assert quality.best_structured_damp(parts["g"]["rows"]) == 1.0
    assert quality.best_mfac_damp(parts["h"]["rows"]) == (0.03, True)
    text = quality.write_report(tmp_path, parts, [0.9])
    assert "| second_order damp=1 (chosen) |" in text
    assert "| M-FAC relative damp=0.03 (chosen) |" in text
