"""Models called with keyword tensors (``model(**inputs)``): a sentence encoder's ``input_ids`` and
``attention_mask``, as a task's ``model_inputs`` gives them.

The ONNX graph takes one input per key, named by the key, in the order the task gives them. Integer
inputs of rank 2 (token ids, attention masks) get a dynamic ``sequence`` axis 1 beside the batch
axis 0; other inputs a dynamic batch axis only. The outputs are named by the model's
``onnx_output_names`` when it declares them (``SentenceEncoder``: ``sentence_embedding``), else by
the fields of what it returns (a mapping or a transformers ``ModelOutput``: ``logits``, ...; the
loss is never exported), else ``output``.

Verification batches are the test split collated by the task, in batches of several sizes
(``TEXT_BATCHES`` in turn, or the fixed batch size), each batch giving every input of
``task.example_inputs`` (both sides of a pair: short queries and long documents): padded to their
own longest text, so the sequence lengths differ from batch to batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import cycle
from typing import Any

import torch
from torch import nn

from compressor.tasks import Task, TaskError

from .errors import ExportError

#: Batch sizes of the verification batches, in turn (1: a text without padding).
TEXT_BATCHES = (1, 3, 8, 32)
#: Keys of a batch that are the targets of a model computing its own loss, not its inputs.
TARGET_KEYS = ("labels", "label", "label_ids", "targets")
BATCH, SEQUENCE = "batch", "sequence"


@dataclass
class NamedInputs:
    """Test inputs of a keyword-input model: ``batches`` of ``{name: tensor}`` with the keys ``names``."""

    names: list[str]
    batches: list[dict[str, torch.Tensor]]

    @property
    def samples(self) -> int:
        """Rows over all batches."""
        return sum(_rows(b) for b in self.batches)

    def sequence_axes(self) -> dict[str, bool]:
        """Per input: whether axis 1 is a sequence axis (an integer tensor of rank 2)."""
        first = self.batches[0]
        return {n: first[n].dim() == 2 and not first[n].is_floating_point() for n in self.names}


def collect(
    test: Any, collate: Callable[[list[Any]], Any], task: Task, count: int, fixed: int | None
) -> NamedInputs | None:
    """The verification inputs of the first ``count`` test samples, or None when the model takes one
    tensor (the caller's path). ExportError for what cannot be exported."""
    if not all(isinstance(x, Mapping) for x in _examples(test, collate, task, 0, 1)):
        return None
    if fixed is not None and fixed > count:
        raise ExportError(f"--batch {fixed} is larger than the {count} test samples available")
    sizes = cycle([fixed] if fixed is not None else TEXT_BATCHES)
    batches: list[dict[str, torch.Tensor]] = []
    names: list[str] | None = None
    start = 0
    while start < count:
        size = min(next(sizes), count - start)
        if fixed is not None and size < fixed:
            break  # a fixed batch axis takes whole batches only
        found = _examples(test, collate, task, start, size)
        start += size
        for inputs in found:
            checked = _checked(inputs, task)
            if names is None:
                names = list(checked)
            elif list(checked) != names:
                raise ExportError(
                    f"the model's inputs differ between batches ({', '.join(names)} vs "
                    f"{', '.join(checked)}); export needs the same named inputs every time"
                )
            batches.append(checked)
    if names is None or not batches:
        raise ExportError("the task gives no model inputs for the test samples: nothing to verify on")
    return NamedInputs(names, batches)


def _examples(test: Any, collate: Callable[[list[Any]], Any], task: Task, start: int, size: int) -> list[Any]:
    """``task.example_inputs`` of the batch of samples ``start`` to ``start + size``."""
    try:
        return list(task.example_inputs(collate([test[i] for i in range(start, start + size)])))
    except TaskError as exc:
        raise ExportError(f"the test samples cannot be read as the model's inputs: {exc}") from exc


def _checked(inputs: Any, task: Task) -> dict[str, torch.Tensor]:
    """``inputs`` as a dict of tensors; ExportError for targets, nesting or non-tensor values."""
    if not isinstance(inputs, Mapping):
        raise ExportError(
            f"the task ({type(task).__name__}) gives the model a dict in one place and "
            f"{type(inputs).__name__} in another; export needs one kind"
        )
    keys = ", ".join(map(str, inputs))
    targets = [k for k in inputs if k in TARGET_KEYS]
    if targets:
        raise ExportError(
            f"the model takes a dict of {keys} ({type(task).__name__}); export handles models called "
            "with their input tensors alone (one tensor, or tensors by name such as a sentence "
            f"encoder's input_ids and attention_mask), and this batch also holds the targets "
            f"{', '.join(map(repr, targets))} that the model needs to compute its own loss"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in inputs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ExportError(f"the model's input {key!r} is not a name an ONNX input can take")
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            kind = type(value).__name__ if not isinstance(value, torch.Tensor) else "a 0-d tensor"
            raise ExportError(
                f"the model takes a dict of {keys} ({type(task).__name__}); its input {key!r} is {kind}, "
                "and export handles inputs that are tensors with a batch axis (int or float)"
            )
        out[key] = value.contiguous()
    return out


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


class KeywordModel(nn.Module):
    """``model`` called as ``model(**dict(zip(names, tensors)))``, returning the named outputs' tensors.

    What the exporters trace: positional tensors in, a tensor or a tuple of tensors out.
    """

    def __init__(self, model: nn.Module, names: list[str], outputs: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.outputs = outputs  # None: the model returns one tensor

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, tensors, strict=True)))
        if self.outputs is None:
            return out
        picked = tuple(_field(out, name) for name in self.outputs)
        return picked[0] if len(picked) == 1 else picked


def _field(out: Any, name: str) -> Any:
    if isinstance(out, Mapping):
        return out[name]
    if isinstance(out, (tuple, list)):
        return out[int(name.rsplit("_", 1)[1])]
    return getattr(out, name)


def output_names(model: nn.Module, example: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str] | None]:
    """(ONNX output names, the fields KeywordModel picks or None) of ``model`` on ``example``."""
    with torch.no_grad():
        out = model(**example)
    declared = getattr(model, "onnx_output_names", None)
    if isinstance(out, torch.Tensor):
        if declared is not None and len(declared) != 1:
            raise ExportError(f"the model declares outputs {declared} but returns one tensor")
        return [declared[0] if declared else "output"], None
    if isinstance(out, Mapping) or hasattr(out, "keys"):  # dict, transformers ModelOutput
        fields = [k for k in out.keys() if k != "loss" and isinstance(out[k], torch.Tensor)]  # noqa: SIM118
    elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        fields = [f"output_{i}" for i in range(len(out))]
    else:
        fields = []
    if not fields:
        raise ExportError(
            f"the model returns {type(out).__name__} with no tensor to export (a loss alone is not "
            "exported); export needs a tensor, or a mapping / ModelOutput of tensors"
        )
    names = list(declared) if declared is not None else fields
    if len(names) != len(fields):
        raise ExportError(f"the model declares outputs {list(names)} but returns {fields}")
    return names, fields


def describe(named: NamedInputs) -> dict[str, Any]:
    """What the verification inputs cover: batches, batch sizes and sequence lengths."""
    sequence = [n for n, on in named.sequence_axes().items() if on]
    lengths = sorted({int(b[sequence[0]].shape[1]) for b in named.batches}) if sequence else []
    sizes = sorted({_rows(b) for b in named.batches}, reverse=True)
    return {"runs": len(named.batches), "batch_sizes": sizes, "sequence_lengths": lengths}
