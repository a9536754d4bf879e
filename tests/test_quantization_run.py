"""Quantization in a `compressor run`: after structured pruning, fine-tuned on the grid, killed and
resumed to the same tensors; and a run with no training (`epochs: 0`) that quantizes in one shot."""

from __future__ import annotations

import pytest
import torch

from compressor import engine
from compressor.core.checkpoint import load_checkpoint
from compressor.core.quantized import pop_records
from compressor.engine import checkpoints

STRUCTURED_THEN_QUANTIZED = """
version: 1
train:
  model: digits-cnn
  data: digits
  epochs: 4
  batch_size: 64
  optimizer: {type: SGD, lr: 0.05, momentum: 0.9}
modifiers:
  - type: StructuredPruning
    params: [conv1.weight, conv2.weight, fc1.weight]
    start: 1
    channel_sparsity: 0.5
    num_grads: 16
  - type: Quantization
    params: [fc1.weight, fc2.weight]
    bits: 8
    calibration: {samples: 128}
    start: 2
"""


def test_structured_then_quantized_run_resumes_bit_exactly(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(STRUCTURED_THEN_QUANTIZED)
    whole = engine.run(recipe, tmp_path / "whole", progress=False)
    save = checkpoints.save

    class KilledError(Exception):
        pass

    def killed_after_epoch_3(files, session, model, epoch, *args):
        save(files, session, model, epoch, *args)
        if epoch == 3:
            raise KilledError

    monkeypatch.setattr(checkpoints, "save", killed_after_epoch_3)
    with pytest.raises(KilledError):
        engine.run(recipe, tmp_path / "cut", progress=False)
    monkeypatch.setattr(checkpoints, "save", save)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert cut["fc1.weight_qlatent"].shape == cut["fc1.weight"].shape  # fine-tuning on the grid, shrunk
    resumed = engine.run(None, tmp_path / "cut", resume=True, progress=False)
    assert resumed["eval"] == whole["eval"]
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = pop_records(dict(a))
    assert set(records) == {"fc1.weight", "fc2.weight"}
    for name, record in records.items():
        assert torch.equal(record.dequantize(), a[name])  # on the grid at the end of training
        assert (
            record.codes.shape == a[name].shape and record.codes.shape[0] < 64 + (name == "fc2.weight") * 64
        )


NO_TRAINING = """
version: 1
train:
  model: digits-mlp
  data: digits
  epochs: 0
  batch_size: 64
  eval_at_start: true
  optimizer: {type: SGD, lr: 0.1}
modifiers:
  - type: Quantization
    params: [fc1.weight, fc2.weight]
    bits: 4
    group_size: 16
    calibration: {samples: 128}
"""


def test_a_run_without_training_quantizes_in_one_shot(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(NO_TRAINING)
    summary = engine.run(recipe, tmp_path / "run", progress=False)
    assert summary["steps"] == 0 and "dense_eval" in summary
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    records = pop_records(dict(state["model"]))
    assert set(records) == {"fc1.weight", "fc2.weight"}
    assert all(torch.equal(r.dequantize(), state["model"][n]) for n, r in records.items())
