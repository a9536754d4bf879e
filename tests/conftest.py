"""Shared oracles and data for the M-FAC tests: the dense float64 inverse and gradient draws."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

EPS32 = torch.finfo(torch.float32).eps
#: Fresh random data each run; set COMPRESSOR_TEST_SEED to replay a run (the seed is in the header).
SESSION_SEED = int(os.environ.get("COMPRESSOR_TEST_SEED", random.randrange(2**31)))


#: Hypothesis profiles (tests/test_recipe_fuzz.py): "ci", the default, replays the same examples each
#: run (derandomized: CI is not flaky); COMPRESSOR_FUZZ=slow draws ten times as many, fresh each run.
#: No example database (a failure prints how to reproduce it); hypothesis keeps only caches in .hypothesis/.
_FUZZ = {"deadline": None, "database": None, "print_blob": True}
_FUZZ_SLOW_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci", max_examples=300, derandomize=True, suppress_health_check=_FUZZ_SLOW_CHECKS, **_FUZZ
)
settings.register_profile("slow", max_examples=3000, suppress_health_check=_FUZZ_SLOW_CHECKS, **_FUZZ)
FUZZ_PROFILE = os.environ.get("COMPRESSOR_FUZZ", "ci")
settings.load_profile(FUZZ_PROFILE)


def pytest_report_header() -> list[str]:
    return [
        f"compressor test seed: COMPRESSOR_TEST_SEED={SESSION_SEED}",
        f"compressor fuzz profile: COMPRESSOR_FUZZ={FUZZ_PROFILE} ({settings.default.max_examples} examples)",
    ]


def dense_fisher(grads: torch.Tensor, damp: float, block_size: int | None = None) -> torch.Tensor:
    """F = damp*I + (1/m) G^T G, block-diagonal over runs of block_size coordinates; float64 (d, d)."""
    g = grads.to(torch.float64)
    m, d = g.shape
    size = d if block_size is None else block_size
    f = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, d, size):
        blk = g[:, s : s + size]
        f[s : s + size, s : s + size] = blk.T @ blk / m
    f.diagonal().add_(damp)
    return f


def condition(f: torch.Tensor) -> float:
    """cond(F) = largest / smallest eigenvalue of the symmetric positive definite F."""
    ev = torch.linalg.eigvalsh(f)
    return (ev[-1] / ev[0]).item()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest row-wise ||y - ref|| / ||ref|| (rows: vectors of a batch), in float64."""
    y, ref = y.to(torch.float64).reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return ((y - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def entry_pairs(d: int, gen: torch.Generator) -> list[list[int]]:
    """(i, j) coordinates to probe ``entry`` at: 8 random pairs, the first and last diagonal entries,
    and two neighbours across the start and the end."""
    return [
        *torch.randint(0, d, (8, 2), generator=gen).tolist(),
        [0, 0],
        [d - 1, d - 1],
        [0, 1],
        [d - 2, d - 1],
    ]


def probe_vectors(grads: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rows: a random vector, a vector in the span of the gradients, the newest gradient. float64 (3, d)."""
    g = grads.to(torch.float64)
    m, d = g.shape
    scale = g.norm() / max(1, g.numel()) ** 0.5
    x = torch.empty(3, d, dtype=torch.float64)
    x[0] = torch.randn(d, generator=gen, dtype=torch.float64) * scale
    x[1] = torch.randn(m, generator=gen, dtype=torch.float64) @ g
    x[2] = g[-1]
    return x


def realistic_grads(m: int, d: int, gen: torch.Generator, scale: float = 1e-2) -> torch.Tensor:
    """Mini-batch-like gradients: a shared mean direction plus noise, rows of norm ~ scale * sqrt(d) / 10."""
    mean = torch.randn(d, generator=gen, dtype=torch.float64)
    noise = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return (0.5 * mean + noise) * scale / 10


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the session seed and the test's id: fresh each run, replayable."""
    g = torch.Generator()
    g.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


class DictData(torch.utils.data.Dataset):
    """n samples {"features": (8,) float32, "labels": () int64} of 3 classes, fixed by ``seed``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, 8, generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "labels": self.labels[i]}
