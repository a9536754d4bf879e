"""The export report: per-tensor sparsity (checkpoint vs ONNX), numerics, sizes; JSON and a rich table.

A quantized export adds per tensor its bits, group size, integer op and bytes, and per export
``QuantSummary``: onnxruntime against the emulated integer model (checked) and against the float
model (reported), each integer op against its own float-rounding bound, and the file against the
dense export.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from compressor.core.atomic import atomic_write

from .numerics import Numerics

REPORT_NAME = "export_report.json"


@dataclass
class TensorRow:
    """One checkpoint parameter and the ONNX tensor that carries it (``onnx_name`` None: not found)."""

    name: str
    shape: list[int]
    numel: int
    checkpoint_zeros: int
    mask_sparsity: float | None
    onnx_name: str | None = None
    onnx_shape: list[int] | None = None
    onnx_zeros: int | None = None
    match: str = "missing"
    structure: str | None = None
    structure_violations: int | None = None
    structure_groups: int | None = None
    note: str = ""
    ok: bool = True
    bits: int | None = None  # quantized tensors only, from here on
    group_size: int | None = None
    onnx_op: str | None = None
    bytes: int | None = None  # its integer initializers in the file
    dense_bytes: int | None = None  # as float32
    layer_max_diff: float | None = None  # |onnxruntime - emulation| of its integer op (Linear)
    layer_ratio: float | None = None  # the worst difference over its float-rounding bound (<= 1 passes)

    @property
    def checkpoint_sparsity(self) -> float:
        """Fraction of zeros of the parameter in the checkpoint."""
        return self.checkpoint_zeros / max(self.numel, 1)

    @property
    def onnx_sparsity(self) -> float | None:
        """Fraction of zeros of the matched ONNX initializer (None: not matched)."""
        return None if self.onnx_zeros is None else self.onnx_zeros / max(self.numel, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, sparsities included."""
        out = asdict(self)
        out["checkpoint_sparsity"] = self.checkpoint_sparsity
        out["onnx_sparsity"] = self.onnx_sparsity
        return out


@dataclass
class QuantSummary:
    """How a quantized export was checked.

    numerics: onnxruntime vs the emulated integer model (``exporters.emulate``), within ``tolerance``
    = max(atol, rtol * max |output|) + ``step`` * ``row_l1``: every input of the last quantized layer
    (``last_layer``) one activation grid step (``step``, its largest) away, times its weight rows'
    largest l1 norm. float_numerics: onnxruntime vs the float model (activation quantization; not
    checked). saturating: this onnxruntime's U8S8 kernels saturate int16 pair sums (emulated).
    """

    numerics: Numerics | None
    float_numerics: Numerics | None
    tolerance: float
    last_layer: str | None
    step: float
    row_l1: float
    saturating: bool
    int8_weights: str
    accuracy_level: int
    tensors: int = 0
    quantized_bytes: int = 0
    float_bytes: int = 0  # the same tensors as float32


@dataclass
class ExportReport:
    """What ``export_checkpoint`` did and found; ``passed`` is True when ``failures`` is empty.

    size_ratio: bytes of the written file / bytes of the dense float ONNX (None when neither
    compressed nor quantized). quantization: how the integer graph was checked (None: no weight is
    quantized).
    """

    checkpoint: str
    output: str
    report: str
    exporter: str
    opset: int
    batch: int | str
    input_shape: list[int | str]
    numerics: Numerics | None  # None: onnxruntime could not run the model (see failures)
    tensors: list[TensorRow]
    dense_bytes: int
    file_bytes: int
    compressed: bool = False
    sparse_initializers: list[str] = field(default_factory=list)
    compressed_numerics: Numerics | None = None
    failures: list[str] = field(default_factory=list)
    written: bool = False
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, dtype, shape of each ONNX input
    outputs: list[dict[str, Any]] = field(default_factory=list)
    quantization: QuantSummary | None = None

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return not self.failures

    @property
    def size_ratio(self) -> float | None:
        """Written file size over the dense float export's (None when neither compressed nor quantized)."""
        shrunk = self.compressed or self.quantization is not None
        return self.file_bytes / self.dense_bytes if shrunk and self.dense_bytes else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what export_report.json holds)."""
        out = asdict(self)
        out["tensors"] = [row.to_dict() for row in self.tensors]
        out["passed"] = self.passed
        out["size_ratio"] = self.size_ratio
        return out

    def write(self) -> Path:
        """Write the JSON report to ``self.report`` atomically."""
        text = json.dumps(_strict(self.to_dict()), indent=2, allow_nan=False) + "\n"
        return atomic_write(self.report, lambda handle: handle.write(text))

    def table(self) -> Table:
        """Per tensor: name, shape, sparsity in the checkpoint and in the ONNX file, the match, and
        (quantized exports) bits, group, integer op and bytes."""
        table = Table(title=f"{Path(self.output).name}: sparsity per tensor, checkpoint vs ONNX")
        columns = ["tensor", "shape", "ONNX tensor", "checkpoint", "ONNX", "structure", "match"]
        if self.quantization is not None:
            columns.insert(5, "quantized")
        for column in columns:
            table.add_column(column, justify="right" if column in ("checkpoint", "ONNX") else "left")
        for row in self.tensors:
            onnx_sparsity = "-" if row.onnx_sparsity is None else f"{row.onnx_sparsity:.2%}"
            structure = "-"
            if row.structure is not None:
                structure = f"{row.structure} " + ("ok" if not row.structure_violations else "broken")
            mark = "[green]yes[/]" if row.ok else "[red]NO[/]"
            cells = [
                row.name,
                "x".join(map(str, row.shape)),
                row.onnx_name or "-",
                f"{row.checkpoint_sparsity:.2%}",
                onnx_sparsity,
                structure,
                f"{mark} ({row.match})" + (f" {row.note}" if row.note else ""),
            ]
            if self.quantization is not None:
                cells.insert(5, _quant_cell(row))
            table.add_row(*cells)
        return table

    def summary(self) -> list[str]:
        """Plain lines: numerics, sizes, verdict, files."""
        n = self.numerics
        lines = ["onnxruntime could not run the model"]
        if n is not None:
            lines = [
                f"onnxruntime vs PyTorch on {n.samples} test samples (batches {n.batch_sizes}): "
                f"max |diff| {n.max_abs_diff:.3g} (atol {n.atol:g}), "
                f"max rel {n.max_rel_diff:.3g} (rtol {n.rtol:g})",
            ]
            if n.runs is not None:
                lines[0] = (
                    f"onnxruntime vs PyTorch on {n.samples} rows of named test inputs in {n.runs} batches "
                    f"(batch sizes {n.batch_sizes}, sequence lengths {n.sequence_lengths}): "
                    f"max |diff| {n.max_abs_diff:.3g} (atol {n.atol:g}), "
                    f"max rel {n.max_rel_diff:.3g} (rtol {n.rtol:g})"
                )
        if self.inputs:
            lines.insert(
                0,
                "ONNX inputs " + _signature_text(self.inputs) + "; outputs " + _signature_text(self.outputs),
            )
        if self.quantization is not None:
            lines += _quant_lines(self.quantization, self.tensors)
        if self.compressed:
            c = self.compressed_numerics
            lines.append(
                f"compressed: {self.file_bytes:,} bytes vs {self.dense_bytes:,} dense "
                f"({self.size_ratio:.1%}), {len(self.sparse_initializers)} sparse initializers"
                + (f"; max |diff| {c.max_abs_diff:.3g}, max rel {c.max_rel_diff:.3g}" if c else "")
            )
        elif self.quantization is not None:
            lines.append(
                f"file: {self.file_bytes:,} bytes vs {self.dense_bytes:,} dense float ({self.size_ratio:.1%})"
            )
        lines.append("PASSED" if self.passed else "FAILED:\n  " + "\n  ".join(self.failures))
        wrote = f"wrote {self.output} ({self.file_bytes:,} bytes) and " if self.written else "wrote "
        lines.append(f"{wrote}{self.report}")
        return lines

    def __rich__(self) -> Group:
        verdict = "green" if self.passed else "red"
        lines = self.summary()
        styled = [Text(ln, style=verdict if ln.startswith(("PASSED", "FAILED")) else "") for ln in lines]
        return Group(self.table(), *styled)


def _quant_cell(row: TensorRow) -> str:
    if row.bits is None:
        return "float"
    group = f"g{row.group_size}" if row.group_size else "per row"
    return f"{row.bits}-bit {group} {row.onnx_op} {row.bytes:,} B"


def _quant_lines(q: QuantSummary, rows: list[TensorRow]) -> list[str]:
    lines = [
        f"quantized: {q.tensors} tensors in {q.quantized_bytes:,} bytes of integers and scales "
        f"({q.float_bytes:,} as float32); int8 weights {q.int8_weights}, MatMulNBits accuracy_level "
        f"{q.accuracy_level}"
    ]
    ratios = [r.layer_ratio for r in rows if r.layer_ratio is not None]
    if ratios:
        worst = max(r.layer_max_diff or 0.0 for r in rows)
        lines.append(
            f"integer ops vs emulation on their own inputs: max |diff| {worst:.3g}, at most "
            f"{max(ratios):.3g} of the float-rounding bound"
        )
    n, f = q.numerics, q.float_numerics
    if n is not None:
        lines.append(
            f"onnxruntime vs emulated integer model: max |diff| {n.max_abs_diff:.3g} (tolerance "
            f"{q.tolerance:.3g} = float part + step {q.step:.3g} x row l1 {q.row_l1:.3g} of {q.last_layer})"
        )
    if f is not None:
        lines.append(
            f"onnxruntime vs float model: max |diff| {f.max_abs_diff:.3g}, max rel {f.max_rel_diff:.3g} "
            "(activation quantization; reported, not checked)"
        )
    if q.saturating and q.int8_weights == "int8" and any(r.onnx_op == "DynamicQuantizeMatMul" for r in rows):
        lines.append(
            "this onnxruntime's U8S8 kernels saturate int16 pair sums (x86 without VNNI): emulated; "
            "int8_weights='uint8' avoids it"
        )
    return lines


def _signature_text(values: list[dict[str, Any]]) -> str:
    return ", ".join(f"{v['name']} {v['dtype']} ({', '.join(map(str, v['shape']))})" for v in values)


def _strict(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings ("inf", "nan"), so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj
