"""Data that ships with compressor or installs with it; nothing is downloaded.

``load_data(name)`` gives a built-in dataset (``digits``, ``mnist``, ``code_pairs``) or a
``"package.module:factory"``'s as a ``DataBundle`` (``compressor.data.builtin``); ``CodePairs`` are
the code-search pairs from the CPython standard library (``compressor.data.code_pairs``, with their
tokenizer, collator and file format).
"""

from compressor.data.builtin import DataBundle, load_data
from compressor.data.code_pairs import CodePairs, DataError

__all__ = ["CodePairs", "DataBundle", "DataError", "load_data"]
