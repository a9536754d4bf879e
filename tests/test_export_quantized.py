"""Quantized export: the modifier's integers written as they are, run by onnxruntime's integer kernels,
checked against an exact emulation (``exporters.quantized``, ``exporters.emulate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from oracles import render_text
from torch import nn

from compressor.mfac.grid import quantize_rtn
from exporters import ExportError, export_checkpoint
from exporters.convert import to_onnx
from exporters.emulate import (
    IntegerOp,
    emulated,
    fake_int8,
    fake_uint8,
    onnxruntime_saturates,
    quantize_uint8,
)
from exporters.int_nodes import unpack_nibbles
from exporters.int_read import read_back, same_integers
from exporters.layer_check import check_layers
from exporters.named import NamedInputs
from exporters.numerics import session
from exporters.prepare import Prepared
from exporters.quant_verify import verify_quantized
from exporters.quantized import QuantRow, quantize_graph

VOCAB, DIM, HIDDEN, OUT = 50, 64, 128, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tokens(nn.Module):
    """Embedding(V, D) -> Linear -> GELU -> Linear on (batch, seq) ids: Gather, MatMul, MatMul."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.fc1 = nn.Linear(dim, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.emb(ids))))


def quantized(model: nn.Module, bits: int, symmetric: bool, group: int | None, names=None) -> dict:
    """Records of quantize_rtn for the (named) 2-D weights, the weights set to their dequantize()."""
    records = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and (names is None or name in names):
                records[name] = quantize_rtn(p, bits, symmetric, group)
                p.copy_(records[name].dequantize())
    return records


def exported(model: nn.Module, example: torch.Tensor, records: dict, **options):
    dense = to_onnx(model.eval(), example, batch=None, opset=None, exporter="legacy")
    params = {n: p.detach() for n, p in model.named_parameters()}
    return dense, *quantize_graph(dense, records, params, **options)


def prepared_for(model: nn.Module, records: dict, inputs) -> Prepared:
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
    return Prepared(Path("model"), model, weights, {}, {}, inputs, quantized=records)


def ids_inputs(seed: int = 0) -> NamedInputs:
    g = torch.Generator().manual_seed(seed)
    return NamedInputs(
        ["input"], [{"input": torch.randint(0, VOCAB, (b, s), generator=g)} for b, s in ((8, 12), (3, 12))]
    )


def raw_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


CASES = [  # bits, symmetric, group, int8 layout; expected ops of emb, fc1, fc2
    (8, True, None, "int8", ("Gather", "DynamicQuantizeMatMul", "DynamicQuantizeMatMul")),
    (8, False, None, "int8", ("Gather", "DynamicQuantizeMatMul", "DynamicQuantizeMatMul")),
    (8, True, None, "uint8", ("Gather", "DynamicQuantizeMatMul", "DynamicQuantizeMatMul")),
    (8, False, 32, "int8", ("Gather", "MatMulNBits", "MatMulNBits")),
    (4, True, None, "int8", ("GatherBlockQuantized", "MatMulNBits", "MatMulNBits")),
    (4, True, 16, "int8", ("GatherBlockQuantized", "MatMulNBits", "MatMulNBits")),
    (4, False, 32, "int8", ("GatherBlockQuantized", "MatMulNBits", "MatMulNBits")),
    (4, False, None, "int8", ("GatherBlockQuantized", "MatMulNBits", "MatMulNBits")),
]


@pytest.mark.parametrize(("bits", "symmetric", "group", "layout", "ops"), CASES)
def test_integers_are_written_as_they_are_and_onnxruntime_matches_the_emulation(
    bits, symmetric, group, layout, ops
):
    torch.manual_seed(bits * 100 + (group or 0) + symmetric)
    model = Tokens().eval()
    records = quantized(model, bits, symmetric, group)
    inputs = ids_inputs()
    dense, graph, rows = exported(model, inputs.batches[0]["input"][:2], records, int8_weights=layout)
    onnx.checker.check_model(graph, full_check=True)
    assert [r.op for r in rows] == list(ops)
    for row in rows:  # the integers in the file are the records', value for value
        assert same_integers(read_back(graph, row.onnx_name, bits, symmetric), records[row.name]), row.name
    matrices = {i.name for i in dense.graph.initializer if len(i.dims) == 2}  # the float weights
    assert len(matrices) == 3 and not matrices & {i.name for i in graph.graph.initializer}
    saved = sum(r.dense_bytes - r.bytes for r in rows)
    assert raw_bytes(dense) - raw_bytes(graph) == saved  # exactly the float weights out, the integers in
    assert len(dense.SerializeToString()) - len(graph.SerializeToString()) > saved - 2048  # names, nodes
    check = verify_quantized(
        graph, prepared_for(model, records, inputs), rows, batch=None, atol=1e-4, rtol=1e-3
    )
    assert not check.failures, check.failures
    q = check.summary
    assert q.numerics.max_abs_diff <= q.tolerance and q.last_layer == "fc2.weight" and q.step > 0
    assert q.float_numerics.max_abs_diff > 0  # activations are quantized: not the float model
    layers = {r.name: r for r in check.tensors}
    assert all(layers[n].layer_ratio <= 1.0 for n in ("fc1.weight", "fc2.weight"))
    if ops[1] == "DynamicQuantizeMatMul":  # MLAS's rounding, emulated bit for bit
        assert layers["fc1.weight"].layer_max_diff == 0.0


def test_layouts_and_sizes_of_each_op():
    torch.manual_seed(1)
    model = Tokens().eval()
    records = {
        **quantized(model, 4, False, 32, {"emb.weight", "fc1.weight"}),
        **quantized(model, 8, False, None, {"fc2.weight"}),
    }
    _, graph, rows = exported(model, torch.zeros(2, 3, dtype=torch.int64), records)
    tensors = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    by = {r.name: r for r in rows}
    fc1 = by[
        "fc1.weight"
    ]  # MatMulNBits: B (N, K/bs, bs/2) uint8, scales (N, K/bs), zero points (N, ceil(K/bs/2))
    node = next(n for n in graph.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": DIM, "N": HIDDEN, "bits": 4, "block_size": 32, "accuracy_level": 4}
    b, scales, zeros = (tensors[n] for n in node.input[1:4])
    assert (
        b.shape == (HIDDEN, 2, 16)
        and b.dtype == np.uint8
        and scales.shape == (HIDDEN, 2)
        and zeros.shape == (HIDDEN, 1)
    )
    codes = records["fc1.weight"].codes.numpy()
    np.testing.assert_array_equal(b[:, 0, 0] & 0x0F, codes[:, 0])  # low nibble first
    np.testing.assert_array_equal(b[:, 0, 0] >> 4, codes[:, 1])
    np.testing.assert_array_equal(unpack_nibbles(zeros, 2), records["fc1.weight"].zero_points.numpy())
    assert fc1.bytes == HIDDEN * DIM // 2 + HIDDEN * 2 * 4 + HIDDEN
    fc2 = by["fc2.weight"]  # DynamicQuantizeMatMul: B (K, N) int8 = codes^T, per-column scale and zero point
    node = next(n for n in graph.graph.node if n.op_type == "DynamicQuantizeMatMul")
    b, scale, zero = (tensors[n] for n in node.input[1:4])
    np.testing.assert_array_equal(b, records["fc2.weight"].codes.numpy().T)
    assert b.dtype == np.int8 and scale.shape == (OUT,) and zero.dtype == np.int8
    assert fc2.bytes == OUT * HIDDEN + OUT * 4 + OUT and fc2.dense_bytes == OUT * HIDDEN * 4
    assert by["emb.weight"].bytes == VOCAB * DIM // 2 + VOCAB * 2 * 4 + VOCAB
    assert {o.domain for o in graph.opset_import} >= {"", "com.microsoft"}


def test_gemm_takes_the_bias_and_a_2d_model_verifies():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    records = {**quantized(model, 8, True, None, {"0.weight"}), **quantized(model, 4, True, 32, {"2.weight"})}
    x = torch.randn(40, 64)
    _, graph, rows = exported(model, x[:2], records)
    assert not any(n.op_type == "Gemm" for n in graph.graph.node)
    for node in graph.graph.node:
        if node.domain == "com.microsoft":  # Gemm's C became the op's bias input
            assert node.input[-1] in ("0.bias", "2.bias"), node
    check = verify_quantized(graph, prepared_for(model, records, x), rows, batch=None, atol=1e-4, rtol=1e-3)
    assert not check.failures, check.failures


@pytest.mark.parametrize("change", ["code", "scale", "zero point"])
def test_a_wrong_integer_or_scale_fails(change):
    torch.manual_seed(3)
    model = Tokens().eval()
    records = {
        **quantized(model, 8, False, None, {"fc1.weight"}),
        **quantized(model, 4, False, 32, {"fc2.weight"}),
    }
    inputs = ids_inputs(1)
    _, graph, rows = exported(model, inputs.batches[0]["input"][:2], records)
    for row in rows:
        node = next(n for n in graph.graph.node if row.onnx_name in n.input)
        index = {"code": 1, "scale": 2, "zero point": 3}[change]
        init = next(i for i in graph.graph.initializer if i.name == node.input[index])
        array = numpy_helper.to_array(init).copy()
        flat = array.reshape(-1)
        if change == "scale":
            flat[0] *= 1.001
        else:  # one code (or zero point) one step off: for 4-bit a nibble, low of byte 0
            flat[0] = flat[0] + 1 if (flat[0] & 0x0F) < 15 or array.dtype == np.int8 else flat[0] - 1
        init.CopyFrom(numpy_helper.from_array(array, init.name))
    check = verify_quantized(
        graph, prepared_for(model, records, inputs), rows, batch=None, atol=1e-4, rtol=1e-3
    )
    notes = {r.name: r.note for r in check.tensors if not r.ok}
    assert set(notes) == {"fc1.weight", "fc2.weight"}, check.failures
    assert all("differ from the checkpoint" in n for n in notes.values())
    layers = check_layers(graph, rows, records, [{"input": b["input"].numpy()} for b in inputs.batches], True)
    assert all(c.worst_ratio > 1.0 for c in layers), [(c.name, c.worst_ratio) for c in layers]


def test_a_gross_error_fails_the_whole_model_check_too():
    torch.manual_seed(4)
    model = Tokens().eval()
    records = quantized(model, 4, True, 16)
    inputs = ids_inputs(2)
    _, graph, rows = exported(model, inputs.batches[0]["input"][:2], records)
    node = next(n for n in graph.graph.node if n.op_type == "MatMulNBits" and "fc2" in n.input[1])
    init = next(i for i in graph.graph.initializer if i.name == node.input[1])
    swapped = numpy_helper.to_array(init)
    swapped = ((swapped & 0x0F) << 4) | (swapped >> 4)  # high nibble first: the wrong packing
    init.CopyFrom(numpy_helper.from_array(swapped.astype(np.uint8), init.name))
    check = verify_quantized(
        graph, prepared_for(model, records, inputs), rows, batch=None, atol=1e-4, rtol=1e-3
    )
    assert any("emulated integer model" in f for f in check.failures), check.failures


def test_emulation_hooks_quantize_as_dynamic_quantize_linear():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [1.0, 0.25, -0.75, 1.5]])
    codes, scale, zero = quantize_uint8(x)
    s = np.float32(3.0) / np.float32(255.0)  # by hand: lo = -1, hi = 2
    assert scale == pytest.approx(float(s), rel=0, abs=0) and zero == 85  # round(1 / s) = 85
    expected = np.clip(np.round(x.numpy() / s) + 85, 0, 255)  # 0.5 / s = 42.5 -> 42 (half to even)
    assert expected[0, 2] == 127
    np.testing.assert_array_equal(codes.numpy(), expected)
    np.testing.assert_array_equal(fake_uint8(x).numpy(), ((expected - 85) * s).astype(np.float32))
    node = onnx.helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node],
        "dql",
        [value("x", onnx.TensorProto.FLOAT, [None, None])],
        [
            value("y", onnx.TensorProto.UINT8, [None, None]),
            value("s", onnx.TensorProto.FLOAT, []),
            value("z", onnx.TensorProto.UINT8, []),
        ],
    )
    dql = session(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    for data in (x, torch.randn(64, 33) * 3 + 1, torch.arange(0.0, 256.0).reshape(2, 128) + 0.5):
        y, s_ort, z_ort = dql.run(None, {"x": data.numpy()})
        got = quantize_uint8(data)
        np.testing.assert_array_equal(got[0].numpy(), y)
        assert got[1:] == (float(s_ort), int(z_ort))
    holder = nn.Sequential(nn.Linear(4, 3))
    record = quantize_rtn(holder[0].weight.detach(), 8, True)
    with torch.no_grad():
        holder[0].weight.copy_(record.dequantize())
    row = QuantRow(
        "0.weight", "DynamicQuantizeMatMul", 8, None, True, [3, 4], 0, 48, "B", None, "uint8 per tensor"
    )
    seen: list[torch.Tensor] = []
    with torch.no_grad(), emulated(holder, [row], {"0.weight": record}, saturate=False) as scales:
        hook = holder[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # runs after
        out = holder(x)
        hook.remove()
    assert torch.equal(seen[-1], fake_uint8(x)) and scales == [("0.weight", scale)]
    assert torch.equal(out, IntegerOp(row, record, False)(x, holder[0].bias)[0])
    assert not holder[0]._forward_pre_hooks and not holder[0]._forward_hooks  # removed on exit
    blocks = torch.tensor([[127.0, 2.5, -2.5, 0.5] + [0.0] * 12])
    np.testing.assert_array_equal(fake_int8(blocks, 16).numpy()[0, :4], [127.0, 2.0, -2.0, 0.0])


def test_saturation_of_u8s8_pair_sums():
    """Codes near +-127 against uint8 activations near 255: on x86 without VNNI onnxruntime's U8S8
    kernels add the pair (k, k + 1) in int16 with saturation; the emulation does the same, exactly.
    uint8 weights (U8U8) and codes within [-64, 64] never saturate."""
    torch.manual_seed(5)
    k, n = 64, 16
    weight = torch.randint(-127, 128, (n, k)).to(torch.float32) * 0.01
    weight[:, :8] = 1.27  # codes 127 side by side
    model = nn.Sequential(nn.Linear(k, n)).eval()
    with torch.no_grad():
        model[0].weight.copy_(weight)
    records = quantized(model, 8, True, None)
    x = torch.rand(32, k) + 1.0  # all positive: codes up to 255, zero point 0
    saturates = onnxruntime_saturates()
    outs = {}
    for layout in ("int8", "uint8"):
        _, graph, rows = exported(model, x[:2], records, int8_weights=layout)
        y = session(graph).run(None, {"input": x.numpy()})[0]
        exact, _ = IntegerOp(rows[0], records["0.weight"], saturate=False)(x, model[0].bias)
        clipped, _ = IntegerOp(rows[0], records["0.weight"], saturate=True)(x, model[0].bias)
        outs[layout] = (y, exact.numpy(), clipped.numpy())
    y, exact, clipped = outs["int8"]
    if saturates:
        np.testing.assert_array_equal(y, clipped)
        assert np.abs(y - exact).max() > 0.1 * np.abs(exact).max()
    else:
        np.testing.assert_array_equal(y, exact)
    y, exact, clipped = outs["uint8"]
    np.testing.assert_array_equal(y, exact)  # U8U8: exact everywhere
    small = nn.Sequential(nn.Linear(k, n)).eval()  # a reduce_range grid: codes within [-64, 64]
    record = quantize_rtn(small[0].weight.detach(), 8, True)
    record.codes = (record.codes.to(torch.int16) // 2).to(torch.int8)
    with torch.no_grad():
        small[0].weight.copy_(record.dequantize())
    _, graph, rows = exported(small, x[:2], {"0.weight": record})
    y = session(graph).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(y, IntegerOp(rows[0], record, saturate=False)(x, small[0].bias)[0].numpy())


@pytest.mark.parametrize(
    ("bits", "dim", "group"), [(8, 40, None), (8, 64, 16), (4, 25, None), (4, 40, 8), (4, 48, 24)]
)
def test_embeddings_gather_only_the_rows_they_need(bits, dim, group):
    torch.manual_seed(6)
    emb = nn.Embedding(VOCAB, dim)
    records = quantized(emb, bits, False, group)
    ids = torch.randint(0, VOCAB, (4, 7))
    _, graph, rows = exported(emb, ids[:2], records)
    onnx.checker.check_model(graph, full_check=True)
    assert rows[0].op == "Gather" and same_integers(
        read_back(graph, rows[0].onnx_name, bits, False), records["weight"]
    )
    got = session(graph).run(None, {"input": ids.numpy()})[0]
    np.testing.assert_array_equal(got, records["weight"].dequantize()[ids].numpy())  # bit for bit


def test_what_cannot_be_exported_is_refused():
    model = Tokens(dim=40).eval()
    records = quantized(model, 4, True, None, {"fc1.weight"})
    with pytest.raises(ExportError, match="power of two from 16 to 256"):
        exported(model, torch.zeros(1, 2, dtype=torch.int64), records)
    records = quantized(model, 8, True, None, {"fc2.weight"})
    with torch.no_grad():
        model.fc2.weight[0, 0] += 1e-3
    with pytest.raises(ExportError, match="not its codes"):
        exported(model, torch.zeros(1, 2, dtype=torch.int64), records)


RECIPE = """version: 1
train:
  model: digits-mlp
  data: digits
  epochs: 1
  batch_size: 64
  seed: 0
  optimizer: {type: SGD, lr: 0.1}
modifiers:
  - type: Quantization
    params: [fc1.weight]
    bits: 8
    start: 1
  - type: Quantization
    params: [fc2.weight]
    bits: 4
    symmetric: false
    group_size: 32
    method: rtn
    start: 1
"""


def test_export_checkpoint_end_to_end(tmp_path):
    """A real run (one epoch, then int8 GPTQ and 4-bit RTN at the end of training, in finalize):
    the checkpoint written after finalize holds the codes, and export writes exactly them."""
    from compressor.core.checkpoint import load_checkpoint
    from compressor.core.quantized import pop_records
    from compressor.engine import run

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    run(recipe, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    records = pop_records(dict(load_checkpoint(path)["model"]))
    assert set(records) == {"fc1.weight", "fc2.weight"}
    report = export_checkpoint(path, samples=100, int8_weights="uint8")
    assert report.passed and report.written, report.failures
    q = report.quantization
    assert q.tensors == 2 and q.int8_weights == "uint8" and q.numerics.max_abs_diff <= q.tolerance
    rows = {r.name: r for r in report.tensors}
    assert (rows["fc1.weight"].bits, rows["fc1.weight"].onnx_op) == (8, "DynamicQuantizeMatMul")
    assert (rows["fc2.weight"].group_size, rows["fc2.weight"].onnx_op) == (32, "MatMulNBits")
    assert all(r.match == "quantized" and r.onnx_zeros == r.checkpoint_zeros for r in rows.values())
    assert report.file_bytes == Path(report.output).stat().st_size < 0.35 * report.dense_bytes
    assert report.size_ratio == pytest.approx(report.file_bytes / report.dense_bytes)
    text = render_text(report, width=200)
    assert "8-bit per row DynamicQuantizeMatMul" in text and "onnxruntime vs float model" in text
    written = onnx.load(report.output)
    assert not any(i.name in ("fc1.weight", "fc2.weight") for i in written.graph.initializer)
    for row in report.tensors:  # the file's integers are the run's codes, scales and zero points
        record = records[row.name]
        assert same_integers(read_back(written, row.onnx_name, record.bits, record.symmetric), record)
    both = export_checkpoint(path, tmp_path / "both.onnx", samples=100, compress=True)
    assert both.passed and both.compressed and both.quantization is not None, both.failures
    assert (
        both.compressed_numerics is not None
        and both.compressed_numerics.max_abs_diff <= both.quantization.tolerance
    )
