"""ONNX export of a sentence encoder (``hf:DIR`` + ``task: contrastive``), on a tiny BERT trained and
pruned by a recipe over a few dozen real code-search pairs: inputs ``input_ids`` and
``attention_mask`` (int64, dynamic batch and sequence), output ``sentence_embedding``, verified
against onnxruntime on tokenized text of several lengths, sparsity per tensor preserved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hf_tiny  # tests/ is on the path (pytest's rootdir-relative import)
import numpy as np
import onnx
import pytest
import torch

from compressor.core.checkpoint import load_checkpoint
from compressor.core.masks import mask_names
from compressor.core.onnx_tensors import constant_tensors
from compressor.core.params import normalize
from compressor.data import CodePairs
from compressor.engine import run
from compressor.models.pretrained import load_pretrained
from exporters import ExportError, export_checkpoint
from exporters.numerics import session

MODULE = __name__
TRAIN, TEST = 40, 24

RECIPE = """\
version: 1
train:
  model: "hf:{model}"
  data: "{data}"
  task: {task}
  {options}
  epochs: 1
  batch_size: 8
  seed: 0
  optimizer: {{type: AdamW, lr: 1.0e-3}}
modifiers:
  - type: MagnitudePruning
    params: ["{pattern}"]
    start: 0
    end: 0
    final_sparsity: 0.8
"""


def pairs() -> tuple[CodePairs, CodePairs]:
    """The recipe's data: the first pairs of the code-search splits (real text)."""
    return CodePairs("train", limit=TRAIN), CodePairs("test", limit=TEST)


class Listed(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def labelled() -> tuple[Listed, Listed]:
    """Token ids with labels, for a classifier trained with task model-loss (it computes its loss)."""
    gen = torch.Generator().manual_seed(0)
    samples = [
        {
            "input_ids": torch.randint(5, 50, (12,), generator=gen),
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(24)
    ]
    return Listed(samples[:16]), Listed(samples[16:])


def _texts() -> list[str]:
    train, _ = pairs()
    return [p[side] for p in train.pairs for side in ("query", "document")]


def _recipe(tmp: Path, model: Path, data: str, task: str, options: str = "") -> Path:
    path = tmp / f"{task}.yaml"
    pattern = hf_tiny.ENCODER_LINEARS.replace("\\", "\\\\")
    text = RECIPE.format(model=model, data=f"{MODULE}:{data}", task=task, options=options, pattern=pattern)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny sentence encoder, encoder linears pruned to 80% (above the 2/3 where
    sparse storage starts to pay), fine-tuned one epoch."""
    tmp = tmp_path_factory.mktemp("sentence")
    model = hf_tiny.sentence_encoder_dir(tmp / "encoder", _texts())
    recipe = _recipe(tmp, model, "pairs", "contrastive", "task_options: {max_length: 48}")
    run(recipe, tmp / "run", progress=False, allow_imports=[MODULE])
    return tmp / "run" / "checkpoint.pt"


@pytest.fixture(scope="module")
def exported(trained: Path):
    return export_checkpoint(trained, trained.parent / "model.onnx", allow_imports=[MODULE])


def test_the_graph_takes_ids_and_mask_by_name_and_gives_sentence_embedding(exported) -> None:
    model = onnx.load(exported.output)
    dims = {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        )
        for v in [*model.graph.input, *model.graph.output]
    }
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert dims["input_ids"] == dims["attention_mask"] == (onnx.TensorProto.INT64, ["batch", "sequence"])
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    assert "auto_model.embeddings.word_embeddings.weight" in {i.name for i in model.graph.initializer}
    assert dims["sentence_embedding"] == (onnx.TensorProto.FLOAT, ["batch", hf_tiny.HIDDEN])
    assert exported.inputs[0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert exported.outputs == [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 32]}]


def test_onnxruntime_matches_the_checkpoint_on_new_texts_of_new_lengths(trained: Path, exported) -> None:
    checked = set(exported.numerics.sequence_lengths)
    model = load_pretrained(f"hf:{trained.parent.parent / 'encoder'}").eval()
    state = load_checkpoint(trained)["model"]
    masks = set(mask_names(state))
    weights = {k: v for k, v in state.items() if not k.endswith("_mask")}
    for name in masks:  # bake: the checkpoint's weights times their masks
        weights[name] = weights[name] * state[f"{name}_mask"]
    model.load_state_dict(weights)
    sess = session(onnx.load(exported.output))
    texts = [p["document"] for p in CodePairs("validation", limit=30).pairs]
    tried = 0
    for length in (5, 9, 17, 40):  # batch 3 at lengths the verification did not see
        if length in checked:
            continue
        tokens = model.tokenizer(
            texts[:3], padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        tokens["attention_mask"][1, length // 2 :] = 0  # one row padded halfway
        feed = {k: tokens[k].long() for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            ref = model(**feed).numpy()
        (got,) = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        assert got.shape == (3, hf_tiny.HIDDEN)
        np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        tried += 1
    assert tried >= 2


def test_sparsity_per_tensor_is_the_checkpoint_masks(trained: Path, exported) -> None:
    state = load_checkpoint(trained)["model"]
    masks = {normalize(n): state[f"{n}_mask"] for n in mask_names(state)}
    assert len(masks) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    off = sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert off == pytest.approx(0.8, abs=0.01)
    rows = {row.name: row for row in exported.tensors}
    tensors = constant_tensors(onnx.load(exported.output))
    for name, mask in masks.items():
        row = rows[name]
        assert row.ok and row.onnx_name in tensors, row
        zeros = int((mask == 0).sum())
        assert int((tensors[row.onnx_name] == 0).sum()) == zeros and row.onnx_zeros == zeros
        assert row.mask_sparsity == pytest.approx(zeros / mask.numel())


def test_the_report_says_what_was_checked(exported) -> None:
    n = exported.numerics
    assert n.runs == 8 and n.samples == 2 * TEST  # queries and documents of batches of 1, 3, 8, 12 pairs
    assert n.batch_sizes == [12, 8, 3, 1]
    assert len(n.sequence_lengths) >= 4 and max(n.sequence_lengths) > 2 * min(n.sequence_lengths)
    assert n.max_abs_diff < 1e-5
    saved = json.loads(Path(exported.report).read_text())
    assert saved["passed"] and saved["numerics"]["sequence_lengths"] == n.sequence_lengths
    assert saved["inputs"][1]["name"] == "attention_mask"
    text = "\n".join(exported.summary())
    assert (
        f"sequence lengths {n.sequence_lengths}" in text and "sentence_embedding float32 (batch, 32)" in text
    )


def test_compress_stores_sparse_initializers_and_verifies_them(trained: Path, exported) -> None:
    report = export_checkpoint(
        trained, trained.parent / "compact.onnx", compress=True, allow_imports=[MODULE]
    )
    assert report.passed and report.compressed_numerics.max_abs_diff < 1e-5
    assert report.compressed_numerics.sequence_lengths == exported.numerics.sequence_lengths
    assert Path(report.output).stat().st_size < Path(exported.output).stat().st_size
    assert report.sparse_initializers  # only where values + indices are smaller (above 2/3 zeros)


def test_the_dynamo_exporter_gives_the_same_graph_interface(trained: Path) -> None:
    report = export_checkpoint(
        trained, trained.parent / "dynamo.onnx", exporter="dynamo", allow_imports=[MODULE]
    )
    assert report.passed and report.numerics.max_abs_diff < 1e-5
    assert [i["name"] for i in report.inputs] == ["input_ids", "attention_mask"]
    assert report.outputs == [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", 32]}]


def test_a_model_trained_on_its_own_loss_with_labels_is_refused_clearly(tmp_path: Path) -> None:
    model = hf_tiny.classifier_dir(tmp_path / "classifier", _texts())
    recipe = _recipe(tmp_path, model, "labelled", "model-loss")
    run(recipe, tmp_path / "run", progress=False, allow_imports=[MODULE])
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(
        ExportError,
        match=r"takes a dict of input_ids, attention_mask, labels \(ModelLossTask\); export handles",
    ) as err:
        export_checkpoint(checkpoint, allow_imports=[MODULE])
    assert "'labels'" in str(err.value)
    cli = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "export", str(checkpoint), "--allow-import", MODULE],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=300,
    )
    assert cli.returncode == 1, cli.stderr
    assert "Traceback" not in cli.stdout + cli.stderr
    assert "labels" in cli.stdout + cli.stderr and not checkpoint.with_suffix(".onnx").exists()


def test_a_fixed_batch_keeps_the_sequence_axis_dynamic(trained: Path) -> None:
    report = export_checkpoint(trained, trained.parent / "fixed.onnx", batch=5, allow_imports=[MODULE])
    assert report.passed and report.numerics.batch_sizes == [5]
    assert report.numerics.runs == 2 * (TEST // 5)  # whole batches only, both sides of each
    assert report.inputs[0]["shape"] == [5, "sequence"] and report.outputs[0]["shape"] == [5, 32]
    assert len(report.numerics.sequence_lengths) >= 3
    with pytest.raises(ExportError, match=r"--batch 25 is larger than the 24 test samples available"):
        export_checkpoint(trained, trained.parent / "big.onnx", batch=25, allow_imports=[MODULE])


def test_a_classifier_called_by_name_exports_its_logits_without_the_loss(tmp_path: Path) -> None:
    from compressor.models.pretrained import load_tokenizer
    from exporters.convert import to_onnx_named
    from exporters.named import KeywordModel, NamedInputs, output_names
    from exporters.numerics import compare_named

    directory = hf_tiny.classifier_dir(tmp_path / "classifier", _texts(), labels=3)
    model = load_pretrained(f"hf:{directory}").eval()
    tokenizer = load_tokenizer(directory)
    texts = _texts()
    tokens = [
        tokenizer(chunk, padding=True, truncation=True, max_length=40, return_tensors="pt")
        for chunk in (texts[:4], texts[4:5], texts[5:12:2])
    ]
    batches = [{k: t[k].long() for k in ("input_ids", "attention_mask")} for t in tokens]
    named = NamedInputs(["input_ids", "attention_mask"], batches)
    outputs = output_names(model, batches[0])
    assert outputs == (["logits"], ["logits"])  # a ModelOutput: its tensors, never a loss
    proto = to_onnx_named(model, named, batches[0], outputs, batch=None, opset=None, exporter="legacy")
    out = proto.graph.output[0]
    assert out.name == "logits" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
        "batch",
        3,
    ]
    numerics = compare_named(proto, KeywordModel(model, named.names, outputs[1]), named, 1e-4, 1e-3)
    assert numerics.ok and numerics.runs == 3 and len(numerics.sequence_lengths) >= 2
