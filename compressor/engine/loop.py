"""One training epoch of ``compressor run``: seeded order, gradient accumulation, DDP slices."""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from compressor.core import distributed
from compressor.data.builtin import DataBundle
from compressor.lifecycle.sampling import fetch_batch
from compressor.lifecycle.session import Session
from compressor.tasks import Task, unpack_data


class EpochSettings(Protocol):
    """What an epoch reads of the recipe's ``train`` section (``TrainSection``)."""

    seed: int
    batch_size: int  # the global batch, in samples
    grad_accum: int  # batches per optimizer step
    # optional: max_grad_norm (float | None), clip the step's gradient to this global L2 norm


class MetricSink(Protocol):
    """Where the step's metrics go (``MetricsLog`` on rank 0, ``NoLog`` elsewhere)."""

    def log(self, step: int, epoch: float | None, split: str, name: str, value: float) -> None: ...


class StepDisplay(Protocol):
    """What shows the step's metrics (the progress bar, ``Progress``)."""

    def update(self, step: int, **fields: float | None) -> None: ...


def train_epoch(
    session: Session,
    bundle: DataBundle,
    train: EpochSettings,
    epoch: int,
    task: Task,
    log: MetricSink,
    bar: StepDisplay,
    *,
    net: torch.nn.Module | None = None,
    ctx: distributed.Context | None = None,
) -> None:
    """One pass over the training data, in an order fixed by (seed, epoch).

    The order and the global batches are those of one process; with P ranks, rank r takes the
    r-th of P equal slices of every batch (a last, partial batch is split as evenly as possible)
    and DDP averages the gradients, each rank's loss weighted so that the step's gradient is the
    mean over the global batch, as in one process.

    ``task`` reads the batches: each batch's loss is its mean, weighted by its share of the step's
    samples (its sample count over the group's, under gradient accumulation; the rank's slice over
    the global batch under DDP), so the step's gradient is the mean over all the step's samples.
    The logged train loss and the task's metrics are over the samples of the step.
    """
    model = session.model
    net = model if net is None else net
    world, rank = (1, 0) if ctx is None else (ctx.world_size, ctx.rank)
    device = torch.device("cpu") if ctx is None else ctx.device
    model.train()
    data, collate = unpack_data(bundle.train, task)
    # modulo 2**64 (the seeds torch takes): unchanged for every seed below about 1.8e13 and negative ones
    order = torch.Generator().manual_seed((train.seed * 1_000_003 + epoch) % 2**64)
    # Batches of indices drawn exactly as DataLoader(data, shuffle=True, generator=order) would.
    index_loader = DataLoader(range(len(data)), batch_size=train.batch_size, shuffle=True, generator=order)
    index_batches = list(index_loader)
    total_steps = session.total_steps
    for first in range(0, len(index_batches), train.grad_accum):
        if total_steps is not None and session.step >= total_steps:
            return
        group = index_batches[first : first + train.grad_accum]
        group_size = sum(len(b) for b in group)
        session.optimizer.zero_grad()
        loss_sum, seen = 0.0, 0
        sums: dict[str, float] = {}
        for i, indices in enumerate(group):
            mine = indices.tensor_split(world)[rank] if world > 1 else indices
            share = len(mine) * world  # the loss below is the global batch's mean, as in one process
            if share == 0:  # still run a sample with weight 0: DDP's all-reduce needs every rank
                mine = indices[:1]
            batch = task.to_device(fetch_batch(data, mine.tolist(), collate), device)
            sync = world == 1 or i == len(group) - 1
            with contextlib.nullcontext() if sync else net.no_sync():
                out = task.forward(net, batch)
                loss = task.loss(out, batch)
                (loss * share / group_size).backward()
            size = task.batch_size(batch)
            for name, value in task.metric_sums(out, batch).items():  # every key on every rank
                sums[name] = sums.get(name, 0) + (value if share else 0)
            if share:
                loss_sum += loss.item() * size
                seen += size
        if world > 1:
            loss_sum, seen, *values = distributed.all_sum([loss_sum, seen, *sums.values()])
            sums = dict(zip(sums, values, strict=True))
        session.before_step()
        clipped = clip_gradients(model, getattr(train, "max_grad_norm", None))
        session.optimizer.step()
        session.after_step()
        metrics = {"loss": loss_sum / seen, **task.metrics(sums, seen)}
        if clipped is not None:
            metrics["grad_norm"] = clipped
        for name, value in metrics.items():
            log.log(session.step, session.epoch, "train", name, value)
        shown = {("acc" if name == "accuracy" else name): value for name, value in metrics.items()}
        bar.update(session.step, **shown, sparsity=session.masks.global_sparsity())


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> float | None:
    """Scale every gradient of ``model`` by min(1, max_norm / |g|), |g| the L2 norm of all of them
    together (``torch.nn.utils.clip_grad_norm_``); |g| before clipping, or None when ``max_norm`` is
    None. Under DDP the gradients are already averaged, so every rank clips alike."""
    if max_norm is None:
        return None
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
