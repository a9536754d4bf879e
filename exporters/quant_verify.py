"""Checks of a quantized export (``quantize_graph``'s graph) against its checkpoint.

    integers   every record's codes, scales and zero points read back from the file equal the
               checkpoint's, value for value (``int_read``)
    ops        each integer Linear op against ``IntegerOp`` on onnxruntime's own input to it, within
               its float-rounding bound (``layer_check``): the tight check of layouts and scales
    model      onnxruntime's outputs against the emulated PyTorch model (``emulate.emulated``) within

                   tolerance = max(atol, rtol * max |output|) + step * row_l1

               step: the largest activation grid step of the last quantized layer (s_a, or m / 127 of
               a MatMulNBits block); row_l1: the largest l1 norm of its weight rows. A rounding
               difference upstream (onnxruntime's float ops are not PyTorch's) can move an input of a
               later layer across a rounding boundary: one step each; this allows every input of the
               last layer one step (as the float export, the float part covers the ops after it).
    float      onnxruntime against the float model: the cost of quantized activations, reported.

Plus onnx.checker, and the sparsity and structure of every tensor (the quantized ones counted on
the file's integers: a weight is 0 where its code is its zero point).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from torch import nn

from .emulate import emulated, onnxruntime_saturates
from .int_read import read_back, same_integers
from .layer_check import LayerCheck, check_layers
from .named import NamedInputs
from .numerics import DYNAMIC_CHUNK, Numerics, compare, compare_named
from .prepare import Prepared
from .quantized import QuantRow
from .report import QuantSummary, TensorRow
from .verify import check_structure, tensor_rows

INF = float("inf")


@dataclass
class QuantVerification:
    """The outcome of ``verify_quantized``: failures are collected, never raised."""

    summary: QuantSummary
    tensors: list[TensorRow]
    failures: list[str]


def verify_quantized(
    model: onnx.ModelProto,
    prepared: Prepared,
    rows: list[QuantRow],
    *,
    batch: int | None,
    atol: float,
    rtol: float,
    runner: nn.Module | None = None,
    int8_weights: str = "int8",
    accuracy_level: int = 4,
) -> QuantVerification:
    """Run every check of the module doc on ``model`` (``rows``: what ``quantize_graph`` did)."""
    records = prepared.quantized
    failures: list[str] = []
    try:
        onnx.checker.check_model(model, full_check=not model.graph.sparse_initializer)
    except Exception as exc:  # ValidationError, InferenceError
        failures.append(f"onnx.checker: {' '.join(str(exc).split())[:300]}")
    saturating = onnxruntime_saturates()
    summary = QuantSummary(
        numerics=None,
        float_numerics=None,
        tolerance=INF,
        last_layer=None,
        step=0.0,
        row_l1=0.0,
        saturating=saturating,
        int8_weights=int8_weights,
        accuracy_level=accuracy_level,
        tensors=len(rows),
        quantized_bytes=sum(r.bytes for r in rows),
        float_bytes=sum(r.dense_bytes for r in rows),
    )
    layers: dict[str, LayerCheck] = {}
    try:
        layers = {
            c.name: c for c in check_layers(model, rows, records, _feeds(model, prepared, batch), saturating)
        }
        _model_check(model, prepared, rows, summary, batch, (atol, rtol), runner)
    except Exception as exc:  # onnxruntime load/run errors carry their own message
        failures.append(f"onnxruntime could not run the quantized model: {' '.join(str(exc).split())[:300]}")
    n = summary.numerics
    if n is not None and not n.ok:
        failures.append(
            f"onnxruntime differs from the emulated integer model on {n.samples} test samples: max |diff| "
            f"{n.max_abs_diff:.3g} over the tolerance {summary.tolerance:.3g} (quant_verify)"
        )
    tensors = _tensor_rows(model, prepared, rows, layers)
    failures += [f"{row.name}: {row.note}" for row in tensors if not row.ok]
    return QuantVerification(summary, tensors, failures)


def _feeds(model: onnx.ModelProto, prepared: Prepared, batch: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The batches ``compare`` / ``compare_named`` run, as onnxruntime feeds."""
    constants = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in constants]
    if isinstance(prepared.inputs, NamedInputs):
        for chunk in prepared.inputs.batches:
            yield {n: chunk[n].numpy() for n in names}
        return
    inputs = prepared.inputs
    size = batch or DYNAMIC_CHUNK
    usable = len(inputs) if batch is None else len(inputs) // batch * batch
    for start in range(0, usable, size):
        yield {names[0]: inputs[start : start + size].numpy()}


def _model_check(
    model: onnx.ModelProto,
    prepared: Prepared,
    rows: list[QuantRow],
    summary: QuantSummary,
    batch: int | None,
    thresholds: tuple[float, float],
    runner: nn.Module | None,
) -> None:
    """Fill ``summary``: onnxruntime vs the emulated model (with its tolerance) and vs the float one."""
    torch_model = runner if runner is not None else prepared.model

    def run() -> Numerics:
        if isinstance(prepared.inputs, NamedInputs):
            return compare_named(model, torch_model, prepared.inputs, INF, INF)
        return compare(model, torch_model, prepared.inputs, batch, INF, INF)

    with emulated(prepared.model, rows, prepared.quantized, saturate=summary.saturating) as seen:
        numerics = run()
    summary.float_numerics = run()
    atol, rtol = thresholds
    scale = numerics.max_abs_diff / numerics.max_rel_diff if numerics.max_rel_diff > 0 else 0.0
    if seen:
        last = seen[-1][0]
        summary.last_layer = last
        summary.step = max(step for name, step in seen if name == last)
        summary.row_l1 = float(prepared.quantized[last].dequantize().abs().sum(dim=1).max())
    summary.tolerance = max(atol, rtol * scale) + summary.step * summary.row_l1
    numerics.atol, numerics.rtol = summary.tolerance, INF
    summary.numerics = numerics


def _tensor_rows(
    model: onnx.ModelProto, prepared: Prepared, rows: list[QuantRow], layers: dict[str, LayerCheck]
) -> list[TensorRow]:
    """Float rows as ``verify`` makes them; quantized rows from the file's integers."""
    by_name = {r.name: r for r in rows}
    others = {n: w for n, w in prepared.weights.items() if n not in by_name}
    floats = {r.name: r for r in tensor_rows(model, replace(prepared, weights=others))}
    out = []
    for name, weight in prepared.weights.items():
        row = by_name.get(name)
        out.append(
            floats[name] if row is None else _quant_row(model, prepared, row, weight, layers.get(name))
        )
    return out


def _quant_row(
    model: onnx.ModelProto, prepared: Prepared, qrow: QuantRow, weight: torch.Tensor, layer: LayerCheck | None
) -> TensorRow:
    array = weight.numpy()
    row = TensorRow(
        name=qrow.name,
        shape=list(array.shape),
        numel=int(array.size),
        checkpoint_zeros=int((array == 0).sum()),
        mask_sparsity=prepared.mask_sparsity.get(qrow.name),
        onnx_name=qrow.onnx_name,
        onnx_shape=_stored_shape(model, qrow.onnx_name),
        match="quantized",
        bits=qrow.bits,
        group_size=qrow.group_size,
        onnx_op=qrow.op,
        bytes=qrow.bytes,
        dense_bytes=qrow.dense_bytes,
    )
    stored = read_back(model, qrow.onnx_name, qrow.bits, qrow.symmetric)
    zero = stored.expanded()[1]
    row.onnx_zeros = int((stored.codes == zero).sum())
    if not same_integers(stored, prepared.quantized[qrow.name]):
        row.ok, row.note = (
            False,
            "the integers in the file differ from the checkpoint's codes, scales or zero points",
        )
    elif row.onnx_zeros != row.checkpoint_zeros:
        row.ok, row.note = (
            False,
            f"{row.onnx_zeros} zero codes in ONNX, {row.checkpoint_zeros} zeros in the checkpoint",
        )
    if layer is not None:
        row.layer_max_diff, row.layer_ratio = layer.max_abs_diff, layer.worst_ratio
        if not layer.ok and row.ok:
            row.ok = False
            row.note = (
                f"{qrow.op} differs from its emulation by up to {layer.max_abs_diff:.3g}, "
                f"{layer.worst_ratio:.3g} times its float-rounding bound"
            )
    check_structure(row, stored.dequantize().numpy(), array, prepared)
    return row


def _stored_shape(model: onnx.ModelProto, name: str) -> list[int]:
    init = next((i for i in model.graph.initializer if i.name == name), None)
    return [] if init is None else [int(d) for d in init.dims]
