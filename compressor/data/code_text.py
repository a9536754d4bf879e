"""Code as text for language models: the code side of the shipped code-search pairs, byte-level tokens.

``CodeText(split)`` holds the functions of one split of ``code_pairs.jsonl.gz``
(``compressor.data.code_pairs``: the same fixed split by a hash of each function's name, so no function
is in two splits) as fixed-length blocks of byte tokens for a causal language model:

- each function's code is encoded as UTF-8 bytes (tokens 0-255), with ``EOS`` (256, GPT-2's
  ``<|endoftext|>``) before and after it: the first block of a function starts at its beginning and
  the model learns where a function ends;
- that sequence is cut into blocks of ``block_size`` tokens, in order; the last block of a function
  is filled up with ``PAD`` (257). A block never holds two functions.

Each item is ``{"input_ids", "attention_mask", "labels"}``, int64 ``(block_size,)`` each: the mask is
1 on the function's tokens and 0 on padding, and ``labels`` are ``input_ids`` with -100 at padding
(the model shifts them by one itself, as Hugging Face causal LMs do). ``default_collate`` stacks
them into ``(batch, block_size)`` tensors, so the ``model-loss`` task takes them as they are.

Why bytes rather than MiniLM's word pieces (the other tokenizer that ships offline): code is
whitespace- and case-sensitive, and the uncased word-piece tokenizer drops both (indentation, line
breaks, ``Foo`` vs ``foo``), so a model trained on its tokens cannot write code back; and its 30,522
word pieces make the output layer (30,522 x width) cost more than the whole transformer of a model
small enough to train on 2 CPU cores, where 258 byte tokens cost almost nothing. Importing this
module needs torch alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from compressor.data.code_pairs import DATA_FILE, DataError, load_code_pairs

__all__ = ["EOS", "IGNORE", "PAD", "VOCAB_SIZE", "ByteTokenizer", "CodeText"]

#: ``<|endoftext|>``: before and after every function (GPT-2's bos and eos are one token).
EOS = 256
#: Fills the last block of a function; masked out of attention and loss.
PAD = 257
#: Bytes 0-255, EOS and PAD.
VOCAB_SIZE = 258
#: The label of a token that is not scored (PyTorch's and Hugging Face's ``ignore_index``).
IGNORE = -100
DEFAULT_BLOCK_SIZE = 128


class ByteTokenizer:
    """Text <-> tokens: UTF-8 bytes are tokens 0-255, ``EOS`` = 256, ``PAD`` = 257; lossless, no files."""

    vocab_size = VOCAB_SIZE
    eos_token_id = EOS
    pad_token_id = PAD

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of ``text``, between two ``EOS`` when ``add_special_tokens``."""
        ids = list(text.encode("utf-8"))
        return [EOS, *ids, EOS] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """The text of byte tokens (invalid UTF-8 replaced); specials dropped, else shown as markers."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out, chunk = [], bytearray()
        for value in values:
            if 0 <= value < 256:
                chunk.append(value)
                continue
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if not skip_special_tokens:
                out.append({EOS: "<|endoftext|>", PAD: "<pad>"}.get(value, f"<{value}>"))
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)


def blocks_of(tokens: Sequence[int], block_size: int) -> list[list[int]]:
    """``tokens`` cut into consecutive blocks of ``block_size`` (the last one shorter, unpadded)."""
    return [list(tokens[i : i + block_size]) for i in range(0, len(tokens), block_size)]


class CodeText(Dataset):
    """One split of the shipped functions' code as blocks of byte tokens (see the module docstring).

    ``split``: ``"train"``, ``"validation"`` or ``"test"`` (``code_pairs``' split of each function).
    ``block_size``: tokens per block (at least 2). ``limit``: the first ``limit`` functions of the
    split. ``functions[i]`` is the ``"module:qualname"`` of block ``i``'s function; ``vocab_size``
    (258) and ``tokenizer`` are for the model and for decoding.
    """

    def __init__(
        self,
        split: str,
        block_size: int = DEFAULT_BLOCK_SIZE,
        limit: int | None = None,
        path: str | Path = DATA_FILE,
    ) -> None:
        if block_size < 2:
            raise DataError(f"block_size must be at least 2 tokens, got {block_size}")
        self.split = split
        self.block_size = block_size
        self.tokenizer = ByteTokenizer()
        self.vocab_size = VOCAB_SIZE
        rows: list[list[int]] = []
        self.functions: list[str] = []
        for pair in load_code_pairs(split, path, limit):
            name = f"{pair['module']}:{pair['qualname']}"
            for block in blocks_of(self.tokenizer.encode(pair["document"]), block_size):
                rows.append(block)
                self.functions.append(name)
        ids = torch.full((len(rows), block_size), PAD, dtype=torch.int64)
        for i, block in enumerate(rows):
            ids[i, : len(block)] = torch.tensor(block, dtype=torch.int64)
        self.input_ids = ids
        self.attention_mask = (ids != PAD).long()
        self.labels = ids.masked_fill(ids == PAD, IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

    @property
    def tokens(self) -> int:
        """Real (not padding) tokens in the split."""
        return int(self.attention_mask.sum())

    def describe(self) -> dict[str, Any]:
        """Functions, blocks and tokens of the split (for reports)."""
        return {
            "split": self.split,
            "functions": len(set(self.functions)),
            "blocks": len(self),
            "tokens": self.tokens,
            "block_size": self.block_size,
        }
