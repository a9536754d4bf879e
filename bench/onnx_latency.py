"""onnxruntime latency and accuracy of the dense, 90%-unstructured and 50%-channel mnist-cnn.

Run from the repository root::

    python bench/onnx_latency.py              # trains the three models (about 2-3 minutes), then times
    python bench/onnx_latency.py --reuse      # reuse the runs already in --out
    python bench/onnx_latency.py --prepare-only   # train and export only (time later, on a quiet machine)

Or time ONNX files exported already (the first is the baseline of the speed-ups), for example the
dense and the structured MiniLM sentence encoders at sequence length 128::

    python bench/onnx_latency.py --onnx dense=out/dense.onnx --onnx structured=out/s/checkpoint.onnx \
        --seq 128 --results bench/results/onnx_latency_minilm.md

Inputs are made from each graph's declared inputs: an int64 (batch, sequence) input is token ids
(5..99), or ones for a name with ``mask``, zeros for ``token_type``; a float input is standard
normal with the batch axis set and the other axes as declared.

Each model is trained by its recipe, exported with ``compressor export`` (verified against
onnxruntime), and timed in onnxruntime at batch 1 and 32 with 1 and 2 intra-op threads. The three
models are timed in interleaved rounds and each figure is a median, so a ratio compares numbers
taken in the same stretch of time on this shared machine. Ratios: dense latency / model latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.engine import run  # noqa: E402
from exporters.export import export_checkpoint  # noqa: E402

MODELS = {
    "dense": "mnist_dense.yaml",
    "90% unstructured (M-FAC)": "mnist_mfac_gradual.yaml",
    "50% channels (second order)": "mnist_channels_50.yaml",
}


def prepare(out: Path, reuse: bool) -> dict[str, dict]:
    """Train (unless reused) and export each model; returns name -> {onnx, summary, report}."""
    out.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, recipe in MODELS.items():
        folder = out / name.split()[0].replace("%", "")
        path = ROOT / "recipes" / recipe
        if not (reuse and (folder / "summary.json").is_file()):
            print(f"training {name} ({path.name}) ...", flush=True)
            run(path, folder, progress=False)
        summary = json.loads((folder / "summary.json").read_text())
        report = export_checkpoint(folder / "checkpoint.pt", folder / "model.onnx", batch="dynamic")
        models[name] = {"onnx": folder / "model.onnx", "summary": summary, "report": report}
    return models


def feed_for(session: Any, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Inputs for an onnxruntime ``session`` from its declared inputs (see the module doc)."""
    rng = np.random.default_rng(0)
    feed = {}
    for item in session.get_inputs():
        if item.type == "tensor(int64)":
            shape = (batch, seq)
            if "mask" in item.name:
                feed[item.name] = np.ones(shape, dtype=np.int64)
            elif "token_type" in item.name:
                feed[item.name] = np.zeros(shape, dtype=np.int64)
            else:
                feed[item.name] = rng.integers(5, 100, size=shape, dtype=np.int64)
        else:
            dims = [batch] + [d if isinstance(d, int) else seq for d in item.shape[1:]]
            feed[item.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def time_models(
    models: dict[str, dict], rounds: int, reps: int, seq: int = 128
) -> dict[tuple[str, int, int], float]:
    """Median seconds per inference call for each (model, batch, threads), rounds interleaved."""
    import onnxruntime as ort

    settings = [(b, t) for b in (1, 32) for t in (1, 2)]
    sessions = {}
    for name, info in models.items():
        for batch, threads in settings:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # no busy-waiting worker threads: an idle session's spinning pool would steal the cores
            # of the session being timed (the sessions are timed in interleaved rounds)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(info["onnx"]), options, providers=["CPUExecutionProvider"])
            feed = feed_for(session, batch, seq)
            session.run(None, feed)  # warm-up
            sessions[(name, batch, threads)] = (session, feed)
    samples: dict[tuple[str, int, int], list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, (session, feed) in sessions.items():
            began = time.perf_counter()
            for _ in range(reps):
                session.run(None, feed)
            samples[key].append((time.perf_counter() - began) / reps)
    return {key: statistics.median(values) for key, values in samples.items()}


def onnx_parameters(path: Path) -> int:
    """Entries of the graph's initializers (its weights)."""
    import onnx

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def files_table(models: dict[str, dict], times: dict[tuple[str, int, int], float], seq: int) -> str:
    """The table for ``--onnx`` files: parameters, bytes, latencies, speed-ups over the first."""
    base = next(iter(models))
    lines = [
        f"### onnxruntime latency at sequence length {seq} "
        "(median per call; b = batch, t = intra-op threads)",
        "",
        "| model | ONNX parameters | ONNX bytes | b1 t1 | b1 t2 | b32 t1 | b32 t2 | "
        "speed-up b1 t1 | speed-up b32 t1 | speed-up b32 t2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in models.items():
        cells = [f"{1e3 * times[(name, b, t)]:.3f} ms" for b in (1, 32) for t in (1, 2)]
        ups = [f"{times[(base, b, t)] / times[(name, b, t)]:.2f}x" for b, t in ((1, 1), (32, 1), (32, 2))]
        size = info["onnx"].stat().st_size
        lines.append(
            f"| {name} | {onnx_parameters(info['onnx']):,} | {size:,} | " + " | ".join(cells + ups) + " |"
        )
    return "\n".join(lines)


def table(models: dict[str, dict], times: dict[tuple[str, int, int], float]) -> str:
    lines = [
        "| model | test accuracy | parameters | ONNX bytes | "
        "b1 t1 | b1 t2 | b32 t1 | b32 t2 | speed-up b32 t1 | speed-up b32 t2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in models.items():
        cells = [f"{1e3 * times[(name, b, t)]:.3f} ms" for b in (1, 32) for t in (1, 2)]
        ups = [f"{times[('dense', 32, t)] / times[(name, 32, t)]:.2f}x" for t in (1, 2)]
        s = info["summary"]
        size = info["onnx"].stat().st_size
        lines.append(
            f"| {name} | {100 * s['eval']['accuracy']:.2f}% | {s.get('parameters', 0):,} | {size:,} | "
            + " | ".join(cells + ups)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runs" / "onnx")
    parser.add_argument("--reuse", action="store_true", help="reuse trained runs found in --out")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--prepare-only", action="store_true", help="train and export, do not time")
    parser.add_argument(
        "--onnx",
        action="append",
        metavar="LABEL=PATH",
        help="time this exported model instead of the mnist ones (repeat; the first is the baseline)",
    )
    parser.add_argument("--seq", type=int, default=128, help="sequence length of token inputs (--onnx)")
    parser.add_argument("--results", type=Path, help="--onnx: also write the table to this file")
    args = parser.parse_args()
    if args.onnx:
        files = {}
        for item in args.onnx:
            label, sep, path = item.partition("=")
            if not sep or not Path(path).is_file():
                parser.error(f"--onnx {item!r}: expected LABEL=PATH of an existing ONNX file")
            files[label] = {"onnx": Path(path)}
        text = files_table(files, time_models(files, args.rounds, args.reps, args.seq), args.seq)
        print(text)
        if args.results is not None:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(text + "\n")
        return
    models = prepare(args.out, args.reuse)
    if args.prepare_only:
        return
    times = time_models(models, args.rounds, args.reps)
    text = "### onnxruntime latency (median per call; b = batch, t = intra-op threads)\n\n" + table(
        models, times
    )
    print(text)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "onnx_latency.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
