"""`compressor export`: verified, reported, compact sparse ONNX from real training checkpoints."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from oracles import render_text
from typer.testing import CliRunner

from compressor.cli import app
from compressor.core import registry
from compressor.core.checkpoint import load_checkpoint
from compressor.core.masks import MASK_SUFFIX
from compressor.engine import run
from exporters import ExportError, VerificationError, export_checkpoint
from exporters import export as export_module
from exporters.compliance import violations

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def setup():
    """One torch thread (the tiny models run several times faster on a shared 2-core machine) and the
    ``onnx`` exporter registered even where the package's entry points are not installed yet."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    added = "onnx" not in registry.names("exporters")
    if added:
        registry.register("exporters", "onnx", export_checkpoint)
    yield
    if added:
        registry.unregister("exporters", "onnx")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """digits MLP, gradual magnitude pruning to 80% (fc1, fc2)."""
    out = tmp_path_factory.mktemp("digits")
    run(ROOT / "recipes/digits_magnitude.yaml", out, overrides={"epochs": "6"}, progress=False)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    """The main M-FAC gradual recipe (conv and linear weights to 90%) on the digits CNN with batch-norm.

    The recipe's own mnist-cnn takes 30-45 s here with a benchmark beside it; digits-cnn about 10 s.
    """
    out = tmp_path_factory.mktemp("cnn")
    text = (ROOT / "recipes/mnist_mfac_gradual.yaml").read_text()
    retargeted = text.replace("model: mnist-cnn", "model: digits-cnn").replace("data: mnist", "data: digits")
    assert retargeted.count("digits") == 2, "mnist_mfac_gradual.yaml no longer names mnist-cnn / mnist"
    recipe = out / "recipe.source.yaml"
    recipe.write_text(retargeted)
    overrides = {"epochs": "3", "prune_start": "1", "prune_end": "2"}
    run(recipe, out, overrides=overrides, progress=False)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def digits_export(digits):
    return export_checkpoint(digits)


@pytest.fixture(scope="module")
def cnn_export(cnn):
    return export_checkpoint(cnn, cnn.parent / "dense.onnx")


def _checkpoint_sparsity(path: Path) -> dict[str, tuple[int, float]]:
    """Masked parameter -> (zeros in its weight, masked-off fraction), straight from the checkpoint."""
    state = load_checkpoint(path)["model"]
    out = {}
    for key, mask in state.items():
        if key.endswith(MASK_SUFFIX):
            name = key[: -len(MASK_SUFFIX)]
            out[name] = (int((state[name] == 0).sum()), 1.0 - int(mask.sum()) / mask.numel())
    return out


def _onnx_zero_counts(path: Path) -> list[tuple[tuple[int, ...], int]]:
    """(shape, zeros) of every float tensor in the file, dense and sparse initializers alike."""
    from compressor.core.onnx_tensors import constant_tensors

    tensors = constant_tensors(onnx.load(str(path)))
    return [(a.shape, int((a == 0).sum())) for a in tensors.values() if a.dtype.kind == "f"]


def _assert_sparsity_matches(report, checkpoint: Path, onnx_path: Path) -> None:
    expected = _checkpoint_sparsity(checkpoint)
    rows = {row.name: row for row in report.tensors}
    assert set(expected) <= set(rows)
    available = _onnx_zero_counts(onnx_path)
    for name, (zeros, masked) in expected.items():
        row = rows[name]
        assert row.ok and row.checkpoint_zeros == zeros and row.onnx_zeros == zeros, row
        assert row.mask_sparsity == pytest.approx(masked, abs=1e-12)
        assert row.onnx_sparsity == pytest.approx(masked, abs=1e-12)  # no kept weight is exactly 0 here
        shapes = {tuple(row.onnx_shape)}
        assert any(shape in shapes and z == zeros for shape, z in available), name


def test_digits_export_verifies_and_keeps_sparsity_exactly(digits, digits_export):
    report = digits_export
    assert report.passed and report.written
    assert Path(report.output) == digits.with_suffix(".onnx") and Path(report.output).is_file()
    n = report.numerics
    assert n.max_abs_diff <= 1e-4 and n.max_rel_diff <= 1e-3
    assert n.samples == 300 and n.batch_sizes == [64, 44]  # two batch sizes through the dynamic axis
    assert report.batch == "dynamic" and report.input_shape == ["batch", 1, 8, 8]
    _assert_sparsity_matches(report, digits, Path(report.output))
    model = onnx.load(report.output)
    names = [i.name for i in model.graph.initializer] + [i.name for i in model.graph.input]
    assert not any(MASK_SUFFIX in name for name in names)
    onnx.checker.check_model(model, full_check=True)


def test_report_file_and_table(digits_export):
    report = digits_export
    saved = json.loads(Path(report.report).read_text())
    assert Path(report.report) == Path(report.output).parent / "export_report.json"
    assert saved["passed"] is True and saved["failures"] == [] and saved["batch"] == "dynamic"
    assert saved["numerics"]["max_abs_diff"] == report.numerics.max_abs_diff
    by_name = {t["name"]: t for t in saved["tensors"]}
    assert set(by_name) == {"fc1.weight", "fc2.weight"}
    for row in report.tensors:
        entry = by_name[row.name]
        assert entry["onnx_zeros"] == entry["checkpoint_zeros"] == row.checkpoint_zeros
        assert entry["onnx_sparsity"] == entry["checkpoint_sparsity"] and entry["ok"] is True
    text = render_text(report, width=160)
    for row in report.tensors:
        line = next(line for line in text.splitlines() if row.name in line)
        assert line.count(f"{row.checkpoint_sparsity:.2%}") == 2 and "yes" in line
    assert "PASSED" in text and "max |diff|" in text


def test_cnn_with_batchnorm_folding(cnn, cnn_export):
    report = cnn_export
    assert report.passed, report.failures
    assert report.numerics.max_abs_diff <= 1e-4
    rows = {row.name: row for row in report.tensors}
    assert {rows[n].match for n in ("conv1.weight", "conv2.weight")} == {"scaled"}  # BN folded in
    _assert_sparsity_matches(report, cnn, Path(report.output))
    assert rows["fc1.weight"].onnx_sparsity > 0.85


def test_compress_is_smaller_and_still_verifies(cnn, cnn_export):
    report = export_checkpoint(cnn, cnn.parent / "sparse.onnx", compress=True)
    dense_size = Path(cnn_export.output).stat().st_size
    size = Path(report.output).stat().st_size
    assert report.passed and report.compressed and size < 0.5 * dense_size
    assert report.file_bytes == size and report.size_ratio == pytest.approx(size / report.dense_bytes)
    assert report.compressed_numerics.max_abs_diff <= 1e-4
    model = onnx.load(report.output)
    assert "fc1.weight" in report.sparse_initializers and len(model.graph.sparse_initializer) >= 1
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in model.graph.sparse_initializer)
    onnx.checker.check_model(model)
    _assert_sparsity_matches(report, cnn, Path(report.output))
    x = load_inputs(8)
    dense_out = ort.InferenceSession(cnn_export.output).run(None, {"input": x})[0]
    sparse_out = ort.InferenceSession(report.output).run(None, {"input": x})[0]
    np.testing.assert_array_equal(dense_out, sparse_out)


def test_models_over_the_protobuf_limit_are_refused_before_export(digits, tmp_path, monkeypatch):
    state = load_checkpoint(digits)["model"]
    size = sum(t.numel() * t.element_size() for n, t in state.items() if not n.endswith(MASK_SUFFIX))
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", size - 1)
    with pytest.raises(ExportError, match=r"over ONNX's 2 GiB limit.*external data"):
        export_checkpoint(digits, tmp_path / "big.onnx")
    assert not (tmp_path / "big.onnx").exists()
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", size + 10**6)
    assert export_checkpoint(digits, tmp_path / "fits.onnx").passed


def test_inspect_reads_sparse_initializers(cnn, cnn_export):
    """`compressor inspect` shows the same tensors and sparsities for the compressed file as for the
    dense one (sparse initializers densified, not skipped)."""
    from compressor.cli.inspection import onnx_table

    report = export_checkpoint(cnn, cnn.parent / "inspect.onnx", compress=True)
    assert report.sparse_initializers

    def rows(path: str) -> list[str]:
        lines = render_text(onnx_table(Path(path)), width=200).splitlines()
        return sorted(line for line in lines if "%" in line)

    dense_rows, sparse_rows = rows(cnn_export.output), rows(report.output)
    assert len(dense_rows) >= 4 and dense_rows == sparse_rows


def load_inputs(n: int) -> np.ndarray:
    from compressor.data import load_data

    return load_data("digits").test.tensors[0][:n].numpy()


def test_fixed_batch(digits, tmp_path):
    report = export_checkpoint(digits, tmp_path / "b8.onnx", batch=8, opset=13)
    assert report.passed and report.batch == 8 and report.opset == 13
    assert report.input_shape == [8, 1, 8, 8] and report.numerics.batch_sizes == [8]
    assert report.numerics.samples == 296 and report.numerics.max_abs_diff <= 1e-4
    session = ort.InferenceSession(report.output)
    assert session.get_inputs()[0].shape == [8, 1, 8, 8]
    with pytest.raises(ExportError, match="positive integer"):
        export_checkpoint(digits, tmp_path / "bad.onnx", batch=0)


def test_dynamo_exporter_keeps_names(digits, tmp_path):
    report = export_checkpoint(digits, tmp_path / "dynamo.onnx", exporter="dynamo")
    assert report.passed and report.numerics.max_abs_diff <= 1e-4
    assert {row.onnx_name for row in report.tensors} == {"fc1.weight", "fc2.weight"}


def test_nm_structure_is_checked(tmp_path):
    recipe = tmp_path / "nm.yaml"
    text = (ROOT / "recipes/digits_magnitude.yaml").read_text()
    recipe.write_text(
        text.replace("target: 0.8", "target: 0.5").replace(
            "    update_every: 0.5\n",
            ("    update_every: 0.5\n    structure: {n: 2, m: 4}\n    global_ranking: false\n"),
        )
    )
    run(recipe, tmp_path / "run", overrides={"epochs": "5"}, progress=False)  # one-shot at epoch 2
    report = export_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert report.passed
    for row in report.tensors:
        assert row.structure == "2:4" and row.structure_violations == 0 and row.structure_groups > 0
    assert "2:4 ok" in render_text(report, width=160)


def test_structure_violations():
    nm = np.array([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert violations(nm, {"n": 2, "m": 4}) == (1, 2)
    blocks = np.ones((4, 4))
    blocks[:2, :2] = 0
    assert violations(blocks, {"blocks": [2, 2]}) == (0, 4)
    blocks[3, 3] = 0
    assert violations(blocks, {"blocks": [2, 2]}) == (1, 4)
    assert violations(blocks, "channels") == (3, 4)  # rows 0, 1 and 3 hold a zero


def test_broken_export_is_detected(digits, tmp_path, monkeypatch):
    real = export_module.to_onnx

    def tampered(*args, **kwargs):
        model = real(*args, **kwargs)
        init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).shape == (128, 64))
        array = numpy_helper.to_array(init).copy()
        array[array == 0] = 0.05  # the pruned weights come back
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        return model

    monkeypatch.setattr(export_module, "to_onnx", tampered)
    out = tmp_path / "broken.onnx"
    with pytest.raises(VerificationError) as caught:
        export_checkpoint(digits, out)
    message = str(caught.value)
    assert "max |diff|" in message and "atol 0.0001" in message
    assert "fc1.weight: no ONNX tensor carries its values or zero pattern" in message
    assert not out.exists()
    saved = json.loads((tmp_path / "export_report.json").read_text())
    assert saved["passed"] is False and saved["numerics"]["max_abs_diff"] > 1e-4
    result = CliRunner().invoke(app, ["export", str(digits), "-o", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "failed verification" in result.output and "Traceback" not in result.output


def _cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.output


def test_cli_exports_and_prints_the_table(digits, tmp_path):
    out = tmp_path / "cli.onnx"
    args = ["export", str(digits), "--output", str(out), "--compress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert out.is_file() and "fc1.weight" in result.output and "PASSED" in result.output
    assert "compressed:" in result.output


def test_damaged_checkpoints_are_clear_cli_errors(digits, tmp_path):
    data = digits.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in _cli_error([str(truncated)])
    tampered = tmp_path / "tampered.pt"
    body = bytearray(data)
    body[_storage_offset(digits)] ^= 0x01  # one bit of one weight: torch.load alone would not notice
    tampered.write_bytes(bytes(body))
    assert "fails its CRC-32 check" in _cli_error([str(tampered)])
    assert not tampered.with_suffix(".onnx").exists()
    assert "no such checkpoint" in _cli_error([str(tmp_path / "missing.pt")])


def _storage_offset(path: Path) -> int:
    """The offset of a byte in the middle of the largest tensor storage of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_output_over_the_input_is_refused(digits, tmp_path):
    assert "refusing to write over the input" in _cli_error([str(digits), "--output", str(digits)])
    with pytest.raises(ExportError, match="refusing"):
        export_checkpoint(digits, digits.parent / ".." / digits.parent.name / digits.name)
    assert "'dynamic' or a positive integer" in _cli_error(
        [str(digits), "-o", str(tmp_path / "x.onnx"), "--batch", "x"]
    )
