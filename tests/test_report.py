"""Run outputs: metrics.csv, summary.json, plots and the progress line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compressor.engine import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_metrics_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.csv"
    with report.MetricsLog(path) as log:
        log.log(1, 0.25, "train", "loss", 2.5)
        log.log_many(4, 1.0, "eval", {"loss": 1 / 3, "accuracy": 0.875})
        log.log(5, None, "train", "sparsity", 0.5)
        log.log(6, 1.5, "train", "loss", math.nan)
    rows = report.read_metrics(path)
    assert path.read_text().splitlines()[0] == "step,epoch,split,name,value"
    assert rows[:3] == [
        {"step": 1, "epoch": 0.25, "split": "train", "name": "loss", "value": 2.5},
        {"step": 4, "epoch": 1.0, "split": "eval", "name": "loss", "value": 1 / 3},  # exact round trip
        {"step": 4, "epoch": 1.0, "split": "eval", "name": "accuracy", "value": 0.875},
    ]
    assert rows[3]["epoch"] is None and math.isnan(rows[4]["value"])
    # reopening appends without a second header
    with report.MetricsLog(path) as log:
        log.log(7, 1.75, "eval", "loss", 0.25)
        assert len(log.rows()) == 6 and log.rows()[-1]["value"] == 0.25


def test_metrics_truncate_for_resume_and_reset(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    with report.MetricsLog(path) as log:
        for step in range(1, 6):
            log.log(step, step / 5, "train", "loss", 1.0 / step)
        log.truncate_after(3)
        log.log(4, 0.8, "train", "loss", 9.0)  # the handle still appends after the rewrite
        assert [(r["step"], r["value"]) for r in log.rows()] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 9.0)]
        assert [r["epoch"] for r in log.rows()] == [0.2, 0.4, 0.6, 0.8]
        log.reset()
        assert log.rows() == []
        log.log(1, 0.2, "train", "loss", 2.0)
    assert path.read_text().splitlines() == ["step,epoch,split,name,value", "1,0.2,train,loss,2.0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_metrics_survive_a_crash(tmp_path: Path) -> None:
    """Rows are readable while the writer is still open (a crashed process never closes it)."""
    path = tmp_path / "metrics.csv"
    log = report.MetricsLog(path)
    for step in range(3):
        log.log(step, step / 10, "train", "loss", 1.0 / (step + 1))
    assert [r["step"] for r in report.read_metrics(path)] == [0, 1, 2]
    with open(path, "a") as f:  # a torn last line, as if killed mid-write
        f.write("3,,tra")
    assert len(report.read_metrics(path)) == 3
    log.close()


def test_summary_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "summary.json"
    report.write_summary(path, {"accuracy": 0.9, "out": tmp_path, "layers": {"b", "a"}})
    assert json.loads(path.read_text()) == {"accuracy": 0.9, "out": str(tmp_path), "layers": ["a", "b"]}

    def fail(obj: object, f: object, **kwargs: object) -> None:
        f.write('{"accuracy": 0.')  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(report.json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        report.write_summary(path, {"accuracy": 0.1})
    assert json.loads(path.read_text())["accuracy"] == 0.9  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left


def test_plots_are_png_and_skip_absent_metrics(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    with report.MetricsLog(csv) as log:
        for step in range(0, 50, 5):
            log.log_many(step, step / 10, "train", {"loss": 2.0 / (step + 1), "sparsity": step / 100})
            log.log(step, step / 10, "eval", "loss", 2.5 / (step + 1))
    written = report.plot_run(csv, tmp_path / "plots", {"conv1.weight": 0.5, "fc1.weight": 0.9})
    assert [p.name for p in written] == ["loss.png", "sparsity.png", "layer_sparsity.png"]
    for p in written:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not (tmp_path / "plots" / "accuracy.png").exists()
    assert [p.name for p in report.plot_run(csv, tmp_path / "p2", None)] == ["loss.png", "sparsity.png"]


def test_progress_disabled_prints_only_epoch_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with report.Progress(total_steps=20, enabled=False) as bar:
        for step in range(1, 11):
            bar.update(step, loss=0.5)
        assert capsys.readouterr().out == ""
        line = bar.epoch_done(1, 2, {"loss": 0.1234, "accuracy": 0.971}, sparsity=0.45)
    out = capsys.readouterr().out
    assert out == line + "\n"
    assert out.startswith("epoch 1/2  loss 0.1234  acc 97.1%  sparsity 45.0%  ")
    assert out.rstrip().endswith(" steps/s")


def test_progress_not_a_terminal_shows_no_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """Enabled, but stdout is captured (not a terminal): still only the epoch line."""
    with report.Progress(total_steps=None, enabled=True) as bar:
        assert not bar.live
        bar.update(5, loss=1.0)
        bar.epoch_done(1, 1, {"loss": 1.0})
    assert capsys.readouterr().out.startswith("epoch 1/1  loss 1  ")
