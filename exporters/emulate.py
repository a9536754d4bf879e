"""The quantized graph's arithmetic in PyTorch: onnxruntime quantizes activations, the float model
does not, so the exported integers are checked against this emulation (``emulated``).

Measured on onnxruntime 1.32 (CPU, x86-64), op by op:

    DynamicQuantizeMatMul   A quantized per tensor to uint8 (DynamicQuantizeLinear): lo = min(0, min A),
                            hi = max(0, max A), s = (hi - lo) / 255 (1 when hi = lo), z = round(-lo / s)
                            in [0, 255], q = clamp(round(A / s) + z, 0, 255), round half to even; then
                            exact integer products with the weight codes, times s * b_scale.
    MatMulNBits, level 4    A quantized to int8 per row and block of ``block_size`` inputs: m = max |A|,
                            q = round(A * (127 / m)) (half to even), A ~ q * m / 127; integer products.

So onnxruntime is the float model run on those quantized inputs (``fake_uint8``, ``fake_int8``) up
to float rounding. ``emulated`` puts a forward pre-hook in front of each quantized Linear (its input
quantized so) and a forward hook after it whose output is ``IntegerOp``'s: the integer products
summed exactly (float64) and rounded as MLAS rounds (DynamicQuantizeMatMul: bit for bit).
Embeddings (Gather, GatherBlockQuantized) are exact and need nothing.

Saturation: with int8 weights DynamicQuantizeMatMul runs U8S8 kernels, which on x86 CPUs without
VNNI (AVX2, AVX-512 without VNNI) add the products of each pair of inputs (k, k + 1), k even, into
int16 with saturation (VPMADDUBSW): a_k w_k + a_k+1 w_k+1 reaches 2 * 255 * 127 > 32767 (the zero
points' terms are added exactly afterwards). Measured on this AVX2 machine: with the pair model
below the outputs match bit for bit; ignoring it, random full-range codes are off by 10-30% of the
output. ``onnxruntime_saturates`` probes the installed runtime; where it saturates, ``IntegerOp``
saturates the same pairs, so the check stays exact (the damage shows against the float model).
Codes within [-64, 64] (a reduce_range grid: 2 * 255 * 64 < 32767) never saturate; uint8 weights
(codes + 128, U8U8 kernels widen to int16 first) never do, on any CPU, about 1.3x slower than U8S8
on AVX2 (U8S8 runs as fast as onnxruntime's own quantize_dynamic graph).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.params import normalize
from compressor.mfac.grid import QuantizedWeight

from .errors import ExportError
from .quantized import QuantRow

INT16_MIN, INT16_MAX = -32768, 32767
#: Rows of activations per chunk when computing the saturation correction (memory: rows x pairs).
CHUNK_ELEMENTS = 2**24


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(codes (x's shape) float32 in [0, 255], scale, zero point) of DynamicQuantizeLinear on ``x``."""
    x = x.detach().to(torch.float32)
    lo = min(float(x.min()), 0.0) if x.numel() else 0.0
    hi = max(float(x.max()), 0.0) if x.numel() else 0.0
    lo32, hi32 = np.float32(lo), np.float32(hi)
    scale = np.float32(1.0) if hi32 == lo32 else np.float32((hi32 - lo32) / np.float32(255))
    zero = int(np.clip(np.round(np.float32(0) - lo32 / scale), 0, 255))
    codes = torch.clamp(torch.round(x / torch.tensor(scale)) + zero, 0, 255)
    return codes, float(scale), zero


def fake_uint8(x: torch.Tensor) -> torch.Tensor:
    """``x`` as DynamicQuantizeMatMul sees it: (q - z) * s of ``quantize_uint8`` (float32)."""
    codes, scale, zero = quantize_uint8(x)
    return ((codes - zero) * torch.tensor(scale, dtype=torch.float32)).to(x.dtype)


def fake_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (..., K) as MatMulNBits (accuracy level 4) sees it: int8 per block of ``block`` inputs."""
    shape = x.shape
    blocks = x.detach().to(torch.float32).reshape(*shape[:-1], shape[-1] // block, block)
    top = blocks.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    codes = torch.round(blocks * (torch.tensor(127.0) / safe))
    scale = torch.where(top > 0, top / 127.0, torch.zeros_like(top))
    return (codes * scale).reshape(shape).to(x.dtype)


@lru_cache(maxsize=1)
def onnxruntime_saturates() -> bool:
    """Whether this onnxruntime's U8S8 kernels saturate pair sums to int16 (x86 without VNNI).

    Probe: 64 inputs of 1.0 (uint8 code 255) times int8 codes 127: exactly 64 * 127 = 8128; a
    saturating kernel gives 32 * 32767 / 255 ~ 4112.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .numerics import session

    k = 64
    weights = numpy_helper.from_array(np.full((k, 1), 127, np.int8), "B")
    scale = numpy_helper.from_array(np.ones(1, np.float32), "s")
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "s"], ["Y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 1])],
        [weights, scale],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    out = session(model).run(None, {"A": np.ones((1, k), np.float32)})[0]
    return bool(abs(float(out[0, 0]) - k * 127) > 1.0)


@dataclass
class _Pairs:
    """The (pair, output) entries of an int8 weight (N, K) whose int16 pair sum can saturate.

    first, second: the input indices 2p and 2p + 1 (K odd: the last pair's second is any index, its
    code w1 being 0). w0, w1: their codes (int32). column: the output index. outputs: N.
    """

    first: torch.Tensor
    second: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    column: torch.Tensor
    outputs: int

    @classmethod
    def of(cls, codes: torch.Tensor) -> _Pairs:
        """The risky pairs of int8 ``codes`` (N, K): 255 * (sum of the pair's positive codes) > 32767,
        or 255 * (sum of its negative codes' magnitudes) > 32768."""
        codes = codes.to(torch.int32)
        n, k = codes.shape
        if k % 2:
            codes = torch.cat([codes, torch.zeros(n, 1, dtype=torch.int32)], dim=1)
        w0, w1 = codes[:, 0::2], codes[:, 1::2]  # (N, ceil(K/2))
        up = w0.clamp(min=0) + w1.clamp(min=0)
        down = (-w0).clamp(min=0) + (-w1).clamp(min=0)
        column, pair = ((255 * up > INT16_MAX) | (255 * down > -INT16_MIN)).nonzero(as_tuple=True)
        second = (2 * pair + 1).clamp(max=k - 1)  # K odd: the last pair's partner is padding (w1 = 0)
        return cls(2 * pair, second, w0[column, pair], w1[column, pair], column, n)

    def lost(self, codes: torch.Tensor) -> torch.Tensor:
        """What saturation adds to the int32 sums (M, N) (float64), for uint8 input codes (M, K)."""
        out = torch.zeros(self.outputs, codes.shape[0], dtype=torch.int32)
        if self.column.numel():
            a = codes.to(torch.int32).T.contiguous()  # (K, M): gathering whole rows is fast
            w0, w1 = self.w0[:, None], self.w1[:, None]
            step = max(1, CHUNK_ELEMENTS // self.column.numel())
            for start in range(0, a.shape[1], step):
                rows = a[:, start : start + step]
                total = rows[self.first] * w0 + rows[self.second] * w1  # (entries, m)
                total -= total.clamp(INT16_MIN, INT16_MAX)
                out[:, start : start + step].index_add_(0, self.column, total, alpha=-1)
        return out.T.to(torch.float64)


class IntegerOp:
    """One quantized Linear as onnxruntime computes it, from the record's integers.

    ``__call__(x (..., K), bias (N,) or None) -> (y (..., N) float32, bound (..., N) float64)``: y is
    onnxruntime's arithmetic (activation quantization as measured, exact integer products in
    float64, saturation where asked); bound is what float rounding may move onnxruntime's y from it:

        DynamicQuantizeMatMul   y = fl32(fl32(acc) * fl32(s_a * s_w)) (+ bias in float32), rounded as
                                MLAS rounds (measured: bit for bit): bound = 2^-22 (|y| + |bias|).
        MatMulNBits             onnxruntime subtracts the zero points' share in float (block sums) and
                                adds the K/bs blocks in float32, so its rounding scales with the
                                uncentered products U = sum_k |s_a q_a,k| (q_w,k + z_w) s_w (unsigned
                                codes): bound = (K/bs + 8) 2^-23 U + 2^-22 |bias| (measured: at most
                                a sixth of it, K up to 1536). At accuracy level 0 (A float) the
                                products are float32: bound = (K + 8) 2^-23 U + 2^-22 |bias|.
    """

    def __init__(self, row: QuantRow, record: QuantizedWeight, saturate: bool) -> None:
        self.op, self.float_input = row.op, row.activation == "float"
        self.block = int(row.block_size or record.shape[1])
        scale, zero = record.expanded()
        self.centered = (record.codes.to(torch.float64) - zero.to(torch.float64)).T.contiguous()  # (K, N)
        if self.op == "MatMulNBits":  # weights with their scales: (K, N), float64 and float32
            shift = 128 if record.bits == 8 else 0
            uncentered = (record.codes.to(torch.float64) + shift) + (zero.to(torch.float64) + shift)
            self.weights = (self.centered * scale.T.to(torch.float64)).contiguous()
            self.magnitude = (uncentered * scale.to(torch.float64)).T.to(torch.float32).contiguous()
        else:
            self.weight_scales = record.scales[:, 0].to(torch.float32)  # (N,)
        wants = self.op == "DynamicQuantizeMatMul" and saturate and not row.unsigned
        self.pairs = _Pairs.of(record.codes) if wants else None

    def activation_scale(self, x: torch.Tensor) -> float:
        """The step of the op's input grid: s_a (DynamicQuantizeMatMul), the largest block's m / 127."""
        if self.op == "DynamicQuantizeMatMul":
            return quantize_uint8(x)[1]
        if self.float_input or not x.numel():
            return 0.0
        return float(x.detach().abs().max()) / 127.0

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the op sees it (float32, x's shape)."""
        if self.op == "DynamicQuantizeMatMul":
            return fake_uint8(x)
        return x if self.float_input else fake_int8(x, self.block)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        k, n = self.centered.shape
        flat = x.detach().to(torch.float32).reshape(-1, k)
        b = torch.zeros(n, dtype=torch.float32) if bias is None else bias.detach().to(torch.float32)
        if self.op == "DynamicQuantizeMatMul":
            codes, scale, zero = quantize_uint8(flat)
            acc = (codes.to(torch.float64) - zero) @ self.centered
            if self.pairs is not None:
                acc += self.pairs.lost(codes)
            y = acc.to(torch.float32) * (torch.tensor(scale, dtype=torch.float32) * self.weight_scales) + b
            bound = 2.0**-22 * (y.abs().to(torch.float64) + b.abs().to(torch.float64))
        elif self.float_input:  # accuracy level 0: float32 products of the dequantized weights
            y = (flat.to(torch.float64) @ self.weights).to(torch.float32) + b
            magnitude = flat.abs() @ self.magnitude
            bound = (k + 8) * 2.0**-23 * magnitude.to(torch.float64) + 2.0**-22 * b.abs()
        else:
            y64, magnitude = self._blocks(flat)
            y = y64.to(torch.float32) + b
            bound = (k // self.block + 8) * 2.0**-23 * magnitude.to(torch.float64) + 2.0**-22 * b.abs()
        return y.reshape(*x.shape[:-1], n), bound.reshape(*x.shape[:-1], n)

    def _blocks(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_b s_a,b s_w,b sum_k q_a (q_w - z_w), the uncentered magnitude) per row, float64 (M, N)."""
        k = self.centered.shape[0]
        x = flat.reshape(-1, k // self.block, self.block)
        top = x.abs().amax(dim=-1, keepdim=True)
        safe = torch.where(top > 0, top, torch.ones_like(top))
        codes = torch.round(x * (torch.tensor(127.0) / safe)).to(torch.float64)
        scale = torch.where(top > 0, top / 127.0, torch.zeros_like(top)).to(torch.float64)
        a = (codes * scale).reshape(-1, k)  # s_a,b q_a per input: one product per weight scale below
        return a @ self.weights, a.abs().to(torch.float32) @ self.magnitude


@contextmanager
def emulated(
    model: nn.Module,
    rows: list[QuantRow],
    records: dict[str, QuantizedWeight],
    *,
    saturate: bool | None = None,
) -> Iterator[list[tuple[str, float]]]:
    """``model`` running as the quantized graph does, while the context lasts (hooks removed after).

    Each quantized Linear gets a forward pre-hook that quantizes its input as onnxruntime does and a
    forward hook that puts ``IntegerOp``'s output in place of its own. Yields the list it appends
    (name, activation scale) to as the layers run (the scale: s_a of DynamicQuantizeMatMul, the
    largest block's m / 127 of MatMulNBits). saturate: emulate int16 pair saturation of int8-weight
    DynamicQuantizeMatMul (default: where ``onnxruntime_saturates``). ExportError when a quantized
    Linear weight is not an ``nn.Linear``'s.
    """
    modules = {normalize(n): m for n, m in model.named_modules()}
    saturating = onnxruntime_saturates() if saturate is None else saturate
    handles: list[Any] = []
    seen: list[tuple[str, float]] = []
    try:
        for row in rows:
            if row.activation is None:
                continue
            path, _, attr = row.name.rpartition(".")
            module = modules.get(path)
            if not isinstance(module, nn.Linear) or attr != "weight":
                kind = type(module).__name__ if module is not None else "no module"
                raise ExportError(f"{row.name}: cannot emulate its integer op on {kind} (needs nn.Linear)")
            handles += _install(module, row.name, IntegerOp(row, records[row.name], saturating), seen)
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _install(module: nn.Linear, name: str, op: IntegerOp, seen: list[tuple[str, float]]) -> list[Any]:
    """The pre-hook (input quantized as onnxruntime does) and the hook (``IntegerOp``'s output)."""
    inputs: list[torch.Tensor] = []

    def before(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        inputs.append(args[0])
        seen.append((name, op.activation_scale(args[0])))
        return (op.quantize(args[0]), *args[1:])

    def after(linear: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        y, _ = op(inputs.pop(), linear.bias)
        return y.to(output.dtype)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
