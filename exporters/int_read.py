"""Read a quantized weight's integers back from an exported graph (the inverse of ``int_nodes``).

``read_back`` gives a ``QuantizedWeight`` as the file stores it: codes (rows, cols) int8 (8-bit
codes shifted back from uint8; 4-bit codes unpacked), scales and zero points per ONNX block (a
group longer than its block reads as several equal blocks). ``same_integers`` compares it with the
checkpoint's record value for value, so a code, a scale or a zero point that differs is caught
whatever the numerics say.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from compressor.core.onnx_tensors import constant_tensors
from compressor.mfac.grid import QuantizedWeight

from .int_nodes import U8_OFFSET, default_zero, unpack_nibbles


def read_back(model: onnx.ModelProto, onnx_name: str, bits: int, symmetric: bool) -> QuantizedWeight:
    """The integers behind the codes initializer ``onnx_name`` (a ``QuantRow.onnx_name``)."""
    tensors = constant_tensors(model)
    node = next(n for n in model.graph.node if onnx_name in n.input)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def optional(index: int) -> np.ndarray | None:
        return tensors[node.input[index]] if len(node.input) > index and node.input[index] else None

    stored = tensors[onnx_name]
    if node.op_type == "DynamicQuantizeMatMul":
        shift = U8_OFFSET if stored.dtype == np.uint8 else 0
        codes = stored.T.astype(np.int16) - shift
        scales = optional(2).reshape(-1, 1)
        zero = optional(3)
        zeros = np.zeros(scales.shape, np.int16) if zero is None else zero.reshape(-1, 1).astype(np.int16)
        zeros = zeros - (shift if zero is not None else 0)
    elif node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
        block = int(attrs["block_size"])
        rows = stored.shape[0]
        codes = (stored if bits == 8 else unpack_nibbles(stored, 2 * stored.shape[-1])).reshape(rows, -1)
        scales = optional(2).reshape(rows, -1)
        blocks = scales.shape[1]
        codes = codes[:, : blocks * block].astype(np.int16)
        zero = optional(3)
        if zero is None:
            zeros = np.full(scales.shape, default_zero(bits), np.int16)
        else:
            zero = zero.reshape(rows, -1)
            zeros = (zero if bits == 8 else unpack_nibbles(zero, blocks))[:, :blocks].astype(np.int16)
        if bits == 8:
            codes, zeros = codes - U8_OFFSET, zeros - U8_OFFSET
    else:  # Gather: the manual path's codes (packed when 4-bit), scales and zero points beside them
        prefix = onnx_name[: -len("_codes")]
        scales = tensors[f"{prefix}_scales"]
        rows = scales.shape[0]
        scales = scales.reshape(rows, -1)
        cols = int(stored.shape[1]) if bits == 8 else _manual_cols(model, node)
        codes = (stored if bits == 8 else unpack_nibbles(stored, cols)).astype(np.int16)
        zero = tensors.get(f"{prefix}_zeros")
        zeros = np.zeros(scales.shape, np.int16) if zero is None else zero.reshape(rows, -1).astype(np.int16)
    groups = scales.shape[1]
    return QuantizedWeight(
        codes=torch.from_numpy(codes.astype(np.int8)),
        scales=torch.from_numpy(np.array(scales, np.float32)),
        zero_points=torch.from_numpy(zeros.astype(np.int8)),
        bits=bits,
        symmetric=symmetric,
        group_size=None if groups == 1 else codes.shape[1] // groups,
    )


def same_integers(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Whether both hold the same codes, and the same scale and zero point for every weight."""
    if a.shape != b.shape or a.bits != b.bits or not torch.equal(a.codes, b.codes):
        return False
    (sa, za), (sb, zb) = a.expanded(), b.expanded()
    return torch.equal(sa, sb) and torch.equal(za, zb)


def _manual_cols(model: onnx.ModelProto, gather: onnx.NodeProto) -> int:
    """The embedding width D of a manual 4-bit Gather: the unpacked row length its nodes reshape to."""
    tag = gather.output[0][: -len("_q")]
    tensors = constant_tensors(model)
    end = tensors.get(f"{tag}_end")
    if end is not None:
        return int(end[0])
    return int(tensors[f"{tag}_unpacked_tail"][0])
