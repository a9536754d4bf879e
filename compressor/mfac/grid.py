"""Integer grids of weight matrices: w = (q - z) * s, per row and group of columns.

A weight is a (rows, cols) matrix: a Linear's (out_features, in_features) or an Embedding's
(num_embeddings, dim). Each row is cut into groups of ``group_size`` consecutive columns (None: the
whole row is one group, "per output channel"); each group g of row r has a scale s[r, g] > 0
(float32) and an integer zero point z[r, g], and its weights are stored as integer codes q:

    q = clamp(round(w / s) + z, qmin, qmax)          ``quantize``  (round half to even)
    w = (q - z) * s                                    ``QuantizedWeight.dequantize``  (float32)

Grids (``code_range``; the grid always holds 0 exactly: q = z):

    bits 8, symmetric    q in [-127, 127], z = 0,  s = max|w| / 127           (int8, as onnxruntime)
    bits 8, asymmetric   q in [-128, 127], s = (max - min) / 255, z = round(-128 - min / s)
    bits 7, symmetric    q in [-64, 64],  z = 0,  s = max|w| / 64             (int8 storage, reduced
    bits 7, asymmetric   q in [-64, 63],  s = (max - min) / 127, z = round(-64 - min / s)    range)
    bits 4, symmetric    q in [0, 15], z = 8,  s = max|w| / 7
    bits 4, asymmetric   q in [0, 15], s = (max - min) / 15, z = round(-min / s)

with min = min(0, min w), max = max(0, max w) over the group's kept weights (a mask leaves pruned
weights out). A group of zeros gets s = 1. Codes and zero points are int8 tensors (4-bit codes in
[0, 15]). The reduced int8 range (bits 7) exists for onnxruntime's u8s8 integer products: on CPUs
without AVX-512 VNNI they add pairs of uint8 x int8 products into int16 with saturation, which
codes in [-64, 64] can never reach (2 * 255 * 64 = 32640 <= 32767). Needs torch alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BITS = (4, 7, 8)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the codes of a ``bits`` grid."""
    if bits == 8:
        return (-127, 127) if symmetric else (-128, 127)
    if bits == 7:
        return (-64, 64) if symmetric else (-64, 63)
    if bits == 4:
        return (0, 15)
    raise ValueError(f"bits must be 4, 7 or 8, got {bits!r}")


def check_group_size(cols: int, group_size: int | None) -> int:
    """The group length in columns (``cols`` for None); ValueError unless it divides ``cols``."""
    if group_size is None:
        return cols
    if group_size < 1 or cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {cols} columns of the weight")
    return group_size


@torch.no_grad()
def fit_grid(
    w: torch.Tensor, bits: int, symmetric: bool, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zero_points) of each row of ``w`` (rows, n) taken as one group: shapes (rows,).

    ``mask`` (rows, n) bool: only True weights count (pruned ones are 0, which the grid holds anyway).
    Scales float32, zero points int8.
    """
    qmin, qmax = code_range(bits, symmetric)
    x = w.detach().to(torch.float32)
    if mask is not None:
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    low = x.amin(dim=1).clamp(max=0.0)
    high = x.amax(dim=1).clamp(min=0.0)
    if symmetric:
        top = torch.maximum(-low, high)
        scale = top / (7 if bits == 4 else qmax)
        zero = torch.full_like(scale, 8 if bits == 4 else 0)
    else:
        scale = (high - low) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(qmin - low / safe).clamp(qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(torch.float32), zero.to(torch.int8)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Codes of ``w`` (any shape) on the grid (scale, zero), broadcast against it: int8."""
    qmin, qmax = code_range(bits, symmetric)
    q = torch.round(w.to(torch.float32) / scale) + zero.to(torch.float32)
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - z) * s in float32, broadcast (the one formula every path uses, so values agree bit for bit)."""
    return (q.to(torch.int32) - zero.to(torch.int32)).to(torch.float32) * scale.to(torch.float32)


@dataclass
class QuantizedWeight:
    """A weight stored as integer codes on a per-row, per-group grid (module doc).

    codes: (rows, cols) int8. scales: (rows, groups) float32. zero_points: (rows, groups) int8.
    group_size: columns per group (None: one group per row).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    bits: int
    symmetric: bool
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the weight."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def group_cols(self) -> int:
        """Columns per group (cols when per row)."""
        return self.shape[1] if self.group_size is None else self.group_size

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zero_points) repeated to (rows, cols)."""
        g = self.group_cols
        return self.scales.repeat_interleave(g, dim=1), self.zero_points.repeat_interleave(g, dim=1)

    def dequantize(self) -> torch.Tensor:
        """The float32 (rows, cols) weight the codes stand for."""
        scale, zero = self.expanded()
        return dequantize(self.codes, scale, zero)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, float32 scales, zero points (none when symmetric 8-bit)."""
        rows, cols = self.shape
        codes = (rows * cols * self.bits + 7) // 8
        groups = int(self.scales.numel())
        zeros = 0 if (self.symmetric and self.bits == 8) else (groups * self.bits + 7) // 8
        return codes + 4 * groups + zeros

    def to_state(self) -> dict[str, Any]:
        """A dict of tensors and numbers (for checkpoints, ``torch.load(weights_only=True)``)."""
        return {
            "codes": self.codes,
            "scales": self.scales,
            "zero_points": self.zero_points,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> QuantizedWeight:
        """Rebuild from ``to_state``."""
        return cls(
            codes=state["codes"],
            scales=state["scales"],
            zero_points=state["zero_points"],
            bits=int(state["bits"]),
            symmetric=bool(state["symmetric"]),
            group_size=None if state["group_size"] is None else int(state["group_size"]),
        )


@torch.no_grad()
def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    mask: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round to nearest on grids fitted to ``w`` (rows, cols) per row and group; masked-off weights
    (``mask`` False) get the code of 0."""
    rows, cols = w.shape
    g = check_group_size(cols, group_size)
    groups = cols // g
    x = w.detach().to(torch.float32).reshape(rows * groups, g)
    m = None if mask is None else mask.reshape(rows * groups, g)
    scale, zero = fit_grid(x, bits, symmetric, m)
    codes = quantize(x, scale[:, None], zero[:, None], bits, symmetric)
    if m is not None:
        codes = torch.where(m, codes, zero[:, None].expand_as(codes))
    return QuantizedWeight(
        codes=codes.reshape(rows, cols),
        scales=scale.reshape(rows, groups),
        zero_points=zero.reshape(rows, groups),
        bits=bits,
        symmetric=symmetric,
        group_size=group_size,
    )


def dynamic_quantize(x: torch.Tensor) -> torch.Tensor:
    """x after onnxruntime's DynamicQuantizeLinear and back: one uint8 grid over the whole tensor.

    s = (max(0, max x) - min(0, min x)) / 255, z = clamp(round(-min / s), 0, 255),
    q = clamp(round(x / s) + z, 0, 255), result (q - z) * s (float32; round half to even).
    """
    x32 = x.to(torch.float32)
    low = x32.min().clamp(max=0.0)
    high = x32.max().clamp(min=0.0)
    scale = (high - low) / 255.0
    if float(scale) == 0.0:
        return torch.zeros_like(x32)
    zero = torch.round(-low / scale).clamp(0, 255)
    q = (torch.round(x32 / scale) + zero).clamp(0, 255)
    return (q - zero) * scale
