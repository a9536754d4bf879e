"""Each integer op of a quantized graph against ``IntegerOp`` on onnxruntime's own input to it.

Fed the same float32 input, onnxruntime and the emulation quantize it to the same codes (the same
formula), so the only difference left is float rounding, bounded element by element
(``IntegerOp``): a wrong code, scale, zero point, block size, packing or bias shows up at once,
however small. (Through a whole model a tiny rounding difference upstream can move an activation
across a rounding boundary downstream; that is checked, more loosely, in ``exporters.quant_verify``.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from compressor.core.onnx_tensors import constant_tensors
from compressor.mfac.grid import QuantizedWeight

from .emulate import IntegerOp
from .numerics import session
from .quantized import QuantRow

#: Where the bias sits among each op's inputs.
BIAS_INPUT = {"DynamicQuantizeMatMul": 4, "MatMulNBits": 5}


@dataclass
class LayerCheck:
    """One quantized Linear over all runs: the largest |onnxruntime - emulation|, and the largest
    ratio of a difference to its float-rounding bound (> 1: the op computes something else)."""

    name: str
    max_abs_diff: float = 0.0
    worst_ratio: float = 0.0
    elements: int = 0

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0


def sites(model: onnx.ModelProto, row: QuantRow) -> list[tuple[str, str, str]]:
    """(input, output, bias or "") of each op reading ``row``'s codes."""
    out = []
    for node in model.graph.node:
        if row.onnx_name in node.input and node.op_type in BIAS_INPUT:
            index = BIAS_INPUT[node.op_type]
            bias = node.input[index] if len(node.input) > index else ""
            out.append((node.input[0], node.output[0], bias))
    return out


def check_layers(
    model: onnx.ModelProto,
    rows: list[QuantRow],
    records: dict[str, QuantizedWeight],
    feeds: Iterable[dict[str, np.ndarray]],
    saturate: bool,
) -> list[LayerCheck]:
    """Run ``model`` on each feed with the inputs and outputs of its integer Linear ops exposed; compare
    each op's output with ``IntegerOp`` of its input. One LayerCheck per Linear row."""
    linear = [row for row in rows if row.activation is not None]
    where = {row.name: sites(model, row) for row in linear}
    constants = constant_tensors(model)
    wanted = [n for ss in where.values() for s in ss for n in s if n and n not in constants]
    probe = _exposed(model, list(dict.fromkeys(wanted)))
    sess = session(probe)
    names = [o.name for o in sess.get_outputs()]
    ops = {row.name: IntegerOp(row, records[row.name], saturate) for row in linear}
    checks = {row.name: LayerCheck(row.name) for row in linear}
    for feed in feeds:
        values = dict(zip(names, sess.run(None, feed), strict=True))
        values.update(constants)
        for name, places in where.items():
            for a, y, bias in places:
                b = torch.from_numpy(np.array(values[bias], np.float32)) if bias else None
                expected, bound = ops[name](torch.from_numpy(np.array(values[a], np.float32)), b)
                diff = (torch.from_numpy(values[y]).to(torch.float64) - expected.to(torch.float64)).abs()
                check = checks[name]
                check.elements += diff.numel()
                if diff.numel():
                    ratio = diff / bound.clamp(min=torch.finfo(torch.float32).tiny)
                    check.max_abs_diff = max(check.max_abs_diff, float(diff.max()))
                    check.worst_ratio = max(check.worst_ratio, float(ratio.max()))
    return list(checks.values())


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (float tensors)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out
