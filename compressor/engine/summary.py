"""The end of a run: summary.json (final and dense metrics, sparsity, size, time) and the plots."""

from __future__ import annotations

from typing import Any

from compressor.engine.files import RunFiles
from compressor.engine.report import MetricsLog, plot_run, write_summary
from compressor.lifecycle.session import Session


def write_run_summary(
    files: RunFiles, session: Session, log: Any, final: dict[str, float], wall: float, world: int
) -> dict[str, Any]:
    summary = run_summary(session, log, final, wall)
    if world > 1:
        summary["world_size"] = world
    write_summary(files.summary, summary)
    plot_run(files.metrics, files.root, summary["sparsity"]["per_parameter"])
    return summary


def run_summary(session: Session, log: MetricsLog, final: dict[str, float], wall: float) -> dict[str, Any]:
    """Final eval, the dense model's eval (the last one before any pruning starts), sparsity, size, time."""
    compressing = [m for m in session.modifiers if m.prunes or m.restructures]
    first = min((session.window(m)[0] for m in compressing), default=None)
    dense = dense_eval(log.rows(), first)
    return {
        "eval": {**{k: v for k, v in final.items() if k != "loss"}, "loss": final["loss"]},
        "dense_eval": dense,
        "dense_eval_accuracy": dense.get("accuracy") if dense else None,
        "sparsity": {"global": session.masks.global_sparsity(), "per_parameter": session.masks.sparsities()},
        "parameters": sum(p.numel() for p in session.model.parameters()),
        "steps": session.step,
        "epochs": session.epoch,
        "wall_time_s": wall,
    }


def dense_eval(rows: list[dict[str, Any]], first: int | None) -> dict[str, float] | None:
    """The metrics of the last evaluation at or before step ``first`` (the first compressing step;
    None: any), sparsity left out; None when there was none."""
    evals = [r for r in rows if r["split"] == "eval" and (first is None or r["step"] <= first)]
    if not evals:
        return None
    last = evals[-1]["step"]
    return {r["name"]: r["value"] for r in evals if r["step"] == last and r["name"] not in ("sparsity",)}
