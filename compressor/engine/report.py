"""What a run writes and shows: metrics.csv, summary.json, PNG plots and a progress bar.

Metric conventions (what ``plot_run`` looks for in metrics.csv):

    name      split            value
    loss      train | eval     mean cross-entropy (nats)
    accuracy  train | eval     fraction correct in [0, 1]
    sparsity  (any)            global fraction of zero weights among the pruned parameters, in [0, 1]

matplotlib is imported inside ``plot_run`` (Agg canvas, no pyplot state), so importing this module
stays light.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypedDict

import rich.progress
from rich.console import Console

from compressor.core.atomic import atomic_write

COLUMNS = ("step", "epoch", "split", "name", "value")
LOSS, ACCURACY, SPARSITY = "loss", "accuracy", "sparsity"


class MetricRow(TypedDict):
    """One row of metrics.csv; epoch is None where the writer gave none."""

    step: int
    epoch: float | None
    split: str
    name: str
    value: float


# ---------------------------------------------------------------- metrics.csv


class MetricsLog:
    """Appends long-format rows (step, epoch, split, name, value) to a CSV file.

    Every row is flushed to the OS as it is written, so a crash of the process loses no row written
    before it. Opening an existing file appends to it (the header is written once).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file: IO[str] = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)
            self._file.flush()

    def log(self, step: int, epoch: float | None, split: str, name: str, value: float) -> None:
        """Append one row and flush it; epoch may be fractional (step / steps_per_epoch) or None."""
        self.log_many(step, epoch, split, {name: value})

    def log_many(self, step: int, epoch: float | None, split: str, values: Mapping[str, float]) -> None:
        """Append one row per (name, value) sharing step, epoch and split; one flush."""
        ep = "" if epoch is None else repr(float(epoch))
        for name, value in values.items():
            self._writer.writerow((int(step), ep, split, name, repr(float(value))))
        self._file.flush()

    def rows(self) -> list[MetricRow]:
        """Every row written so far (also by other writers of the same file), in order."""
        return read_metrics(self.path)

    def reset(self) -> None:
        """Drop every row (a fresh run in an old folder); the header stays."""
        self.truncate_after(-1)

    def truncate_after(self, step: int, rows: int | None = None) -> None:
        """Keep what the log held when a checkpoint was saved (resuming from it): its first ``rows``
        rows, the count the checkpoint recorded, or, for a checkpoint without one, the rows with
        ``step <= step`` (which also keeps rows logged after the save at its step). Rewritten atomically."""
        kept = self.rows()
        keep = kept[:rows] if rows is not None else [r for r in kept if r["step"] <= step]
        self._file.close()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(COLUMNS)
        for r in keep:
            ep = "" if r["epoch"] is None else repr(r["epoch"])
            writer.writerow((r["step"], ep, r["split"], r["name"], repr(r["value"])))
        _atomic_write(self.path, buf.getvalue())
        self._open()

    def close(self) -> None:
        """Close the file (every row is already flushed)."""
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[MetricRow]:
    """Rows of a metrics.csv; a torn last line (crash mid-write) is skipped."""
    rows: list[MetricRow] = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            try:
                rows.append(
                    MetricRow(
                        step=int(rec["step"]),
                        epoch=float(rec["epoch"]) if rec["epoch"] else None,
                        split=rec["split"],
                        name=rec["name"],
                        value=float(rec["value"]),
                    )
                )
            except (TypeError, ValueError):
                continue
    return rows


# ---------------------------------------------------------------- summary.json


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> Path:
    """Write ``summary`` as JSON atomically: a temporary file in the same folder, fsync, os.replace.

    Readers see the old file or the new one, never a partial one; on failure no temporary is left.
    Paths become strings, numpy/torch scalars numbers, sets sorted lists.
    """
    return _atomic_write(path, lambda f: json.dump(summary, f, indent=2, default=_jsonable))


def _atomic_write(path: str | os.PathLike[str], content: str | Callable[[IO[str]], None]) -> Path:
    """Write ``content`` (text, or a function writing to the file, then a newline) atomically."""

    def write(handle: IO[str]) -> None:
        if isinstance(content, str):
            handle.write(content)
        else:
            content(handle)
            handle.write("\n")

    return atomic_write(path, write)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"summary value of type {type(obj).__name__} is not JSON serializable")


# ---------------------------------------------------------------- plots


def plot_run(
    metrics_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    layer_sparsity: dict[str, float] | None = None,
) -> list[Path]:
    """PNG plots of a run; a plot whose metric is absent is skipped. Returns the paths written.

    loss.png and accuracy.png: one line per split over optimizer steps; sparsity.png: global sparsity
    over steps; layer_sparsity.png: one horizontal bar per layer (fractions in [0, 1] shown as %).
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for row in read_metrics(metrics_csv):
        steps, values = series[row["name"]].setdefault(row["split"], ([], []))
        steps.append(row["step"])
        values.append(row["value"])

    written = []
    curves = [
        (LOSS, "loss.png", "Loss", "cross-entropy loss (nats)", 1.0),
        (ACCURACY, "accuracy.png", "Accuracy", "accuracy (%)", 100.0),
        (SPARSITY, "sparsity.png", "Global sparsity", "zero weights (% of pruned parameters)", 100.0),
    ]
    for name, file, title, ylabel, scale in curves:
        if name not in series:
            continue
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
        for split, (steps, values) in sorted(series[name].items()):
            ax.plot(steps, [v * scale for v in values], marker="." if len(steps) < 30 else None, label=split)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(title="split")
        written.append(_save(fig, out / file))

    if layer_sparsity:
        names = list(layer_sparsity)
        fig = Figure(figsize=(6.4, 1.2 + 0.3 * len(names)), layout="constrained")
        ax = fig.add_subplot()
        bars = ax.barh(names, [100.0 * layer_sparsity[n] for n in names], color="tab:blue", label="sparsity")
        ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
        ax.invert_yaxis()  # first layer on top
        ax.set_xlim(0, 110)
        ax.set(title="Sparsity per layer", xlabel="zero weights (% of the layer)", ylabel="parameter")
        ax.legend(loc="lower right")
        written.append(_save(fig, out / "layer_sparsity.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------- progress


class Progress:
    """A rich progress bar for training, shown only when enabled and stdout is a terminal.

    ``update(step, loss=..., acc=..., sparsity=...)`` sets the bar to ``step`` completed optimizer
    steps (acc and sparsity are fractions); ``total_steps`` None gives a bar without an end.
    ``epoch_done`` prints one line (unless ``quiet``), ``epoch 3/10  loss 0.123  acc 97.1%  sparsity 45.0%
    120 steps/s`` (steps/s over that epoch).
    """

    def __init__(
        self,
        total_steps: int | None,
        enabled: bool = True,
        stream: IO[str] | None = None,
        *,
        quiet: bool = False,
    ) -> None:
        self.total_steps = total_steps
        self.quiet = quiet  # no bar and no epoch lines (the ranks other than 0 of a distributed run)
        self._stream = stream
        self._console = Console(file=stream or sys.stdout)
        self.live = enabled and not quiet and self._console.is_terminal
        self._bar: rich.progress.Progress | None = None
        self._step: int | None = None
        self._epoch_mark: tuple[int | None, float] = (None, time.perf_counter())

    def __enter__(self) -> Progress:
        self._epoch_mark = (self._step, time.perf_counter())
        if self.live:
            self._bar = rich.progress.Progress(
                rich.progress.BarColumn(bar_width=20),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TextColumn("{task.fields[info]}"),
                rich.progress.TimeElapsedColumn(),
                rich.progress.TextColumn("eta"),
                rich.progress.TimeRemainingColumn(),
                console=self._console,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.total_steps, info="")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def update(self, step: int, **fields: float | None) -> None:
        """Show ``step`` completed steps and the given fields (loss, acc, sparsity, anything else)."""
        if self._epoch_mark[0] is None:  # first update (also when resuming): the clock ran from step - 1
            self._epoch_mark = (step - 1, self._epoch_mark[1])
        self._step = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=format_fields(fields, self._rate()))

    def epoch_done(
        self, epoch: int, epochs: int, metrics: Mapping[str, float | None], sparsity: float | None = None
    ) -> str:
        """Print and return the epoch's one-line summary (metrics: loss, accuracy, ...); restarts steps/s."""
        line = f"epoch {epoch}/{epochs}  {format_fields({**metrics, 'sparsity': sparsity}, self._rate())}"
        if self.quiet:
            pass
        elif self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self._stream or sys.stdout, flush=True)
        self._epoch_mark = (self._step, time.perf_counter())
        return line

    def _rate(self) -> float | None:
        """Steps per second since the epoch began; None before the first update."""
        (step0, t0), step = self._epoch_mark, self._step
        elapsed = time.perf_counter() - t0
        return (step - step0) / elapsed if step0 is not None and step is not None and step > step0 else None


LABELS = {"accuracy": "acc", "eval_loss": "eval loss", "eval_accuracy": "eval acc"}
PERCENT = {"acc", "accuracy", "eval_accuracy", "sparsity"}


def format_fields(fields: Mapping[str, float | None], steps_per_s: float | None = None) -> str:
    """``loss 0.123  acc 97.1%  sparsity 45.0%  120 steps/s``; acc and sparsity are fractions."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        label = LABELS.get(key, key)
        if key in PERCENT:
            parts.append(f"{label} {100 * value:.1f}%")
        else:
            parts.append(f"{label} {value:.4g}" if isinstance(value, float) else f"{label} {value}")
    if steps_per_s is not None and math.isfinite(steps_per_s):
        parts.append(f"{steps_per_s:.0f} steps/s" if steps_per_s >= 10 else f"{steps_per_s:.1f} steps/s")
    return "  ".join(parts)
