"""What half-precision storage (``storage_dtype`` bfloat16 / float16) costs and saves, against float32.

Run from the repository root (no install needed)::

    python bench/half_precision.py                  # static + dynamic tables, d = 1,000,000 (a few minutes)
    python bench/half_precision.py --dim 200000     # quicker
    python bench/half_precision.py --mnist 5        # the optimizer recipe, float32 vs bfloat16, 5 epochs

Every ratio is against float32 measured in the same run (same gradients, same process).

Static (``FisherInverse``), realistic gradients (tests/conftest.py ``realistic_grads``: a shared mean
direction plus noise, entries ~1e-3), damp 1e-5, for m in (64, 256) and blocks of 128 or none:

* variants: ``bf16``/``fp16``: float32 gradients, the factor stored in half; ``bf16 grads``/``fp16
  grads``: the gradient buffer itself kept in half (what a sampler would store), factor in half too.
* mul err: ||y - y32|| / ||y32|| for y = F^-1 x, the largest over probes: a random vector, one in the
  gradients' span, the newest gradient, and the OBS update vector sum_q (w_q / [F^-1]_qq) e_q of the
  50% least salient weights (``obs`` column on its own: the product that pruning actually uses).
* diag err: max_i |diag_i - diag32_i| / diag32_i.
* mask 50% / 90%: |pruned & pruned32| / |pruned32| for OBS masks (prune the lowest w^2 / (2 diag)) at
  50% and 90% sparsity, w ~ N(0, 1).
* bytes: what the object keeps (``nbytes``: factor, row scales, diagonal), ratio to float32's.
* build / mul: wall time (median of ``--reps``), ratio to float32's.

Dynamic (``SlidingFisherInverse``): the window filled with m realistic gradients, then ``update_mul``
with one more: its error against float32's, the window's bytes, the time of ``update_mul``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from compressor.mfac import FisherInverse, SlidingFisherInverse  # noqa: E402

DAMP = 1e-5
VARIANTS = {  # name: (gradient dtype, storage dtype)
    "float32": (torch.float32, None),
    "float32 PyTorch": (torch.float32, None),  # COMPRESSOR_KERNELS=off: the path half storage takes
    "bf16": (torch.float32, torch.bfloat16),
    "fp16": (torch.float32, torch.float16),
    "bf16 grads": (torch.bfloat16, torch.bfloat16),
    "fp16 grads": (torch.float16, torch.float16),
}


def realistic_grads(m: int, d: int, gen: torch.Generator, scale: float = 1e-2) -> torch.Tensor:
    """As tests/conftest.py: a shared mean direction plus noise; float32 (m, d)."""
    mean = torch.randn(d, generator=gen)
    noise = torch.randn(m, d, generator=gen)
    return (0.5 * mean + noise).mul_(scale / 10)


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().reshape(-1, ref.shape[-1]), ref.double().reshape(-1, ref.shape[-1])
    return ((y - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max_i |y_i - ref_i| / |ref_i|."""
    return ((y.double() - ref.double()).abs() / ref.double().abs()).max().item()


def pruned(diag: torch.Tensor, w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Indices of the lowest OBS saliencies w^2 / (2 diag)."""
    scores = w.double().square() / (2 * diag.double())
    return torch.topk(scores, int(sparsity * w.numel()), largest=False).indices


def agreement(a: torch.Tensor, b: torch.Tensor, d: int) -> float:
    mark = torch.zeros(d, dtype=torch.bool)
    mark[a] = True
    return mark[b].float().mean().item()


def static_table(d: int, ms: list[int], blocks: list[int | None], reps: int, seed: int) -> list[list[str]]:
    rows = []
    saved_mode = os.environ.get("COMPRESSOR_KERNELS", "auto")
    for m in ms:
        gen = torch.Generator().manual_seed(seed)
        grads = realistic_grads(m, d, gen)
        w = torch.randn(d, generator=gen)
        x = torch.empty(4, d)
        x[0] = torch.randn(d, generator=gen) * grads.norm() / (m * d) ** 0.5
        x[1] = torch.randn(m, generator=gen) @ grads
        x[2] = grads[-1]
        for block in blocks:
            base: dict[str, Any] = {}
            for name, (gdtype, storage) in VARIANTS.items():
                g = grads if gdtype == torch.float32 else grads.to(gdtype)
                os.environ["COMPRESSOR_KERNELS"] = "off" if name == "float32 PyTorch" else saved_mode

                def make(
                    g: torch.Tensor = g, s: torch.dtype | None = storage, b: int | None = block
                ) -> FisherInverse:
                    return FisherInverse(g, DAMP, b, storage_dtype=s)

                build, fi = median_time(make, reps)
                diag = fi.diag()
                if not base:  # float32: the OBS vector of its 50% mask, used for every variant
                    q = pruned(diag, w, 0.5)
                    x[3].zero_()
                    x[3][q] = w[q] / diag[q]
                mul, y = median_time(lambda fi=fi, x0=x[0]: fi.mul(x0), reps)
                y = fi.mul(x)
                masks = [pruned(diag, w, s) for s in (0.5, 0.9)]
                if not base:
                    base = dict(build=build, mul=mul, y=y, diag=diag, masks=masks, nbytes=fi.nbytes)
                    absolute = [f"{fi.nbytes / 2**20:.0f} MiB", f"{build:.2f} s", f"{mul * 1e3:.0f} ms"]
                    rows.append([str(m), str(block), name, "-", "-", "-", "-", "-", *absolute])
                    print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)  # progress
                    continue
                rows.append(
                    [
                        str(m),
                        str(block),
                        name,
                        f"{rel(y[:3], base['y'][:3]):.1e}",
                        f"{rel(y[3], base['y'][3]):.1e}",
                        f"{rel_max(diag, base['diag']):.1e}",
                        f"{agreement(masks[0], base['masks'][0], d):.4f}",
                        f"{agreement(masks[1], base['masks'][1], d):.4f}",
                        f"{fi.nbytes / base['nbytes']:.3f}",
                        f"{build / base['build']:.2f}",
                        f"{mul / base['mul']:.2f}",
                    ]
                )
                print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr, flush=True)  # progress
                del fi
    os.environ["COMPRESSOR_KERNELS"] = saved_mode
    return rows


def dynamic_table(d: int, ms: list[int], reps: int, seed: int) -> list[list[str]]:
    rows = []
    for m in ms:
        gen = torch.Generator().manual_seed(seed + 1)
        grads = realistic_grads(m + 1, d, gen)
        base: dict[str, Any] = {}
        for name in ("float32", "bf16", "fp16"):
            storage = VARIANTS[name][1]
            window = SlidingFisherInverse(d, m, DAMP, storage_dtype=storage)
            window.reset(grads[:m])
            window.update_mul(grads[m])  # warm-up; the timed calls put the same gradient in again
            t, u = median_time(lambda window=window, g=grads[m]: window.update_mul(g), reps)
            x = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 1e-3
            y = window.mul(x)
            if not base:
                base = dict(t=t, u=u, y=y, nbytes=window.nbytes)
                rows.append([str(m), name, "-", "-", f"{window.nbytes / 2**20:.0f} MiB", f"{t * 1e3:.0f} ms"])
                continue
            rows.append(
                [
                    str(m),
                    name,
                    f"{rel(u, base['u']):.1e}",
                    f"{rel(y, base['y']):.1e}",
                    f"{window.nbytes / base['nbytes']:.3f}",
                    f"{t / base['t']:.2f}",
                ]
            )
    return rows


def mnist(epochs: int, out: Path, storages: list[str]) -> list[list[str]]:
    """recipes/mnist_mfac_optimizer.yaml with each storage_dtype of ``storages``."""
    recipe = (Path(ROOT) / "recipes" / "mnist_mfac_optimizer.yaml").read_text()
    rows = []
    for storage in storages:
        text = recipe.replace("    damp: 1e-5\n", f"    damp: 1e-5\n    storage_dtype: {storage}\n")
        assert f"storage_dtype: {storage}" in text
        folder = out / storage
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{storage}.yaml"
        path.write_text(text)
        cmd = [sys.executable, "-m", "compressor.cli", "run", str(path), "--set", f"epochs={epochs}"]
        cmd += ["-o", str(folder), "--no-progress"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - start
        losses: dict[int, float] = {}
        accuracy = None
        with open(folder / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row["split"] == "train" and row["name"] == "loss":
                    losses[int(row["step"])] = float(row["value"])
                if row["split"] != "train" and row["name"] == "accuracy":
                    accuracy = float(row["value"])
        steps = sorted(losses)
        per_epoch = len(steps) // epochs
        curve = [
            statistics.mean(losses[s] for s in steps[e * per_epoch : (e + 1) * per_epoch])
            for e in range(epochs)
        ]
        last = [losses[s] for s in steps[(epochs - 1) * per_epoch :]]
        rows.append(
            [
                storage,
                " ".join(f"{v:.3f}" for v in curve),
                f"{curve[-1]:.4f} / {statistics.median(last):.4f}",
                f"{accuracy:.3f}",
                f"{wall:.0f} s",
            ]
        )
        print(rows[-1], flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--grads", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mnist", type=int, default=0, metavar="EPOCHS", help="only the optimizer recipe runs"
    )
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--out", help="with --mnist: keep the runs' folders here (default: a temporary one)")
    parser.add_argument("--storages", nargs="+", default=["float32", "bfloat16"], help="with --mnist")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d = {args.dim}, damp = {DAMP:g}")
    if args.mnist:
        if args.out:
            rows = mnist(args.mnist, Path(args.out), args.storages)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                rows = mnist(args.mnist, Path(tmp), args.storages)
        print(
            table(
                ["storage", "train loss per epoch (mean)", "last epoch mean / median", "test acc", "wall"],
                rows,
            )
        )
        return
    FisherInverse(torch.randn(16, 4096), DAMP, 128).mul(torch.randn(4096))  # a first use builds the kernels
    if not args.skip_static:
        header = ["m", "B", "variant", "mul err", "obs err", "diag err", "mask 50%", "mask 90%", "bytes",
                  "build", "mul"]  # fmt: skip
        rows = static_table(args.dim, args.grads, [128, None], args.reps, args.seed)
        print("\nFisherInverse (ratios: variant / float32; float32 rows: absolute)\n")
        print(table(header, rows), flush=True)
    rows = dynamic_table(args.dim, args.grads, args.reps, args.seed)
    print("\nSlidingFisherInverse (ratios: variant / float32; float32 rows: absolute)\n")
    print(table(["m", "variant", "update_mul err", "mul err", "bytes", "update_mul time"], rows))


if __name__ == "__main__":
    main()
