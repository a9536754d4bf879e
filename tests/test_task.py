"""The task abstraction: built-in tasks on nested batches, the trainer and the gradient sampler
through a task, a model that returns its own loss, and gradient-accumulation weighting."""

from __future__ import annotations

import sys
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import DictData
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.engine import evaluate, run
from compressor.engine.loop import train_epoch
from compressor.lifecycle.sampling import GradientSampler
from compressor.lifecycle.session import Session
from compressor.recipe import RecipeError
from compressor.tasks import (
    ClassificationTask,
    ModelLossTask,
    Task,
    TaskError,
    as_task,
    build_task,
    move_to,
)
from modifiers.mfac_pruning import MFACPruning

Pair = namedtuple("Pair", "x y")


class OwnLoss(nn.Module):
    """Returns an object with ``.loss``: ``scale`` x the cross entropy of its logits, as HF models do.

    ``calls`` counts forward calls (the loss can only come from here).
    """

    def __init__(self, scale: float = 3.0) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.scale = scale
        self.calls = 0

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        logits = self.fc(features)
        return SimpleNamespace(loss=self.scale * nn.functional.cross_entropy(logits, labels), logits=logits)


# ---------------------------------------------------------------------- batches and built-ins


def test_move_to_moves_every_nested_tensor_and_keeps_containers() -> None:
    batch = {"a": (torch.ones(2), [torch.zeros(3), "text"]), "b": Pair(torch.ones(1), 7)}
    moved = move_to(batch, "meta")
    assert type(moved) is dict and type(moved["a"]) is tuple and type(moved["a"][1]) is list
    assert isinstance(moved["b"], Pair) and moved["b"].y == 7 and moved["a"][1][1] == "text"
    leaves = [moved["a"][0], moved["a"][1][0], moved["b"].x]
    assert all(t.device.type == "meta" for t in leaves)
    assert [tuple(t.shape) for t in leaves] == [(2,), (3,), (1,)]


def test_classification_reads_pairs_and_scores_them() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    task = ClassificationTask()
    for batch in ((x, y), [x, y], Pair(x, y)):
        batch = task.to_device(batch, "cpu")
        out = task.forward(model, batch)
        assert torch.equal(out, model(x))
        assert torch.equal(task.loss(out, batch), nn.functional.cross_entropy(out, y))
        assert task.batch_size(batch) == 6
        assert task.loss_sum(out, batch) == float(
            nn.functional.cross_entropy(out, y, reduction="sum").detach()
        )
        correct = int((out.argmax(1) == y).sum())
        assert task.metric_sums(out, batch) == {"accuracy": correct}
        assert task.metrics({"accuracy": correct}, 6) == {"accuracy": correct / 6}
    with pytest.raises(TaskError, match=r"classification: a batch must be \(inputs, targets\), got a dict"):
        task.forward(model, {"x": x})


def test_a_loss_without_reduction_is_summed_as_mean_times_size() -> None:
    task = ClassificationTask(lambda out, y: ((out[:, 0] - y) ** 2).mean())
    out, y = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 0.0])
    assert task.loss_sum(out, (None, y)) == pytest.approx(10.0)


def test_model_loss_calls_the_model_with_the_dict_and_takes_its_loss() -> None:
    model, data = OwnLoss(), DictData(5)
    task = ModelLossTask()
    batch = task.to_device(task.collate([data[i] for i in range(5)]), "cpu")
    out = task.forward(model, batch)
    expected = 3.0 * nn.functional.cross_entropy(model.fc(data.features), data.labels)
    assert torch.allclose(task.loss(out, batch), expected) and task.batch_size(batch) == 5
    assert task.loss({"loss": expected}, batch) is expected  # a mapping output works too
    assert task.metrics({}, 5) == {}
    with pytest.raises(TaskError, match="without a loss tensor"):
        task.loss(SimpleNamespace(logits=out.logits), batch)
    with pytest.raises(TaskError, match=r"mapping of the model's keyword arguments \(model\(\*\*batch\)\)"):
        task.forward(model, (data.features, data.labels))


def test_build_task_by_name_and_clear_errors() -> None:
    assert isinstance(build_task("model-loss"), ModelLossTask)
    task = build_task("classification", "cross_entropy")
    assert isinstance(task, ClassificationTask) and task.loss_fn is nn.functional.cross_entropy
    with pytest.raises(TaskError, match=r"unknown task 'regression' .built-ins: classification, model-loss"):
        build_task("regression")
    with pytest.raises(TaskError, match="unknown loss 'mse'; known: cross_entropy"):
        build_task("classification", "mse")
    with pytest.raises(TypeError, match="not both"):
        as_task(ModelLossTask(), nn.functional.cross_entropy)
    with pytest.raises(TaskError, match="cannot tell the size of a batch of a str"):
        ModelLossTask().batch_size("text")


# ---------------------------------------------------------------------- evaluation and sampling


def test_evaluate_a_model_loss_task_from_a_dataloader_with_its_collate() -> None:
    model, data = OwnLoss(scale=1.0), DictData(10)
    seen: list[int] = []

    def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seen.append(len(samples))
        return torch.utils.data.default_collate(samples)

    metrics = evaluate(
        model, DataLoader(data, batch_size=3, collate_fn=collate), ModelLossTask(), batch_size=4
    )
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model.fc(data.features), data.labels))
    assert seen == [4, 4, 2] and metrics.keys() == {"loss"}
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_the_sampler_takes_the_models_own_loss_on_dict_batches() -> None:
    torch.manual_seed(0)
    model, data = OwnLoss(), DictData(20)
    sampler = GradientSampler(model, data, task=ModelLossTask(), seed=4)
    rows = sampler.sample(["fc.weight"], num_grads=3, batch_size=8, key=5)
    indices = next(sampler._index_batches(8, 5))
    model.zero_grad()
    batch = {"features": data.features[indices], "labels": data.labels[indices]}
    model(**batch).loss.backward()
    assert rows.shape == (3, 24)
    assert torch.allclose(rows[0], model.fc.weight.grad.reshape(-1))


def test_session_mfac_pruning_samples_exactly_m_gradients_of_the_models_own_loss() -> None:
    torch.manual_seed(0)
    m = 6
    model, data = OwnLoss(), DictData(40)
    modifier = MFACPruning(
        params=["fc.weight"], final_sparsity=0.5, start=0, end=0, num_grads=m, grad_batch_size=8
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    session = Session([modifier], model, optimizer, steps_per_epoch=1, data=data, task=ModelLossTask())
    inner, shapes = session.sampler.sample, []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls = model.calls
        rows = inner(*args, **kwargs)
        shapes.append((tuple(rows.shape), model.calls - calls))
        return rows

    session.sampler.sample = spy
    session.before_step()
    session.after_step()
    assert shapes == [((m, 24), m)]  # m rows, each from one call of the model (its own loss)
    assert session.masks.sparsities()["fc.weight"] == pytest.approx(0.5, abs=1 / 24)
    scaled = GradientSampler(model, data, task=ModelLossTask(), seed=0).sample(["fc.weight"], 2, 8)
    model.scale = 1.0
    plain = GradientSampler(model, data, task=ModelLossTask(), seed=0).sample(["fc.weight"], 2, 8)
    assert torch.allclose(scaled, 3.0 * plain)  # the loss is the model's, scale and all


def test_session_loss_fn_keeps_working_as_a_classification_task() -> None:
    model = nn.Linear(4, 3)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    session = Session(
        [],
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        steps_per_epoch=1,
        data=data,
        loss_fn=nn.functional.nll_loss,
    )
    assert isinstance(session.task, ClassificationTask) and session.task.loss_fn is nn.functional.nll_loss
    assert session.sampler is not None and session.sampler.task is session.task


# ---------------------------------------------------------------------- the trainer


def test_gradient_accumulation_of_uneven_batches_is_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    model, data = OwnLoss(), DictData(10)
    session = Session([], model, torch.optim.SGD(model.parameters(), lr=0.0), steps_per_epoch=1)
    grads: list[torch.Tensor] = []
    original = session.before_step
    session.before_step = lambda: (grads.append(model.fc.weight.grad.clone()), original())  # type: ignore[method-assign]
    train = SimpleNamespace(seed=0, batch_size=4, grad_accum=3)  # batches of 4, 4 and 2: one step
    rows: list[tuple[str, float]] = []
    log = SimpleNamespace(log=lambda step, epoch, split, name, value: rows.append((name, value)))
    bar = SimpleNamespace(update=lambda *a, **k: None)
    train_epoch(session, SimpleNamespace(train=data), train, 0, ModelLossTask(), log, bar)
    model.zero_grad()
    full = model(features=data.features, labels=data.labels).loss
    full.backward()
    assert len(grads) == 1 and model.calls == 4
    assert torch.allclose(grads[0], model.fc.weight.grad, atol=1e-6)
    assert rows[0][0] == "loss" and rows[0][1] == pytest.approx(float(full.detach()), rel=1e-6)


USER_MODULE = """
import torch
from compressor.tasks import ModelLossTask
from compressor.data import DataBundle
from test_task import DictData, OwnLoss

made = []


def data(seed):
    return DataBundle(DictData(48, seed), DictData(16, seed + 1), (8,), 3, "dict")


def model():
    return OwnLoss()


def task(loss):
    made.append(loss)
    return ModelLossTask()


def not_a_task():
    return 42
"""

RECIPE = """\
version: 1
train:
  model: "{mod}:model"
  data: "{mod}:data"
  task: "{mod}:{task}"
  epochs: 2
  batch_size: 16
  grad_accum: 2
  optimizer: {{type: SGD, lr: 0.5}}
modifiers:
  - type: MagnitudePruning
    params: [fc.weight]
    start: 1
    end: 1
    final_sparsity: 0.5
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh importable module of factories for model, data and task."""
    name = f"task_factories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_model_with_its_own_loss_trains_through_a_recipe_with_a_user_task(
    tmp_path: Path, user_module: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(mod=user_module, task="task"))
    with pytest.raises(
        RecipeError, match=rf"r.yaml:5:9: train.task: the recipe asks to import module '{user_module}'"
    ):
        run(
            recipe,
            tmp_path / "refused",
            progress=False,
            allow_imports=[f"{user_module}:model", f"{user_module}:data"],
        )
    summary = run(recipe, tmp_path / "out", progress=False, allow_imports=[user_module])
    assert sys.modules[user_module].made == ["cross_entropy"]  # factory(loss=train.loss)
    assert summary["eval"].keys() == {"loss"} and summary["dense_eval_accuracy"] is None
    assert summary["sparsity"]["per_parameter"]["fc.weight"] == pytest.approx(0.5, abs=1 / 24)
    lines = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    train_losses = [float(r.rsplit(",", 1)[1]) for r in lines if ",train,loss," in r]
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]  # 2 epochs of 48 / 32 steps
    assert not any(",accuracy," in r for r in lines)
    from exporters import ExportError, export_checkpoint

    with pytest.raises(
        ExportError, match=r"the model takes a dict of features, labels \(ModelLossTask\); export"
    ):
        export_checkpoint(tmp_path / "out" / "checkpoint.pt", allow_imports=[user_module])
    recipe.write_text(RECIPE.format(mod=user_module, task="not_a_task"))
    with pytest.raises(
        RecipeError, match=r"r.yaml:5:9: train.task: task factory .* returned int, not a compressor"
    ):
        run(recipe, tmp_path / "bad", progress=False, allow_imports=True)


def test_a_builtin_task_name_in_a_recipe_and_an_unknown_one(tmp_path: Path, user_module: str) -> None:
    recipe = tmp_path / "r.yaml"
    text = RECIPE.format(mod=user_module, task="task").replace(f'"{user_module}:task"', "model-loss")
    recipe.write_text(text.replace("epochs: 2", "epochs: 1"))
    summary = run(recipe, tmp_path / "out", progress=False, allow_imports=[user_module])
    assert summary["eval"].keys() == {"loss"} and summary["steps"] == 2
    recipe.write_text(text.replace("model-loss", "regression"))
    with pytest.raises(RecipeError, match=r"r.yaml:5:9: train.task: unknown task 'regression'"):
        run(recipe, tmp_path / "bad", progress=False, allow_imports=[user_module])


class _Custom(Task):
    """A task subclass with only forward and loss: the defaults do the rest."""

    def forward(self, model: nn.Module, batch: Any) -> Any:
        return model(batch["x"])

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return nn.functional.mse_loss(output, batch["y"])


def test_a_minimal_task_subclass_evaluates_with_the_defaults() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(1.0)
    data = [{"x": torch.zeros(2), "y": torch.tensor([3.0])} for _ in range(5)]
    assert evaluate(model, data, _Custom(), batch_size=2) == {"loss": pytest.approx(4.0)}


def _renaming_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A DataLoader's own collate: the samples hold "x" and "y", the model takes features and labels."""
    return {
        "features": torch.stack([s["x"] for s in samples]),
        "labels": torch.stack([s["y"] for s in samples]),
    }


def test_a_dataloader_gives_its_dataset_and_collate_to_the_sampler_and_the_trainer() -> None:
    torch.manual_seed(0)
    model, plain = OwnLoss(), DictData(12)
    renamed = [{"x": plain.features[i], "y": plain.labels[i]} for i in range(12)]
    loader = DataLoader(renamed, batch_size=5, collate_fn=_renaming_collate)
    rows = GradientSampler(model, loader, task=ModelLossTask(), seed=2).sample(["fc.weight"], 3, 4, key=1)
    expected = GradientSampler(model, plain, task=ModelLossTask(), seed=2).sample(["fc.weight"], 3, 4, key=1)
    assert torch.equal(rows, expected)  # the same seeded batches, collated by the loader's collate_fn
    session = Session([], model, torch.optim.SGD(model.parameters(), lr=0.0), steps_per_epoch=2)
    losses: list[float] = []
    log = SimpleNamespace(log=lambda step, epoch, split, name, value: losses.append(value))
    train = SimpleNamespace(seed=0, batch_size=4, grad_accum=2)  # batches 4, 4 | 4: two steps
    bar = SimpleNamespace(update=lambda *a, **k: None)
    train_epoch(session, SimpleNamespace(train=loader), train, 0, ModelLossTask(), log, bar)
    assert session.step == 2 and len(losses) == 2 and model.calls == 3 + 3 + 3
    with torch.no_grad():
        everything = float(model(features=plain.features, labels=plain.labels).loss)
    assert (8 * losses[0] + 4 * losses[1]) / 12 == pytest.approx(everything, rel=1e-6)  # lr 0: one model


def test_a_batch_the_task_cannot_read_stops_the_cli_before_training(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from compressor.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\ntrain:\n  model: digits-mlp\n  data: digits\n  task: model-loss\n  epochs: 1\n"
        "  optimizer: {type: SGD, lr: 0.1}\nmodifiers: []\n"
    )
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        f"{recipe}:5:9: train.task: task 'model-loss' cannot run the model on the training data: model-loss: "
        "a batch must be a mapping of the model's keyword arguments (model(**batch)), got a list of 2"
    ) in " ".join(result.output.split())
    assert not (tmp_path / "out" / "metrics.csv").exists()
