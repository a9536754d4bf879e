"""Resume restores the global RNGs: a model whose training forward draws random numbers (dropout,
Gaussian noise, Python's ``random``, NumPy) is killed with SIGKILL at several points, in one process
and at 2 ranks under torchrun, and resumed; the end state is bit-identical to an uninterrupted run.
In one process, resumes that skip the restore of one RNG (or of all) end elsewhere: the model does
consume every RNG, so the tests above would catch a resume that forgot one.

The kill points are exact: the model's forward, at the N-th forward of a mode in its process (as
``RNG_TEST_STOP=train:N`` or ``eval:N`` says; on rank ``RNG_TEST_RANK``, default 0), writes a marker
file with its pid and waits; the test then kills the run's processes (the CLI, or torchrun and each
of its workers) with SIGKILL, or that one worker alone: torchrun must then stop the job by itself.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from compressor.core.checkpoint import load_checkpoint

CLI = str(Path(sys.executable).with_name("compressor"))
TORCHRUN = Path(sys.executable).with_name("torchrun")
MODULE = "rng_noisy_model"
STEPS = 23  # optimizer steps per epoch: 1438 digits training samples in batches of 64
EPOCHS = 4

NOISY_MODEL = '''
"""A digits MLP whose training forward draws from every global RNG; a stop point for the tests."""
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn

CALLS = {"train": 0, "eval": 0}


class NoisyMLP(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 64)
        self.drop = nn.Dropout(0.4)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        mode = "train" if self.training else "eval"
        CALLS[mode] += 1
        stopper = os.environ.get("RANK", "0") == os.environ.get("RNG_TEST_RANK", "0")
        if os.environ.get("RNG_TEST_STOP") == f"{mode}:{CALLS[mode]}" and stopper:
            marker = os.environ["RNG_TEST_MARKER"]
            with open(marker + ".tmp", "w") as handle:
                handle.write(f"{mode} {os.getpid()}")
            os.replace(marker + ".tmp", marker)
            time.sleep(600)  # killed here by the test
        x = x.flatten(1)
        if self.training:
            x = x + 0.1 * torch.randn_like(x)  # torch
            x = x * (1.0 + 0.2 * random.random())  # Python
            x = x + float(np.random.uniform(-0.1, 0.1))  # NumPy
        return self.fc2(self.drop(torch.relu(self.fc1(x))))  # dropout: torch


def factory(input_shape, num_classes):
    return NoisyMLP(math.prod(input_shape), num_classes)
'''

RECIPE = f"""
version: 1
train:
  model: {MODULE}:factory
  data: digits
  epochs: {EPOCHS}
  batch_size: 64
  seed: 0
  optimizer: {{type: SGD, lr: 0.1, momentum: 0.9}}
modifiers:
  - type: MagnitudePruning
    params: ["re:fc\\\\d\\\\.weight"]
    start: 1
    end: 3
    init_sparsity: 0.3
    final_sparsity: 0.8
    update_every: 0.5
"""

needs_torchrun = pytest.mark.skipif(
    not torch.distributed.is_available() or not TORCHRUN.exists() or not Path("/proc/self/stat").exists(),
    reason="needs torch.distributed and /proc",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with the model module and the recipe."""
    tmp = tmp_path_factory.mktemp("rng")
    (tmp / f"{MODULE}.py").write_text(NOISY_MODEL)
    (tmp / "recipe.yaml").write_text(RECIPE)
    return tmp


def _env(workdir: Path, stop: str | None = None, rank: int = 0) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{workdir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "COMPRESSOR_DIST_TIMEOUT_S": "60",
    }
    env.pop("RNG_TEST_STOP", None)
    if stop is not None:
        env["RNG_TEST_STOP"] = stop
        env["RNG_TEST_MARKER"] = str(workdir / "stopped")
        env["RNG_TEST_RANK"] = str(rank)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(ranks: int, *args: str) -> list[str]:
    cli = [*args, "--no-progress", "--allow-import", MODULE]
    if ranks == 1:
        return [CLI, *cli]
    launcher = [str(TORCHRUN), f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1"]
    return [*launcher, f"--master_port={_free_port()}", "-m", "compressor.cli", *cli]


def _finish(workdir: Path, ranks: int, *args: str) -> None:
    done = subprocess.run(
        _command(ranks, *args), env=_env(workdir), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _kill_at(workdir: Path, ranks: int, stop: str, *args: str) -> None:
    """Run until the model reaches ``stop``, then SIGKILL the run's process group."""
    marker = workdir / "stopped"
    marker.unlink(missing_ok=True)
    victim = subprocess.Popen(
        _command(ranks, *args),
        env=_env(workdir, stop),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: torchrun and its workers, or the CLI
    )
    deadline = time.monotonic() + 300
    try:
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        reached = marker.exists()
        # torchrun starts each worker in a session of its own: kill them with the launcher's group
        for pid in (*_descendants(victim.pid), victim.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    finally:
        _, err = victim.communicate(timeout=60)
    assert reached, f"the run did not reach {stop}: {err.decode(errors='replace')[-3000:]}"
    assert victim.returncode == -signal.SIGKILL


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _metrics(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _train_steps(folder: Path) -> list[int]:
    return [int(r["step"]) for r in _metrics(folder) if (r["split"], r["name"]) == ("train", "loss")]


def _same(a: Any, b: Any, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ (tensors bit for bit, with their dtypes and shapes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in _same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def _assert_identical(whole: Path, cut: Path) -> None:
    """The whole checkpoint (model, optimizer, session, RNGs), metrics.csv and summary, bit for bit."""
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    a.pop("elapsed"), b.pop("elapsed")
    assert not _same(a, b), _same(a, b)
    assert _metrics(whole) == _metrics(cut)
    sa, sb = (json.loads((f / "summary.json").read_text()) for f in (whole, cut))
    sa.pop("wall_time_s"), sb.pop("wall_time_s")
    assert sa == sb  # eval, dense_eval, sparsity, steps, ...


@pytest.fixture(scope="module")
def in_process(workdir) -> tuple[Path, Path]:
    """A whole run in this process (one thread, as the CLI runs below), and a copy of its folder taken
    right after the checkpoint of epoch 1."""
    from compressor import engine
    from compressor.engine import checkpoints

    save, threads = checkpoints.save, torch.get_num_threads()
    whole, snapshot = workdir / "inproc", workdir / "inproc_at_1"

    def snapshotting(files, session, model, epoch, *rest):
        save(files, session, model, epoch, *rest)
        if epoch == 1 and not snapshot.exists():
            shutil.copytree(files.root, snapshot)

    sys.path.insert(0, str(workdir))
    checkpoints.save = snapshotting
    torch.set_num_threads(1)
    try:
        engine.run(workdir / "recipe.yaml", whole, progress=False, allow_imports=(MODULE,))
    finally:
        checkpoints.save = save
        torch.set_num_threads(threads)
        sys.path.remove(str(workdir))
    return whole, snapshot


def _resume_copy(snapshot: Path, target: Path) -> Path:
    from compressor import engine

    shutil.copytree(snapshot, target)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, str(snapshot.parent))
    try:
        engine.run(None, target, resume=True, progress=False, allow_imports=(MODULE,))
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(snapshot.parent))
    return target


def test_one_process_killed_three_times_resumes_bit_identical(workdir, in_process):
    recipe = str(workdir / "recipe.yaml")
    whole, cut = in_process[0], workdir / "one_cut"  # the uninterrupted run

    # right after the checkpoint of epoch 1: the first training forward of epoch 2
    _kill_at(workdir, 1, f"train:{STEPS + 1}", "run", recipe, "--output", str(cut))
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 1
    assert _train_steps(cut) == list(range(1, STEPS + 1))
    # mid-epoch: resumed from the checkpoint of epoch 1, it trains epoch 2, then is killed 12 steps
    # into epoch 3 (its forward 23 + 12): the resume goes back to the checkpoint of epoch 2
    _kill_at(workdir, 1, f"train:{STEPS + 12}", "run", "--resume", str(cut))
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 2
    assert _train_steps(cut) == list(range(1, 2 * STEPS + 12))  # rows the resume must drop
    # after the last checkpoint (finalized), in the final evaluation; eval forwards of this process:
    # the task probe, the evaluations of epochs 3 and 4, then the final one
    _kill_at(workdir, 1, "eval:4", "run", "--resume", str(cut))
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == EPOCHS
    assert not (cut / "summary.json").exists()
    _finish(workdir, 1, "run", "--resume", str(cut))
    _assert_identical(whole, cut)


@needs_torchrun
def test_two_ranks_killed_twice_resume_bit_identical(workdir):
    recipe = str(workdir / "recipe.yaml")
    whole, cut = workdir / "two_whole", workdir / "two_cut"
    _finish(workdir, 2, "run", recipe, "--output", str(whole))
    saved = load_checkpoint(whole / "checkpoint.pt")
    ranks = saved["rng_ranks"]  # each rank draws its own dropout masks: its own state to restore
    assert len(ranks) == 2 and not _same(ranks[0], saved["rng"])
    for name in ("torch", "python", "numpy"):
        assert _same(ranks[0][name], ranks[1][name]), f"both ranks hold the same {name} RNG state"

    # right after the checkpoint of epoch 1, then mid-epoch (as in one process)
    _kill_at(workdir, 2, f"train:{STEPS + 1}", "run", recipe, "--output", str(cut))
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 1
    assert _train_steps(cut) == list(range(1, STEPS + 1))
    _kill_at(workdir, 2, f"train:{STEPS + 12}", "run", "--resume", str(cut))
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 2
    assert _train_steps(cut) == list(range(1, 2 * STEPS + 12))
    _finish(workdir, 2, "run", "--resume", str(cut))
    _assert_identical(whole, cut)


@pytest.mark.parametrize("skipped", ["all", "torch", "python", "numpy"])
def test_a_resume_that_skips_an_rng_state_differs(in_process, tmp_path, monkeypatch, skipped):
    """The model draws from every global RNG: a resume that restores all but one of them (or none)
    ends elsewhere, so the bit-identical resumes above do check the RNG restore."""
    from compressor.core.checkpoint import rng_state, set_rng_state
    from compressor.engine import checkpoints

    def restore_but_one(state):
        if skipped != "all":
            current = rng_state()
            set_rng_state({**state, skipped: current[skipped]})

    whole, snapshot = in_process
    monkeypatch.setattr(checkpoints, "set_rng_state", restore_but_one)
    broken = _resume_copy(snapshot, tmp_path / "resumed")
    a = load_checkpoint(whole / "checkpoint.pt")["model"]
    b = load_checkpoint(broken / "checkpoint.pt")["model"]
    assert _same(a, b), f"a resume without the {skipped} RNG state ended with the same weights"


def test_an_in_process_resume_is_bit_identical(in_process, tmp_path):
    whole, snapshot = in_process
    _assert_identical(whole, _resume_copy(snapshot, tmp_path / "resumed"))


def _draws() -> list[Any]:
    import random

    import numpy as np

    drawn = [torch.rand(4), random.random(), float(np.random.standard_normal())]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        drawn.append(torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5).cpu())
    return drawn


def test_rng_state_survives_a_checkpoint_file(tmp_path):
    """Every state comes back through save_checkpoint / load_checkpoint (weights_only), the CUDA
    generators too where there is a GPU; a checkpoint without the NumPy state still loads."""
    from compressor.core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # CUDA in use: its generators are part of the state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    first = _draws()
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert not _same(_draws(), first)
    old = load_checkpoint(tmp_path / "c.pt")["rng"]
    del old["numpy"]
    old.pop("cuda", None)
    set_rng_state(old)  # an older checkpoint: torch and Python only
    assert not _same(_draws()[:2], first[:2])


def test_ranks_fork_their_rngs_apart_deterministically():
    from compressor.core.checkpoint import fork_rank_rngs, rng_state, seed_rngs

    states = []
    for rank in (0, 1, 2, 1):
        seed_rngs(7)
        fork_rank_rngs(rank)
        states.append(rng_state())
    seed_rngs(7)
    assert not _same(states[0], rng_state())  # rank 0 keeps its streams
    assert _same(states[0], states[1]) and _same(states[1], states[2])  # the others have their own
    assert not _same(states[1], states[3])  # the same each time


@needs_torchrun
def test_a_killed_rank_stops_the_job_with_a_message_and_the_run_resumes_bit_identical(workdir):
    """SIGKILL of one worker of a 2-rank job, mid-epoch: torchrun stops the other rank (blocked in
    its next collective) well within the collective timeout, exits non-zero and names the signal;
    ``run --resume`` at 2 ranks then ends as the uninterrupted run, bit for bit."""
    recipe = str(workdir / "recipe.yaml")
    whole, cut = workdir / "rank_whole", workdir / "rank_cut"
    _finish(workdir, 2, "run", recipe, "--output", str(whole))
    marker = workdir / "stopped"
    marker.unlink(missing_ok=True)
    env = _env(workdir, f"train:{STEPS + 7}", rank=1)  # rank 1, 7 steps into epoch 2
    victim = subprocess.Popen(
        _command(2, "run", recipe, "--output", str(cut)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), victim.communicate(timeout=60)
        worker = int(marker.read_text().split()[1])
        os.kill(worker, signal.SIGKILL)  # that worker only; rank 0 and torchrun are left alone
        killed = time.monotonic()
        _, err = victim.communicate(timeout=float(env["COMPRESSOR_DIST_TIMEOUT_S"]))
        stopped_after = time.monotonic() - killed
    finally:
        for pid in (*_descendants(victim.pid), victim.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        victim.wait(timeout=60)
    assert victim.returncode not in (0, None)
    assert stopped_after < 30, f"torchrun took {stopped_after:.1f} s to stop the job"
    assert "Signal 9 (SIGKILL)" in err and "rank      : 1" in err, err[-3000:]
    # rank 0, blocked in a collective, says why it stops, unless torchrun's SIGTERM came first
    said = err.count("lost contact with another rank (")
    assert said == 1 or (said == 0 and "Signal 15 (SIGTERM) received" in err), err[-3000:]
    assert "compressor/engine/" not in err  # no traceback of ours: torchrun's own only
    assert not any(p.name.endswith(".tmp") for p in cut.iterdir())  # no half-written file left
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 1
    _finish(workdir, 2, "run", "--resume", str(cut))
    _assert_identical(whole, cut)
