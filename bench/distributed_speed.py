"""Benchmark the sharded M-FAC optimizer (``MFAC(..., shard=True)``) at world size 1 and 2.

Run from the repository root (no install needed)::

    python bench/distributed_speed.py                 # CPU, gloo: d = 1,000,000, m = 32, 1 thread per rank
    python bench/distributed_speed.py --quick         # d = 200,000, m = 16
    python bench/distributed_speed.py --backend nccl  # one GPU per rank (cuda:rank); untested here

For each world size P, P processes are spawned (gloo over 127.0.0.1, or nccl), and every rank holds the
same d parameters (four tensors) with the same gradients, as DDP leaves them. Three optimizers step on
their own copies, repetitions interleaved in a rotating order, each step timed on every rank after a
barrier (the slowest rank's median is reported):

* SGD                  -- ``torch.optim.SGD`` (lr only): the baseline every ratio is against.
* M-FAC unsharded      -- ``MFAC(...)``: every rank holds the whole m x d window.
* M-FAC sharded        -- ``MFAC(..., shard=True)``: rank r holds m x d/P of it, plus one float64
  all-reduce of m numbers and one all-gather of d values per step.

The windows are filled (m steps) before timing. Window memory is counted from the window tensors
(G of the window's dtype plus the float64 m x m G G^T and its Cholesky factor), per rank. On a machine
with fewer free cores than ranks the step times are noisy; the memory ratio is exact.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OPTIMIZERS = ("sgd", "unsharded", "sharded")


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def window_bytes(window: Any) -> int:
    """Bytes of a window's tensors on this rank: G (or its slice), G G^T and the Cholesky factor."""
    m = window.num_grads
    return window.grads.numel() * window.grads.element_size() + 2 * m * m * 8


# ------------------------------------------------------------------------------------------------ rank


def make_params(dim: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Four float32 tensors of d values in all (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [dim // 2, dim // 4, dim // 8, dim - dim // 2 - dim // 4 - dim // 8]
    return [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    """One rank: build the three optimizers, fill the windows, time interleaved steps, report to rank 0."""
    from compressor.mfac import MFAC

    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    try:
        hyper = dict(lr=1e-3, num_grads=args.num_grads, damp=1e-4)
        params = {name: make_params(args.dim, device, args.seed) for name in OPTIMIZERS}
        opts = {
            "sgd": torch.optim.SGD(params["sgd"], lr=1e-3),
            "unsharded": MFAC(params["unsharded"], **hyper),
            "sharded": MFAC(params["sharded"], **hyper, shard=True),
        }
        gen = torch.Generator().manual_seed(args.seed + 1)
        grads = [torch.randn(p.shape, generator=gen).mul_(1e-3).to(device) for p in params["sgd"]]

        def step(name: str) -> Callable[[], None]:
            def run() -> None:
                for p, g in zip(params[name], grads, strict=True):
                    p.grad = g
                opts[name].step()

            return run

        for _ in range(args.num_grads):  # fill the windows, so that the timed steps see m gradients
            for name in OPTIMIZERS:
                step(name)()
        times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
        for rep in range(args.reps):  # interleaved, in a rotating order
            for name in OPTIMIZERS[rep % 3 :] + OPTIMIZERS[: rep % 3]:
                times[name].append(timed_on_all(step(name), device))
        memory = {name: window_bytes(opts[name].window) for name in ("unsharded", "sharded")}
        same = all(
            torch.equal(a, b) for a, b in zip(params["sharded"], gathered(params["sharded"]), strict=True)
        )
        result = {"world": world, "times": times, "memory": memory, "identical": same}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            out.put(everyone)
    finally:
        dist.destroy_process_group()


def timed_on_all(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes on this rank, started after a barrier (and synchronized on a GPU)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def gathered(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's parameters, broadcast: the sharded updates must leave every rank with the same ones."""
    out = [p.detach().clone() for p in params]
    for t in out:
        dist.broadcast(t, src=0)
    return out


# ------------------------------------------------------------------------------------------------ driver


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn ``world`` ranks and return every rank's measurements."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(
        rank_main, args=(world, free_port(), args, queue), nprocs=world, join=False, start_method="spawn"
    )
    result = queue.get()
    while not procs.join():
        pass
    return result


def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The slowest rank's median step time per optimizer; the largest per-rank window."""
    median = {name: max(statistics.median(r["times"][name]) for r in ranks) for name in OPTIMIZERS}
    memory = {name: max(r["memory"][name] for r in ranks) for name in ("unsharded", "sharded")}
    return {"median": median, "memory": memory, "identical": all(r["identical"] for r in ranks)}


def report(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Sharded M-FAC, d = {args.dim:,}, m = {args.num_grads}, float32, backend {args.backend}, "
        f"{args.threads} thread(s) per rank, median of {args.reps} interleaved steps (slowest rank).",
        "",
        "| world size | window per rank, unsharded -> sharded | **memory sharded / unsharded** "
        "| step: SGD, unsharded, sharded M-FAC | **unsharded / SGD** | **sharded / SGD** "
        "| **time sharded / unsharded** | ranks identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for world, s in sorted(results.items()):
        mem, t = s["memory"], s["median"]
        cells = [
            str(world),
            f"{mem['unsharded'] / 2**20:.1f} -> {mem['sharded'] / 2**20:.1f} MiB",
            f"**{mem['sharded'] / mem['unsharded']:.3f}**",
            ", ".join(fmt_s(t[name]) for name in OPTIMIZERS),
            f"**{t['unsharded'] / t['sgd']:.1f}**",
            f"**{t['sharded'] / t['sgd']:.1f}**",
            f"**{t['sharded'] / t['unsharded']:.2f}**",
            "yes" if s["identical"] else "NO",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1_000_000, help="d, the number of parameters")
    p.add_argument("--num-grads", type=int, default=32, help="m, the window length")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument("--reps", type=int, default=15, help="timed steps per optimizer (median is reported)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="nccl: one GPU per rank")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="d = 200,000, m = 16, 7 reps")
    p.add_argument("--output", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.num_grads, args.reps = 200_000, 16, 7
    if args.backend == "nccl" and torch.cuda.device_count() < max(args.worlds):
        p.error(f"--backend nccl needs {max(args.worlds)} GPUs, found {torch.cuda.device_count()}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {}
    for world in args.worlds:
        log(f"world size {world} ...")
        results[world] = summarize(run_world(world, args))
    table = report(results, args)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
