"""ONNX nodes and initializers that hold a ``QuantizedWeight``'s integers as they are.

Linear (weight (N, K) = (out, in); A (..., K) -> Y (..., N)):

    8-bit per row     com.microsoft DynamicQuantizeMatMul(A, B (K, N), b_scale (N,), b_zero_point (N,)?,
                      bias?): A quantized per tensor to uint8 at run time. B is int8 (the codes, U8S8
                      kernels, as ``quantize_dynamic`` runs) or uint8 (codes + 128, zero point z + 128:
                      U8U8 kernels, exact on every CPU, slower on AVX2, see ``exporters.emulate``).
    4- or 8-bit       com.microsoft MatMulNBits(A, B (N, K/bs, bs*bits/8) uint8, scales (N, K/bs),
    groups            zero_points?, bias?), accuracy_level 4: A quantized to int8 per block of bs.

Embedding (weight (V, D); ids (...) -> (..., D)):

    4-bit, blocks     com.microsoft GatherBlockQuantized(data (V, D/2) uint8, ids, scales (V, D/bs),
                      zero_points (V, ceil(D/bs/2))?)
    8-bit, or 4-bit   Gather the codes (4-bit: packed, unpacked after the Gather), scales and zero
    without blocks    points by the ids and dequantize the gathered rows: (q - z) * s in float32.

Unsigned codes are packed two per byte along the last axis, low nibble first (as onnxruntime
packs). Block sizes are powers of two in [16, 256] (``onnx_block``): a group longer than its block
repeats its scale and zero point over its blocks (MatMulNBits quantizes A per block of at most 256
inputs, measured on onnxruntime 1.32; the schema asks for a power of two >= 16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.mfac.grid import QuantizedWeight

MS_DOMAIN = "com.microsoft"
MIN_BLOCK, MAX_BLOCK = 16, 256
U8_OFFSET = 128  # int8 code + 128 = uint8 code; also the default zero point of 8-bit MatMulNBits


def onnx_block(group_cols: int) -> int | None:
    """The largest power of two in [16, 256] that divides ``group_cols`` (None: there is none)."""
    block = MAX_BLOCK
    while block >= MIN_BLOCK:
        if group_cols % block == 0:
            return block
        block //= 2
    return None


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., n) codes in [0, 15] -> (..., ceil(n / 2)) uint8, element 2i in the low nibble of byte i."""
    q = q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of ``pack_nibbles``: (..., ceil(n / 2)) uint8 -> (..., n) uint8."""
    pairs = np.stack([packed & 0x0F, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :n]


def block_grid(record: QuantizedWeight, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, cols) uint8, scales (rows, cols/block) float32, zeros (rows, cols/block) uint8) on
    blocks of ``block`` columns; 8-bit codes and zero points shifted by 128 to unsigned."""
    repeat = record.group_cols // block
    shift = U8_OFFSET if record.bits == 8 else 0
    codes = (record.codes.numpy().astype(np.int16) + shift).astype(np.uint8)
    scales = np.repeat(record.scales.numpy().astype(np.float32), repeat, axis=1)
    zeros = (np.repeat(record.zero_points.numpy().astype(np.int16), repeat, axis=1) + shift).astype(np.uint8)
    return codes, scales, zeros


def default_zero(bits: int) -> int:
    """The unsigned zero point MatMulNBits and GatherBlockQuantized (uint8 data) assume when omitted."""
    return 2 ** (bits - 1)


@dataclass
class Built:
    """The nodes computing one consumer, and the initializers they read (name -> array)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, array: np.ndarray) -> str:
        self.initializers[name] = array
        return name


def dynamic_quantize_matmul(
    a: str, y: str, record: QuantizedWeight, names: tuple[str, str], bias: str | None, unsigned: bool
) -> Built:
    """DynamicQuantizeMatMul of a per-row 8-bit Linear weight; ``unsigned``: uint8 B (U8U8).

    names: (initializer prefix, one per weight and layout; node name, one per consumer).
    """
    prefix, tag = names
    built = Built()
    codes = record.codes.numpy().T  # (K, N)
    zeros = record.zero_points.numpy()[:, 0]
    if unsigned:
        codes = (codes.astype(np.int16) + U8_OFFSET).astype(np.uint8)
        zeros = (zeros.astype(np.int16) + U8_OFFSET).astype(np.uint8)
    inputs = [a, built.add(f"{prefix}_B", np.ascontiguousarray(codes))]
    inputs.append(built.add(f"{prefix}_scale", record.scales.numpy()[:, 0].astype(np.float32)))
    inputs.append(built.add(f"{prefix}_zero", zeros) if unsigned or zeros.any() else "")
    inputs.append(bias or "")
    while not inputs[-1]:
        inputs.pop()
    built.nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, [y], name=tag, domain=MS_DOMAIN))
    return built


def matmul_nbits(
    a: str,
    y: str,
    record: QuantizedWeight,
    names: tuple[str, str],
    bias: str | None,
    block: int,
    accuracy_level: int,
) -> Built:
    """MatMulNBits of a Linear weight (N, K) on blocks of ``block`` inputs."""
    prefix, tag = names
    built = Built()
    n, k = record.shape
    codes, scales, zeros = block_grid(record, block)
    blocks = k // block
    packed = (
        codes.reshape(n, blocks, block) if record.bits == 8 else pack_nibbles(codes.reshape(n, blocks, block))
    )
    inputs = [a, built.add(f"{prefix}_B", packed), built.add(f"{prefix}_scales", scales)]
    if not bool((zeros == default_zero(record.bits)).all()):
        inputs.append(built.add(f"{prefix}_zeros", zeros if record.bits == 8 else pack_nibbles(zeros)))
    if bias:
        inputs += [""] * (5 - len(inputs)) + [bias]
    attrs = {"K": k, "N": n, "bits": record.bits, "block_size": block, "accuracy_level": accuracy_level}
    built.nodes.append(helper.make_node("MatMulNBits", inputs, [y], name=tag, domain=MS_DOMAIN, **attrs))
    return built


def gather_block_quantized(
    ids: str, y: str, record: QuantizedWeight, names: tuple[str, str], block: int
) -> Built:
    """GatherBlockQuantized of a 4-bit Embedding weight (V, D) on blocks of ``block`` columns."""
    prefix, tag = names
    built = Built()
    codes, scales, zeros = block_grid(record, block)
    inputs = [built.add(f"{prefix}_data", pack_nibbles(codes)), ids, built.add(f"{prefix}_scales", scales)]
    if not bool((zeros == default_zero(record.bits)).all()):
        inputs.append(built.add(f"{prefix}_zeros", pack_nibbles(zeros)))
    attrs = {"bits": record.bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
    built.nodes.append(
        helper.make_node("GatherBlockQuantized", inputs, [y], name=tag, domain=MS_DOMAIN, **attrs)
    )
    return built


def gather_dequantize(ids: str, y: str, record: QuantizedWeight, names: tuple[str, str]) -> Built:
    """Gather the codes (V, D) (4-bit: packed (V, ceil(D/2)), unpacked after), scales and zero points
    (V, G) of the ids, then (q - z) * s on the gathered rows only (float32, as ``dequantize``)."""
    prefix, tag = names
    built = Built()
    v, d = record.shape
    groups, g = int(record.scales.shape[1]), record.group_cols
    node = helper.make_node
    codes = record.codes.numpy()
    stored = pack_nibbles(codes) if record.bits == 4 else codes
    built.nodes += [
        node("Gather", [built.add(f"{prefix}_codes", stored), ids], [f"{tag}_q"], name=f"{tag}_q", axis=0),
        node("Shape", [ids], [f"{tag}_ids_shape"], name=f"{tag}_ids_shape"),
    ]
    q, ids_shape = f"{tag}_q", f"{tag}_ids_shape"
    if record.bits == 4:
        q = _unpack_nodes(built, q, ids_shape, d, tag)
    built.nodes.append(node("Cast", [q], [f"{tag}_qf"], name=f"{tag}_qf", to=TensorProto.FLOAT))
    q = f"{tag}_qf"
    if groups > 1:  # (..., D) -> (..., G, g): each group meets its own scale and zero point
        q = _reshape(built, q, ids_shape, [groups, g], f"{tag}_grouped")
    zeros = record.zero_points.numpy()
    if zeros.any():
        zeros = zeros.reshape(v, groups, 1) if groups > 1 else zeros
        built.nodes += [
            node("Gather", [built.add(f"{prefix}_zeros", zeros), ids], [f"{tag}_z"], name=f"{tag}_z", axis=0),
            node("Cast", [f"{tag}_z"], [f"{tag}_zf"], name=f"{tag}_zf", to=TensorProto.FLOAT),
            node("Sub", [q, f"{tag}_zf"], [f"{tag}_centered"], name=f"{tag}_centered"),
        ]
        q = f"{tag}_centered"
    scales = record.scales.numpy().astype(np.float32)
    scales = scales.reshape(v, groups, 1) if groups > 1 else scales
    scaled = f"{tag}_w" if groups > 1 else y
    built.nodes += [
        node("Gather", [built.add(f"{prefix}_scales", scales), ids], [f"{tag}_s"], name=f"{tag}_s", axis=0),
        node("Mul", [q, f"{tag}_s"], [scaled], name=f"{tag}_w"),
    ]
    if groups > 1:
        _reshape(built, scaled, ids_shape, [d], y)
    return built


def _reshape(built: Built, x: str, ids_shape: str, tail: list[int], y: str) -> str:
    """Reshape ``x`` to (*ids.shape, *tail); node and helper names from ``y``."""
    tail_name = built.add(f"{y}_tail", np.array(tail, np.int64))
    built.nodes += [
        helper.make_node("Concat", [ids_shape, tail_name], [f"{y}_shape"], name=f"{y}_shape", axis=0),
        helper.make_node("Reshape", [x, f"{y}_shape"], [y], name=f"{y}_reshape"),
    ]
    return y


def _unpack_nodes(built: Built, packed: str, ids_shape: str, d: int, tag: str) -> str:
    """(..., ceil(D/2)) packed uint8 -> (..., D) uint8 codes: high = x >> 4, low = x - (high << 4)."""
    node = helper.make_node
    four = built.add(f"{tag}_four", np.array(4, np.uint8))
    axis = built.add(f"{tag}_last", np.array([-1], np.int64))
    built.nodes += [
        node("BitShift", [packed, four], [f"{tag}_hi"], name=f"{tag}_hi", direction="RIGHT"),
        node("BitShift", [f"{tag}_hi", four], [f"{tag}_hi4"], name=f"{tag}_hi4", direction="LEFT"),
        node("Sub", [packed, f"{tag}_hi4"], [f"{tag}_lo"], name=f"{tag}_lo"),
        node("Unsqueeze", [f"{tag}_lo", axis], [f"{tag}_lo1"], name=f"{tag}_lo1"),
        node("Unsqueeze", [f"{tag}_hi", axis], [f"{tag}_hi1"], name=f"{tag}_hi1"),
        node("Concat", [f"{tag}_lo1", f"{tag}_hi1"], [f"{tag}_pairs"], name=f"{tag}_pairs", axis=-1),
    ]
    even = 2 * ((d + 1) // 2)
    out = _reshape(built, f"{tag}_pairs", ids_shape, [even], f"{tag}_unpacked")
    if even == d:
        return out
    start = built.add(f"{tag}_start", np.array([0], np.int64))
    end = built.add(f"{tag}_end", np.array([d], np.int64))
    built.nodes.append(node("Slice", [out, start, end, axis], [f"{tag}_codes4"], name=f"{tag}_codes4"))
    return f"{tag}_codes4"


def to_initializers(arrays: dict[str, np.ndarray]) -> list[onnx.TensorProto]:
    """TensorProtos of ``arrays`` by name."""
    return [numpy_helper.from_array(np.ascontiguousarray(a), name) for name, a in arrays.items()]
