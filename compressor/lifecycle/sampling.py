"""Mini-batch gradients for second-order modifiers.

``GradientSampler.sample`` returns m gradients of the selected parameters, one mini-batch each,
as rows of an (m, d) float32 tensor; ``GradientSampler.chunks`` yields the same rows in (k, d)
chunks (for the streamed block Fisher, which never holds all m rows). The model runs in eval mode
(batch-norm uses its running statistics, as in the reference pruner) and is put back in its previous
mode afterwards; the parameters' ``.grad`` are restored too, so sampling inside a training step
changes nothing.
Batches come from a private, seeded generator: the same call at the same step draws the same
batches, which keeps interrupted-and-resumed runs identical.

Under torch.distributed (torchrun, DDP) every rank draws the same seeded stream of m batches and
computes only its share of the rows: rank r takes the rows [start_r, end_r) where the first m % P
ranks take one row more than m // P. The shares are then all-gathered in rank order, so every rank
returns the same (m, d) tensor, row for row the one a single process computes: exactly m
gradients, none counted twice, no silent m / P. Each rank's batches are its own shard of the
stream: every rank draws the index lists of all m batches from the seeded generator (cheap), and
loads and collates only the samples of its own rows. Gradients are taken on the model inside the
DDP wrapper (no all-reduce of its own), after rank 0's batch-norm statistics are copied to every
rank. ``chunks`` yields only the rank's own rows, with no gather: the streamed block Fisher sums
them on each rank and all-reduces its d * B sums instead of gathering m * d rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from compressor.core import distributed
from compressor.core.params import normalize
from compressor.mfac.partition import shard_range
from compressor.tasks import Task, as_task, unpack_data


class GradientSampler:
    """Draws mini-batch gradients of named parameters of ``model`` from ``data``.

    Args:
        model: the model, possibly DDP-wrapped (the wrapper is looked through: sampling never
            triggers DDP's all-reduce).
        data: a Dataset whose samples ``task`` collates and reads, or a DataLoader (its dataset and
            collate_fn are used; batches are drawn by index in the sampler's own seeded order).
        loss_fn: loss(output, target) of a classification task (default cross entropy); or give
        task: a ``compressor.tasks.Task`` (how batches are collated, moved, fed to the model and
            their mean loss taken); not both.
        seed: seeds the sampler's own shuffling (the global RNG is not touched).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data: Dataset,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        *,
        task: Task | None = None,
    ) -> None:
        self.model = distributed.unwrap(model)
        self.task = as_task(task, loss_fn)
        self.data, self.collate = unpack_data(data, self.task)
        self.seed = seed

    def sample(
        self,
        names: list[str],
        num_grads: int,
        batch_size: int,
        *,
        key: int = 0,
        select: dict[str, torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """(num_grads, d) float32: row i is the gradient of the mean loss over batch i.

        ``names``: parameters (normalized names) whose gradients are concatenated in this order.
        ``select``: optional bool mask per name; only those coordinates are kept (d = their count).
        ``key``: mixed into the shuffling seed (pass the step, so resumed runs draw the same batches).
        The loss of row i is the task's (``task.loss(task.forward(model, batch), batch)``).
        Collective under torch.distributed: every rank must call it with the same arguments.
        """
        world = distributed.world_size()
        parts = list(self.chunks(names, num_grads, batch_size, key=key, select=select, device=device))
        (out,) = parts  # chunk_rows None: this rank's rows in one chunk, no copy
        return out if world == 1 else gather_rows(out, num_grads, world)

    def chunks(
        self,
        names: list[str],
        num_grads: int,
        batch_size: int,
        *,
        key: int = 0,
        select: dict[str, torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
        chunk_rows: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """The rows of ``sample`` as (k, d) float32 chunks of at most ``chunk_rows`` rows (None: one
        chunk), each a new tensor, so a consumer (``compressor.mfac.BlockFisherInverse.add``) never
        needs all m rows at once.

        Under torch.distributed each rank yields only its own share of the rows (``shard``: rank r's
        rows of the same seeded stream, in order; possibly none), with no gather: combine the ranks'
        results yourself (``BlockFisherInverse.all_reduce``). Collective: every rank iterates it to
        the end with the same arguments. The model's mode and the parameters' ``.grad`` are restored
        when the iteration ends (or the iterator is closed).
        """
        if num_grads < 1 or batch_size < 1:
            raise ValueError(f"num_grads and batch_size must be >= 1, got {num_grads} and {batch_size}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
        params = dict((normalize(n), p) for n, p in self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"unknown parameters {missing[:5]}")
        return self._chunks(names, params, num_grads, batch_size, key, select, device, chunk_rows)

    def _chunks(
        self,
        names: list[str],
        params: dict[str, torch.nn.Parameter],
        num_grads: int,
        batch_size: int,
        key: int,
        select: dict[str, torch.Tensor] | None,
        device: torch.device | str,
        chunk_rows: int | None,
    ) -> Iterator[torch.Tensor]:
        chosen = [params[n] for n in names]
        keep = [None if select is None else select[n].reshape(-1) for n in names]
        dim = sum(p.numel() if k is None else int(k.sum()) for p, k in zip(chosen, keep, strict=True))
        world, rank = distributed.world_size(), distributed.rank()
        first, count = shard(num_grads, world, rank)
        if world > 1:
            distributed.broadcast_buffers(self.model)
        step = count if chunk_rows is None else chunk_rows
        every = list(self.model.parameters())
        saved = [p.grad for p in every]  # all of them: backward writes every parameter's .grad
        was_training = self.model.training
        model_device = chosen[0].device if chosen else torch.device("cpu")
        self.model.eval()
        try:
            batches = self._index_batches(batch_size, key)
            for _ in range(first):  # the rows of the ranks before this one: drawn, not loaded
                next(batches)
            if count == 0 and chunk_rows is None:
                yield torch.empty(0, dim, dtype=torch.float32, device=device)
            for start in range(0, count, max(1, step)):
                out = torch.empty(min(step, count - start), dim, dtype=torch.float32, device=device)
                for row in range(out.shape[0]):
                    self._gradient_row(next(batches), model_device, every, chosen, keep, out[row])
                yield out
        finally:
            for p, g in zip(every, saved, strict=True):
                p.grad = g
            self.model.train(was_training)

    def _gradient_row(
        self,
        indices: list[int],
        model_device: torch.device,
        every: list[torch.nn.Parameter],
        chosen: list[torch.nn.Parameter],
        keep: list[torch.Tensor | None],
        out: torch.Tensor,
    ) -> None:
        """Write the gradient of the mean loss over the batch ``indices`` into the row ``out``."""
        batch = self.task.to_device(fetch_batch(self.data, indices, self.collate), model_device)
        for p in every:
            p.grad = None
        with torch.enable_grad():
            self.task.loss(self.task.forward(self.model, batch), batch).backward()
        offset = 0
        for p, k in zip(chosen, keep, strict=True):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            g = g.reshape(-1) if k is None else g.reshape(-1)[k]
            out[offset : offset + g.numel()] = g
            offset += g.numel()

    def _index_batches(self, batch_size: int, key: int) -> Iterator[list[int]]:
        """The sample indices of each shuffled batch, cycling through the data as often as needed.

        Drawn exactly as ``DataLoader(data, batch_size, shuffle=True, generator=...)`` draws its
        batches, epoch after epoch, without loading a sample.
        """
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        while True:
            loader = DataLoader(
                range(len(self.data)), batch_size=batch_size, shuffle=True, generator=generator
            )
            for indices in loader:
                yield indices.tolist()

    def _batches(self, batch_size: int, key: int) -> Iterator[Any]:
        """Shuffled batches (``_index_batches``, loaded and collated)."""
        for indices in self._index_batches(batch_size, key):
            yield fetch_batch(self.data, indices, self.collate)


def fetch_batch(
    data: Dataset, indices: list[int], collate: Callable[[list[Any]], Any] = default_collate
) -> Any:
    """The samples of ``data`` at ``indices``, collated as a DataLoader does (``__getitems__`` if the
    dataset has it, else one ``data[i]`` each; then ``collate``, by default ``default_collate``)."""
    getitems = getattr(data, "__getitems__", None)
    samples = getitems(indices) if getitems is not None else [data[i] for i in indices]
    return collate(samples)


def shard(m: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of ``rank``'s share of m rows: the first m % P ranks take one more
    (the split of the sharded M-FAC window's coordinates, ``shard_range``)."""
    start, stop = shard_range(m, world, rank)
    return start, stop - start


def gather_rows(part: torch.Tensor, m: int, world: int) -> torch.Tensor:
    """The (m, d) tensor of every rank's rows (``shard``), in rank order, on every rank.

    The shares are padded to ceil(m / P) rows for the all-gather, then packed in place; the result
    is a view of the first m rows of that (m + P - 1, d) buffer.
    """
    import torch.distributed as dist

    home = part.device
    size = -(-m // world)
    comm = distributed.comm_device()  # nccl gathers on the GPU, gloo on the CPU
    padded = torch.zeros(size, part.shape[1], dtype=part.dtype, device=comm)
    padded[: part.shape[0]] = part
    del part
    buffer = torch.empty(size * world, padded.shape[1], dtype=padded.dtype, device=comm)
    dist.all_gather(list(buffer.chunk(world)), padded)
    del padded
    for r in range(world):
        first, count = shard(m, world, r)
        if first != r * size:  # rows move towards the front only: one row at a time never overlaps
            for i in range(count):
                buffer[first + i] = buffer[r * size + i]
    return buffer[:m].to(home)
