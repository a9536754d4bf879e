"""bench/quantization.py's report: paired differences by seed, the quality and latency tables,
and the peak-memory sampler."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load

report = load("quantization_report")

RAW = {
    "rows": {
        "dense float32": {"0": {"recall@1": 0.5, "mrr@10": 0.6, "mean_cosine": 1.0, "file_bytes": 100}},
        "4-bit g128 RTN": {"0": {"recall@1": 0.4, "mrr@10": 0.5, "mean_cosine": 0.9, "file_bytes": 15}},
        "4-bit g128 GPTQ-act": {
            "0": {"recall@1": 0.46, "mrr@10": 0.55, "mean_cosine": 0.95, "file_bytes": 15, "quantize_s": 10},
            "1": {"recall@1": 0.44, "mrr@10": 0.55, "mean_cosine": 0.95, "file_bytes": 15, "quantize_s": 12},
        },
        "4-bit g128 GPTQ-Fisher": {
            "0": {"recall@1": 0.45, "file_bytes": 15},
            "1": {"recall@1": 0.47, "file_bytes": 15},
        },
    },
    "latency": {"dense float32|32|1": 2.0, "4-bit g128 RTN|32|1": 1.0},
}


def test_paired_differences_follow_the_seeds() -> None:
    assert report.paired(RAW["rows"], "4-bit g128 GPTQ-Fisher", "4-bit g128 GPTQ-act") == pytest.approx(
        [-0.01, 0.03]
    )
    # a row without seeds pairs its one value with every seed of the other
    assert report.paired(RAW["rows"], "4-bit g128 GPTQ-act", "4-bit g128 RTN") == pytest.approx([0.06, 0.04])


def test_tables_show_shares_of_dense_and_speed_ups(tmp_path) -> None:
    quality = "\n".join(report.quality_table(RAW))
    assert "| 4-bit g128 GPTQ-act | 2 | 0.4500 ± 0.0141 | 90.0 |" in quality
    assert "| 0.0 | 15.0 | 11 ± 1 |" in quality  # MB (of 15 bytes), % of the dense file, seconds
    pairs = "\n".join(report.pairs_table(RAW))
    assert "4-bit g128 GPTQ-act minus 4-bit g128 RTN | 2 | +0.0500 | 0.0141 | +3.5 |" in pairs
    latency = "\n".join(report.latency_table(RAW))
    assert "1000.0 (2.00x)" in latency
    path = tmp_path / "quantization.json"
    path.write_text(json.dumps(RAW))
    text = report.write_report(path, tmp_path)
    assert (tmp_path / "quantization.md").read_text() == text and (tmp_path / "quantization.png").exists()
