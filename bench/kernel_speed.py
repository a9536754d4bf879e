"""Benchmark the compiled M-FAC kernels against the PyTorch path they replace and against a floor.

Run from the repository root (no install needed; the first run compiles the kernels, ~1 min)::

    python bench/kernel_speed.py                   # d = 1,000,000, float32, CPU, m x B in 64x128 32x128 ...
    python bench/kernel_speed.py --quick           # d = 200,000, fewer configurations (about a minute)
    python bench/kernel_speed.py --device cuda     # the CUDA kernels (COMPRESSOR_KERNELS=on is implied)

One row per kernel and configuration (m gradients, Fisher blocks of B), all times medians of
``--reps`` interleaved repetitions measured in the same run:

* factor_blocks: ``FisherInverse(G, damp, B)`` with the kernel (COMPRESSOR_KERNELS=on) vs the
  PyTorch path (=off). Floor: one GEMM ``G @ G.T``, the same ~2 m^2 d flops (the kernel does
  half a Gram and a triangular solve, both m^2 d, in float64).
* factor_wide_blocks (rows with m > 128 or B > 128, B >= m): likewise; BLAS per block, one block
  per thread (csrc/mfac_cpu_wide.h).
* direct_blocks (rows with B < m): ``FisherInverse(G, damp, B)`` in its direct form, likewise.
* blocked_mul: ``inv.mul(x)`` with the kernel vs the PyTorch path. Floor: one GEMV ``G @ x``, i.e.
  the bytes of W (m d values) at the bandwidth a GEMV reaches on this machine.
* accumulate_blocks (``--accumulate k x B``): ``BlockFisherInverse(d, B).add(chunk)`` of k float32
  rows with the kernel vs the PyTorch path. Floor: the float64 batched products it must do,
  ``sums.baddbmm_(rows^T, rows)`` on rows already converted to float64 (bench/scale_speed.py's floor).

auto uses: what ``COMPRESSOR_KERNELS=auto`` runs for this shape on this machine (the measured
dispatch of compressor/mfac/kernels/dispatch.py, cached beside the build; its own small cases, not
this row's timing).

speed-up = PyTorch / kernel; kernel / floor and PyTorch / floor: each against the floor;
diff = largest |kernel - PyTorch| relative to the largest |PyTorch| (mul outputs, or the diagonal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from compressor.mfac import BlockFisherInverse, FisherInverse, kernels  # noqa: E402

GRAD_SCALE = 1e-3


@contextlib.contextmanager
def kernel_mode(value: str) -> Iterator[None]:
    saved = os.environ.get("COMPRESSOR_KERNELS")
    os.environ["COMPRESSOR_KERNELS"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COMPRESSOR_KERNELS", None)
        else:
            os.environ["COMPRESSOR_KERNELS"] = saved


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    del out
    return seconds


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, the functions alternating within every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else (f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs")


def bench_config(m: int, block: int, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    gen = torch.Generator().manual_seed(args.seed)
    grads = (torch.randn(m, args.dim, generator=gen) * GRAD_SCALE).to(device)
    x = torch.randn(args.dim, generator=gen).to(device)
    damp = args.damp

    def build(mode: str) -> FisherInverse:
        with kernel_mode(mode):
            return FisherInverse(grads, damp, block)

    fast, slow = build("on"), build("off")  # warm-up; and the objects for mul
    if block < m:
        name = "direct_blocks"
    elif m <= kernels.FUSED_MAX_GRADS and block <= kernels.FUSED_MAX_BLOCK:
        name = "factor_blocks"
    else:  # kernels.factor_blocks hands these to the extension's factor_wide_blocks
        name = "factor_wide_blocks"
    with kernel_mode("on"):  # does the dispatch take the kernel for this shape?
        nb = max(1, min(args.dim // block, 2 * torch.get_num_threads()))
        some = torch.empty(nb * block, device=device)
        run = kernels.direct_blocks if name == "direct_blocks" else kernels.factor_blocks
        used = run(grads, 0, nb, block, damp, some) is not None
        w, xs = torch.zeros(1, m, block, device=device), torch.zeros(1, block, device=device)
        mul_used = kernels.blocked_mul(w, xs, torch.empty_like(xs), 0, m)
    label = f"m={m}, B={block}"
    t = interleaved(
        {"floor": lambda: grads @ grads.T, "torch": lambda: build("off"), "kernel": lambda: build("on")},
        args.reps,
        device,
    )
    rows = [row(name, label, t, "GEMM G Gᵀ", rel_diff(fast.diag(), slow.diag()), used, auto(name, m, block))]
    if block < m:  # the direct form's mul is one batched product, no kernel
        return rows

    def mul(inv: FisherInverse, mode: str) -> torch.Tensor:
        with kernel_mode(mode):
            return inv.mul(x)

    y_fast, y_slow = mul(fast, "on"), mul(slow, "off")
    t = interleaved(
        {"floor": lambda: grads @ x, "torch": lambda: mul(slow, "off"), "kernel": lambda: mul(fast, "on")},
        args.reps * 3,
        device,
    )
    mul_auto = auto("blocked_mul", m, block)
    rows.append(row("blocked_mul", label, t, "GEMV G x", rel_diff(y_fast, y_slow), mul_used, mul_auto))
    return rows


def auto(kernel: str, m: int, block: int) -> str:
    """What the measured dispatch picks for this shape (it measures on first use, once per machine)."""
    if kernels.module("cpu") is None:
        return "PyTorch"
    return "kernel" if kernels.measured_faster(kernel, m, block) else "PyTorch"


def bench_accumulate(k: int, block: int, args: argparse.Namespace) -> list[str]:
    """BlockFisherInverse.add of k float32 rows, kernel vs PyTorch path vs the float64 bmm floor."""
    gen = torch.Generator().manual_seed(args.seed)
    d = args.dim
    chunk = torch.randn(k, d, generator=gen) * GRAD_SCALE
    full, tail = divmod(d, block)
    rows64 = chunk[:, : full * block].double().unflatten(1, (full, block)).transpose(0, 1).contiguous()
    floor_sums = torch.zeros(full, block, block, dtype=torch.float64)
    tail64 = chunk[:, full * block :].double()

    def floor() -> None:
        floor_sums.baddbmm_(rows64.mT, rows64)
        if tail:
            tail64.T @ tail64

    fishers = {mode: BlockFisherInverse(d, block) for mode in ("on", "off")}

    def add(mode: str) -> None:
        with kernel_mode(mode):
            fishers[mode].add(chunk)

    add("on"), add("off"), floor()  # warm-up
    fns = {"floor": floor, "torch": lambda: add("off"), "kernel": lambda: add("on")}
    t = interleaved(fns, args.reps * 3, torch.device("cpu"))
    diff = rel_diff(fishers["on"].diag(), fishers["off"].diag())
    with kernel_mode("on"):
        used = kernels.accumulate_blocks(chunk, 0, torch.zeros(1, block, block, dtype=torch.float64))
    label = f"k={k} rows, B={block}"
    return row("accumulate_blocks", label, t, "float64 bmm", diff, used, auto("accumulate_blocks", k, block))


def row(
    kernel: str, label: str, t: dict[str, float], floor: str, diff: float, used: bool, auto_uses: str
) -> list[str]:
    speedup = t["torch"] / t["kernel"]
    verdict = ("faster" if speedup > 1.0 else "slower") if used else "not dispatched"
    if not used:  # the kernel does not apply to this shape: both columns timed the PyTorch path
        auto_uses = "PyTorch (no kernel for this shape)"
    return [
        kernel,
        label,
        fmt_s(t["kernel"]),
        fmt_s(t["torch"]),
        f"**{speedup:.2f}x**",
        f"{fmt_s(t['floor'])} ({floor})",
        f"{t['kernel'] / t['floor']:.2f}x",
        f"{t['torch'] / t['floor']:.2f}x",
        f"{diff:.1e}",
        verdict,
        auto_uses,
    ]


HEADER = [
    "kernel",
    "config",
    "kernel",
    "PyTorch path",
    "speed-up",
    "floor",
    "kernel / floor",
    "PyTorch / floor",
    "diff",
    "verdict",
    "auto uses",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1_000_000)
    p.add_argument(
        "--configs",
        default="64x128,32x128,128x128,256x128,64x1024,64x32,128x50",
        help="m x B, comma-separated",
    )
    p.add_argument(
        "--accumulate",
        default="32x32,32x128",
        help="k x B of the streamed sums' rows (CPU only; '' for none)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--damp", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="d = 200,000 and 64x128, 32x128, 64x32 only")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.configs = 200_000, "64x128,32x128,64x32"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with kernel_mode("on"):
        kernels.module(device.type)  # build (or load) before timing; raises if it cannot build
    configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"### compressor.mfac kernels vs the PyTorch path, d = {args.dim:,}, float32, {name}, "
        f"torch {torch.__version__}, median of {args.reps} (mul: {3 * args.reps}) interleaved reps\n"
    )
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for m, block in configs:
        for cells in bench_config(m, block, args, device):
            print("| " + " | ".join(cells) + " |", flush=True)
    if device.type == "cpu" and args.accumulate:
        for k, block in (tuple(int(v) for v in c.lower().split("x")) for c in args.accumulate.split(",")):
            print("| " + " | ".join(bench_accumulate(k, block, args)) + " |", flush=True)


if __name__ == "__main__":
    main()
