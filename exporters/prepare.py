"""A checkpoint made ready for export: its model rebuilt from its recipe, masks baked in, test inputs.

Masks are baked (masked weights set to exact zero) and their buffers and hooks removed, so nothing
of the masking machinery reaches the exported graph. Quantized weights come with their integer
records (``Prepared.quantized``), read from the model's quantization buffers
(``compressor.core.quantized``, removed from the state dict before loading); the input smoothing
factors of SmoothQuant stay in the model (a forward pre-hook: a Mul before the layer's product).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.builders import build_task, build_train
from compressor.core.checkpoint import load_checkpoint
from compressor.core.errors import CompressorError
from compressor.core.masks import MASK_SUFFIX, MaskSet, mask_names
from compressor.core.params import match_params, normalize
from compressor.core.quantized import attach, pop_records, smoothing_buffers
from compressor.mfac.grid import QuantizedWeight
from compressor.recipe import AllowImports, parse_recipe
from compressor.sparsity.patterns import as_structure
from compressor.tasks import ClassificationTask, Task, TaskError, unpack_data

from .errors import ExportError
from .named import NamedInputs, collect


@dataclass
class Prepared:
    """What export and verification need from one checkpoint.

    weights: normalized name -> baked tensor, for every weight (dim >= 2) and every masked parameter.
    mask_sparsity: normalized name -> fraction of the mask that is off, for the masked parameters.
    structures: normalized name -> the structure its pruner asked for (only non-unstructured ones).
    inputs: the model's inputs as the recipe's task reads them from the test split: real test
        samples (n, *input_shape), float32, for a model that takes one tensor; ``NamedInputs`` (batches
        of tensors by name, see ``exporters.named``) for one called as ``model(**inputs)``.
    quantized: normalized name -> the integer record of each quantized weight (empty: none); the
        weight in ``weights`` equals its ``dequantize()``.
    """

    path: Path
    model: nn.Module
    weights: dict[str, torch.Tensor]
    mask_sparsity: dict[str, float]
    structures: dict[str, Any]
    inputs: torch.Tensor | NamedInputs
    epoch: int | None = None
    notes: list[str] = field(default_factory=list)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)


def prepare(path: Path, samples: int, allow_imports: AllowImports = (), batch: int | None = None) -> Prepared:
    """Load ``path`` (CheckpointError if damaged), rebuild and bake its model; ``samples`` test inputs
    (for a keyword-input model: batches of the fixed ``batch`` size, else of several sizes).

    The model and data are rebuilt from the checkpoint's recipe, importing a "package.module:factory"
    only when ``allow_imports`` permits it (see ``compressor.recipe.imports``).
    """
    state = load_checkpoint(path)
    text = state.get("recipe")
    beside = path.parent / "recipe.yaml"  # the run folder's resolved recipe, for older checkpoints
    if not isinstance(text, str) and beside.is_file():
        text = beside.read_text()
    if not isinstance(text, str):
        raise ExportError(
            f"{path}: the checkpoint carries no recipe and there is no recipe.yaml beside it, "
            "so its model cannot be rebuilt"
        )
    recipe = parse_recipe(text, file=f"{path} (recipe)")
    if recipe.train is None:
        raise ExportError(f"{path}: the checkpoint's recipe has no 'train' section naming model and data")
    train = recipe.train
    bundle, model = build_train(recipe, allow_imports)
    task = build_task(recipe, allow_imports)
    try:
        task.prepare(model)  # e.g. the contrastive task takes the model's tokenizer to collate
    except CompressorError as exc:  # TaskError, or ZooError: no tokenizer saved beside the model
        raise ExportError(f"{path}: the task cannot collate the test data for this model: {exc}") from exc
    inputs = _test_inputs(bundle.test, samples, task, batch)
    state_dict: dict[str, torch.Tensor] = dict(state["model"])
    quantized = pop_records(state_dict)
    example = inputs[:2] if isinstance(inputs, torch.Tensor) else inputs.batches[0]
    model = _match_shapes(model, state_dict, example)
    attach(model, smoothing_buffers(state_dict))  # SmoothQuant's input factors: a Mul in the graph
    masked = mask_names(state_dict)
    masks = MaskSet(model, masked)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise ExportError(f"{path}: the weights do not fit model {train.model!r}: {detail}") from exc
    mask_sparsity = masks.sparsities()
    masks.remove()  # bakes: masked weights -> exact 0, then drops buffers and hooks
    leftover = [n for n, _ in model.named_buffers() if n.endswith(MASK_SUFFIX)]
    if leftover:
        raise ExportError(f"{path}: mask buffers survived baking: {leftover}")
    model.eval().requires_grad_(False)
    params = {normalize(n): p for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in params.items() if p.dim() >= 2 or n in mask_sparsity}
    return Prepared(
        path=path,
        model=model,
        weights=weights,
        mask_sparsity=mask_sparsity,
        structures=_structures(recipe.modifiers, list(params)),
        inputs=inputs,
        epoch=state.get("epoch"),
        quantized=quantized,
    )


def _test_inputs(
    test: Any, samples: int, task: Task | None = None, batch: int | None = None
) -> torch.Tensor | NamedInputs:
    """The model's inputs for the first ``samples`` samples of the test split.

    ``task`` (default classification) collates them and says what the model takes
    (``Task.example_inputs``): one tensor (float32, all samples), or a dict of tensors by name
    (``NamedInputs``: batches of the fixed ``batch`` size, else of several sizes, see
    ``exporters.named``). ExportError for anything else, or when the task cannot read them.
    """
    task = task or ClassificationTask()
    test, collate = unpack_data(test, task)
    count = min(samples, len(test))
    if count < 1:
        raise ExportError("the run's test data is empty: nothing to verify the export on")
    tensors = getattr(test, "tensors", None)
    if tensors is not None and isinstance(task, ClassificationTask):
        return tensors[0][:count].to(torch.float32).contiguous()
    named = collect(test, collate, task, count, batch)
    if named is not None:
        return named
    try:
        xs = task.model_inputs(collate([test[i] for i in range(count)]))
    except TaskError as exc:
        raise ExportError(f"the test samples cannot be read as the model's inputs: {exc}") from exc
    if not isinstance(xs, torch.Tensor):
        raise ExportError(
            f"the model takes {type(xs).__name__} ({type(task).__name__}); export handles models that "
            "take one input tensor, or tensors by name (a dict, such as a sentence encoder's input_ids "
            "and attention_mask)"
        )
    return xs.to(torch.float32).contiguous()


def _match_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], example: Any) -> nn.Module:
    """Resize channel-pruned layers with ``compressor.surgery.channels.match_shapes`` (when importable)."""
    try:
        module = importlib.import_module("compressor.surgery.channels")
    except ModuleNotFoundError as exc:
        if exc.name == "compressor.surgery.channels":
            return model
        raise
    match = getattr(module, "match_shapes", None)
    if match is None:
        return model
    try:
        out = match(model, state_dict, example)
    except ValueError as exc:  # the checkpoint comes from another architecture
        raise ExportError(f"the checkpoint's weights do not fit the recipe's model: {exc}") from exc
    return out if isinstance(out, nn.Module) else model


def _structures(modifiers: list[Any], names: list[str]) -> dict[str, Any]:
    """Parameter name -> structure spec, for pruners that asked for one other than unstructured."""
    out: dict[str, Any] = {}
    for modifier in modifiers:
        spec = getattr(modifier, "structure", None)
        if spec is None or spec == "unstructured" or not getattr(modifier, "prunes", False):
            continue
        for name in match_params(modifier.parameter_patterns(), names):
            out[name] = as_structure(spec)
    return out
