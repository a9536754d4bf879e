"""Evaluation on a split: mean loss and the task's metrics, in one process or sharded over ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from compressor.core import distributed
from compressor.tasks import ClassificationTask, Task, unpack_data


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, task: Any, batch_size: int = 512) -> dict[str, float]:
    """Mean loss over the samples of ``data`` and the task's metrics (classification: ``accuracy``,
    a fraction; contrastive: ``recall@1``, ``mrr@10``, ``mean_cosine`` over the whole split), in eval
    mode (mode restored). A task whose loss depends on the batch (in-batch negatives) is scored on
    batches of ``batch_size``.

    ``task``: a ``compressor.tasks.Task``, or a loss function (a classification task with that loss).
    ``data``: a Dataset, or a DataLoader (its dataset and collate_fn; batches of ``batch_size``).
    """
    task = task if isinstance(task, Task) else ClassificationTask(task)
    task.prepare(model)
    data, collate = unpack_data(data, task)
    total, sums, seen, kept = _eval_sums(model, data, task, collate, batch_size)
    return {"loss": total / seen, **task.metrics(sums, seen), **task.split_metrics(kept)}


@torch.no_grad()
def _eval_sums(
    model: torch.nn.Module, data: Any, task: Task, collate: Any, batch_size: int = 512
) -> tuple[float, dict[str, float], int, list[Any]]:
    """(summed loss, summed ``task.metric_sums``, samples, the batches' ``task.split_outputs``) of
    ``model`` over ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, seen = 0.0, 0
    sums: dict[str, float] = {}
    kept: list[Any] = []
    for batch in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        batch = task.to_device(batch, device)
        out = task.forward(model, batch)
        total += task.loss_sum(out, batch)
        for name, value in task.metric_sums(out, batch).items():
            sums[name] = sums.get(name, 0) + value
        seen += task.batch_size(batch)
        part = task.split_outputs(out, batch)
        if part is not None:
            kept.append(part)
    model.train(was_training)
    return total, sums, seen, kept


def evaluate_sharded(
    model: torch.nn.Module, data: Any, task: Task, ctx: distributed.Context
) -> dict[str, float]:
    """``evaluate``, sharded over the ranks (rank r takes samples r, r + P, ...), rank 0's buffers."""
    if ctx.world_size <= 1:
        return evaluate(model, data, task)
    distributed.broadcast_buffers(model)
    data, collate = unpack_data(data, task)
    part = Subset(data, range(ctx.rank, len(data), ctx.world_size))
    total, sums, seen, kept = _eval_sums(model, part, task, collate)
    total, seen, *values = distributed.all_sum([total, seen, *sums.values()])
    kept = [out for rank in distributed.all_gather_objects(kept) for out in rank]
    metrics = task.metrics(dict(zip(sums, values, strict=True)), seen)
    return {"loss": total / seen, **metrics, **task.split_metrics(kept)}
