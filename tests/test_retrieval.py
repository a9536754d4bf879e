"""compressor.tasks.retrieval against brute-force loops: loss, ranks, recall@k, MRR@k, mean cosine,
pooling."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.tasks.retrieval import (
    DEFAULT_SCALE,
    RetrievalError,
    cosine_matrix,
    mean_cosine,
    mean_pool,
    mrr_at_k,
    multiple_negatives_loss,
    normalize,
    ranks,
    recall_at_k,
    retrieval_metrics,
)

ROOT = Path(__file__).resolve().parents[1]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().tolist(), b.double().tolist()
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def _brute_ranks(q: torch.Tensor, d: torch.Tensor) -> list[int]:
    out = []
    for i in range(q.shape[0]):
        own = _cos(q[i], d[i])
        out.append(1 + sum(1 for j in range(d.shape[0]) if j != i and _cos(q[i], d[j]) >= own))
    return out


def _unnormalised(gen: torch.Generator, n: int, h: int) -> torch.Tensor:
    """Random rows with norms spread over two orders of magnitude, float64."""
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    return x * torch.exp(torch.randn(n, 1, generator=gen, dtype=torch.float64) * 2)


@pytest.mark.parametrize("extra", [0, 5])
def test_ranks_recall_mrr_match_brute_force(gen, extra):
    n, h = 23, 6
    q = _unnormalised(gen, n, h)
    # Documents near their query so that ranks spread over 1..c rather than all being large.
    d = torch.cat([q + 1.5 * _unnormalised(gen, n, h) / 10, _unnormalised(gen, extra, h)])
    brute = _brute_ranks(q, d)
    assert ranks(q, d).tolist() == brute
    c = n + extra
    for k in (1, 3, 10, c + 7):
        assert recall_at_k(q, d, k) == pytest.approx(sum(r <= k for r in brute) / n)
        assert mrr_at_k(q, d, k) == pytest.approx(sum(1 / r for r in brute if r <= k) / n)
    assert recall_at_k(q, d, c + 7) == 1.0  # k beyond the candidates: every query found
    m = retrieval_metrics(q, d)
    assert m["candidates"] == c
    assert m["recall@1"] == pytest.approx(recall_at_k(q, d, 1))
    assert m["mrr@10"] == pytest.approx(mrr_at_k(q, d, 10))


def test_ties_count_against_the_query():
    # One-hot rows: cosines are exactly 0 or 1, so ties are exact. Rows i and i + 3 coincide.
    h, n = 3, 7
    q = torch.eye(h)[torch.arange(n) % h]
    d = q.clone()
    brute = _brute_ranks(q, d)
    assert ranks(q, d).tolist() == brute
    assert brute == [3, 2, 2, 3, 2, 2, 3]
    assert recall_at_k(q, d, 1) == 0.0
    assert mrr_at_k(q, d, 10) == pytest.approx(sum(1 / r for r in brute) / n)
    same = torch.ones(5, 4)  # every text the same vector: rank c for all, not 1
    assert ranks(same, same).tolist() == [5] * 5
    assert recall_at_k(same, same, 1) == 0.0


def test_scale_invariance_of_metrics(gen):
    q, d = _unnormalised(gen, 12, 5), _unnormalised(gen, 12, 5)
    scaled = d * torch.rand(12, 1, generator=gen, dtype=torch.float64).add(0.1) * 100
    assert ranks(q, d).tolist() == ranks(q * 7, scaled).tolist()
    assert torch.allclose(cosine_matrix(q, d), cosine_matrix(q * 7, scaled))


@pytest.mark.parametrize("extra", [0, 4])
def test_multiple_negatives_loss_matches_brute_force(gen, extra):
    n, h = 9, 5
    q, d = _unnormalised(gen, n, h), _unnormalised(gen, n + extra, h)
    total = 0.0
    for i in range(n):
        logits = [DEFAULT_SCALE * _cos(q[i], d[j]) for j in range(n + extra)]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(x - top) for x in logits))
        total += log_z - logits[i]
    loss = multiple_negatives_loss(q, d)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(total / n, rel=1e-10)
    assert multiple_negatives_loss(q * 3, d / 5).item() == pytest.approx(loss.item(), rel=1e-10)
    assert multiple_negatives_loss(q, d, scale=1.0).item() != pytest.approx(loss.item())


def test_loss_gradients_flow_and_favour_the_pair(gen):
    q = torch.randn(6, 4, generator=gen, requires_grad=True)
    d = torch.randn(6, 4, generator=gen, requires_grad=True)
    loss = multiple_negatives_loss(q, d)
    loss.backward()
    assert q.grad is not None and d.grad is not None
    assert q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0
    # Perfectly matched, well separated pairs give a near-zero loss.
    eye = torch.eye(6)
    assert multiple_negatives_loss(eye, eye).item() < 1e-6


def test_mean_cosine_matches_loop(gen):
    a, b = _unnormalised(gen, 10, 7), _unnormalised(gen, 10, 7)
    assert mean_cosine(a, b) == pytest.approx(sum(_cos(a[i], b[i]) for i in range(10)) / 10, rel=1e-10)
    assert mean_cosine(a, a * 5) == pytest.approx(1.0)
    assert mean_cosine(a, -a) == pytest.approx(-1.0)
    assert mean_cosine(a.float(), b.float()) == pytest.approx(mean_cosine(a, b), abs=1e-5)


def test_mean_pool_and_normalize(gen):
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    assert pooled.shape == (3, 4)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0))
    assert torch.allclose(pooled[1], hidden[1].mean(0))
    assert torch.equal(pooled[2], torch.zeros(4))  # no token: zeros, not NaN
    unit = normalize(pooled)
    assert torch.allclose(unit[:2].norm(dim=1), torch.ones(2))
    assert torch.equal(unit[2], torch.zeros(4))


@pytest.mark.parametrize(
    ("q_shape", "d_shape", "call", "says"),
    [
        ((4, 3), (4, 2), "recall", "hidden size 3 but documents 2"),
        ((4, 3), (3, 3), "loss", "4 queries but only 3 documents"),
        ((4,), (4, 3), "mrr", "expected 2-d embeddings"),
        ((0, 3), (2, 3), "recall", "no queries"),
    ],
)
def test_bad_shapes_raise_clear_errors(q_shape, d_shape, call, says):
    fn = {"recall": recall_at_k, "loss": multiple_negatives_loss, "mrr": mrr_at_k}[call]
    with pytest.raises(RetrievalError) as info:
        fn(torch.ones(q_shape), torch.ones(d_shape))
    assert isinstance(info.value, CompressorError)
    assert says in str(info.value)


def test_bad_k_and_mismatched_mean_cosine():
    with pytest.raises(RetrievalError, match="k must be at least 1"):
        recall_at_k(torch.ones(2, 2), torch.ones(2, 2), k=0)
    with pytest.raises(RetrievalError, match="same shape"):
        mean_cosine(torch.ones(2, 3), torch.ones(3, 3))


BLOCK_TRANSFORMERS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transformers", "tokenizers", "pydantic", "yaml"}:
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import compressor.tasks.retrieval, compressor.data
print("ok")
"""


def test_retrieval_and_data_import_with_torch_alone():
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TRANSFORMERS], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
