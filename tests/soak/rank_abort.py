"""Soak for the rank abort at exit ("terminate called without an active exception", SIGABRT).

Each round runs, in a fresh process tree, the two 2-rank gloo jobs where ranks aborted before:
  * spawn: two spawned ranks run tests/sharded_workers.py's MFAC(shard=True) jobs (window, masked,
    modifier) and leave through the interpreter's normal teardown (no os._exit);
  * torchrun: a 2-rank ``compressor run`` of a digits M-FAC pruning recipe (2 epochs).
A round fails when any rank or launcher exits non-zero. Optional CPU hogs run beside the rounds.

    python tests/soak/rank_abort.py --rounds 50 --hogs 2 [--checkout DIR]

``--checkout`` runs another checkout's code (e.g. a worktree of a commit before the fix); the
default is this one. Prints one line per failed round and the counts at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """
version: 1
train:
  model: digits-mlp
  data: digits
  epochs: 2
  batch_size: 64
  seed: 0
  optimizer: {type: SGD, lr: 0.1, momentum: 0.9}
modifiers:
  - type: MFACPruning
    params: ["fc1.weight", "fc2.weight"]
    start: 0
    end: 2
    update_every: 1
    init_sparsity: 0.5
    final_sparsity: 0.8
    num_grads: 7
    grad_batch_size: 16
    block_size: 64
"""

SPAWN = """
import datetime, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {tests!r})
import sharded_workers as W

def entry(rank, init):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for job, args in [("window", {{"seed": 1}}), ("masked", {{"seed": 1}}), ("modifier", {{}})]:
            W.JOBS[job](rank, args)
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    ctx = mp.start_processes(entry, args=({init!r},), nprocs=2, join=False, start_method="spawn")
    for p in ctx.processes:
        p.join()
    codes = [p.exitcode for p in ctx.processes]
    print("exit codes", codes)
    sys.exit(1 if any(codes) else 0)
"""


def _hog() -> None:
    while True:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out: {exc}"
    return done.returncode, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--hogs", type=int, default=0, help="busy-looping processes beside the rounds")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args()
    root = args.checkout.resolve()
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "COMPRESSOR_DIST_TIMEOUT_S": "120"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    failed = {"spawn": 0, "torchrun": 0}
    aborts = 0
    began = time.perf_counter()
    try:
        for i in range(1, args.rounds + 1):
            with tempfile.TemporaryDirectory() as tmp:
                script = Path(tmp) / "spawn.py"
                script.write_text(SPAWN.format(tests=str(root / "tests"), init=str(Path(tmp) / "init")))
                recipe = Path(tmp) / "recipe.yaml"
                recipe.write_text(RECIPE)
                runs = {
                    "spawn": [sys.executable, str(script)],
                    "torchrun": [
                        torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", "-m", "compressor.cli", "run", str(recipe),
                        "--output", str(Path(tmp) / "out"), "--no-progress",
                    ],
                }  # fmt: skip
                for name, cmd in runs.items():
                    code, output = _run(cmd, env, timeout=600)
                    if code != 0:
                        failed[name] += 1
                        aborts += "terminate called" in output or "SIGABRT" in output
                        lines = [line for line in output.splitlines() if line.strip()]
                        print(f"round {i} {name}: exit {code}: " + " | ".join(lines[-4:]), flush=True)
            print(f"round {i} done ({time.perf_counter() - began:.0f} s)", flush=True)
    finally:
        for hog in hogs:
            hog.terminate()
    print(
        f"{args.rounds} rounds in {time.perf_counter() - began:.0f} s with {args.hogs} hogs, code of {root}: "
        f"spawn failed {failed['spawn']}, torchrun failed {failed['torchrun']}, "
        f"'terminate called'/SIGABRT in {aborts}"
    )
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
