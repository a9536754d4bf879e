"""How many classes a user's datasets have: read from what they declare, never by loading every sample."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from compressor.core.errors import CompressorError
from compressor.data import builtin as datasets

LOADS = {"count": 0}


class Counted(Dataset):
    """20 (x, y) pairs with labels 0..3, counting every ``__getitem__``; ``declares`` sets attributes."""

    def __init__(self, **declares: object) -> None:
        self.x, self.y = torch.randn(20, 2), torch.arange(20) % 4
        for name, value in declares.items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        LOADS["count"] += 1
        return self.x[i], self.y[i]


@pytest.fixture(autouse=True)
def _zero() -> None:
    LOADS["count"] = 0


@pytest.mark.parametrize(
    ("declares", "expected"),
    [
        ({"num_classes": 7}, 7),
        ({"classes": ["a", "b", "c", "d", "e"]}, 5),
        ({"targets": torch.arange(20) % 6}, 6),
        ({"targets": [0, 1, 2] * 3}, 3),
        ({"num_classes": 9, "classes": ["a"], "targets": [0]}, 9),  # num_classes first
    ],
)
def test_declared_classes_are_read_without_loading_a_sample(declares, expected):
    assert datasets.infer_num_classes(Counted(**declares), Counted()) == expected
    assert LOADS["count"] == 0


def test_labels_held_by_both_datasets_count_and_subsets_are_looked_through():
    train = TensorDataset(torch.randn(5, 2), torch.tensor([0, 1, 1, 2, 0]))
    test = Counted(targets=torch.tensor([0, 4]))
    assert datasets.infer_num_classes(train, test) == 5
    assert datasets.infer_num_classes(Subset(Counted(num_classes=8), [0, 1]), Counted()) == 8
    assert datasets.infer_num_classes(Subset(Counted(targets=torch.arange(20)), [1, 3]), Counted()) == 4
    assert LOADS["count"] == 0


def test_a_dataset_that_declares_nothing_is_refused_with_what_to_add():
    with pytest.raises(CompressorError, match=r"pkg:data: cannot tell how many classes.*`num_classes`"):
        datasets.infer_num_classes(Counted(), Counted(), "pkg:data")
    assert LOADS["count"] == 0


FACTORY = """
from tests_zoo_classes_support import Counted

def data():
    return Counted(num_classes=4), Counted(num_classes=4)
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "zoo_counted_factory.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tests_zoo_classes_support", sys.modules[__name__])
    yield "zoo_counted_factory:data"
    sys.modules.pop("zoo_counted_factory", None)


def test_load_data_of_a_factory_loads_one_sample(factory):
    """One sample tells the input shape; the classes come from the declaration."""
    bundle = datasets.load_data(factory)
    assert (bundle.input_shape, bundle.num_classes) == ((2,), 4)
    assert LOADS["count"] == 1
