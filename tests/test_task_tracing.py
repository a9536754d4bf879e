"""Channel surgery traces the model through the session's task: dict inputs, a model's own loss."""

from __future__ import annotations

import pytest
import torch
from conftest import DictData
from torch import nn
from torch.utils.data import TensorDataset

from compressor.lifecycle.session import Session
from compressor.surgery.channels import example_inputs_of
from compressor.tasks import ModelLossTask, Task, TaskError
from modifiers.channel_pruning import StructuredPruning


class DictMLP(nn.Module):
    """Called as model(features=..., labels=...); returns {"loss", "logits"} as HF models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc2(torch.relu(self.fc1(features)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_example_inputs_of_a_classification_session_are_one_input_sample() -> None:
    model = nn.Linear(4, 3)
    data = TensorDataset(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    session = Session([], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1, data=data)
    example = example_inputs_of(session)
    assert isinstance(example, torch.Tensor) and torch.equal(example, data[0][0].unsqueeze(0))


def test_example_inputs_of_a_model_loss_session_are_a_dict_of_one_sample() -> None:
    model, data = DictMLP(), DictData(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session([], model, optimizer, steps_per_epoch=1, data=data, task=ModelLossTask())
    example = example_inputs_of(session)
    assert example.keys() == {"features", "labels"}
    assert torch.equal(example["features"], data.features[:1]) and torch.equal(
        example["labels"], data.labels[:1]
    )


@pytest.mark.parametrize("importance", ["magnitude", "second_order"])
def test_structured_pruning_removes_channels_of_a_dict_input_model(importance: str) -> None:
    torch.manual_seed(0)
    model, data = DictMLP(), DictData(40)
    modifier = StructuredPruning(
        type="StructuredPruning",
        params=["fc1.weight"],
        channel_sparsity=0.5,
        importance=importance,
        num_grads=8,
        grad_batch_size=8,
        start=0,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session([modifier], model, optimizer, steps_per_epoch=1, data=data, task=ModelLossTask())
    session.before_step()
    session.after_step()
    assert (model.fc1.out_features, model.fc2.in_features) == (8, 8)
    out = model(features=data.features, labels=data.labels)
    assert out["logits"].shape == (40, 3) and torch.isfinite(out["loss"])


def test_a_task_without_model_inputs_says_so() -> None:
    class Bare(Task):
        pass

    with pytest.raises(TaskError, match=r"Bare does not say how its batches are fed to the model"):
        Bare().model_inputs({"x": torch.zeros(1)})


def test_export_inputs_go_through_the_task() -> None:
    from exporters import ExportError
    from exporters.prepare import _test_inputs

    x, y = torch.randn(6, 4), torch.arange(6)
    assert torch.equal(_test_inputs(TensorDataset(x, y), 4), x[:4])
    pairs = [(x[i].double(), y[i]) for i in range(6)]  # not a TensorDataset: collated by the task
    inputs = _test_inputs(pairs, 3)
    assert inputs.dtype == torch.float32 and torch.equal(inputs, x[:3])
    with pytest.raises(ExportError, match=r"the model takes a dict of features, labels \(ModelLossTask\)"):
        _test_inputs(DictData(4), 2, ModelLossTask())
    with pytest.raises(
        ExportError, match=r"cannot be read as the model's inputs: classification: a batch must"
    ):
        _test_inputs(DictData(4), 2)


def test_without_data_the_keyword_inputs_of_the_loop_are_traced() -> None:
    torch.manual_seed(0)
    model, data = DictMLP(), DictData(16)
    modifier = StructuredPruning(
        type="StructuredPruning",
        params=["fc1.weight"],
        channel_sparsity=0.25,
        importance="magnitude",
        start=1,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = Session([modifier], model, optimizer, steps_per_epoch=1, total_epochs=2)
    optimizer = session.wrap(optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(features=data.features, labels=data.labels)["loss"].backward()
        optimizer.step()
    assert (model.fc1.out_features, model.fc2.in_features) == (12, 12)
