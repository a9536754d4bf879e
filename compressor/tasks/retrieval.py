"""Retrieval loss and metrics on sentence embeddings: pure functions on tensors, torch alone.

Conventions: ``queries`` is (n, h) and ``documents`` is (n, h) or (c, h) float tensors, one row per
text; document ``i`` is the relevant one for query ``i`` (so c >= n and rows n..c-1 are extra
distractors). Inputs need not be normalised: every function works on cosine similarity. Embeddings
of the sentence encoder come from :func:`mean_pool` and :func:`normalize`, as sentence-transformers
computes them for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the usual name)

from compressor.core.errors import CompressorError

#: The similarity scale of all-MiniLM-L6-v2's training loss (multiple-negatives ranking).
DEFAULT_SCALE = 20.0


class RetrievalError(CompressorError, ValueError):
    """Embeddings of the wrong shape for a retrieval loss or metric."""


def _check(queries: torch.Tensor, documents: torch.Tensor) -> None:
    if queries.dim() != 2 or documents.dim() != 2:
        raise RetrievalError(
            f"expected 2-d embeddings (rows, hidden), got queries {tuple(queries.shape)} and "
            f"documents {tuple(documents.shape)}"
        )
    if queries.shape[1] != documents.shape[1]:
        raise RetrievalError(
            f"queries have hidden size {queries.shape[1]} but documents {documents.shape[1]}"
        )
    if queries.shape[0] == 0:
        raise RetrievalError("no queries: a retrieval loss or metric needs at least one")
    if documents.shape[0] < queries.shape[0]:
        raise RetrievalError(
            f"{queries.shape[0]} queries but only {documents.shape[0]} documents; document i must be "
            "the one relevant to query i"
        )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the attention mask: (b, t, h), (b, t) -> (b, h).

    Padding tokens (mask 0) are left out; a row with no token gives zeros (the denominator is
    clamped at 1e-9, as sentence-transformers does).
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm: (n, h) -> (n, h); a zero row stays zero."""
    return F.normalize(embeddings, p=2, dim=-1)


def cosine_matrix(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query with every document: (n, h), (c, h) -> (n, c)."""
    _check(queries, documents)
    return normalize(queries) @ normalize(documents).T


def multiple_negatives_loss(
    queries: torch.Tensor, documents: torch.Tensor, scale: float = DEFAULT_SCALE
) -> torch.Tensor:
    """In-batch contrastive loss (multiple-negatives ranking): a scalar, the mean over the n queries.

    Cross-entropy of ``scale * cos(q_i, d_j)`` over j, with target j = i: every other document of the
    batch is a negative for query i. ``queries`` (n, h), ``documents`` (c, h) with c >= n (rows past n
    are extra hard negatives). Differentiable in both inputs.
    """
    _check(queries, documents)
    logits = scale * cosine_matrix(queries, documents)
    target = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, target)


def ranks(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's own document among all c documents: (n,) int64.

    Rank = 1 + the number of documents whose cosine is strictly higher than the own document's plus
    the number of *other* documents with an equal cosine (ties count against the query, so a model
    that maps every text to the same vector does not score recall 1).
    """
    _check(queries, documents)
    dtype = torch.float64 if torch.float64 in (queries.dtype, documents.dtype) else torch.float32
    sims = cosine_matrix(queries.to(dtype), documents.to(dtype))
    n = queries.shape[0]
    own = sims[torch.arange(n), torch.arange(n)].unsqueeze(1)
    at_least = (sims >= own).sum(dim=1)  # includes the own document itself
    return at_least.to(torch.int64)


def recall_at_k(queries: torch.Tensor, documents: torch.Tensor, k: int = 1) -> float:
    """Fraction of queries whose own document ranks within the top ``k`` (see :func:`ranks`); in [0, 1].

    ``k`` larger than the number of documents counts every query as found.
    """
    if k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    return (ranks(queries, documents) <= k).double().mean().item()


def mrr_at_k(queries: torch.Tensor, documents: torch.Tensor, k: int = 10) -> float:
    """Mean reciprocal rank cut at ``k``: mean of 1/rank when rank <= k, else 0; in [0, 1]."""
    if k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    r = ranks(queries, documents).double()
    return torch.where(r <= k, 1.0 / r, torch.zeros_like(r)).mean().item()


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i): two embeddings of the same n texts, (n, h) each; in [-1, 1].

    For example a pruned model's embeddings against the dense model's.
    """
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] == 0:
        raise RetrievalError(
            f"expected two embedding sets of the same shape (n >= 1, hidden), got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    return F.cosine_similarity(a.double(), b.double(), dim=1).mean().item()


def retrieval_metrics(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """``{"recall@1", "mrr@10", "candidates"}`` of queries (n, h) against documents (c, h)."""
    r = ranks(queries, documents).double()
    return {
        "recall@1": (r <= 1).double().mean().item(),
        "mrr@10": torch.where(r <= 10, 1.0 / r, torch.zeros_like(r)).mean().item(),
        "candidates": float(documents.shape[0]),
    }
