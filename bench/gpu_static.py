"""Static M-FAC at ResNet-50's size on one GPU: d = 25M, m = 1024, float32 and bfloat16 storage.

The paper (section 4.1) reports 4.7 minutes per pruning step for m = 1024 at d = 25M on an RTX 2080 Ti
with 512 GB of host memory. Here: random gradients at a realistic scale (N(0, 1) x 1e-3, the order of
a trained network's per-sample gradient entries) are made on the GPU chunk by chunk and kept in host
memory (float32: m * d * 4 = 102 GB; bfloat16: half), then ``FisherInverse(grads, damp, device=cuda)``
builds the factor W on the GPU (the precompute: Gram, Cholesky, W = L^-1 G), and one IHVP ``mul`` and
``diag`` are timed. Each row of the table is also a ratio to a cuBLAS GEMM G_page G_page^T of the
same m over the same d, timed in the same run.

    python bench/gpu_static.py                      # the GPU run: d = 25M, m = 1024, fp32 and bf16
    python bench/gpu_static.py --dim 200000 --m 64 --device cpu   # a quick check anywhere

Needs torch alone (no pydantic); run from the repository root (or with it on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.mfac import FisherInverse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_gradients(m: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """(m, dim) random rows x 1e-3 in host memory (pinned when a GPU makes them), made on ``device``."""
    pin = device.type == "cuda"
    grads = torch.empty(m, dim, dtype=dtype, pin_memory=pin)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = max(1, (1 << 30) // (dim * 4))  # about 1 GiB of float32 per piece
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        piece = torch.randn(stop - start, dim, generator=gen, device=device).mul_(1e-3)
        grads[start:stop].copy_(piece.to(dtype))
    return grads


def gemm_seconds(grads: torch.Tensor, device: torch.device, page_cols: int = 1 << 20) -> float:
    """Seconds of G G^T (m x m, float32) over all d columns, in pages moved to ``device``: the
    matrix-matrix floor of the precompute's Gram step, same transfers included."""
    m, dim = grads.shape
    gram = torch.zeros(m, m, device=device)
    sync(device)
    start = time.perf_counter()
    for c in range(0, dim, page_cols):
        page = grads[:, c : c + page_cols].to(device, non_blocking=True).float()
        gram.addmm_(page, page.T)
    sync(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace, name: str) -> dict[str, float]:
    device = torch.device(args.device)
    dtype = DTYPES[name]
    began = time.perf_counter()
    grads = host_gradients(args.m, args.dim, dtype, device, args.seed)
    made = time.perf_counter() - began
    gemm = gemm_seconds(grads, device)
    kwargs = {"storage_dtype": dtype} if dtype != torch.float32 else {}
    sync(device)
    start = time.perf_counter()
    fisher = FisherInverse(grads, args.damp, device=device, **kwargs)  # half rows: stored as they are
    sync(device)
    precompute = time.perf_counter() - start
    x = torch.randn(args.dim, device=device) * 1e-3
    fisher.mul(x)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        y = fisher.mul(x)
    sync(device)
    ihvp = (time.perf_counter() - start) / args.repeats
    start = time.perf_counter()
    d = fisher.diag()
    sync(device)
    diag = time.perf_counter() - start
    finite = bool(y.isfinite().all()) and bool(d.isfinite().all())
    del fisher, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"made": made, "gemm": gemm, "precompute": precompute, "ihvp": ihvp, "diag": diag, "ok": finite}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dim", type=int, default=25_000_000)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--damp", type=float, default=1e-5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"static M-FAC, d = {args.dim:,}, m = {args.m}, damp {args.damp:g}, on {where}")
    print("| storage | make G s | G G^T GEMM s | precompute s | / GEMM | IHVP s | diag s | finite |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        r = run(args, name)
        print(
            f"| {name} | {r['made']:.1f} | {r['gemm']:.2f} | {r['precompute']:.2f} "
            f"| {r['precompute'] / r['gemm']:.1f}x | {r['ihvp']:.3f} | {r['diag']:.3f} | {r['ok']} |",
            flush=True,
        )
    print("paper (RTX 2080 Ti, 512 GB host memory): 4.7 minutes per pruning step at this size")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
