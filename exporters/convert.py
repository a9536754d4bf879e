"""PyTorch -> ONNX ModelProto, in memory, with a dynamic or a fixed batch axis.

Two exporters: ``legacy`` (TorchScript; the default here: faster on these models (docs/export.md),
any opset from 7, needs no onnxscript; it folds batch-norm into the convolutions) and ``dynamo``
(``torch.export`` based, the default of torch >= 2.9; needs onnxscript, opset >= 18; keeps the
parameter names but also stores batch-norm-folded values under them).

``to_onnx_named`` exports a model called with keyword tensors (see ``exporters.named``): one ONNX
input per name, dynamic batch and sequence axes, named outputs whose other axes are fixed. Both
exporters pass on a BERT sentence encoder (int64 ids and mask, padded and unpadded batches, to
1e-7); legacy takes well under a second where dynamo takes several.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import onnx
import torch
from torch import nn

from .errors import ExportError
from .named import BATCH, SEQUENCE, KeywordModel, NamedInputs

Exporter = Literal["legacy", "dynamo"]
EXPORTERS: tuple[str, ...] = ("legacy", "dynamo")
INPUT, OUTPUT = "input", "output"


def to_onnx(
    model: nn.Module, example: torch.Tensor, *, batch: int | None, opset: int | None, exporter: Exporter
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) traced on ``example``; ``batch=None`` makes axis 0 dynamic."""
    if exporter == "legacy":
        return _guarded(exporter, opset, lambda: _legacy(model, example, batch, opset))
    return _guarded(exporter, opset, lambda: _dynamo(model, example, batch, opset))


def _guarded(exporter: str, opset: int | None, export: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """``export()``, its failures as ExportError with torch's first line."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer warnings
            return export()
    except ExportError:
        raise
    except Exception as exc:  # torch raises many types; the message is what the user needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"torch.onnx.export ({exporter}, opset {opset or 'default'})"
        raise ExportError(f"{where} failed: {first}") from exc


def _legacy(model: nn.Module, example: torch.Tensor, batch: int | None, opset: int | None) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = None if batch is not None else {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    torch.onnx.export(
        model,
        (example,),
        buffer,
        dynamo=False,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes=axes,
        opset_version=opset,
        do_constant_folding=True,
    )
    return onnx.load_model_from_string(buffer.getvalue())


def _dynamo(model: nn.Module, example: torch.Tensor, batch: int | None, opset: int | None) -> onnx.ModelProto:
    shapes = None if batch is not None else ({0: torch.export.Dim("batch")},)
    return _dynamo_export(model, (example,), [INPUT], [OUTPUT], shapes, opset)


def _dynamo_export(
    model: nn.Module,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    shapes: Any,
    opset: int | None,
) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` of ``model(*args)`` with ``dynamic_shapes=shapes``, optimized,
    weights inside the proto."""
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=shapes,
        opset_version=opset,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export (dynamo) returned no program")
    return program.model_proto


def to_onnx_named(
    model: nn.Module,
    inputs: NamedInputs,
    example: Mapping[str, torch.Tensor],
    outputs: tuple[list[str], list[str] | None],
    *,
    batch: int | None,
    opset: int | None,
    exporter: Exporter,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode, called as ``model(**example)``) with inputs named ``inputs.names``.

    ``outputs``: (ONNX output names, the fields of the model's output they are, see
    ``named.output_names``). Axis 0 of every input and output is ``batch`` (unless ``batch`` fixes
    it); axis 1 of the integer rank-2 inputs is ``sequence``, and so is axis 1 of outputs of rank >= 3
    (token states) when there is a sequence input. Other output axes are fixed at the traced sizes.
    """
    names, fields = outputs
    wrapped = KeywordModel(model, inputs.names, fields).eval()
    args = tuple(example[n] for n in inputs.names)
    sequence = inputs.sequence_axes()
    in_axes = {
        n: ({} if batch is not None else {0: BATCH}) | ({1: SEQUENCE} if sequence[n] else {})
        for n in inputs.names
    }
    with torch.no_grad():
        produced = wrapped(*args)
    shapes = [tuple(t.shape) for t in (produced if isinstance(produced, tuple) else (produced,))]
    out_axes = {
        n: ({} if batch is not None else {0: BATCH})
        | ({1: SEQUENCE} if len(s) >= 3 and any(sequence.values()) else {})
        for n, s in zip(names, shapes, strict=True)
    }
    if exporter == "legacy":
        proto = _guarded(
            exporter,
            opset,
            lambda: _legacy_named(wrapped, args, inputs.names, names, in_axes, out_axes, opset),
        )
    else:
        proto = _guarded(
            exporter, opset, lambda: _dynamo_named(wrapped, args, inputs.names, names, in_axes, opset)
        )
    _fix_output_dims(proto, out_axes, shapes)
    _strip_prefix(proto, "model.")
    return proto


def _strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Name the initializers as the model names its parameters (``auto_model.embeddings...``), not as
    the wrapper that was traced does (``model.auto_model...``)."""
    graph = proto.graph
    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in subgraphs for node in graph.node for a in node.attribute):
        return  # subgraphs may read initializers by name: leave the names alone
    taken = (
        {i.name for i in graph.initializer}
        | {i.name for i in graph.input}
        | {o for node in graph.node for o in node.output}
    )
    renames = {}
    for init in graph.initializer:
        new = init.name[len(prefix) :]
        if init.name.startswith(prefix) and new and new not in taken:
            renames[init.name] = new
            taken.add(new)
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _legacy_named(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    in_axes: dict[str, dict[int, str]],
    out_axes: dict[str, dict[int, str]],
    opset: int | None,
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        args,
        buffer,
        dynamo=False,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes={**in_axes, **out_axes},
        opset_version=opset,
        do_constant_folding=True,
    )
    return onnx.load_model_from_string(buffer.getvalue())


def _dynamo_named(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    in_axes: dict[str, dict[int, str]],
    opset: int | None,
) -> onnx.ModelProto:
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple(
        {axis: dims.setdefault(name, torch.export.Dim(name)) for axis, name in in_axes[n].items()}
        for n in input_names
    )
    return _dynamo_export(model, args, input_names, output_names, (shapes,), opset)


def _fix_output_dims(
    proto: onnx.ModelProto, out_axes: dict[str, dict[int, str]], shapes: list[tuple[int, ...]]
) -> None:
    """Give each output its dynamic axes' names and its other axes' traced sizes (the legacy exporter
    leaves e.g. the width of a normalised embedding as a symbolic name)."""
    for output, shape in zip(proto.graph.output, shapes, strict=True):
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            name = out_axes.get(output.name, {}).get(axis)
            if name is not None:
                dim.dim_param = name
            else:
                dim.dim_value = int(size)
