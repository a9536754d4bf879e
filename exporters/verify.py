"""Checks of one exported ModelProto against its checkpoint: onnx.checker, onnxruntime numerics,
per-tensor sparsity (exactly the checkpoint's) and N:M / block compliance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from torch import nn

from compressor.core.onnx_tensors import constant_tensors

from .compliance import describe, violations
from .matching import closest_unmatched, match_tensors
from .named import NamedInputs
from .numerics import Numerics, compare, compare_named
from .prepare import Prepared
from .report import TensorRow


@dataclass
class Verification:
    """The outcome of ``verify``; ``numerics`` is None when onnxruntime could not run the model."""

    numerics: Numerics | None
    tensors: list[TensorRow]
    failures: list[str] = field(default_factory=list)


def verify(
    model: onnx.ModelProto,
    prepared: Prepared,
    *,
    batch: int | None,
    atol: float,
    rtol: float,
    runner: nn.Module | None = None,
) -> Verification:
    """Run every check; failures are collected (with their numbers), never raised.

    ``runner``: for a keyword-input model, the ``KeywordModel`` that was exported (positional tensors
    in the ONNX inputs' order, the exported outputs out); compared on every batch of the inputs.
    """
    failures: list[str] = []
    try:  # shape inference (full_check) rejects sparse initializers as Gemm/Conv inputs; ORT accepts them
        onnx.checker.check_model(model, full_check=not model.graph.sparse_initializer)
    except Exception as exc:  # ValidationError, InferenceError
        failures.append(f"onnx.checker: {' '.join(str(exc).split())[:300]}")
    numerics = None
    try:
        if isinstance(prepared.inputs, NamedInputs):
            numerics = compare_named(
                model, runner if runner is not None else prepared.model, prepared.inputs, atol, rtol
            )
        else:
            numerics = compare(model, prepared.model, prepared.inputs, batch, atol, rtol)
    except Exception as exc:  # onnxruntime load/run errors carry their own message
        failures.append(f"onnxruntime could not run the model: {' '.join(str(exc).split())[:300]}")
    if numerics is not None and numerics.failure() is not None:
        failures.append(numerics.failure())
    rows = tensor_rows(model, prepared)
    failures += [f"{row.name}: {row.note}" for row in rows if not row.ok]
    return Verification(numerics, rows, failures)


def tensor_rows(model: onnx.ModelProto, prepared: Prepared) -> list[TensorRow]:
    """One row per reported parameter: its ONNX tensor, both sparsities, structure compliance."""
    onnx_tensors = constant_tensors(model)
    matches = match_tensors(prepared.weights, onnx_tensors)
    taken = {m.onnx_name for m in matches.values()}
    rows = []
    for name, weight in prepared.weights.items():
        array = weight.numpy()
        row = TensorRow(
            name=name,
            shape=list(array.shape),
            numel=int(array.size),
            checkpoint_zeros=int((array == 0).sum()),
            mask_sparsity=prepared.mask_sparsity.get(name),
        )
        match = matches.get(name)
        if match is None:
            _missing(row, array, onnx_tensors, taken)
        else:
            found = match.in_param_layout(onnx_tensors[match.onnx_name])
            row.onnx_name, row.onnx_shape = match.onnx_name, list(onnx_tensors[match.onnx_name].shape)
            row.onnx_zeros, row.match = int((found == 0).sum()), match.kind
            if row.onnx_zeros != row.checkpoint_zeros:
                row.ok = False
                row.note = f"{row.onnx_zeros} zeros in ONNX, {row.checkpoint_zeros} in the checkpoint"
            check_structure(row, found, array, prepared)
        rows.append(row)
    return rows


def _missing(row: TensorRow, array: np.ndarray, onnx_tensors: dict[str, np.ndarray], taken: set[str]) -> None:
    """Fill a row for a parameter with no ONNX tensor of its values or zero pattern."""
    closest = closest_unmatched(array, onnx_tensors, taken)
    if closest is not None:
        row.onnx_name, row.onnx_shape = f"({closest[0]}?)", list(closest[1].shape)
        row.onnx_zeros = int((closest[1] == 0).sum())
    sparse = row.checkpoint_zeros > 0 or row.mask_sparsity is not None
    row.ok = not sparse
    if not sparse:
        row.note = "dense, not found (folded or fused by the exporter)"
        return
    hint = f"; closest {closest[0]} has {row.onnx_zeros}" if closest is not None else ""
    row.note = f"no ONNX tensor carries its values or zero pattern ({row.checkpoint_zeros} zeros{hint})"


def check_structure(row: TensorRow, found: np.ndarray, original: np.ndarray, prepared: Prepared) -> None:
    """Fill the row's structure columns: ``found`` (the weight as in the file, the parameter's layout)
    against the structure its pruner asked for (``original``: the checkpoint's, for the note)."""
    spec = prepared.structures.get(row.name)
    if spec is None:
        return
    row.structure = describe(spec)
    row.structure_violations, row.structure_groups = violations(found, spec)
    if row.structure_violations:
        before, _ = violations(original, spec)
        if before:
            row.note = f"checkpoint not yet {row.structure} ({before} groups off; mid-schedule?)"
        else:
            row.ok = False
            row.note = f"{row.structure_violations} of {row.structure_groups} groups break {row.structure}"
