"""Exporters: sparse ONNX export, verification against onnxruntime, and the sparsity report.

They depend on ``compressor`` and are found through the registry, never imported by it::

    from exporters import export_checkpoint
    report = export_checkpoint("out/checkpoint.pt", compress=True)   # -> out/checkpoint.onnx
    print(report.numerics.max_abs_diff, report.size_ratio)

A model called with tensors by name (a sentence encoder of ``hf:DIR`` with ``task: contrastive``)
exports with inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence) and output
``sentence_embedding``, verified on the task's tokenized test batches (see ``exporters.named``).

A checkpoint with quantized weights is written on their integers (onnxruntime's DynamicQuantizeMatMul,
MatMulNBits, GatherBlockQuantized; ``exporters.quantized``), checked against an exact emulation of
onnxruntime's integer arithmetic (``exporters.emulate``, ``exporters.quant_verify``).
"""

from .errors import ExportError, VerificationError
from .export import export_checkpoint
from .quantized import QuantRow, quantize_graph
from .report import ExportReport, TensorRow

__all__ = [
    "ExportError",
    "ExportReport",
    "QuantRow",
    "TensorRow",
    "VerificationError",
    "export_checkpoint",
    "quantize_graph",
]
