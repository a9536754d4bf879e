"""MFAC(shard=True) on 2 (and 3) CPU processes with gloo against the single-process MFAC.

The spawned ranks run the jobs of tests/sharded_workers.py; each module fixture is one spawn (the
spawn, some seconds, is the slow part). Gradients are fresh random draws from the session seed.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Any

import pytest
import torch
from conftest import SESSION_SEED
from sharded_workers import (
    DIM,
    HYPER,
    SAVE_AT,
    STEPS,
    checkpoint,
    flat,
    groups,
    make_opt,
    make_params,
    resume,
    run_steps,
    spawn,
    train_session,
)

from compressor.mfac import MFAC
from compressor.mfac.partition import shard_range

TOL = 1e-5  # relative error of the parameters' movement against the unsharded optimizer


@pytest.fixture(scope="module")
def seed() -> int:
    return SESSION_SEED ^ zlib.crc32(b"test_sharded_mfac")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def reference(seed: int, folder: Any) -> dict[str, Any]:
    """The uninterrupted single-process run, and its state after SAVE_AT steps (saved to a file)."""
    params = make_params(seed)
    opt = make_opt(params)
    start = flat(params).clone()
    traj = run_steps(opt, params, seed, range(SAVE_AT))
    state = checkpoint(params, opt)
    torch.save(state, folder / "unsharded.pt")
    traj += run_steps(opt, params, seed, range(SAVE_AT, STEPS))
    return {"start": start, "traj": traj, "state": state}


@pytest.fixture(scope="module")
def two(seed: int, folder: Any, reference: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """One spawn of 2 ranks: training and resume, the window alone, MFAC with masks."""
    unsharded = folder / "unsharded.pt"  # written by the reference fixture
    jobs = [
        ("train", {"seed": seed, "save": str(folder / "sharded2.pt"), "unsharded_state": str(unsharded)}),
        ("window", {"seed": seed}),
        ("masked", {"seed": seed}),
        ("modifier", {}),
    ]
    return dict(zip(["train", "window", "masked", "modifier"], spawn(2, str(folder), jobs), strict=True))


@pytest.fixture(scope="module")
def three(seed: int, folder: Any, two: dict[str, Any]) -> list[dict[str, Any]]:
    """One spawn of 3 ranks: resume of the 2-rank state; a 1-rank subgroup."""
    return spawn(3, str(folder), [("resume", {"seed": seed, "state": str(folder / "sharded2.pt")})])[0]


def movement_error(traj: list[torch.Tensor], ref: list[torch.Tensor], start: torch.Tensor) -> float:
    """max over steps of ||p_t - q_t|| / ||q_t - p_0||: the error relative to how far the reference moved."""
    return max(((p - q).norm() / (q - start).norm()).item() for p, q in zip(traj, ref, strict=True))


def param_error(traj: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max over steps of ||p_t - q_t|| / ||q_t||."""
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(traj, ref, strict=True))


def assert_same_on_every_rank(trajs: list[list[torch.Tensor]]) -> None:
    for other in trajs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(trajs[0], other, strict=True))


# ----------------------------------------------------------------------------- 2 ranks


def test_updates_match_unsharded_and_are_identical_on_every_rank(two, reference):
    ranks = two["train"]
    assert_same_on_every_rank([r["traj"] for r in ranks])
    moved = movement_error(ranks[0]["traj"], reference["traj"], reference["start"])
    params = param_error(ranks[0]["traj"], reference["traj"])
    print(f"\n2 ranks, {STEPS} steps: movement error {moved:.2e}, parameter error {params:.2e}")
    assert moved <= TOL and params <= TOL


def test_window_memory_per_rank(two):
    m = HYPER["num_grads"]
    ranks = two["train"]
    assert [r["columns"] for r in ranks] == [(0, 289), (289, DIM)]  # d = 577: 289 + 288
    for r in ranks:
        ratio = r["window_elements"] / (m * DIM)
        with_gram = (4 * r["window_elements"] + 8 * r["gram_elements"]) / (4 * m * DIM + 8 * m * m)
        print(f"\nper-rank window elements / unsharded: {ratio:.3f} ({with_gram:.3f} with G G^T, bytes)")
        assert ratio <= 0.55 and with_gram <= 0.55


def test_state_dict_gathers_the_whole_window(two, reference):
    ranks = two["train"]
    gathered = [r["window_gathered"] for r in ranks]
    assert torch.equal(gathered[0], gathered[1]) and gathered[0].shape == (HYPER["num_grads"], DIM)
    torch.testing.assert_close(gathered[0], reference["state"]["opt"]["mfac_window"]["grads"])


def test_resume_one_rank_state_on_two_ranks(two, reference):
    ranks = two["train"]
    assert_same_on_every_rank([r["resumed"] for r in ranks])
    assert movement_error(ranks[0]["resumed"], reference["traj"][SAVE_AT:], reference["start"]) <= TOL


def test_resume_two_rank_state_on_one_rank(two, reference, folder, seed):
    params, opt = resume(torch.load(folder / "sharded2.pt"))
    assert type(opt.window).__name__ == "SlidingFisherInverse"
    resumed = run_steps(opt, params, seed, range(SAVE_AT, STEPS))
    assert movement_error(resumed, reference["traj"][SAVE_AT:], reference["start"]) <= TOL


def test_window_against_unsharded_also_for_d_below_world_size(two):
    ranks = two["window"]
    assert ranks[1]["d=1 columns"] == 0 and ranks[0]["d=1 columns"] == 1
    for d in (1, 2, 7):
        for (part0, whole), (part1, _) in zip(ranks[0][f"d={d}"], ranks[1][f"d={d}"], strict=True):
            assert torch.equal(part0, part1) and part0.shape == whole.shape
            torch.testing.assert_close(part0, whole, rtol=1e-10, atol=1e-10 * whole.abs().max().item())


def test_bad_inputs_raise_on_every_rank(two):
    for r in two["window"]:
        assert "shape (5,)" in r["bad shape"]
        assert "shape (5,) or (k, 5)" in r["bad mul"]
        assert "window state has shape" in r["bad state"]
        assert "differs between ranks" in r["differing g"]
        assert "rows [1] contain NaN" in r["nan reset"] and r["emptied"]


def test_masked_mfac_sharded_matches_unsharded(two, seed):
    ranks = two["masked"]
    assert_same_on_every_rank([r["traj"] for r in ranks])
    params = make_params(seed)
    masks = {params[0]: torch.rand(params[0].shape, generator=torch.Generator().manual_seed(seed)) < 0.5}
    opt = MFAC(groups(params), **HYPER, masks=masks)
    ref = run_steps(opt, params, seed, range(6))  # type: ignore[arg-type]
    assert ranks[0]["dim"] == opt.dim < DIM
    assert movement_error(ranks[0]["traj"], ref, flat(make_params(seed))) <= TOL


def test_recipe_modifier_shards_under_two_ranks(two):
    ranks = two["modifier"]
    assert all(r["window"] == "ShardedSlidingFisherInverse" for r in ranks)
    assert all(r["preflight"] == 4 * 3 * 501 for r in ranks)  # this rank's ceil(1001 / 2) columns
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    ref = train_session(shard=True)  # one process: the setting is inert, the window whole
    assert ref["window"] == "SlidingFisherInverse"
    torch.testing.assert_close(ranks[0]["params"], ref["params"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 3 ranks


def test_resume_two_rank_state_on_three_ranks(three, reference):
    assert_same_on_every_rank([r["resumed"] for r in three])
    assert movement_error(three[0]["resumed"], reference["traj"][SAVE_AT:], reference["start"]) <= TOL


def test_world_size_one_is_the_unsharded_optimizer_and_members_only(three, reference):
    assert all(torch.equal(a, b) for a, b in zip(three[0]["solo"], reference["traj"], strict=True))
    assert all("not a member" in r["not a member"] for r in three[1:])


# ----------------------------------------------------------------------------- single process


def test_settings_errors_without_a_process_group():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match=r"initialized torch\.distributed process group"):
        MFAC(p, shard=True)
    with pytest.raises(ValueError, match="shard must be True or False"):
        MFAC(p, shard="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only used with shard=True"):
        MFAC(p, process_group=object())
    with pytest.raises(RuntimeError, match="initialized"):
        MFAC(p, shard=True)


@pytest.mark.parametrize(("dim", "world"), [(577, 2), (10, 3), (2, 3), (1, 4), (12, 4)])
def test_shard_ranges_cover_the_vector_evenly(dim, world):
    ranges = [shard_range(dim, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == dim
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    widths = [b - a for a, b in ranges]
    assert max(widths) - min(widths) <= 1 and widths == sorted(widths, reverse=True)
