"""Heads and FFN neurons of a sentence encoder removed by a recipe (StructuredPruning with units), then
`compressor run`, resume and `compressor export`: the smaller encoder (per-layer head counts differ) is
rebuilt from the checkpoint, exported to ONNX and verified against onnxruntime, on a tiny BERT
sentence encoder over real code-search pairs (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import hf_tiny  # tests/ is on the path
import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from compressor import engine
from compressor.cli import app
from compressor.core.checkpoint import load_checkpoint
from compressor.data import CodePairs
from compressor.engine import checkpoints
from compressor.models.pretrained import load_pretrained
from compressor.surgery.channels import match_shapes
from compressor.surgery.encoder import encoder_layers, encoder_macs
from exporters.numerics import session

MODULE = __name__
TRAIN, TEST = 40, 24

RECIPE = """\
version: 1
train:
  model: "hf:{model}"
  data: "{module}:pairs"
  task: contrastive
  task_options: {{max_length: 48}}
  epochs: 2
  batch_size: 8
  seed: 0
  eval_at_start: true
  optimizer: {{type: AdamW, lr: 1.0e-3}}
modifiers:
  - type: StructuredPruning
    params: ["{pattern}"]
    units: [heads, neurons]
    mac_sparsity: 0.5
    importance: second_order
    num_grads: 8
    grad_batch_size: 4
    start: 0
"""


def pairs() -> tuple[CodePairs, CodePairs]:
    return CodePairs("train", limit=TRAIN), CodePairs("test", limit=TEST)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train, _ = pairs()
    texts = [p[side] for p in train.pairs for side in ("query", "document")]
    directory = hf_tiny.sentence_encoder_dir(tmp_path_factory.mktemp("tiny") / "encoder", texts)
    model = load_pretrained(f"hf:{directory}")
    with torch.no_grad():  # layer 0's heads strong, layer 1's weak: the layers keep different head counts
        for layer, scale in zip(encoder_layers(model), (3.0, 0.3), strict=True):
            layer.attention_output.weight.mul_(scale)
            layer.value.weight.mul_(scale)
    model.auto_model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def recipe(encoder: Path) -> Path:
    path = encoder.parent / "structured.yaml"
    pattern = hf_tiny.ENCODER_LINEARS.replace("\\", "\\\\")
    path.write_text(RECIPE.format(model=encoder, module=MODULE, pattern=pattern))
    return path


@pytest.fixture(scope="module")
def ran(recipe: Path) -> Path:
    """`compressor run` of the recipe: the run folder."""
    out = recipe.parent / "run"
    result = CliRunner().invoke(
        app, ["run", str(recipe), "-o", str(out), "--no-progress", "--allow-import", MODULE]
    )
    assert result.exit_code == 0, result.output
    return out


def _heads_and_neurons(state: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    d = hf_tiny.HIDDEN // hf_tiny.HEADS
    return [
        (
            state[f"auto_model.encoder.layer.{i}.attention.self.query.weight"].shape[0] // d,
            state[f"auto_model.encoder.layer.{i}.intermediate.dense.weight"].shape[0],
        )
        for i in range(hf_tiny.LAYERS)
    ]


def test_the_run_removes_half_the_macs_and_keeps_the_hidden_size(ran: Path, encoder: Path) -> None:
    state = load_checkpoint(ran / "checkpoint.pt")["model"]
    dense = load_pretrained(f"hf:{encoder}")
    counts = _heads_and_neurons(state)
    assert all(1 <= h <= hf_tiny.HEADS and 1 <= n <= hf_tiny.INTERMEDIATE for h, n in counts)
    assert len({h for h, _ in counts}) > 1  # the layers keep different numbers of heads
    d, hidden = hf_tiny.HIDDEN // hf_tiny.HEADS, hf_tiny.HIDDEN
    macs = sum(4 * d * hidden * h + 2 * hidden * n for h, n in counts)
    total = encoder_macs(encoder_layers(dense))
    assert 0.5 <= 1.0 - macs / total < 0.5 + 4 * d * hidden / total  # overshot by less than one head
    assert state["auto_model.embeddings.word_embeddings.weight"].shape[1] == hidden
    summary = json.loads((ran / "summary.json").read_text())
    assert summary["parameters"] < sum(p.numel() for p in dense.parameters())
    assert summary["dense_eval"] is not None and "recall@1" in summary["eval"]


def test_export_gives_the_smaller_encoder_verified_by_onnxruntime(ran: Path, encoder: Path) -> None:
    checkpoint, output = ran / "checkpoint.pt", ran / "small.onnx"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "-o", str(output), "--allow-import", MODULE])
    assert result.exit_code == 0, result.output
    graph = onnx.load(output)
    onnx_params = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    dense = load_pretrained(f"hf:{encoder}").eval()
    assert onnx_params < 0.85 * sum(p.numel() for p in dense.parameters())
    # onnxruntime against the checkpoint rebuilt in torch, on texts and lengths of its own
    state = load_checkpoint(checkpoint)["model"]
    model = load_pretrained(f"hf:{encoder}").eval()
    assert match_shapes(model, state, example_inputs=None)
    model.load_state_dict(state)
    assert [(x.heads, x.neurons) for x in encoder_layers(model)] == _heads_and_neurons(state)
    texts = [p["document"] for p in CodePairs("validation", limit=8).pairs]
    tokens = model.tokenizer(texts, padding="max_length", truncation=True, max_length=23, return_tensors="pt")
    tokens["attention_mask"][2, 9:] = 0
    feed = {k: tokens[k].long() for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = model(**feed).numpy()
    (got,) = session(graph).run(None, {k: v.numpy() for k, v in feed.items()})
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)


def test_a_structured_run_resumes_to_the_same_weights(recipe: Path, ran: Path, monkeypatch) -> None:
    save = checkpoints.save

    class KilledError(Exception):
        pass

    def killed_after_epoch_1(files, session_, model, epoch, *args):
        save(files, session_, model, epoch, *args)
        if epoch == 1:
            raise KilledError

    cut = recipe.parent / "cut"
    monkeypatch.setattr(checkpoints, "save", killed_after_epoch_1)
    with pytest.raises(KilledError):
        engine.run(recipe, cut, progress=False, allow_imports=[MODULE])
    monkeypatch.setattr(checkpoints, "save", save)
    half = load_checkpoint(cut / "checkpoint.pt")["model"]
    assert _heads_and_neurons(half) == _heads_and_neurons(load_checkpoint(ran / "checkpoint.pt")["model"])
    engine.run(None, cut, resume=True, progress=False, allow_imports=[MODULE])
    a = load_checkpoint(ran / "checkpoint.pt")["model"]
    b = load_checkpoint(cut / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_latency_bench_times_exported_sentence_encoders(ran: Path) -> None:
    from bench_scripts import load

    onnx_latency = load("onnx_latency")

    output = ran / "small.onnx"
    if not output.is_file():
        test_export_gives_the_smaller_encoder_verified_by_onnxruntime(ran, ran.parent / "encoder")
    files = {"a": {"onnx": output}, "b": {"onnx": output}}
    times = onnx_latency.time_models(files, rounds=1, reps=1, seq=16)
    assert set(times) == {(m, b, t) for m in files for b in (1, 32) for t in (1, 2)}
    text = onnx_latency.files_table(files, times, seq=16)
    assert "sequence length 16" in text and f"| a | {onnx_latency.onnx_parameters(output):,} |" in text
