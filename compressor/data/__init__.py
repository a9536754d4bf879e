"""Data that ships with compressor or installs with it; nothing is downloaded.

``load_data(name)`` gives a built-in dataset (``digits``, ``mnist``, ``code_pairs``, ``code_text``) or a
``"package.module:factory"``'s as a ``DataBundle`` (``compressor.data.builtin``); ``CodePairs`` are
the code-search pairs from the CPython standard library (``compressor.data.code_pairs``, with their
tokenizer, collator and file format); ``CodeText`` is the code of the same functions as byte-token
blocks for a language model (``compressor.data.code_text``).
"""

from compressor.data.builtin import DataBundle, load_data
from compressor.data.code_pairs import CodePairs, DataError
from compressor.data.code_text import CodeText

__all__ = ["CodePairs", "CodeText", "DataBundle", "DataError", "load_data"]
