"""The report of ``bench/quantization.py``: tables and a plot from bench/results/quantization.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

SETTINGS = [(1, 1), (1, 2), (32, 1), (32, 2)]
#: (row, baseline) pairs compared seed by seed (rows without seeds pair their one value with each).
PAIRS = [
    ("int8 per channel GPTQ-act", "int8 per channel RTN"),
    ("int8 per channel GPTQ-Fisher", "int8 per channel RTN"),
    ("int8 per channel GPTQ-Fisher", "int8 per channel GPTQ-act"),
    ("4-bit g128 GPTQ-act", "4-bit g128 RTN"),
    ("4-bit g128 GPTQ-Fisher", "4-bit g128 RTN"),
    ("4-bit g128 GPTQ-Fisher", "4-bit g128 GPTQ-act"),
    ("4-bit g32 GPTQ-act", "4-bit g32 RTN"),
    ("4-bit g32 GPTQ-Fisher", "4-bit g32 RTN"),
    ("4-bit g32 GPTQ-Fisher", "4-bit g32 GPTQ-act"),
    ("int8 per channel GPTQ-act", "quantize_dynamic int8 per channel"),
]


#: The order of the tables: rows by the first of these their label starts with, then by method
#: (``METHODS``: the first of these the label holds), then by label.
ORDER = ("dense", "quantize_dynamic", "int8", "4-bit g128", "4-bit g32", "50%", "structured")
METHODS = ("full range", "RTN", "GPTQ-act", "GPTQ-Fisher")


def ordered(rows: dict[str, Any]) -> list[str]:
    """The row labels in table order (``ORDER``, ``METHODS``)."""

    def key(label: str) -> tuple[int, int, str]:
        group = next((i for i, p in enumerate(ORDER) if label.startswith(p)), len(ORDER))
        method = next((i for i, m in enumerate(METHODS) if m in label), len(METHODS))
        return (group, method, label)

    return sorted(rows, key=key)


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 4) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _values(rows: dict[str, Any], label: str, key: str) -> list[float]:
    return [float(r[key]) for r in rows.get(label, {}).values() if key in r]


def paired(rows: dict[str, Any], a: str, b: str, key: str = "recall@1") -> list[float]:
    """a - b seed by seed; a row without seeds (one value) pairs with every seed of the other."""
    ra, rb = rows.get(a, {}), rows.get(b, {})
    seeds = sorted(set(ra) | set(rb), key=int) if len(ra) > 1 or len(rb) > 1 else sorted(ra)
    out = []
    for s in seeds:
        x = ra.get(s) or (next(iter(ra.values())) if len(ra) == 1 else None)
        y = rb.get(s) or (next(iter(rb.values())) if len(rb) == 1 else None)
        if x is not None and y is not None and key in x and key in y:
            out.append(float(x[key]) - float(y[key]))
    return out


def quality_table(raw: dict[str, Any]) -> list[str]:
    rows = raw.get("rows", {})
    dense = rows.get("dense float32", {}).get("0", {})
    dense_recall, dense_bytes = dense.get("recall@1"), dense.get("file_bytes")
    lines = [
        "| row | seeds | recall@1 | % of dense | MRR@10 | cosine to dense | file MB | % of dense file "
        "| quantize s | peak extra MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ordered(rows):
        seeds = rows[label]
        recall = _values(rows, label, "recall@1")
        share = f"{100 * statistics.fmean(recall) / dense_recall:.1f}" if recall and dense_recall else "-"
        size = _values(rows, label, "file_bytes")
        mb = f"{statistics.fmean(size) / 1e6:.1f}" if size else "-"
        pct = f"{100 * statistics.fmean(size) / dense_bytes:.1f}" if size and dense_bytes else "-"
        took = _values(rows, label, "quantize_s") or _values(rows, label, "run_s")
        peak = _values(rows, label, "quantize_peak_mb") or _values(rows, label, "run_peak_mb")
        mrr, cosine = _values(rows, label, "mrr@10"), _values(rows, label, "mean_cosine")
        lines.append(
            f"| {label} | {len(seeds)} | {_mean_std(recall)} | {share} | {_mean_std(mrr)} "
            f"| {_mean_std(cosine)} | {mb} | {pct} | {_mean_std(took, digits=0)} "
            f"| {_mean_std(peak, digits=0)} |"
        )
    return lines


def pairs_table(raw: dict[str, Any]) -> list[str]:
    rows = raw.get("rows", {})
    lines = [
        "| comparison (recall@1, paired by seed) | n | mean difference | std | mean / std |",
        "|---|---|---|---|---|",
    ]
    for a, b in PAIRS:
        diffs = paired(rows, a, b)
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        std = f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-"
        ratio = (
            f"{mean / statistics.stdev(diffs):+.1f}" if len(diffs) > 1 and statistics.stdev(diffs) else "-"
        )
        lines.append(f"| {a} minus {b} | {len(diffs)} | {mean:+.4f} | {std} | {ratio} |")
    return lines


def latency_table(raw: dict[str, Any], key: str = "latency") -> list[str]:
    """Median ms per call and the speed-up over the dense file, per row and (batch, threads)."""
    times = raw.get(key, {})
    if not times:
        return []
    labels = ordered(dict.fromkeys(k.split("|")[0] for k in times))
    head = " | ".join(f"b{b} t{t} ms (speed-up)" for b, t in SETTINGS)
    lines = [f"| row | {head} |", "|---|" + "---|" * len(SETTINGS)]
    for label in labels:
        cells = []
        for b, t in SETTINGS:
            s = times.get(f"{label}|{b}|{t}")
            base = times.get(f"dense float32|{b}|{t}")
            cells.append(
                "-" if s is None else f"{1000 * s:.1f} ({base / s:.2f}x)" if base else f"{1000 * s:.1f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(raw: dict[str, Any], path: Path) -> None:
    """File size and batch-32 single-thread latency against recall@1, one point per row."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, times = raw.get("rows", {}), raw.get("latency", {})
    fig = Figure(figsize=(12, 5))
    FigureCanvasAgg(fig)
    for i, (what, unit) in enumerate(
        (("file_bytes", "file MB"), ("latency", "latency, batch 32, 1 thread (ms)"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        for label in ordered(rows):
            recall = _values(rows, label, "recall@1")
            if not recall:
                continue
            if what == "file_bytes":
                x = statistics.fmean(_values(rows, label, "file_bytes")) / 1e6
            elif f"{label}|32|1" in times:
                x = 1000 * times[f"{label}|32|1"]
            else:
                continue
            index = ordered(rows).index(label)
            marker = (
                "*"
                if label.startswith("dense")
                else "x"
                if "quantize_dynamic" in label
                else "os^Dv"[next((i for i, p in enumerate(ORDER[2:]) if label.startswith(p)), 0) % 5]
            )
            color = colormaps["tab20"](index % 20)
            ax.plot([x], [statistics.fmean(recall)], marker, color=color, label=label, markersize=7)
        ax.set_xlabel(unit)
        ax.set_ylabel("test recall@1 (onnxruntime)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("all-MiniLM-L6-v2 code search, deployed in onnxruntime: size and speed against recall@1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(path: Path, results: Path) -> str:
    raw = json.loads(path.read_text()) if path.exists() else {}
    lines = [
        "# Quantization of MiniLM for onnxruntime (`python bench/quantization.py`)",
        "",
        f"Machine: {raw.get('machine', 'not timed yet')}. Metrics of the exported ONNX files in onnxruntime "
        "on the 1,215 test pairs; mean ± std over calibration seeds where the row depends on them.",
        "",
        *quality_table(raw),
        "",
        *pairs_table(raw),
        "",
        *latency_table(raw),
    ]
    if raw.get("latency_focus"):
        lines += [
            "",
            "The rows the acceptance compares, timed again alone (11 interleaved rounds; the table above "
            "has 3, and its identical int8 graphs spread by about 10%):",
            "",
            *latency_table(raw, "latency_focus"),
        ]
    if raw.get("rows"):
        plot(raw, results / "quantization.png")
        lines += ["", "![size and speed against recall@1](quantization.png)"]
    text = "\n".join(lines) + "\n"
    (results / "quantization.md").write_text(text)
    return text
