"""`compressor run` under torchrun with 2 CPU ranks (gloo) against one process: a short M-FAC pruning
run on the digits data, gradient sampling across ranks, resume 2 -> 1 and 1 -> 2, a user error."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_helper import fresh_sample, run_probed

from compressor.core.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "ddp_helper.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
M = 7  # odd: rank 0 computes 4 gradients, rank 1 computes 3

RECIPE = f"""
version: 1
train:
  model: digits-mlp
  data: digits
  epochs: 4
  batch_size: 64
  seed: 0
  optimizer: {{type: SGD, lr: 0.1, momentum: 0.9}}
modifiers:
  - type: MFACPruning
    params: ["fc1.weight", "fc2.weight"]
    start: 1
    end: 3
    update_every: 1
    init_sparsity: 0.5
    final_sparsity: 0.8
    num_grads: {M}
    grad_batch_size: 16
    block_size: 64
"""

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not TORCHRUN.exists(), reason="needs torch.distributed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESSOR_DIST_TIMEOUT_S": "60"}
    launcher = [
        str(TORCHRUN),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
    ]
    return subprocess.run(
        [*launcher, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _probes(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


def _checkpoint_masks(folder: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(folder / "checkpoint.pt")["model"]
    return {k[: -len("_mask")]: v for k, v in state.items() if k.endswith("_mask")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two ranks over the same recipe, each with a snapshot after epoch 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE)
    torch.set_num_threads(1)
    one = run_probed(tmp / "one", recipe, snapshot=(2, tmp / "one_at_2"), sample=M)
    began = time.perf_counter()
    done = _torchrun(
        str(HELPER), str(tmp / "two"), str(recipe), str(tmp / "probes2"),
        "--snapshot", "2", str(tmp / "two_at_2"), "--sample", str(M),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {
        "tmp": tmp,
        "one": one,
        "two": _probes(tmp / "probes2"),
        "out": done,
        "wall": time.perf_counter() - began,
    }


def test_two_ranks_prune_like_one_process(runs):
    one, (r0, r1) = runs["one"], runs["two"]
    for epoch in range(1, 5):  # identical masks on both ranks, after every epoch
        assert _equal(r0["masks"][epoch], r1["masks"][epoch]), epoch
    assert r0["summary"] == r1["summary"]
    s1, s2 = one["summary"], r0["summary"]
    assert s2["world_size"] == 2 and s2["steps"] == s1["steps"]
    assert s2["sparsity"]["global"] == pytest.approx(s1["sparsity"]["global"], abs=1e-9)
    assert s2["eval"]["accuracy"] == pytest.approx(s1["eval"]["accuracy"], abs=0.02)
    # The same global batches: the weights differ only by rounding, so nearly every mask entry agrees.
    assert _agreement(r0["masks"][4], one["masks"][4]) > 0.98
    # The file on disk is rank 0's, holding the masks every rank had.
    assert _equal(_checkpoint_masks(runs["tmp"] / "two"), r0["masks"][4])


def test_the_pruner_sees_exactly_m_gradients_on_every_rank(runs):
    one, (r0, r1) = runs["one"], runs["two"]
    pruning = [g for g in one["grads"] if g != (M, M)]
    assert not pruning and len(one["grads"]) >= 3
    assert r0["grads"] == r1["grads"] == one["grads"]  # (asked M, got M), same number of calls
    # The gathered rows are the rows one process draws, in the same order, on every rank.
    single = fresh_sample(M)
    assert r0["sample"].shape == single.shape == (M, single.shape[1])
    assert torch.equal(r0["sample"], r1["sample"])
    torch.testing.assert_close(r0["sample"], single, rtol=0, atol=0)


def test_files_come_from_rank_0_once(runs):
    two, one = runs["tmp"] / "two", runs["tmp"] / "one"
    for name in ("checkpoint.pt", "metrics.csv", "summary.json", "recipe.yaml", "loss.png"):
        assert (two / name).is_file(), name
    assert len((two / "metrics.csv").read_text().splitlines()) == len(
        (one / "metrics.csv").read_text().splitlines()
    )  # each row once, not once per rank
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert runs["out"].stdout.count("epoch 4/4") == 1  # the epoch lines of rank 0 only
    assert not list(two.glob(".*.tmp"))


def test_a_two_rank_checkpoint_resumes_in_one_process(runs):
    tmp, two = runs["tmp"], runs["two"][0]
    cut = tmp / "two_at_2"
    saved = _checkpoint_masks(cut)
    assert _equal(saved, two["masks"][2])
    resumed = run_probed(cut, None)
    assert _equal(resumed["restored"], saved)  # the masks come back exactly
    assert sorted(resumed["masks"]) == [3, 4]
    assert resumed["summary"]["sparsity"]["global"] == pytest.approx(
        two["summary"]["sparsity"]["global"], abs=1e-9
    )
    assert resumed["summary"]["eval"]["accuracy"] == pytest.approx(
        two["summary"]["eval"]["accuracy"], abs=0.02
    )
    assert all(bool((~saved[k] & resumed["masks"][4][k]).sum() == 0) for k in saved)  # pruned stays pruned
    with open(cut / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    train_steps = [int(r["step"]) for r in rows if (r["split"], r["name"]) == ("train", "loss")]
    assert train_steps == list(range(1, two["summary"]["steps"] + 1))  # no row lost or repeated


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    tmp, one = runs["tmp"], runs["one"]
    cut = tmp / "one_at_2"
    saved = _checkpoint_masks(cut)
    done = _torchrun(str(HELPER), str(cut), "-", str(tmp / "probes_resumed"), "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    r0, r1 = _probes(tmp / "probes_resumed")
    assert _equal(r0["restored"], saved) and _equal(r1["restored"], saved)
    assert _equal(r0["masks"][4], r1["masks"][4])
    assert r0["summary"]["sparsity"]["global"] == pytest.approx(
        one["summary"]["sparsity"]["global"], abs=1e-9
    )
    assert r0["summary"]["eval"]["accuracy"] == pytest.approx(one["summary"]["eval"]["accuracy"], abs=0.02)


def test_a_user_error_stops_every_rank_with_one_message(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("batch_size: 64", "batch_size: 63"))
    began = time.perf_counter()
    done = _torchrun(
        "-m", "compressor.cli", "run", str(recipe), "--output", str(tmp_path / "out"), timeout=90
    )
    assert done.returncode != 0
    assert time.perf_counter() - began < 60  # no rank waits for the collective timeout
    output = done.stdout + done.stderr
    assert output.count("must divide evenly over the 2 ranks") == 1, output
    assert "compressor/engine/" not in output and "compressor/cli/" not in output  # torchrun's own only
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
