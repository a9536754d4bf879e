"""Calibration on a sentence encoder: both sides of each pair, padding tokens left out, query/key/value
one stage, each layer's H equal to 2 X X^T / n of the real tokens' inputs recorded by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import hf_tiny  # tests/ is on the path
import pytest
import torch

from compressor.data import CodePairs
from compressor.lifecycle import calibration, quantize_layers
from compressor.lifecycle.calibration import Calibration
from compressor.lifecycle.session import Session
from compressor.mfac import gptq
from compressor.models.pretrained import load_pretrained
from compressor.tasks.contrastive import ContrastiveTask
from modifiers.quantization import Quantization


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, CodePairs]:
    train = CodePairs("train", limit=40)
    texts = [p[side] for p in train.pairs for side in ("query", "document")]
    directory: Path = hf_tiny.sentence_encoder_dir(tmp_path_factory.mktemp("tiny") / "encoder", texts)
    return load_pretrained(f"hf:{directory}"), train


def test_stages_group_query_key_value_and_every_layer_runs(encoder) -> None:
    model, train = encoder
    task = ContrastiveTask(max_length=32)
    task.prepare(model)
    calib = Calibration(model, train, task, samples=8, batch_size=4)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n}
    stages = calib.stages(linears)
    assert [len(s) for s in stages] == [3, 1, 1, 1] * hf_tiny.LAYERS
    assert [n.rsplit(".", 1)[-1] for n in stages[0]] == ["query", "key", "value"]


def test_curvature_is_2xxt_of_real_tokens_of_both_sides(encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    model, train = encoder
    task = ContrastiveTask(max_length=32)
    seen: list[torch.Tensor] = []
    real = gptq.gptq_quantize

    def spy(w, hessian, **kw):
        seen.append(hessian.clone())
        return real(w, hessian, **kw)

    monkeypatch.setattr(quantize_layers, "gptq_quantize", spy)
    quant = Quantization(
        params=[hf_tiny.ENCODER_LINEARS], bits=8, end=0, calibration={"samples": 12, "batch_size": 5}
    )
    session = Session(
        [quant], model, torch.optim.SGD(model.parameters(), lr=0.0), steps_per_epoch=1, data=train, task=task
    )
    session.before_step()
    session.after_step()
    assert len(seen) == 6 * hf_tiny.LAYERS  # one H per linear (query, key, value share theirs)

    # by hand, on the quantized model (a layer's inputs depend only on the layers before it, which
    # were quantized when its H was taken): every query and document, padding rows dropped
    calib = Calibration(model, train, task, samples=12, batch_size=5)
    intermediate = next(m for n, m in model.named_modules() if n.endswith("layer.1.intermediate.dense"))
    rows: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    handle = intermediate.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach()))
    model.eval()  # as calibration runs it (no dropout)
    with torch.no_grad():
        for batch in calib.batches():
            for side in ("query", "document"):
                masks.append(batch[side]["attention_mask"].reshape(-1).bool())
                model(**batch[side])
    handle.remove()
    assert any(not bool(m.all()) for m in masks)  # there was padding to leave out
    x = torch.cat([r.reshape(-1, r.shape[-1])[m] for r, m in zip(rows, masks, strict=True)]).double()
    by_hand = 2 * x.T @ x / x.shape[0]
    index = 6 * 1 + 4  # layer 1: query, key, value, attention output, then intermediate
    assert torch.allclose(seen[index], by_hand, rtol=1e-9, atol=1e-12)


class _Twice(torch.nn.Module):
    """Two blocks of a ModuleList where the second reads the model's input, not the first's output:
    they do not chain, so ``walk`` must capture by partial forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](x) + self.blocks[0](x)


def _prune_half(module: torch.nn.Module) -> None:
    """Zero the smaller half of a Linear's weights (a stand-in for any layer-wise change)."""
    w = module.weight.data
    w.mul_((w.abs() > w.abs().median()).to(w.dtype))


@pytest.mark.parametrize("replay", [True, False])
def test_walk_inputs_equal_hooks_on_the_changed_model(
    encoder, replay: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stage's captured inputs (both sides, real tokens) equal, to the last bit, the inputs
    recorded by hand with forward hooks on the final model (a layer's inputs depend only on the
    layers before it, all changed by then), whether blocks are replayed or partial forwards run."""
    model, train = encoder
    model = copy.deepcopy(model)
    task = ContrastiveTask(max_length=32)
    task.prepare(model)
    calib = Calibration(model, train, task, samples=10, batch_size=4, seed=3)
    if not replay:  # a plan with no block: every stage by partial forwards
        monkeypatch.setattr(
            calibration, "block_plan", lambda _model, _modules, stages, *_: [None] * len(stages)
        )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n}
    captured: dict[str, torch.Tensor] = {}
    for stage in calib.walk(linears):
        assert stage.replayed is replay
        rows: list[torch.Tensor] = []
        count = stage.capture(rows.append)
        captured[stage.names[0]] = torch.cat(rows)
        assert count == captured[stage.names[0]].shape[0]
        for name in stage.names:
            _prune_half(linears[name])

    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in captured}
    masks: list[torch.Tensor] = []
    handles = [
        linears[n].register_forward_pre_hook(lambda _m, args, n=n: recorded[n].append(args[0].detach()))
        for n in captured
    ]
    model.eval()
    with torch.no_grad():
        for batch in calib.batches():
            for side in ("query", "document"):
                masks.append(batch[side]["attention_mask"].reshape(-1).bool())
                model(**batch[side])
    for h in handles:
        h.remove()
    for name, rows in captured.items():
        by_hand = torch.cat(
            [r.reshape(-1, r.shape[-1])[m] for r, m in zip(recorded[name], masks, strict=True)]
        )
        assert torch.equal(rows, by_hand), name


def test_walk_falls_back_when_blocks_do_not_chain() -> None:
    torch.manual_seed(0)
    model = _Twice()
    data = torch.utils.data.TensorDataset(torch.randn(12, 6), torch.zeros(12, dtype=torch.long))
    from compressor.tasks import ClassificationTask

    calib = Calibration(model, data, ClassificationTask(), samples=12, batch_size=5)
    linears = {"blocks.0.0": model.blocks[0][0], "blocks.1.0": model.blocks[1][0]}
    stages = list(calib.walk(linears))
    assert [s.replayed for s in stages] == [False]  # both read x: one stage, by partial forward
    rows: list[torch.Tensor] = []
    stages[0].capture(rows.append)
    x = torch.cat([data.tensors[0][i : i + 1] for i in calib.indices])
    assert torch.equal(torch.cat(rows), x)


class _Stack(torch.nn.Module):
    """A chained stack of two blocks and a head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(2)
        )
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_walk_replays_the_stack_and_runs_the_head_by_partial_forward() -> None:
    torch.manual_seed(1)
    model = _Stack()
    data = torch.utils.data.TensorDataset(torch.randn(12, 6), torch.zeros(12, dtype=torch.long))
    from compressor.tasks import ClassificationTask

    calib = Calibration(model, data, ClassificationTask(), samples=12, batch_size=5)
    linears = {"blocks.0.0": model.blocks[0][0], "blocks.1.0": model.blocks[1][0], "head": model.head}
    captured, replayed = {}, []
    for stage in calib.walk(linears):
        rows: list[torch.Tensor] = []
        stage.capture(rows.append)
        captured[stage.names[0]] = torch.cat(rows)
        replayed.append(stage.replayed)
        for name in stage.names:
            _prune_half(linears[name])
    assert replayed == [True, True, False]
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: recorded[n].append(args[0]))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        for batch in calib.batches():
            model(batch[0])
    for h in handles:
        h.remove()
    for name in linears:
        assert torch.equal(captured[name], torch.cat(recorded[name])), name


def test_walk_replays_a_gpt2_decoder_whose_blocks_grow_a_cache() -> None:
    """GPT-2's blocks append to a key/value cache on every call: the cached inputs leave it out, so
    the blocks replay, and every stage's inputs equal those hooks record on the changed model."""
    pytest.importorskip("transformers")
    from compressor.data.code_text import VOCAB_SIZE
    from compressor.models.codelm import gpt2_lm
    from compressor.tasks import ModelLossTask

    torch.manual_seed(0)
    model = gpt2_lm(VOCAB_SIZE, 16, n_embd=32, n_layer=2, n_head=2, n_inner=64).eval()
    gen = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(0, 256, (16,), generator=gen)} for _ in range(12)]
    for row in data:
        row["labels"] = row["input_ids"].clone()
    calib = Calibration(model, data, ModelLossTask(), samples=12, batch_size=4)
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    captured: dict[str, torch.Tensor] = {}
    for stage in calib.walk(layers):
        assert stage.replayed
        rows: list[torch.Tensor] = []
        stage.capture(rows.append)
        captured[stage.names[0]] = torch.cat(rows)
        for name in stage.names:
            _prune_half(layers[name])
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in captured}
    handles = [
        layers[n].register_forward_pre_hook(
            lambda _m, a, n=n: recorded[n].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in captured
    ]
    with torch.no_grad():
        for batch in calib.batches():
            model(**batch)
    for h in handles:
        h.remove()
    assert len(captured) == 8
    for name, rows in captured.items():
        assert torch.equal(rows, torch.cat(recorded[name])), name
