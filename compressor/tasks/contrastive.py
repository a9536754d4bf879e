"""The sentence-embedding contrastive task: (query, document) text pairs, in-batch negatives.

A sample is ``{"query": str, "document": str}`` (``compressor.data.CodePairs``, the built-in data
``code_pairs``). The task tokenizes a batch with the model's tokenizer (``prepare``), embeds both
sides with the model (a sentence encoder: ``model(input_ids, attention_mask)`` -> (b, h), or any
transformers model, whose ``last_hidden_state`` is mean-pooled and L2-normalised), and scores them:

- loss: multiple-negatives ranking (``compressor.tasks.retrieval.multiple_negatives_loss``): cross entropy
  of ``scale * cos(q_i, d_j)`` over the batch's documents j, target j = i; the mean over queries;
- metrics over a whole split (``split_metrics``): ``recall@1`` and ``mrr@10`` of each query's own
  document among all of the split's documents, and ``mean_cosine``: the mean, over every query and
  document of the split, of the cosine between the model's embedding and the embedding of the
  model as it was when the task was prepared (the dense model, before any pruning or training).

In a recipe: ``train: {task: contrastive, task_options: {max_length: 128}, data: code_pairs, ...}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compressor.tasks import retrieval
from compressor.tasks.base import Task, TaskError, describe_batch

#: all-MiniLM-L6-v2 was trained on 128 word pieces (special tokens included).
DEFAULT_MAX_LENGTH = 128
#: The similarity scale sentence-transformers trains with (``MultipleNegativesRankingLoss``).
DEFAULT_SCALE = retrieval.DEFAULT_SCALE


class ContrastiveTask(Task):
    """(query, document) pairs embedded by a sentence encoder and scored by in-batch contrast.

    Args:
        tokenizer: a transformers tokenizer; None takes the model's (``model.tokenizer``) in
            ``prepare``.
        max_length: word pieces per text after truncation (special tokens included), >= 2.
        scale: the inverse temperature of the loss, > 0 (20, as all-MiniLM-L6-v2 was trained).
        reference: keep a frozen copy of the model given to ``prepare`` for ``mean_cosine``
            (one more model in memory; its embeddings are computed once per text and cached).

    A batch: ``{"query": {"input_ids", "attention_mask"}, "document": {...}, "texts": (queries,
    documents)}``, the tensors int64 (b, t) with t <= max_length; the output: (queries (b, h),
    documents (b, h)).
    """

    name = "contrastive"

    def __init__(
        self,
        tokenizer: Any = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        scale: float = DEFAULT_SCALE,
        reference: bool = True,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise TaskError(f"contrastive: max_length must be an integer >= 2 tokens, got {max_length!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise TaskError(f"contrastive: scale must be a number > 0, got {scale!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.scale = float(scale)
        self.keep_reference = bool(reference)
        self.reference: nn.Module | None = None
        self._reference_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ set-up

    def prepare(self, model: nn.Module) -> None:
        """Take the model's tokenizer (unless one was given) and a frozen copy of the model as the
        reference of ``mean_cosine``. Done once; later calls change nothing."""
        if self.tokenizer is None:
            tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is None or not callable(tokenizer):
                raise TaskError(
                    f"contrastive: the model ({type(model).__name__}) has no tokenizer; use a sentence "
                    "encoder loaded with hf:SOURCE whose directory holds its tokenizer, or pass "
                    "ContrastiveTask(tokenizer=...)"
                )
            self.tokenizer = tokenizer
        if self.keep_reference and self.reference is None:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    # ------------------------------------------------------------ batches

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        """Tokenize a list of ``{"query", "document"}`` samples (padding to the longest, truncation)."""
        try:
            queries = [str(s["query"]) for s in samples]
            documents = [str(s["document"]) for s in samples]
        except (KeyError, TypeError, IndexError) as exc:
            first = describe_batch(samples[0]) if samples else "nothing"
            raise TaskError(
                f"contrastive: a sample must be a mapping with 'query' and 'document' texts, got {first}"
            ) from exc
        return {
            "query": self._tokenize(queries),
            "document": self._tokenize(documents),
            "texts": (tuple(queries), tuple(documents)),
        }

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise TaskError("contrastive: no tokenizer yet; call task.prepare(model) first")
        out = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}

    def _sides(self, batch: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        if (
            not isinstance(batch, Mapping)
            or not isinstance(batch.get("query"), Mapping)
            or not isinstance(batch.get("document"), Mapping)
        ):
            raise TaskError(
                f"contrastive: a batch must be a mapping with tokenized 'query' and 'document' "
                f"(made by the task's collate), got {describe_batch(batch)}"
            )
        return batch["query"], batch["document"]

    def forward(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (b, h), documents (b, h)): the model's embedding of each side."""
        query, document = self._sides(batch)
        return embed(model, query), embed(model, document)

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """Multiple-negatives ranking loss of the batch (a mean over its queries)."""
        queries, documents = output
        return retrieval.multiple_negatives_loss(queries, documents, self.scale)

    def batch_size(self, batch: Any) -> int:
        """Pairs in the batch."""
        return int(self._sides(batch)[0]["input_ids"].shape[0])

    def model_inputs(self, batch: Any) -> Any:
        """The queries' ``{"input_ids", "attention_mask"}`` (the model is called as model(**inputs))."""
        return dict(self._sides(batch)[0])

    def example_inputs(self, batch: Any) -> list[Any]:
        """Both sides: the short queries and the long documents."""
        query, document = self._sides(batch)
        return [dict(query), dict(document)]

    # ------------------------------------------------------------ metrics

    def split_outputs(self, output: Any, batch: Any) -> Any:
        """The batch's embeddings on the CPU (float32) with their texts."""
        queries, documents = output
        texts = batch.get("texts") if isinstance(batch, Mapping) else None
        return queries.detach().float().cpu(), documents.detach().float().cpu(), texts

    def split_metrics(self, outputs: list[Any]) -> dict[str, float]:
        """``recall@1`` and ``mrr@10`` among all of the split's documents, and ``mean_cosine`` to the
        reference model's embeddings of the same texts (when the task keeps a reference)."""
        if not outputs:
            return {}
        queries = torch.cat([q for q, _, _ in outputs])
        documents = torch.cat([d for _, d, _ in outputs])
        found = retrieval.retrieval_metrics(queries, documents)
        metrics = {"recall@1": found["recall@1"], "mrr@10": found["mrr@10"]}
        if self.reference is not None and all(texts is not None for _, _, texts in outputs):
            texts = [t for _, _, (qs, ds) in outputs for t in qs] + [
                t for _, _, (qs, ds) in outputs for t in ds
            ]
            mine = torch.cat([queries, documents])
            metrics["mean_cosine"] = retrieval.mean_cosine(mine, self.reference_embeddings(texts))
        return metrics

    @torch.no_grad()
    def reference_embeddings(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """The reference model's embeddings of ``texts``: (n, h) float32 on the CPU, cached by text."""
        if self.reference is None:
            raise TaskError("contrastive: no reference model (prepare(model) with reference=True)")
        missing = sorted({t for t in texts if t not in self._reference_cache}, key=len)
        device = next(self.reference.parameters()).device
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            tokens = {k: v.to(device) for k, v in self._tokenize(chunk).items()}
            for text, row in zip(chunk, embed(self.reference, tokens).float().cpu(), strict=True):
                self._reference_cache[text] = row
        return torch.stack([self._reference_cache[t] for t in texts])

    def __getstate__(self) -> dict[str, Any]:  # the reference cache is rebuilt on demand
        state = self.__dict__.copy()
        state["_reference_cache"] = {}
        return state


def embed(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's sentence embeddings of tokenized ``inputs``: (b, h).

    A model returning a (b, h) tensor is used as it is (``compressor.models.pretrained.SentenceEncoder``
    pools and normalises); one returning ``last_hidden_state`` (b, t, h) is mean-pooled over the
    attention mask and L2-normalised, as sentence-transformers does.
    """
    out = model(**inputs)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out
    hidden = (
        out.get("last_hidden_state") if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
    )
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        return retrieval.normalize(retrieval.mean_pool(hidden, inputs["attention_mask"]))
    shown = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    raise TaskError(
        f"contrastive: the model returned {shown}; expected sentence embeddings (batch, hidden) or an "
        "output with last_hidden_state (batch, tokens, hidden)"
    )
