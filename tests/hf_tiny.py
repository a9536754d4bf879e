"""Builders of tiny transformers directories for tests (no download): a BERT sentence encoder laid out
as sentence-transformers saves one, and a BERT sequence classifier, each with its tokenizer.

The vocabulary is the special tokens plus the words (lower-cased, split as BERT's basic tokenizer
splits) of the texts given, so real text tokenizes to real ids rather than to [UNK].
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers

HIDDEN, LAYERS, HEADS, INTERMEDIATE = 32, 2, 4, 48
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ENCODER_LINEARS = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"


def vocabulary(texts: Iterable[str], size: int = 400) -> list[str]:
    """The special tokens and the ``size`` most frequent words and punctuation marks of ``texts``."""
    counts = Counter(w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower()))
    return SPECIAL + [w for w, _ in counts.most_common(size)]


def config(vocab_size: int, max_positions: int = 128, **extra: object) -> transformers.BertConfig:
    """A 2-layer BERT of width 32 (4 heads)."""
    return transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=max_positions,
        **extra,
    )


def save_tokenizer(directory: Path, words: list[str]) -> None:
    """A BertTokenizerFast over ``words`` (the special tokens first), saved in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(directory))


def save_sentence_layout(directory: Path, max_seq_length: int = 64) -> None:
    """modules.json (Transformer, mean Pooling, Normalize), 1_Pooling/config.json, sentence_bert_config."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    modes = {f"pooling_mode_{m}": m == "mean_tokens" for m in ("cls_token", "mean_tokens", "max_tokens")}
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN, **modes})
    )
    (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def sentence_encoder_dir(directory: Path, texts: Iterable[str], seed: int = 0) -> Path:
    """A tiny BERT sentence encoder (mean pooling, normalised) with a tokenizer of ``texts``' words."""
    words = vocabulary(texts)
    torch.manual_seed(seed)
    transformers.BertModel(config(len(words)), add_pooling_layer=False).save_pretrained(str(directory))
    save_tokenizer(directory, words)
    save_sentence_layout(directory)
    return directory


def classifier_dir(directory: Path, texts: Iterable[str], labels: int = 2, seed: int = 0) -> Path:
    """A tiny BertForSequenceClassification with a tokenizer of ``texts``' words."""
    words = vocabulary(texts)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(config(len(words), num_labels=labels))
    model.save_pretrained(str(directory))
    save_tokenizer(directory, words)
    return directory
