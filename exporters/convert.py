"""PyTorch -> ONNX ModelProto, in memory, with a dynamic or a fixed batch axis.

Two exporters: ``legacy`` (TorchScript; the default here: faster on these models (README, Export),
any opset from 7, needs no onnxscript; it folds batch-norm into the convolutions) and ``dynamo``
(``torch.export`` based, the default of torch >= 2.9; needs onnxscript, opset >= 18; keeps the
parameter names but also stores batch-norm-folded values under them).
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import onnx
import torch
from torch import nn

from .errors import ExportError

Exporter = Literal["legacy", "dynamo"]
EXPORTERS: tuple[str, ...] = ("legacy", "dynamo")
INPUT, OUTPUT = "input", "output"


def to_onnx(
    model: nn.Module, example: torch.Tensor, *, batch: int | None, opset: int | None, exporter: Exporter
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) traced on ``example``; ``batch=None`` makes axis 0 dynamic."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer warnings
            if exporter == "legacy":
                return _legacy(model, example, batch, opset)
            return _dynamo(model, example, batch, opset)
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
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=shapes,
        opset_version=opset,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise ExportError("torch.onnx.export (dynamo) returned no program")
    return program.model_proto
