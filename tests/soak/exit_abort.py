"""The rank abort at exit, reproduced at a high rate: "terminate called without an active exception".

Each round spawns two gloo ranks that build their group, then their first ``torch.optim`` optimizer
(which pins the group in ``torch.distributed.nn.functional``'s default arguments, see
``compressor.mfac.group_defaults``), leave ``--works`` async all_reduces of 50,000 floats in flight,
call ``destroy_process_group`` and exit normally. The in-flight work widens the window of the
original abort: when the group outlives ``destroy_process_group``, its gloo worker threads are still
finishing (and freeing) work while the interpreter is torn down, and a rank dies with SIGABRT.

    python tests/soak/exit_abort.py --rounds 20 --mode plain       # before the fix: nothing of ours
    python tests/soak/exit_abort.py --rounds 20 --mode compressor  # compressor.mfac imported first

``plain`` is any torch script, and the library before the fix (which did nothing about the group);
``compressor`` imports ``compressor.mfac`` before the group exists, as ``compressor run`` and
``MFAC(shard=True)`` users do, so ``destroy_process_group`` frees the group and drains its work.
Prints one line per round and the counts at the end; exits 1 when a ``compressor`` round aborts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RANKS = """
import datetime, sys, tempfile
import torch, torch.distributed as dist, torch.multiprocessing as mp

def entry(rank, init, mode, works):
    torch.set_num_threads(1)
    if mode == "compressor":
        __import__("compressor.mfac")
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)  # the first optimizer, after the group
    pending = [dist.all_reduce(torch.randn(50_000), async_op=True) for _ in range(works)]
    del pending
    dist.destroy_process_group()

if __name__ == "__main__":
    ctx = mp.start_processes(entry, args=({init!r}, {mode!r}, {works}), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join()
    codes = [p.exitcode for p in ctx.processes]
    print("exit codes", codes)
    sys.exit(1 if any(codes) else 0)
"""


def run_round(mode: str, works: int, timeout: float = 300) -> tuple[int, str]:
    """(exit status, output) of one round of two ranks in a fresh process tree."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ranks.py"
        script.write_text(RANKS.format(init=str(Path(tmp) / "init"), mode=mode, works=works))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        try:
            done = subprocess.run(
                [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            return 124, f"timed out: {exc}"
    return done.returncode, done.stdout + done.stderr


def aborted(output: str) -> bool:
    """Whether a rank died of the abort (its message, or SIGABRT's exit status -6)."""
    return "terminate called" in output or "-6" in output.split("exit codes")[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--mode", choices=["plain", "compressor"], default="compressor")
    parser.add_argument("--works", type=int, default=200, help="async all_reduces left in flight at exit")
    args = parser.parse_args()
    aborts = failures = 0
    began = time.perf_counter()
    for i in range(1, args.rounds + 1):
        code, output = run_round(args.mode, args.works)
        hit = aborted(output)
        aborts += hit
        failures += code != 0 and not hit
        last = [line for line in output.splitlines() if line.strip()][-1:] or [""]
        print(f"round {i}: exit {code}{' ABORT' if hit else ''}: {last[0]}", flush=True)
    print(
        f"{args.mode}: {aborts} of {args.rounds} rounds aborted, {failures} failed otherwise "
        f"({args.works} works in flight, {time.perf_counter() - began:.0f} s)"
    )
    return 1 if args.mode == "compressor" and (aborts or failures) else 0


if __name__ == "__main__":
    sys.exit(main())
