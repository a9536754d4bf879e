"""``export_checkpoint``: checkpoint -> verified, reported (optionally compact) ONNX file.

A checkpoint with quantized weights (``Prepared.quantized``) is exported in float, verified, then
rewritten on its integers (``exporters.quantized``) and verified again (``exporters.quant_verify``);
the file written is the integer graph. Registered as the ``onnx`` exporter (entry point group
``compressor.exporters``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import onnx
import torch

from compressor.core.atomic import atomic_write
from compressor.recipe import AllowImports

from .compact import to_sparse
from .convert import Exporter, to_onnx, to_onnx_named
from .errors import ExportError, VerificationError
from .named import KeywordModel, NamedInputs, output_names
from .prepare import prepare
from .quant_verify import QuantVerification, verify_quantized
from .quantized import Int8Weights, QuantRow, quantize_graph
from .report import REPORT_NAME, ExportReport
from .verify import verify

DEFAULT_SAMPLES = 300
#: protobuf's limit on one serialized message: a larger ONNX file needs external data files.
PROTOBUF_LIMIT = 2**31 - 1


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    opset: int | None = None,
    batch: Literal["dynamic"] | int | str = "dynamic",
    compress: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    samples: int = DEFAULT_SAMPLES,
    exporter: Exporter = "legacy",
    allow_imports: AllowImports = (),
    accuracy_level: int = 4,
    int8_weights: Int8Weights = "int8",
) -> ExportReport:
    """Export ``checkpoint`` to ONNX, verify it against onnxruntime and write it with a JSON report.

    Args:
        output: the .onnx file; default ``<checkpoint stem>.onnx`` beside the checkpoint. Never the
            checkpoint itself. ``export_report.json`` is written beside it.
        opset: ONNX opset (default: the exporter's).
        batch: "dynamic" (a dynamic batch axis) or a fixed batch size.
        compress: store tensors that shrink as sparse initializers; the compact model is verified too.
        atol: threshold on max |onnx - torch|.
        rtol: threshold on max |onnx - torch| divided by max |torch|.
        samples: test samples compared (in batches of the exported batch size). A model called with
            tensors by name (a sentence encoder's ``input_ids`` and ``attention_mask``) is compared on
            every input the task gives per batch (both sides of a pair), in batches of several sizes
            and sequence lengths (see ``exporters.named``).
        exporter: "legacy" (TorchScript) or "dynamo".
        allow_imports: the modules whose "package.module:factory" the checkpoint's recipe may import
            and call to rebuild its model and data (True: any); by default none (a RecipeError says so).
        accuracy_level: MatMulNBits' (4-bit, and 8-bit in groups): 4 quantizes its input to int8 per
            block (onnxruntime's fast path), 0 keeps it float.
        int8_weights: per-row 8-bit Linear weights as "int8" (U8S8 kernels, what onnxruntime's
            quantize_dynamic runs; on x86 without VNNI their int16 pair sums saturate) or "uint8"
            (codes + 128, U8U8 kernels: exact everywhere, slower on AVX2). See ``exporters.emulate``.

    Raises:
        CheckpointError: a missing, truncated or tampered checkpoint.
        ExportError: an option or a model that cannot be exported.
        VerificationError: a check failed; nothing is written but the report (``passed: false``).
    """
    source = Path(checkpoint)
    target = _output_path(source, output)
    fixed = _batch_size(batch)
    if samples < 1:
        raise ExportError(f"samples must be >= 1, got {samples}")
    prepared = prepare(source, samples, allow_imports, batch=fixed)
    _check_size(prepared.model)
    runner = None
    if isinstance(prepared.inputs, NamedInputs):
        example = _named_example(prepared.inputs, fixed)
        outputs = output_names(prepared.model, example)
        runner = KeywordModel(prepared.model, prepared.inputs.names, outputs[1]).eval()
        dense = to_onnx_named(
            prepared.model, prepared.inputs, example, outputs, batch=fixed, opset=opset, exporter=exporter
        )
    else:
        if fixed is not None and fixed > len(prepared.inputs):
            raise ExportError(
                f"--batch {fixed} is larger than the {len(prepared.inputs)} test samples available"
            )
        example = prepared.inputs[: fixed or min(2, len(prepared.inputs))]
        dense = to_onnx(prepared.model, example, batch=fixed, opset=opset, exporter=exporter)
    if opset is not None and _opset(dense) != opset:
        hint = " (dynamo starts at 18; use exporter 'legacy' below)" if exporter == "dynamo" else ""
        raise ExportError(f"asked for opset {opset}, the {exporter} exporter produced {_opset(dense)}{hint}")
    dense_bytes = dense.SerializeToString()
    checks = verify(dense, prepared, batch=fixed, atol=atol, rtol=rtol, runner=runner)
    final, moved, compressed_numerics, quantization = dense, [], None, None
    failures, tensors = list(checks.failures), checks.tensors
    rows: list[QuantRow] = []

    def check_quantized(model: onnx.ModelProto) -> QuantVerification:
        return verify_quantized(
            model,
            prepared,
            rows,
            batch=fixed,
            atol=atol,
            rtol=rtol,
            runner=runner,
            int8_weights=int8_weights,
            accuracy_level=accuracy_level,
        )

    if prepared.quantized:
        final, rows = quantize_graph(
            dense,
            prepared.quantized,
            prepared.weights,
            accuracy_level=accuracy_level,
            int8_weights=int8_weights,
        )
        checked = check_quantized(final)
        failures += [f"quantized model: {f}" for f in checked.failures]
        tensors, quantization = checked.tensors, checked.summary
    if compress:
        final, moved = to_sparse(final)
        if prepared.quantized:
            again_q = check_quantized(final)
            compressed_numerics, again_failures = again_q.summary.numerics, again_q.failures
        else:
            again = verify(final, prepared, batch=fixed, atol=atol, rtol=rtol, runner=runner)
            compressed_numerics, again_failures = again.numerics, again.failures
        failures += [f"compressed model: {f}" for f in again_failures]
    payload = final.SerializeToString() if final is not dense else dense_bytes
    report = ExportReport(
        checkpoint=str(source),
        output=str(target),
        report=str(target.parent / REPORT_NAME),
        exporter=exporter,
        opset=_opset(final),
        batch=fixed if fixed is not None else "dynamic",
        input_shape=_input_shape(final),
        inputs=_signature(final.graph.input),
        outputs=_signature(final.graph.output),
        numerics=checks.numerics,
        tensors=tensors,
        dense_bytes=len(dense_bytes),
        file_bytes=len(payload),
        compressed=compress,
        sparse_initializers=moved,
        compressed_numerics=compressed_numerics,
        failures=failures,
        quantization=quantization,
    )
    if report.failures:
        report.write()
        raise VerificationError(
            f"{source}: the exported model failed verification (nothing written; see {report.report}):\n  "
            + "\n  ".join(report.failures),
            report,
        )
    atomic_write(target, lambda handle: handle.write(payload), binary=True)
    report.written = True
    report.write()
    return report


def _output_path(source: Path, output: str | os.PathLike[str] | None) -> Path:
    target = Path(output) if output is not None else source.with_suffix(".onnx")
    if target.is_dir():
        raise ExportError(f"--output {target} is a folder; give a file name such as {target / 'model.onnx'}")
    same = target.resolve() == source.resolve()
    if not same and target.exists() and source.exists():
        same = os.path.samefile(target, source)
    if same or target.parent / REPORT_NAME == source:
        raise ExportError(f"refusing to write over the input checkpoint {source}; choose another --output")
    return target


def _check_size(model: torch.nn.Module) -> None:
    """Refuse, before exporting, models whose weights alone exceed protobuf's 2 GiB message limit."""
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > PROTOBUF_LIMIT:
        raise ExportError(
            f"the model's weights take {size / 2**30:.2f} GiB, over ONNX's 2 GiB limit for a single file; "
            "exporting with external data files is not supported yet"
        )


def _batch_size(batch: Literal["dynamic"] | int | str) -> int | None:
    """None for a dynamic batch axis, else the fixed size (>= 1)."""
    if batch == "dynamic":
        return None
    try:
        size = int(batch)
    except (TypeError, ValueError):
        raise ExportError(f"--batch must be 'dynamic' or a positive integer, got {batch!r}") from None
    if isinstance(batch, bool) or size < 1 or str(size) != str(batch).strip():
        raise ExportError(f"--batch must be 'dynamic' or a positive integer, got {batch!r}")
    return size


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _input_shape(model: onnx.ModelProto) -> list[int | str]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in dims]


def _named_example(inputs: NamedInputs, fixed: int | None) -> dict[str, torch.Tensor]:
    """The batch the exporter traces: of the fixed size, else the largest batch with padding (a zero
    in an attention mask) if any, else the largest one."""

    def rank(batch: dict[str, torch.Tensor]) -> tuple[bool, bool, int]:
        rows = int(next(iter(batch.values())).shape[0])
        mask = batch.get("attention_mask")
        padded = mask is not None and bool((mask == 0).any())
        return (fixed is None or rows == fixed, padded, rows)

    return max(inputs.batches, key=rank)


def _signature(values: Any) -> list[dict[str, Any]]:
    """Name, element type and shape (dimension names for dynamic axes) of graph inputs or outputs."""
    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor.shape.dim]
        out.append(
            {
                "name": value.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                "shape": dims,
            }
        )
    return out
