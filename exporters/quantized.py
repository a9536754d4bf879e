"""``quantize_graph``: a float ONNX export -> the same graph on the modifier's integers, as they are.

Each record's float initializer is found by content (``exporters.matching``: its values are the
record's ``dequantize()`` bit for bit) and each of its consumers is rewritten (``exporters.int_nodes``):

    MatMul(A, W^T) (+ Add b)             Linear: DynamicQuantizeMatMul (8-bit per row) or
    Gemm(A, W, C, transB=1)              MatMulNBits (4-bit; 8-bit in groups); a (N,) bias (the
                                         Add after a MatMul, Gemm's C) becomes the op's bias input,
                                         as in the graph onnxruntime makes of quantize_dynamic's
    Gather(W, ids)                       Embedding: GatherBlockQuantized (4-bit in blocks) or
                                         Gather + dequantize of the gathered rows

The float initializers go (the file shrinks), everything else stays; the com.microsoft opset is
imported. Nothing is quantized again: the integers in the file are the records' codes, scales and
zero points (8-bit codes shifted by 128 where a uint8 layout is needed). A weight whose uses need
different ops (a tied embedding and output layer) is refused, as are consumers other than these.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from compressor.mfac.grid import QuantizedWeight

from .errors import ExportError
from .int_nodes import (
    MS_DOMAIN,
    Built,
    dynamic_quantize_matmul,
    gather_block_quantized,
    gather_dequantize,
    matmul_nbits,
    onnx_block,
    to_initializers,
)
from .matching import Match, match_tensors

Int8Weights = Literal["int8", "uint8"]
#: MatMulNBits accuracy levels exported: 4 (A quantized to int8 per block) or 0 (A kept float).
ACCURACY_LEVELS = (0, 4)


@dataclass
class QuantRow:
    """One quantized weight in the file.

    shape: the weight's (rows, cols). bytes: its new initializers' bytes; dense_bytes: rows * cols * 4.
    block_size: the ONNX block (MatMulNBits, GatherBlockQuantized) or None. activation: what
    onnxruntime does to the op's input: "uint8 per tensor", "int8 per block", "float" (MatMulNBits at
    accuracy level 0) or None (a Gather). unsigned: 8-bit codes stored as uint8 (DynamicQuantizeMatMul
    with U8U8 kernels). onnx_name: the codes' initializer.
    """

    name: str
    op: str
    bits: int
    group_size: int | None
    symmetric: bool
    shape: list[int]
    bytes: int
    dense_bytes: int
    onnx_name: str
    block_size: int | None = None
    activation: str | None = None
    unsigned: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def quantize_graph(
    model: onnx.ModelProto,
    records: dict[str, QuantizedWeight],
    params: dict[str, torch.Tensor],
    *,
    accuracy_level: int = 4,
    int8_weights: Int8Weights = "int8",
) -> tuple[onnx.ModelProto, list[QuantRow]]:
    """A copy of ``model`` with each record's float weight replaced by its integers, and one row each.

    records: normalized parameter name -> QuantizedWeight. params: the same names -> the model's
    weights, which must equal ``record.dequantize()`` exactly. accuracy_level: MatMulNBits' (4: A
    quantized to int8 per block). int8_weights: the B layout of DynamicQuantizeMatMul ("int8":
    U8S8 kernels; "uint8": U8U8, exact on every CPU; see ``exporters.emulate``).
    ExportError for a weight that is not found, differs from its record, or feeds an op that
    cannot take integers.
    """
    if int8_weights not in ("int8", "uint8"):
        raise ExportError(f"int8_weights must be 'int8' or 'uint8', got {int8_weights!r}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level must be 0 or 4 (MatMulNBits on CPU), got {accuracy_level!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = {name: _checked(name, record, params) for name, record in records.items()}
    places = _locate(weights, tensors)
    consumers = _consumers(graph)
    rows: list[QuantRow] = []
    added: dict[str, np.ndarray] = {}
    replaced: dict[int, Built] = {}
    settings = (accuracy_level, int8_weights)
    for name, record in records.items():
        own: dict[str, np.ndarray] = {}
        ops: set[tuple[str, int | None]] = set()
        for match in places[name]:
            for index in consumers.get(match.onnx_name, []):
                add = _bias_add(graph, index, consumers, tensors, record.shape[0])
                folded = None if add is None else (graph.node[add].input, graph.node[add].output[0])
                op, block, built = _rewrite(graph.node[index], match, record, name, settings, tensors, folded)
                replaced[index] = built
                if add is not None:
                    replaced[add] = Built()  # its bias is the integer op's
                own.update(built.initializers)
                ops.add((op, block))
        if not own:
            raise ExportError(f"{name}: its ONNX tensor {places[name][0].onnx_name} feeds no node")
        if len(ops) > 1:
            raise ExportError(
                f"{name}: one weight feeds {sorted(op for op, _ in ops)}; integer export writes a tied "
                "weight only when every use takes the same integer op (a Gather and a MatMul do not)"
            )
        added.update(own)
        rows.append(_row(name, record, *ops.pop(), own, settings))
    _splice(graph, replaced, {m.onnx_name for ms in places.values() for m in ms}, added)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, rows


def _checked(name: str, record: QuantizedWeight, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's weight ``name``, ExportError unless it is (rows, cols) and equals the record exactly."""
    weight = params.get(name)
    if weight is None:
        raise ExportError(f"{name}: the checkpoint quantized it, but the model has no such weight")
    expected = record.dequantize()
    weight = weight.detach().to(torch.float32).cpu()
    if tuple(weight.shape) != tuple(expected.shape):
        raise ExportError(f"{name}: weight shape {tuple(weight.shape)}, its codes {tuple(expected.shape)}")
    if not torch.equal(weight, expected):
        worst = float((weight - expected).abs().max())
        raise ExportError(f"{name}: the weight is not its codes' (q - z) * s (max |diff| {worst:.3g})")
    return weight


def _locate(weights: dict[str, torch.Tensor], tensors: dict[str, np.ndarray]) -> dict[str, list[Match]]:
    """Every initializer holding each weight (exact or transposed; several for a tied weight)."""
    found: dict[str, list[Match]] = {name: [] for name in weights}
    free = dict(tensors)
    while True:
        hits = {n: m for n, m in match_tensors(weights, free).items() if m.kind != "scaled"}
        if not hits:
            break
        for name, match in hits.items():
            found[name].append(match)
            del free[match.onnx_name]
    missing = [name for name, matches in found.items() if not matches]
    if missing:
        raise ExportError(
            f"no ONNX initializer holds the quantized weights {missing} (as they are or transposed); "
            "integer export needs each as a MatMul, Gemm or Gather constant"
        )
    return found


def _bias_add(
    graph: onnx.GraphProto,
    index: int,
    consumers: dict[str, list[int]],
    tensors: dict[str, np.ndarray],
    n: int,
) -> int | None:
    """The index of the Add that alone reads MatMul ``index``'s output and adds a float (N,) constant to
    it (a Linear's bias), or None: the integer op takes that bias itself, as quantize_dynamic's does."""
    node = graph.node[index]
    if node.op_type != "MatMul" or node.output[0] in {o.name for o in graph.output}:
        return None
    readers = consumers.get(node.output[0], [])
    if len(readers) != 1 or graph.node[readers[0]].op_type != "Add":
        return None
    add = graph.node[readers[0]]
    others = [i for i in add.input if i != node.output[0]]
    bias = tensors.get(others[0]) if len(others) == 1 else None
    if bias is None or bias.shape != (n,) or bias.dtype != np.float32:
        return None
    return readers[0]


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it."""
    out: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in dict.fromkeys(node.input):
            out.setdefault(name, []).append(index)
    return out


def _rewrite(
    node: onnx.NodeProto,
    match: Match,
    record: QuantizedWeight,
    name: str,
    settings: tuple[int, Int8Weights],
    tensors: dict[str, np.ndarray],
    folded: tuple[Any, str] | None = None,
) -> tuple[str, int | None, Built]:
    """(op, ONNX block size, the nodes) that replace ``node``, a consumer of ``record``'s tensor.

    settings: (MatMulNBits' accuracy_level, the DynamicQuantizeMatMul B layout). folded: (inputs,
    output) of the Add of a (N,) bias after a MatMul (``_bias_add``), taken in as the op's bias.
    """
    tag = _safe(f"{node.output[0]}_int")
    where = f"{name} ({match.onnx_name}) feeds {node.op_type} {node.name or node.output[0]!r}"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gather" and list(node.input).index(match.onnx_name) == 0:
        if match.kind != "exact" or attrs.get("axis", 0) != 0:
            raise ExportError(f"{where}: integer export gathers rows of the weight as it is (axis 0)")
        block = onnx_block(record.group_cols) if record.bits == 4 else None
        if block is not None:
            names = (_safe(f"{name}_gbq{record.bits}"), tag)
            built = gather_block_quantized(node.input[1], node.output[0], record, names, block)
            return "GatherBlockQuantized", block, built
        names = (_safe(f"{name}_gather{record.bits}"), tag)
        return "Gather", None, gather_dequantize(node.input[1], node.output[0], record, names)
    linear = (node.op_type == "MatMul" and match.kind == "transposed") or (
        node.op_type == "Gemm"
        and not attrs.get("transA", 0)
        and attrs.get("alpha", 1.0) == 1.0
        and attrs.get("beta", 1.0) == 1.0
        and bool(attrs.get("transB", 0)) == (match.kind == "exact")
    )
    if not linear or list(node.input).index(match.onnx_name) != 1:
        raise ExportError(
            f"{where}: integer export handles a Linear weight as MatMul's B (transposed) or Gemm's B "
            "(alpha = beta = 1), and an Embedding weight as Gather's data"
        )
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    output = node.output[0]
    if folded is not None:
        bias, output = next(i for i in folded[0] if i != node.output[0]), folded[1]
    after = None  # a Gemm C that is not a (N,) constant: added after the integer op, as Gemm broadcasts it
    if bias is not None and tuple(getattr(tensors.get(bias), "shape", ())) != (record.shape[0],):
        bias, after = None, bias
    y = f"{tag}_product" if after else output
    op, block, built = _linear(node.input[0], y, record, (_safe(name), tag), bias, settings)
    if after:
        built.nodes.append(helper.make_node("Add", [y, after], [output], name=f"{tag}_bias"))
    return op, block, built


def _linear(
    a: str,
    y: str,
    record: QuantizedWeight,
    names: tuple[str, str],
    bias: str | None,
    settings: tuple[int, Int8Weights],
) -> tuple[str, int | None, Built]:
    """(op, block, nodes) of ``y = a @ W^T (+ bias)`` on ``record``'s integers."""
    accuracy_level, int8_weights = settings
    name, tag = names
    if record.bits == 8 and record.group_size in (None, record.shape[1]):
        unsigned = int8_weights == "uint8"
        built = dynamic_quantize_matmul(a, y, record, (f"{name}_dqmm8", tag), bias, unsigned)
        return "DynamicQuantizeMatMul", None, built
    block = onnx_block(record.group_cols)
    if block is None:
        raise ExportError(
            f"{name}: MatMulNBits needs blocks of a power of two from 16 to 256 inputs, and none divides "
            f"its {'groups' if record.group_size else 'rows'} of {record.group_cols}"
        )
    built = matmul_nbits(a, y, record, (f"{name}_nbits{record.bits}", tag), bias, block, accuracy_level)
    return "MatMulNBits", block, built


def _safe(name: str) -> str:
    """``name`` with the characters exporters put in tensor names ("/", ":") made plain."""
    return name.replace("/", "_").replace(":", "_")


def _splice(
    graph: onnx.GraphProto, replaced: dict[int, Built], old: set[str], added: dict[str, np.ndarray]
) -> None:
    """Replace each node by its nodes (in place, order kept), drop the old initializers, add the new."""
    nodes = []
    for index, node in enumerate(graph.node):
        nodes += replaced[index].nodes if index in replaced else [node]
    del graph.node[:]
    graph.node.extend(nodes)
    still = {name for node in nodes for name in node.input}
    keep = [init for init in graph.initializer if init.name not in old or init.name in still]
    del graph.initializer[:]
    graph.initializer.extend(keep + to_initializers(added))
    inputs = [i for i in graph.input if i.name not in old or i.name in still]
    del graph.input[:]
    graph.input.extend(inputs)


def _row(
    name: str,
    record: QuantizedWeight,
    op: str,
    block: int | None,
    own: dict[str, np.ndarray],
    settings: tuple[int, Int8Weights],
) -> QuantRow:
    rows, cols = record.shape
    activation = {"DynamicQuantizeMatMul": "uint8 per tensor", "MatMulNBits": "int8 per block"}.get(op)
    if op == "MatMulNBits" and settings[0] == 0:
        activation = "float"
    codes = next(n for n in own if n.endswith(("_B", "_data", "_codes")))
    return QuantRow(
        name=name,
        op=op,
        bits=record.bits,
        group_size=record.group_size,
        symmetric=record.symmetric,
        shape=[rows, cols],
        bytes=sum(int(a.nbytes) for a in own.values()),
        dense_bytes=rows * cols * 4,
        onnx_name=codes,
        block_size=block,
        activation=activation,
        unsigned=op == "DynamicQuantizeMatMul" and settings[1] == "uint8",
    )
