"""The sampler's share of m gradients per rank, and the memory preflight at a world size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from compressor.core import distributed
from compressor.core.preflight import PreflightError, preflight
from compressor.lifecycle import sampling
from compressor.lifecycle.sampling import GradientSampler, shard


@pytest.mark.parametrize(("m", "world"), [(7, 2), (8, 2), (5, 3), (2, 4), (1, 1), (64, 5)])
def test_shares_cover_m_rows_once_the_first_ranks_one_more(m, world):
    shares = [shard(m, world, r) for r in range(world)]
    rows = [row for first, count in shares for row in range(first, first + count)]
    assert rows == list(range(m))  # every row once, in rank order
    counts = [count for _, count in shares]
    assert counts == sorted(counts, reverse=True) and max(counts) - min(counts) <= 1


def test_preflight_counts_the_ranks_on_one_host():
    gib = 1 << 30
    preflight("x", 4 * gib, budget=10 * gib, world_size=1)
    preflight("x", 4 * gib, budget=10 * gib, world_size=4, local_ranks=1)  # 4 * 1.25 = 5 GiB
    with pytest.raises(PreflightError, match=r"2 ranks on this host"):
        preflight("x", 4 * gib, budget=10 * gib, world_size=2, local_ranks=2)  # 2 * 4 * 1.5 = 12 GiB
    preflight("x", 4 * gib, budget=10 * gib, world_size=2, local_ranks=2, gathered=False)  # 8 GiB


class Counting(Dataset):
    """(x, y) pairs that remember which samples were loaded."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.loaded.append(i)
        return self.x[i], self.y[i]


def _as_rank(monkeypatch: pytest.MonkeyPatch, world: int, rank: int) -> list[torch.Tensor]:
    """Make the sampler believe it is ``rank`` of ``world``; returns where its gathered share lands."""
    parts: list[torch.Tensor] = []
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "broadcast_buffers", lambda model: None)
    monkeypatch.setattr(sampling, "gather_rows", lambda part, m, w: parts.append(part) or part)
    return parts


def _old_rows(model: torch.nn.Module, data: Dataset, m: int, batch_size: int, key: int) -> torch.Tensor:
    """The rows as the sampler drew them before it split drawing from loading: one seeded DataLoader
    over the data, cycled, every batch loaded."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + key)
    rows = []
    while len(rows) < m:
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            rows.append(model.weight.grad.reshape(-1).clone())
            if len(rows) == m:
                break
    return torch.stack(rows)


SEED = 3


@pytest.mark.parametrize(("m", "world"), [(7, 3), (8, 2), (2, 4)])
def test_each_rank_loads_only_its_rows_and_the_rows_are_unchanged(monkeypatch, m, world):
    """20 samples in batches of 8 (the third batch of each pass has 4): m rows cycle through passes."""
    model = torch.nn.Linear(4, 3)
    data = Counting(20)
    expected = _old_rows(model, data, m, batch_size=8, key=11)
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + 11)
    batches: list[list[int]] = []
    while len(batches) < m:  # the index lists of the m batches, as a DataLoader draws them
        batches += [
            b.tolist() for b in DataLoader(range(20), batch_size=8, shuffle=True, generator=generator)
        ]
    batches = batches[:m]
    parts = []
    for rank in range(world):
        with monkeypatch.context() as patch:
            gathered = _as_rank(patch, world, rank)
            data.loaded.clear()
            GradientSampler(model, data, seed=SEED).sample(["weight"], m, batch_size=8, key=11)
        first, count = shard(m, world, rank)
        assert data.loaded == [i for b in batches[first : first + count] for i in b]  # its rows, once
        parts += gathered
    assert torch.equal(torch.cat(parts), expected)  # row for row the rows of one process, as before


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
def test_chunks_are_the_rows_of_sample_in_order(chunk_rows):
    model = torch.nn.Linear(4, 3)
    data = Counting(20)
    sampler = GradientSampler(model, data, seed=SEED)
    rows = sampler.sample(["weight", "bias"], 7, batch_size=8, key=11)
    chunks = list(sampler.chunks(["weight", "bias"], 7, batch_size=8, key=11, chunk_rows=chunk_rows))
    step = chunk_rows or 7
    assert [len(c) for c in chunks] == [min(step, 7 - s) for s in range(0, 7, step)]
    assert torch.equal(torch.cat(chunks), rows)
    assert model.weight.grad is None and model.training  # restored after the iteration
    with pytest.raises(ValueError, match="chunk_rows"):
        sampler.chunks(["weight"], 7, batch_size=8, chunk_rows=0)


@pytest.mark.parametrize(("m", "world"), [(7, 3), (2, 4)])
def test_chunks_yield_only_the_ranks_own_rows_without_a_gather(monkeypatch, m, world):
    model = torch.nn.Linear(4, 3)
    data = Counting(20)
    expected = _old_rows(model, data, m, batch_size=8, key=11)
    parts = []
    for rank in range(world):
        with monkeypatch.context() as patch:
            gathered = _as_rank(patch, world, rank)
            own = list(
                GradientSampler(model, data, seed=SEED).chunks(
                    ["weight"], m, batch_size=8, key=11, chunk_rows=2
                )
            )
            assert gathered == []  # no all-gather of rows
        _, count = shard(m, world, rank)
        assert sum(len(c) for c in own) == count
        parts += own
    assert torch.equal(torch.cat(parts), expected)
