"""CompressionCallback: a recipe's modifiers inside the Hugging Face Trainer (compressor.integrations.hf).

A tiny BertForSequenceClassification (hidden 32, 2 layers) is built from a BertConfig (no download)
and trained on a few dozen random token sequences with labels, on the CPU, for a handful of steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import accelerate  # noqa: F401  (the hf extra; the Trainer needs it: install.sh installs both)
import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

from compressor.integrations.hf import (
    CallbackError,
    CompressionCallback,
    UnsupportedModifierError,
)
from compressor.lifecycle.sampling import GradientSampler
from compressor.models.pretrained import MissingExtraError
from compressor.recipe import RecipeError

ENCODER_LINEARS = r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)\.weight"
SEQ, VOCAB, SAMPLES, BATCH = 12, 40, 24, 4


class RandomText(torch.utils.data.Dataset):
    """``SAMPLES`` dicts of input_ids (SEQ,), attention_mask (SEQ,) and a label in {0, 1}; fixed seed."""

    def __init__(self, samples: int = SAMPLES) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(5, VOCAB, (samples, SEQ), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()  # learnable: the parity of the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(SEQ, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def _args(out: Path, **kwargs) -> TrainingArguments:
    settings = {
        "output_dir": str(out),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-3,
        "weight_decay": 0.1,  # AdamW's decay and momentum would move zeroed weights without the masks
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **kwargs,
    }
    return TrainingArguments(**settings)


class Probe(TrainerCallback):
    """Listed after the CompressionCallback: after every optimizer step and every step end, records
    whether each masked weight is zero where its mask is off, the sparsity and the step counts."""

    def __init__(self, callback: CompressionCallback) -> None:
        self.callback = callback
        self.after_optimizer: list[bool] = []
        self.lrs: list[float] = []  # the learning rate each optimizer step used
        self.steps: list[dict] = []
        self.at_begin: dict[str, torch.Tensor] | None = None

    def _held(self) -> bool:
        masks = self.callback.session.masks
        return all(bool((masks.mask(n).logical_not() & (p != 0)).sum() == 0) for n, p in self._params())

    def _params(self):
        session = self.callback.session
        return [(n, session.params[n]) for n in session.masks.names]

    def on_train_begin(self, args, state, control, **kwargs):
        masks = self.callback.session.masks
        self.at_begin = {n: masks.mask(n).clone() for n in masks.names}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.after_optimizer.append(self._held())
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        masks = self.callback.session.masks
        self.steps.append(
            {
                "global_step": state.global_step,
                "session_step": self.callback.session.step,
                "held": self._held(),
                "sparsity": masks.global_sparsity(),
                "masks": {n: masks.mask(n).clone() for n in masks.names},
            }
        )


def _train(out: Path, recipe: str, *, resume: str | None = None, model=None, **kwargs):
    """(trainer, callback, probe) after ``trainer.train()`` with a CompressionCallback of ``recipe``."""
    callback = CompressionCallback(recipe)
    probe = Probe(callback)
    trainer = Trainer(
        model=model if model is not None else _model(),
        args=_args(out, **kwargs),
        train_dataset=RandomText(),
        callbacks=[callback, probe],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, probe


GRADUAL = f"""
version: 1
modifiers:
  - type: MagnitudePruning
    params: ['{ENCODER_LINEARS}']
    start: 0
    end: 2            # epochs: 2 x 3 optimizer steps per epoch = step 6
    update_every: 1   # every 3 steps: updates at steps 0, 3 and 6
    final_sparsity: 0.6
"""


def test_magnitude_reaches_target_and_masks_hold_every_step(tmp_path):
    # 24 samples / batch 4 = 6 batches per epoch; 2 micro-batches per optimizer step: 3 steps an epoch
    trainer, callback, probe = _train(
        tmp_path, GRADUAL, max_steps=8, gradient_accumulation_steps=2, max_grad_norm=0.5
    )
    session = callback.session
    assert session.steps_per_epoch == 3
    assert trainer.state.global_step == session.step == 8
    assert [s["global_step"] for s in probe.steps] == list(range(1, 9))
    assert all(s["session_step"] == s["global_step"] for s in probe.steps)
    assert len(probe.after_optimizer) == 8 and all(probe.after_optimizer)
    assert all(s["held"] for s in probe.steps)
    # the updates at steps 3 and 6 run before the 4th and 7th optimizer steps
    sparsity = [s["sparsity"] for s in probe.steps]
    assert sparsity[0] == 0.0 and 0.0 < sparsity[3] < 0.6 and sparsity[2] == 0.0
    assert sparsity[5] == sparsity[3] < sparsity[6]
    total = sum(session.masks.mask(n).numel() for n in session.masks.names)
    assert len(session.masks) == 12  # 2 layers x (query, key, value, attention dense, intermediate, output)
    for s in sparsity[6:]:
        assert abs(s - 0.6) <= 1 / total
    # the weights are still exactly zero where pruned, after the final optimizer step and the scheduler
    for name, param in probe._params():
        assert (param[~session.masks.mask(name)] == 0).all()
    logged = [e for e in trainer.state.log_history if "compression/sparsity" in e]
    assert [e["step"] for e in logged] == [0, 3, 6]
    assert callback.metrics[-len(session.masks) - 1][1:] == ("sparsity", pytest.approx(sparsity[-1]))


def test_session_steps_follow_trainer_steps_with_uneven_accumulation(tmp_path):
    # 6 batches, 4 per optimizer step: steps of 4 and 2 micro-batches, 2 optimizer steps an epoch
    recipe = f"""
version: 1
modifiers:
  - type: MagnitudePruning
    params: ['{ENCODER_LINEARS}']
    start: 1
    final_sparsity: 0.5
"""
    trainer, callback, probe = _train(tmp_path, recipe, num_train_epochs=3, gradient_accumulation_steps=4)
    assert callback.session.steps_per_epoch == 2  # the Trainer steps after 4 batches and after the last 2
    # max_steps: 3 epochs of ceil(6 / 4) = 2 steps from transformers 4.52 on; before, the Trainer
    # planned floor(6 / 4) = 1 step an epoch, so it stops after 3 steps (in its second epoch)
    total = 6 if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 52) else 3
    assert trainer.state.max_steps == total
    assert trainer.state.global_step == callback.session.step == total
    assert [(s["global_step"], s["session_step"]) for s in probe.steps] == [
        (i, i) for i in range(1, total + 1)
    ]
    # start: epoch 1 = step 2; updates every epoch: steps 2 (cubic from 0: nothing yet), 4, and the end
    # of training (end omitted: max_steps), which fires at the last step's end, before the last checkpoint
    sparsity = [s["sparsity"] for s in probe.steps]
    assert sparsity[: min(total, 4) - 1] == [0.0] * (min(total, 4) - 1)
    if total == 6:
        assert sparsity[3] == 0.0 and 0.0 < sparsity[4] < 0.5
    assert abs(sparsity[-1] - 0.5) < 1e-3


def test_mfac_one_shot_samples_from_the_trainers_dataloader(tmp_path, monkeypatch):
    calls = []
    original = GradientSampler.sample

    def spy(self, names, num_grads, batch_size, **kwargs):
        out = original(self, names, num_grads, batch_size, **kwargs)
        calls.append({"data": self.data, "rows": out.shape[0], "batch_size": batch_size, "names": names})
        return out

    monkeypatch.setattr(GradientSampler, "sample", spy)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")  # the PyTorch path: no kernel build in this test
    recipe = f"""
version: 1
modifiers:
  - type: MFACPruning
    params: ['{ENCODER_LINEARS}']
    start: {{step: 2}}
    end: {{step: 2}}   # one shot, before the third optimizer step
    final_sparsity: 0.5
    num_grads: 6
    grad_batch_size: 4
    block_size: 64
"""
    trainer, _, probe = _train(tmp_path, recipe, max_steps=4)
    assert len(calls) == 1
    assert calls[0]["rows"] == 6 and calls[0]["batch_size"] == 4
    assert calls[0]["data"] is trainer.train_dataset
    assert len(calls[0]["names"]) == 12
    sparsity = [s["sparsity"] for s in probe.steps]
    assert sparsity[:2] == [0.0, 0.0]
    assert all(abs(s - 0.5) < 1e-3 for s in sparsity[2:])
    assert all(s["held"] for s in probe.steps)


RESUMED = f"""
version: 1
modifiers:
  - type: MagnitudePruning
    params: ['{ENCODER_LINEARS}']
    start: 0
    end: {{step: 6}}
    update_every: {{step: 2}}
    final_sparsity: 0.7
"""


def test_checkpoint_resume_restores_masks_and_session(tmp_path):
    settings = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "gradient_accumulation_steps": 2}
    whole, _, whole_probe = _train(tmp_path / "whole", RESUMED, **settings)
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert (checkpoint / "trainer_state.json").is_file()

    resumed, _, resumed_probe = _train(tmp_path / "resumed", RESUMED, resume=str(checkpoint), **settings)
    at_four = whole_probe.steps[3]["masks"]
    assert 0.0 < whole_probe.steps[3]["sparsity"] < 0.7
    assert resumed_probe.at_begin.keys() == at_four.keys()
    assert all(torch.equal(resumed_probe.at_begin[n], at_four[n]) for n in at_four)
    assert [s["global_step"] for s in resumed_probe.steps] == [5, 6, 7, 8]
    assert all(s["session_step"] == s["global_step"] and s["held"] for s in resumed_probe.steps)
    # the same later updates (at steps 4 and 6), the same final masks and weights as the whole run
    final = resumed_probe.steps[-1]["masks"]
    assert all(torch.equal(final[n], whole_probe.steps[-1]["masks"][n]) for n in final)
    assert abs(resumed_probe.steps[-1]["sparsity"] - 0.7) < 1e-3
    whole_state = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, whole_state[name]), name


@pytest.mark.filterwarnings("ignore:.*comes after the end of training")
def test_resume_needs_the_callbacks_state(tmp_path):
    plain = Trainer(
        model=_model(),
        args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=RandomText(),
    )
    plain.train()
    with pytest.raises(CallbackError, match="without compression state"):
        _train(tmp_path / "again", GRADUAL, resume=str(tmp_path / "checkpoint-2"), max_steps=4)


@pytest.mark.filterwarnings("ignore:.*comes after the end of training")
def test_resume_with_a_callback_added_after_the_trainer_is_built(tmp_path):
    _train(tmp_path, GRADUAL, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=_model(), args=_args(tmp_path, max_steps=4), train_dataset=RandomText())
    trainer.add_callback(CompressionCallback(GRADUAL))
    with pytest.raises(CallbackError, match=r"Trainer\(callbacks="):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize(
    ("modifier", "words"),
    [
        (
            "{type: MFACOptimizer, lr: 0.001, start: 0, end: 1}",
            r"MFACOptimizer\) swaps the optimizer",
        ),
        (
            f"{{type: StructuredPruning, params: ['{ENCODER_LINEARS}'], channel_sparsity: 0.5}}",
            r"StructuredPruning\) removes channels",
        ),
    ],
)
def test_modifiers_the_trainer_cannot_host(modifier, words):
    recipe = f"version: 1\nmodifiers:\n  - {modifier}\n"
    with pytest.raises(UnsupportedModifierError, match=words) as err:
        CompressionCallback(recipe)
    assert "compressor run" in str(err.value)


def test_a_transformers_without_the_optimizer_step_events_is_refused_by_name(monkeypatch):
    """transformers < 4.45 has no on_pre_optimizer_step: a clear error naming it and the version."""
    monkeypatch.delattr(TrainerCallback, "on_pre_optimizer_step")
    recipe = "version: 1\nmodifiers:\n- {type: MagnitudePruning, params: [x], final_sparsity: 0.5}"
    with pytest.raises(MissingExtraError, match=r"on_pre_optimizer_step events \(transformers >= 4\.45\)"):
        CompressionCallback(recipe)


def test_bad_recipes_get_the_recipe_message(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        CompressionCallback(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="final_sparsity"):
        CompressionCallback("version: 1\nmodifiers:\n  - {type: MagnitudePruning, params: [x]}\n")
    wrong = "version: 1\nmodifiers:\n- {type: MagnitudePruning, params: [conv1.weight], final_sparsity: 0.5}"
    path = tmp_path / "wrong.yaml"
    path.write_text(wrong)
    callback = CompressionCallback(path)  # the patterns are checked against the model at Trainer()
    with pytest.raises(RecipeError, match=r"wrong\.yaml:3:.*conv1\.weight"):
        Trainer(model=_model(), args=_args(tmp_path, max_steps=1), callbacks=[callback])


def test_a_pattern_naming_only_a_tied_alias_names_the_tensor_to_select(tmp_path):
    # GPT-2's lm_head.weight is its token embedding, listed once as transformer.wte.weight
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2)
    rule = "- {type: MagnitudePruning, params: [%s], start: 0, end: 0, final_sparsity: 0.5}"
    tied = tmp_path / "tied.yaml"
    tied.write_text("version: 1\nmodifiers:\n" + rule % "lm_head.weight" + "\n")
    message = r"tied\.yaml:3:.*'lm_head\.weight', which is tied to 'transformer\.wte\.weight'.*select"
    with pytest.raises(RecipeError, match=message):
        callback = CompressionCallback(tied)
        Trainer(model=transformers.GPT2LMHeadModel(config), args=_args(tmp_path), callbacks=[callback])
    # the listed name is accepted, and the tensor it names is the head's
    listed = CompressionCallback("version: 1\nmodifiers:\n" + rule % "transformer.wte.weight" + "\n")
    model = transformers.GPT2LMHeadModel(config)
    Trainer(model=model, args=_args(tmp_path), callbacks=[listed])
    assert listed._pruned_names(model) == ["transformer.wte.weight"]
    assert model.lm_head.weight is model.transformer.wte.weight


def test_missing_transformers_is_a_clear_error():
    code = textwrap.dedent(
        """
        import sys
        import compressor, compressor.integrations, compressor.lifecycle.session
        assert "transformers" not in sys.modules, "import compressor must stay light"
        sys.modules["transformers"] = None  # as if the hf extra were not installed
        try:
            import compressor.integrations.hf
        except ImportError as err:
            print(type(err).__name__, err)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MissingExtraError") and "pip install compressor[hf]" in done.stdout


def test_a_learning_rate_modifier_overrides_the_trainers_scheduler_in_its_window(tmp_path):
    recipe = f"""
version: 1
modifiers:
  - type: ConstantPruning
    params: ['{ENCODER_LINEARS}']
  - type: LearningRate
    kind: constant
    value: 0.05
    start: {{step: 2}}
    end: {{step: 4}}
"""
    _, _, probe = _train(tmp_path, recipe, max_steps=6)
    linear = [1e-3 * (6 - step) / 6 for step in range(6)]  # the Trainer's default linear decay
    assert probe.lrs[:2] == pytest.approx(linear[:2])
    assert probe.lrs[2:4] == [0.05, 0.05]
    # at its end (step 4) the schedule's last update sets its final value once; then the Trainer's again
    assert probe.lrs[4] == 0.05 and probe.lrs[5] == pytest.approx(linear[5])


ROOT = Path(__file__).resolve().parents[1]
LOOPS_PAGE = ROOT / "docs" / "training-loops.md"


def readme_trainer_example() -> str:
    """The one ```python block of the docs' "## With the Hugging Face Trainer" section."""
    text = LOOPS_PAGE.read_text(encoding="utf-8")
    section = text.split("\n## With the Hugging Face Trainer\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 1, "the section should hold exactly one python example"
    return blocks[0].split("\n```", 1)[0]


def test_readme_trainer_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_trainer_example())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "COMPRESSOR_KERNELS": "off",  # the PyTorch path: no kernel build in a test
        "OMP_NUM_THREADS": "1",  # a tiny model: threads only contend
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sparsity 0.50" in done.stdout.splitlines()
    # the saved model: no mask buffers left, half of the encoder's linear weights exactly zero
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "bert-pruned" / "final" / "model.safetensors")
    assert not [k for k in saved if k.endswith("_mask")]
    chosen = [v for k, v in saved.items() if re.fullmatch(ENCODER_LINEARS[3:], k)]
    assert len(chosen) == 12
    zeros = sum(int((v == 0).sum()) for v in chosen) / sum(v.numel() for v in chosen)
    assert abs(zeros - 0.5) < 1e-3


QUANTIZED = f"""
version: 1
modifiers:
  - type: Quantization
    params: ['{ENCODER_LINEARS}']
    bits: 4
    group_size: 16
    calibration: {{samples: 16, batch_size: 8}}
    start: {{step: 2}}
"""


def test_quantization_in_the_trainer_holds_the_grid_and_resumes(tmp_path):
    """GPTQ at step 2 from the Trainer's own batches (model-loss task), fine-tuning on the grid after
    it; the Trainer's checkpoint carries the codes and latent weights (buffers), and resuming from
    it ends with the same tensors as the whole run."""
    from compressor.core.quantized import pop_records

    settings = {"max_steps": 6, "save_strategy": "steps", "save_steps": 4}
    whole, _, _ = _train(tmp_path / "whole", QUANTIZED, **settings)
    records = pop_records(dict(whole.model.state_dict()))
    assert len(records) == 12
    params = dict(whole.model.named_parameters())
    for name, record in records.items():
        assert torch.equal(record.dequantize(), params[name].detach()), name
    resumed, _, _ = _train(
        tmp_path / "resumed", QUANTIZED, resume=str(tmp_path / "whole" / "checkpoint-4"), **settings
    )
    whole_state = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, whole_state[name]), name
