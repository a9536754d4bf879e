"""Built-in data and models, "package.module:factory" strings, and the errors for bad names."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from compressor.core.factories import ZooError
from compressor.data import builtin as datasets
from compressor.models import builtin as models

DATA = {
    # name: (n_train, n_test, input_shape, test count per class, value range)
    "digits": (1438, 359, (1, 8, 8), None, (0.0, 1.0)),
    "mnist": (4000, 1000, (1, 28, 28), 100, ((0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081)),
}
MODELS = {"digits-mlp": "digits", "digits-cnn": "digits", "mnist-mlp": "mnist", "mnist-cnn": "mnist"}


@pytest.mark.parametrize("name", sorted(DATA))
def test_builtin_data_shapes_dtypes_ranges_balance(name: str) -> None:
    n_train, n_test, shape, per_class, (lo, hi) = DATA[name]
    b = datasets.load_data(name)
    (xtr, ytr), (xte, yte) = b.train.tensors, b.test.tensors
    assert (b.name, b.input_shape, b.num_classes) == (name, shape, 10)
    assert xtr.shape == (n_train, *shape) and xte.shape == (n_test, *shape)
    assert xtr.dtype == xte.dtype == torch.float32 and ytr.dtype == yte.dtype == torch.int64
    x = torch.cat([xtr, xte])
    assert x.min().item() == pytest.approx(lo, abs=1e-5) and x.max().item() == pytest.approx(hi, abs=1e-5)
    counts_all = torch.bincount(torch.cat([ytr, yte]), minlength=10)
    counts_test = torch.bincount(yte, minlength=10)
    # stratified: each class's test share is 20% of that class, to the nearest sample
    assert ((counts_test - 0.2 * counts_all).abs() <= 0.5).all()
    if per_class is not None:
        assert (counts_test == per_class).all()


def test_split_is_fixed_and_ignores_seed() -> None:
    a, b = datasets.load_data("digits", seed=0), datasets.load_data("digits", seed=123)
    for part in ("train", "test"):
        for ta, tb in zip(getattr(a, part).tensors, getattr(b, part).tensors, strict=True):
            assert torch.equal(ta, tb)
    # Loads hand out copies: changing one bundle leaves the per-process cache intact.
    a.train.tensors[0].zero_()
    assert datasets.load_data("digits").train.tensors[0].max() == 1.0


def test_split_matches_pinned_fingerprint() -> None:
    """The test indices are pinned: a change in the split procedure (or NumPy's RandomState) fails here."""
    labels = np.repeat(np.arange(3), [5, 7, 9])
    train, test = datasets.stratified_split(labels)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(21))
    assert np.bincount(labels[test]).tolist() == [1, 1, 2]
    for arrays, pinned in (
        (datasets._digits_arrays, "3530be80b9605f4c"),
        (datasets._mnist_arrays, "45579736574882cc"),
    ):
        test_idx = datasets.stratified_split(arrays()[1])[1]
        assert hashlib.sha256(test_idx.astype("<i8").tobytes()).hexdigest()[:16] == pinned


@pytest.mark.parametrize("model", sorted(MODELS))
def test_builtin_models_run_on_their_data(model: str) -> None:
    b = datasets.load_data(MODELS[model])
    net = models.build_model(model, b.input_shape, b.num_classes).eval()
    x = b.test.tensors[0][:7]
    assert net(x).shape == (7, b.num_classes)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    expected = {"fc1", "fc2", "fc3"} if model == "mnist-mlp" else {"fc1", "fc2"}
    if model.endswith("cnn"):
        expected |= {"conv1", "bn1", "conv2", "bn2"}
    assert names == expected


def test_model_init_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = models.build_model("mnist-cnn", (1, 28, 28), 10, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = models.build_model("mnist-cnn", (1, 28, 28), 10, seed=1)
    c = models.build_model("mnist-cnn", (1, 28, 28), 10, seed=2)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert models.build_model("mnist-mlp", (1, 28, 28), 10).fc1.in_features == 784


FACTORY_MODULE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

def model(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))

def bare_model():
    return nn.Linear(3, 2)

def data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 2, 3, generator=g)
    y = torch.arange(20) % 4
    return TensorDataset(x[:15], y[:15]), TensorDataset(x[15:], y[15:])

def not_a_model():
    return 42

def raising(input_shape):
    raise RuntimeError(f"no model for {input_shape}")

broken_attr = 1
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "zoo_user_factories"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    (tmp_path / "zoo_broken_module.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in (name, "zoo_broken_module"):
        sys.modules.pop(mod, None)


def test_factory_strings(user_module: str) -> None:
    b = datasets.load_data(f"{user_module}:data", seed=3)
    assert (b.input_shape, b.num_classes, len(b.train), len(b.test)) == ((2, 3), 4, 15, 5)
    assert isinstance(b.train, TensorDataset)
    assert torch.equal(datasets.load_data(f"{user_module}:data", seed=3).test.tensors[0], b.test.tensors[0])
    assert not torch.equal(
        datasets.load_data(f"{user_module}:data", seed=4).test.tensors[0], b.test.tensors[0]
    )

    net = models.build_model(f"{user_module}:model", b.input_shape, b.num_classes, seed=5)
    assert net(b.test.tensors[0]).shape == (5, 4)
    again = models.build_model(f"{user_module}:model", b.input_shape, b.num_classes, seed=5)
    assert torch.equal(net[1].weight, again[1].weight)
    assert isinstance(models.build_model(f"{user_module}:bare_model", (3,), 2), torch.nn.Linear)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mnist-cnm", r"unknown model 'mnist-cnm'; did you mean 'mnist-cnn'\?.*built-ins: codelm, "),
        ("resnet", r"unknown model 'resnet' \(built-ins: codelm, digits-cnn, digits-mlp, mnist-cnn, "),
        ("zoo_no_such_module:f", r"cannot import module 'zoo_no_such_module' \(ModuleNotFoundError"),
        ("zoo_broken_module:f", r"cannot import module 'zoo_broken_module' \(RuntimeError: boom"),
        ("{mod}:missing", r"module '{mod}' has no attribute 'missing'"),
        ("{mod}:broken_attr", r"'broken_attr' is a int, not callable"),
        ("{mod}:not_a_model", r"returned int, not a torch.nn.Module"),
        ("{mod}:raising", r"model factory '{mod}:raising' raised RuntimeError: no model for \(1, 28, 28\)"),
        ("{mod}:", r"model '{mod}:' is not a built-in name or 'package.module:factory'"),
    ],
)
def test_model_name_errors(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(ZooError, match=message.format(mod=user_module)):
        models.build_model(spec.format(mod=user_module), (1, 28, 28), 10)


def test_data_name_errors(user_module: str) -> None:
    with pytest.raises(
        ZooError,
        match=r"unknown dataset 'digit'; did you mean 'digits'\? "
        r"\(built-ins: code_pairs, code_text, digits, mnist;",
    ):
        datasets.load_data("digit")
    with pytest.raises(ZooError, match=r"returned Linear; expected a DataBundle"):
        datasets.load_data(f"{user_module}:bare_model")
    with pytest.raises(ZooError, match=rf"dataset factory '{user_module}:raising' raised TypeError: "):
        datasets.load_data(f"{user_module}:raising")  # called without its input_shape
