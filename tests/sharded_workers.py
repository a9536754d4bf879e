"""The problem and the rank-side jobs of tests/test_sharded_mfac.py (imported by spawned children).

A job runs on every rank of a gloo group on CPU and writes what it measured to ``{out}.{rank}.pt``;
the test process compares those files with the single-process ``MFAC``.
"""

from __future__ import annotations

import datetime
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from compressor.mfac import MFAC, ShardedSlidingFisherInverse, SlidingFisherInverse

SHAPES = [(20, 25), (25,), (13, 4)]  # d = 577: odd, so the two slices differ by one coordinate
DIM = sum(torch.Size(s).numel() for s in SHAPES)
STEPS, SAVE_AT = 20, 10
HYPER = dict(lr=0.05, num_grads=8, damp=1e-3, weight_decay=1e-2, momentum=0.9)


# ----------------------------------------------------------------------------- the problem


def make_params(seed: int) -> list[torch.Tensor]:
    """float32 leaf tensors of SHAPES, N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Two parameter groups: the second with its own lr, momentum and no weight decay."""
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "momentum": 0.5, "weight_decay": 0.0}]


def make_opt(params: list[torch.Tensor], **kwargs: Any) -> MFAC:
    return MFAC(groups(params), **HYPER, **kwargs)


def set_grads(params: list[torch.Tensor], seed: int, step: int) -> None:
    """Fresh random gradients of step ``step``, the same on every rank; None for one at step 3."""
    gen = torch.Generator().manual_seed(seed * 1009 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * 1e-2
        p.grad = None if (step == 3 and i == 1) else g


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def run_steps(opt: MFAC, params: list[torch.Tensor], seed: int, steps: range) -> list[torch.Tensor]:
    """The flat parameters after each of ``steps``."""
    out = []
    for step in steps:
        set_grads(params, seed, step)
        opt.step()
        out.append(flat(params).clone())
    return out


def checkpoint(params: list[torch.Tensor], opt: MFAC) -> dict[str, Any]:
    return {"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}


def resume(state: dict[str, Any], **kwargs: Any) -> tuple[list[torch.Tensor], MFAC]:
    """Parameters and an optimizer rebuilt from ``checkpoint``'s dict."""
    params = [p.clone().requires_grad_() for p in state["params"]]
    opt = make_opt(params, **kwargs)
    opt.load_state_dict(state["opt"])
    return params, opt


# ----------------------------------------------------------------------------- rank side


def job_train(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """20 sharded steps (saving the state at step 10) and a resume of an unsharded state at step 10."""
    seed = args["seed"]
    params = make_params(seed)
    opt = make_opt(params, shard=True)
    traj = run_steps(opt, params, seed, range(SAVE_AT))
    saved = checkpoint(params, opt)  # a collective: every rank calls it, rank 0 writes it
    if rank == 0:
        torch.save(saved, args["save"])
    traj += run_steps(opt, params, seed, range(SAVE_AT, STEPS))
    window = opt.window
    assert isinstance(window, ShardedSlidingFisherInverse)

    params1, opt1 = resume(torch.load(args["unsharded_state"]), shard=True)  # saved at world size 1
    resumed = run_steps(opt1, params1, seed, range(SAVE_AT, STEPS))
    return {
        "traj": traj,
        "resumed": resumed,
        "window_gathered": saved["opt"]["mfac_window"]["grads"],
        "window_elements": window.grads.numel(),
        "gram_elements": window.gram.numel(),
        "columns": (window.start, window.stop),
    }


def job_resume(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Continue from a state saved at another world size (here loaded by every rank); then 20 steps
    sharded over a group of rank 0 alone (world size 1), which the other ranks may not join."""
    seed = args["seed"]
    params, opt = resume(torch.load(args["state"]), shard=True)
    out: dict[str, Any] = {"resumed": run_steps(opt, params, seed, range(SAVE_AT, STEPS))}
    solo = dist.new_group([0])  # every rank must take part in creating it
    params = make_params(seed)
    if rank == 0:
        out["solo"] = run_steps(make_opt(params, shard=True, process_group=solo), params, seed, range(STEPS))
    else:
        out["not a member"] = _raises(lambda: make_opt(params, shard=True, process_group=solo), ValueError)
    return out


def _raises(fn: Callable[[], Any], kind: type[BaseException]) -> str:
    """The message of the ``kind`` error ``fn`` raises ('' when it raises none)."""
    try:
        fn()
    except kind as err:
        return str(err)
    return ""


def job_window(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """The window alone against SlidingFisherInverse: mul, reset, d < world size, bad inputs."""
    gen = torch.Generator().manual_seed(args["seed"])
    out: dict[str, Any] = {}
    for d in (1, 2, 7):  # d = 1: rank 1 holds no coordinate
        m = 3
        # float64: with d <= m every x is in the span of G, where float32 loses eps * cond(F)
        whole = SlidingFisherInverse(d, m, 1e-2, dtype=torch.float64)
        part = ShardedSlidingFisherInverse(d, m, 1e-2, dtype=torch.float64)
        grads = torch.randn(m + 2, d, generator=gen, dtype=torch.float64)
        x = torch.randn(4, d, generator=gen, dtype=torch.float64)
        pairs = []
        for g in grads:
            pairs.append((part.update_mul(g), whole.update_mul(g)))
        pairs.append((part.mul(x), whole.mul(x)))
        pairs.append((part.mul(x[0]), whole.mul(x[0])))
        whole.reset(grads[:m])
        part.reset(grads[:m])
        pairs.append((part.mul(x), whole.mul(x)))
        out[f"d={d}"] = pairs
        out[f"d={d} columns"] = part.grads.shape[1]
    window = ShardedSlidingFisherInverse(5, 2, 1e-2)
    out["bad shape"] = _raises(lambda: window.update(torch.zeros(4)), ValueError)
    out["bad mul"] = _raises(lambda: window.mul(torch.zeros(2, 4)), ValueError)
    out["bad state"] = _raises(
        lambda: window.load_state_dict(SlidingFisherInverse(4, 2).state_dict()), ValueError
    )
    bad_rows = torch.ones(2, 5)
    bad_rows[1, 4] = float("nan")  # in rank 1's columns [3, 5) only: rank 0 must raise as well
    out["nan reset"] = _raises(lambda: window.reset(bad_rows), ValueError)
    out["emptied"] = window.count == 0 and not window.grads.any()
    window.check_inputs = True
    window.update(torch.ones(5))  # the same on both ranks: fine
    out["differing g"] = _raises(lambda: window.update(torch.full((5,), float(rank))), ValueError)
    return out


def job_masked(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """MFAC with masks and shard=True, masked coordinates included, for a few steps."""
    seed = args["seed"]
    params = make_params(seed)
    masks = {params[0]: torch.rand(params[0].shape, generator=torch.Generator().manual_seed(seed)) < 0.5}
    opt = MFAC(groups(params), **HYPER, masks=masks, shard=True)
    return {"traj": run_steps(opt, params, seed, range(6)), "dim": opt.dim}  # type: ignore[arg-type]


def train_session(shard: bool, steps: int = 5) -> dict[str, Any]:
    """The recipe path: a Session whose MFACOptimizer (``shard``) trains a small net on fixed batches."""
    from compressor.lifecycle.session import Session
    from modifiers.mfac_optimizer import MFACOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    mfac = MFACOptimizer(lr=0.05, num_grads=3, damp=1e-3, momentum=0.5, shard=shard)
    session = Session([mfac], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=4)
    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        x, y = torch.randn(10, 6, generator=gen), torch.randint(0, 3, (10,), generator=gen)
        session.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        session.before_step()
        session.optimizer.step()
        session.after_step()
    out = {
        "params": flat(list(model.parameters())),
        "window": type(mfac.optimizer.window).__name__,
        "preflight": mfac.gradient_bytes(1001),
    }
    session.finalize()
    return out


def job_modifier(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    return train_session(shard=True)


JOBS: dict[str, Callable[[int, dict[str, Any]], dict[str, Any]]] = {
    "train": job_train,
    "resume": job_resume,
    "window": job_window,
    "masked": job_masked,
    "modifier": job_modifier,
}


def spawn(world: int, folder: str, jobs: list[tuple[str, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Run ``jobs`` one after another in one spawn of ``world`` gloo ranks; per job, each rank's result."""
    import torch.multiprocessing as mp

    init_file = os.path.join(folder, f"init-{world}")
    for i, (_, args) in enumerate(jobs):
        args["out"] = os.path.join(folder, f"job{i}-w{world}")
    mp.spawn(_entry_all, args=(world, init_file, jobs), nprocs=world, join=True)
    return [[torch.load(f"{args['out']}.{r}.pt") for r in range(world)] for _, args in jobs]


def _entry_all(rank: int, world: int, init_file: str, jobs: list[tuple[str, dict[str, Any]]]) -> None:
    """Several jobs in one process group (one spawn: the spawn is the slow part)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for job, args in jobs:
            torch.save(JOBS[job](rank, args), f"{args['out']}.{rank}.pt")
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
