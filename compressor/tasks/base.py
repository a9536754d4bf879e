"""The task: what a batch is and what the model does with it, for every path that runs the model.

The trainer (training and evaluation), the gradient sampler and ``Session`` never look inside a
batch: they ask the task. A ``Task`` says

- ``collate(samples)``: a list of samples -> a batch (default ``torch.utils.data.default_collate``);
- ``to_device(batch, device)``: the batch with every tensor nested in tuples, lists and dicts moved;
- ``forward(model, batch)``: the model's output on the batch;
- ``loss(output, batch)``: the mean loss over the batch, a scalar tensor (the trainer weights it by
  the batch's share of the step under gradient accumulation and DDP slices);
- ``batch_size(batch)``: how many samples the batch holds (the weight of its mean loss);
- ``metric_sums(output, batch)`` and ``metrics(sums, seen)``: optional metrics, as sums over the
  batch that add up over an epoch (and over ranks), then turned into the epoch's values;
- ``model_inputs(batch)``: what the model is called with, for tracing (channel surgery's dependency
  graph): a tensor or tuple (``model(*inputs)``) or a dict (``model(**inputs)``);
  ``example_inputs(batch)`` the list of them the exporters verify on;
- ``prepare(model)``: called once with the model before the first batch is collated (a tokenizer,
  a reference copy of the dense model);
- ``split_outputs(output, batch)`` and ``split_metrics(outputs)``: metrics over a whole split that
  do not add up batch by batch (retrieval among all of the split's documents).

Built-ins (``build_task(name)``): ``classification`` (batches (x, y), cross entropy, accuracy),
``model-loss`` (batches are dicts passed as ``model(**batch)``, the model returns its own loss as
``output.loss``, as Hugging Face models do) and ``contrastive`` (text pairs embedded by a sentence
encoder, in-batch negatives, recall@1 / MRR@10 / mean cosine to the dense model:
``compressor.tasks.contrastive``). A recipe's ``train.task`` names one of them or a
``"package.module:factory"`` returning a Task (imported only when allowed, as ``train.model``);
``train.task_options`` are its keyword arguments.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import default_collate

from compressor.core.errors import CompressorError

#: Losses a classification task can name (``train.loss``): loss(logits (n, C), labels (n,)) -> mean.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"cross_entropy": torch.nn.functional.cross_entropy}
#: The label of a token that no loss scores (PyTorch's and Hugging Face's ``ignore_index``).
IGNORE_INDEX = -100


class TaskError(CompressorError, ValueError):
    """A batch the task cannot read, a model output it cannot use, or an unknown task or loss."""


def move_to(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor nested in tuples, lists and dicts moved to ``device``.

    Containers keep their type (named tuples included); anything else is returned as it is.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in ``batch`` (depth first, in order), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    )
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


class Task:
    """How batches are made, moved, fed to the model and scored; subclass and override ``forward``
    and ``loss`` (the rest has defaults)."""

    #: The name shown in messages and metrics.
    name: str = "task"

    def collate(self, samples: list[Any]) -> Any:
        """A batch from a list of samples (``default_collate``: tensors stacked along a new dim 0)."""
        return default_collate(samples)

    def to_device(self, batch: Any, device: torch.device | str) -> Any:
        """``batch`` on ``device`` (every nested tensor moved, see ``move_to``)."""
        return move_to(batch, device)

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """The model's output on ``batch`` (already on the model's device)."""
        raise NotImplementedError

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """The mean loss over the batch's samples: a scalar tensor that backpropagates."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        """Samples in ``batch``: the length of its first tensor along dim 0."""
        tensor = first_tensor(batch)
        if tensor is None or tensor.dim() == 0:
            raise TaskError(f"{self.name}: cannot tell the size of a batch of {describe_batch(batch)}")
        return int(tensor.shape[0])

    def loss_sum(self, output: Any, batch: Any) -> float:
        """The loss summed over the batch's samples (evaluation adds these up): mean x size."""
        return float(self.loss(output, batch).detach()) * self.batch_size(batch)

    def metric_sums(self, output: Any, batch: Any) -> dict[str, float]:
        """Per-batch sums that add up over an epoch and over ranks (e.g. correct predictions)."""
        return {}

    def model_inputs(self, batch: Any) -> Any:
        """The model's inputs in ``batch``, as tracers take them: a tensor (``model(x)``), a tuple of
        positional arguments or a dict of keyword arguments. A task that does not say: TaskError."""
        raise TaskError(
            f"{type(self).__name__} does not say how its batches are fed to the model "
            "(define model_inputs(batch)); tracing the model needs it"
        )

    def metrics(self, sums: Mapping[str, float], seen: int) -> dict[str, float]:
        """The epoch's metrics from the summed ``metric_sums`` over ``seen`` samples (default: means)."""
        return {name: value / seen for name, value in sums.items()}

    def prepare(self, model: torch.nn.Module) -> None:
        """Called with the model before the first batch is collated (the trainer, ``Session`` and the
        exporters call it; a second call does nothing). Default: nothing. A task that needs the
        model's tokenizer, or the untrained model as a reference, takes them here."""

    def split_outputs(self, output: Any, batch: Any) -> Any:
        """What evaluation keeps of a batch for ``split_metrics`` (e.g. embeddings moved to the CPU);
        None (the default) keeps nothing."""
        return None

    def split_metrics(self, outputs: list[Any]) -> dict[str, float]:
        """Metrics over a whole split from every batch's ``split_outputs`` (in batch order; under DDP
        every rank's, rank by rank), for those that do not add up batch by batch, such as retrieval
        of each query's document among all of the split's. Default: none."""
        return {}

    def example_inputs(self, batch: Any) -> list[Any]:
        """The model's inputs in ``batch`` as the exporters verify them: a list of what
        ``model_inputs`` returns (default ``[model_inputs(batch)]``; a pair task gives both sides)."""
        return [self.model_inputs(batch)]


class ClassificationTask(Task):
    """Batches (x, y): output = model(x) of shape (n, C), loss = ``loss_fn(output, y)`` (default cross
    entropy), accuracy = correct / seen with correct = (output.argmax(1) == y).

    ``loss_fn(output, target)`` returns the batch's mean; evaluation sums it with ``reduction="sum"``
    when ``loss_fn`` takes that keyword, else as mean x batch size.
    """

    name = "classification"

    def __init__(self, loss_fn: Callable[..., torch.Tensor] | None = None) -> None:
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self._sums_itself = _takes(self.loss_fn, "reduction")

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TaskError(
                f"classification: a batch must be (inputs, targets), got {describe_batch(batch)}; "
                "set train.task for other data"
            )
        return batch[0], batch[1]

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """``model(x)``."""
        return model(self._pair(batch)[0])

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """``loss_fn(output, y)``."""
        return self.loss_fn(output, self._pair(batch)[1])

    def batch_size(self, batch: Any) -> int:
        """``len(y)``."""
        return len(self._pair(batch)[1])

    def loss_sum(self, output: Any, batch: Any) -> float:
        """``loss_fn(output, y, reduction="sum")`` when it takes ``reduction``, else mean x size."""
        if self._sums_itself:
            return float(self.loss_fn(output, self._pair(batch)[1], reduction="sum").detach())
        return super().loss_sum(output, batch)

    def model_inputs(self, batch: Any) -> Any:
        """``x``."""
        return self._pair(batch)[0]

    def metric_sums(self, output: Any, batch: Any) -> dict[str, float]:
        """``{"accuracy": correct}``."""
        return {"accuracy": int((output.argmax(1) == self._pair(batch)[1]).sum())}


class ModelLossTask(Task):
    """The model computes its own loss: a batch is a mapping of keyword arguments, the model is
    called as ``model(**batch)`` and returns an object with ``.loss`` (or a mapping with ``"loss"``),
    the batch's mean, as Hugging Face models do when given ``labels``.

    The batch's size is the length along dim 0 of its first tensor (``input_ids`` first, for
    tokenized text). Metrics: the loss alone, unless ``perplexity``.

    ``perplexity=True`` (``task_options: {perplexity: true}``), for language models whose loss is the
    mean cross entropy over the batch's scored tokens (labels other than -100): also ``token_loss``,
    the mean over every scored token of the split (each batch's loss weighted by its scored tokens,
    not by its samples as ``loss`` is), and ``perplexity`` = exp(token_loss). A token is scored when
    its label is not -100; with ``shift_labels`` (the default, as Hugging Face causal LMs shift the
    labels by one inside the model) the first label of each row is never scored.
    """

    name = "model-loss"

    def __init__(self, perplexity: bool = False, shift_labels: bool = True) -> None:
        self.perplexity = bool(perplexity)
        self.shift_labels = bool(shift_labels)

    def scored_tokens(self, batch: Any) -> int:
        """The tokens the model's loss averages over: labels other than -100 (after the shift)."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
            raise TaskError(
                f"model-loss: perplexity counts the scored tokens of the batch's 'labels', got "
                f"{describe_batch(batch)}"
            )
        scored = labels[..., 1:] if self.shift_labels else labels
        return int((scored != IGNORE_INDEX).sum())

    def metric_sums(self, output: Any, batch: Any) -> dict[str, float]:
        """With ``perplexity``: ``{"token_loss": loss x scored tokens, "tokens": scored tokens}``."""
        if not self.perplexity:
            return {}
        tokens = self.scored_tokens(batch)
        loss = float(self.loss(output, batch).detach()) if tokens else 0.0  # no token: a NaN mean
        return {"token_loss": loss * tokens, "tokens": tokens}

    def metrics(self, sums: Mapping[str, float], seen: int) -> dict[str, float]:
        """With ``perplexity``: ``token_loss`` (summed loss / scored tokens) and exp of it."""
        if not self.perplexity:
            return super().metrics(sums, seen)
        tokens = sums.get("tokens", 0)
        mean = sums.get("token_loss", 0.0) / tokens if tokens else math.nan
        return {"token_loss": mean, "perplexity": math.inf if mean > 700 else math.exp(mean)}

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        """``model(**batch)``."""
        if not isinstance(batch, Mapping):
            raise TaskError(
                f"model-loss: a batch must be a mapping of the model's keyword arguments "
                f"(model(**batch)), got {describe_batch(batch)}"
            )
        return model(**batch)

    def model_inputs(self, batch: Any) -> Any:
        """The batch itself, a dict of keyword arguments (labels included)."""
        return batch

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """``output.loss`` (or ``output["loss"]``)."""
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise TaskError(
                f"model-loss: the model returned {type(output).__name__} without a loss tensor "
                "(.loss or ['loss']); does the batch hold what the model needs for it (labels)?"
            )
        return loss


def as_task(task: Task | None, loss_fn: Callable[..., torch.Tensor] | None = None) -> Task:
    """``task``, or a classification task with ``loss_fn`` when none is given; both: TypeError."""
    if task is not None and loss_fn is not None:
        raise TypeError("give task= or loss_fn= (a classification task with that loss), not both")
    if task is None:
        return ClassificationTask(loss_fn)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a compressor.tasks.Task, got {type(task).__name__}")
    return task


def _takes(fn: Callable[..., Any], keyword: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``keyword`` (False when it has no signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is p.VAR_KEYWORD or (p.name == keyword and p.kind is not p.POSITIONAL_ONLY) for p in params
    )


def describe_batch(batch: Any) -> str:
    """A short description of a batch's structure, for messages: ``dict(input_ids, labels)``, ..."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {', '.join(map(str, list(batch)[:8]))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}"
    return f"a {type(batch).__name__}"


def unpack_data(data: Any, task: Task) -> tuple[Any, Callable[[list[Any]], Any]]:
    """(dataset, collate) of ``data``: a DataLoader gives its dataset and its ``collate_fn``, a
    Dataset itself and ``task.collate``. Batches are drawn by index from the dataset (in a seeded
    order), so a DataLoader's sampler, batch size and workers are not used."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        collate = data.collate_fn if data.collate_fn is not None else task.collate
        return data.dataset, collate
    return data, task.collate
