"""Text data that ships with compressor: code-search pairs from the CPython standard library.

``code_pairs.jsonl.gz`` (beside this file, built by :mod:`compressor.data.build_code_pairs`, whose
docstring states the rules) holds (query, document) pairs: the first sentence of a documented
function's docstring and the function's code without its docstring, with fixed train / validation /
test splits. The source is the Python Software Foundation's (``LICENSE-PSF.txt``, ``NOTICE``).

Use::

    pairs = CodePairs("train", tokenizer="path/to/model_dir")   # items {"query": str, "document": str}
    loader = DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=pairs.collate)
    # each batch: {"query": {"input_ids", "attention_mask"}, "document": {...}}, int64 (b, t)

Importing this module needs torch alone; ``transformers`` is imported when a tokenizer is loaded.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from compressor.core.errors import CompressorError

#: The shipped pairs (gzip of JSON lines; the first line is a header with the rules and counts).
DATA_FILE = Path(__file__).with_name("code_pairs.jsonl.gz")
FORMAT = "compressor.code_pairs/1"
SPLITS = ("train", "validation", "test")
#: all-MiniLM-L6-v2 was trained on 128 word pieces; longer inputs are truncated to this by default.
DEFAULT_MAX_LENGTH = 128

__all__ = [
    "DATA_FILE",
    "DEFAULT_MAX_LENGTH",
    "SPLITS",
    "CodePairs",
    "DataError",
    "PairCollator",
    "code_pairs_header",
    "load_code_pairs",
    "load_tokenizer",
]


class DataError(CompressorError, ValueError):
    """A data set or tokenizer that cannot be used as asked (unknown split, missing file, bad format)."""


def _read_lines(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"code-pairs file {path} does not exist (build it: python -m compressor.data.build_code_pairs)"
        )
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            records = [json.loads(line) for line in f]
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"code-pairs file {path} is not gzip of JSON lines: {e}") from e
    if not records or records[0].get("format") != FORMAT:
        found = records[0].get("format") if records else None
        raise DataError(
            f"code-pairs file {path}: expected a first line with format {FORMAT!r}, got {found!r}"
        )
    return records


def code_pairs_header(path: str | Path = DATA_FILE) -> dict[str, Any]:
    """The data file's header: ``format``, ``python`` (the version that built it), ``rules``, ``counts``."""
    return _read_lines(Path(path))[0]


def load_code_pairs(
    split: str, path: str | Path = DATA_FILE, limit: int | None = None
) -> list[dict[str, Any]]:
    """The pairs of one split, in file order: dicts ``{"query", "document", "module", "qualname", ...}``.

    ``split``: ``"train"``, ``"validation"`` or ``"test"``. ``limit``: keep the first ``limit`` pairs.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    pairs = [r for r in _read_lines(Path(path))[1:] if r.get("split") == split]
    for r in pairs[:1]:
        if not isinstance(r.get("query"), str) or not isinstance(r.get("document"), str):
            raise DataError(f"code-pairs file {path}: records need string 'query' and 'document'")
    return pairs[:limit] if limit is not None else pairs


def load_tokenizer(directory: str | Path) -> Any:
    """A tokenizer from a local model directory (``tokenizer.json`` or ``vocab.txt``); never downloads."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"tokenizer directory {directory} does not exist")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise DataError("loading a tokenizer needs transformers: pip install 'compressor[hf]'") from e
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"no usable tokenizer in {directory}: {e}") from e


class PairCollator:
    """Tokenizes a batch of ``{"query", "document"}`` items: padding to the longest, truncation.

    Returns ``{"query": {"input_ids", "attention_mask"}, "document": {...}}``, each int64 (b, t) with
    t <= ``max_length`` (word pieces, special tokens included).
    """

    def __init__(self, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if max_length < 2:
            raise DataError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer
        self.max_length = max_length

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        try:
            queries = [item["query"] for item in batch]
            documents = [item["document"] for item in batch]
        except (KeyError, TypeError) as e:
            raise DataError(f"a pair batch needs items with 'query' and 'document' texts: {e!r}") from e
        return {"query": self._encode(queries), "document": self._encode(documents)}


class CodePairs(Dataset):
    """One split of the code-search pairs as a map-style Dataset of ``{"query": str, "document": str}``.

    ``tokenizer``: a local model directory (or a tokenizer object) for :attr:`collate`; None leaves
    the texts untokenized (``collate`` then raises). ``max_length``: tokens per text after truncation.
    ``limit``: the first ``limit`` pairs of the split. ``path``: another file of the same format.
    """

    def __init__(
        self,
        split: str,
        tokenizer: str | Path | Any | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        limit: int | None = None,
        path: str | Path = DATA_FILE,
    ) -> None:
        self.split = split
        self.pairs = load_code_pairs(split, path, limit)
        self.collator = None if tokenizer is None else PairCollator(tokenizer, max_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, str]:
        pair = self.pairs[index]
        return {"query": pair["query"], "document": pair["document"]}

    def collate(self, batch: Sequence[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        """Tokenize a list of items (see :class:`PairCollator`); for ``DataLoader(collate_fn=...)``."""
        if self.collator is None:
            raise DataError("CodePairs was made without a tokenizer; pass tokenizer=<model directory>")
        return self.collator(batch)
