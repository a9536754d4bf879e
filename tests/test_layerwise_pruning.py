"""SparseGPTPruning and WandaPruning on a tiny BERT sentence encoder: each layer's result equal to the
math on the statistic recorded by hand with forward hooks, per-layer targets and N:M exact, masks
kept through training, several steps along a schedule, joint pruning and quantization in one sweep,
and bad settings as recipe errors at their line."""

from __future__ import annotations

import copy
from pathlib import Path

import hf_tiny  # tests/ is on the path
import pytest
import torch

from compressor.core.quantized import read
from compressor.data import CodePairs
from compressor.lifecycle.session import Session
from compressor.mfac.sparsegpt import QuantSpec, sparsegpt_prune, wanda_mask
from compressor.models.pretrained import load_pretrained
from compressor.recipe import RecipeError, parse_recipe
from compressor.tasks.contrastive import ContrastiveTask
from modifiers.layerwise_pruning import SparseGPTPruning, WandaPruning
from modifiers.magnitude import ConstantPruning
from modifiers.quantization import Quantization

CALIBRATION = {"samples": 12, "batch_size": 5, "seed": 1}
QUERY = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, CodePairs]:
    train = CodePairs("train", limit=40)
    texts = [p[side] for p in train.pairs for side in ("query", "document")]
    directory: Path = hf_tiny.sentence_encoder_dir(tmp_path_factory.mktemp("tiny") / "encoder", texts)
    return load_pretrained(f"hf:{directory}"), train


def _session(model: torch.nn.Module, train: CodePairs, modifiers: list, lr: float = 0.0) -> Session:
    task = ContrastiveTask(max_length=32)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Session(modifiers, model, opt, steps_per_epoch=2, total_epochs=2, data=train, task=task)


def _first_layer_inputs(model: torch.nn.Module, train: CodePairs) -> torch.Tensor:
    """The real tokens' inputs of layer 0's query (both sides), recorded with a hook on the dense
    model over the calibration samples (layer 0 reads only the embeddings, which no pruner changes)."""
    from compressor.lifecycle.calibration import Calibration

    task = ContrastiveTask(max_length=32)
    task.prepare(model)
    calib = Calibration(model, train, task, samples=12, batch_size=5, seed=1)
    query = next(m for n, m in model.named_modules() if n.endswith(QUERY))
    rows: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    handle = query.register_forward_pre_hook(lambda _m, args: rows.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for batch in calib.batches():
            for side in ("query", "document"):
                masks.append(batch[side]["attention_mask"].reshape(-1).bool())
                model(**batch[side])
    handle.remove()
    return torch.cat([r.reshape(-1, r.shape[-1])[m] for r, m in zip(rows, masks, strict=True)]).double()


def _name(model: torch.nn.Module, suffix: str) -> str:
    return next(n for n, _ in model.named_parameters() if n.endswith(suffix))


def _param(model: torch.nn.Module, suffix: str) -> torch.Tensor:
    return dict(model.named_parameters())[_name(model, suffix)].detach()


def _linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p
        for n, p in model.named_parameters()
        if n.endswith(".weight") and ".encoder." in n and p.dim() == 2
    }


def test_sparsegpt_layer_equals_the_math_on_hand_recorded_h(encoder) -> None:
    dense, train = encoder
    model = copy.deepcopy(dense)
    x = _first_layer_inputs(copy.deepcopy(dense), train)
    pruner = SparseGPTPruning(
        params=[hf_tiny.ENCODER_LINEARS],
        final_sparsity=0.5,
        start=0,
        end=0,
        calibration=CALIBRATION,
        mask_block=16,
    )
    session = _session(model, train, [pruner])
    session.before_step()
    session.after_step()
    hessian = 2 * x.T @ x / x.shape[0]
    w0 = _param(dense, f"{QUERY}.weight")
    expected = sparsegpt_prune(w0, hessian, sparsity=0.5, damp=0.01, block_size=128, mask_block=16)
    got = _param(model, f"{QUERY}.weight")
    assert torch.allclose(got.double(), expected.weight, rtol=0, atol=1e-6)
    assert torch.equal(session.masks.mask(_name(model, f"{QUERY}.weight")).bool(), expected.mask)
    for name, w in _linears(model).items():  # every layer to the target, exactly (runs of 16 columns)
        assert int((w == 0).sum()) == w.numel() // 2, name
        assert torch.equal(session.masks.mask(name).bool(), w != 0), name


def test_nm_and_blocks_are_exact(encoder) -> None:
    dense, train = encoder
    for structure in ({"n": 2, "m": 4}, {"blocks": [1, 4]}):
        model = copy.deepcopy(dense)
        pruner = SparseGPTPruning(
            params=[hf_tiny.ENCODER_LINEARS],
            final_sparsity=0.5,
            structure=structure,
            start=0,
            end=0,
            calibration=CALIBRATION,
            mask_block=16,
        )
        session = _session(model, train, [pruner])
        session.before_step()
        for name, w in _linears(model).items():
            groups = (w.detach() != 0).reshape(w.shape[0], -1, 4).sum(-1)
            if "n" in structure:
                assert bool((groups == 2).all()), name  # 2 of every 4 kept
            else:
                assert bool(((groups == 0) | (groups == 4)).all()), name  # whole 1 x 4 tiles
                assert int((groups == 0).sum()) == groups.numel() // 2, name


def test_wanda_equals_the_math_and_keeps_masks_through_training(encoder) -> None:
    dense, train = encoder
    model = copy.deepcopy(dense)
    x = _first_layer_inputs(copy.deepcopy(dense), train)
    pruner = WandaPruning(
        params=[hf_tiny.ENCODER_LINEARS], final_sparsity=0.5, start=0, end=0, calibration=CALIBRATION
    )
    hold = ConstantPruning(params=[hf_tiny.ENCODER_LINEARS], start=0)
    session = _session(model, train, [pruner, hold], lr=0.1)
    w0 = _param(dense, f"{QUERY}.weight")
    session.before_step()
    expected = wanda_mask(w0, x.square().sum(0).sqrt(), sparsity=0.5)
    assert torch.equal(session.masks.mask(_name(model, f"{QUERY}.weight")).bool(), expected)
    got = _param(model, f"{QUERY}.weight")
    assert torch.equal(got, w0 * expected)  # no update of the kept weights
    for name, w in _linears(model).items():  # per output row
        assert bool(((w == 0).sum(1) == w.shape[1] // 2).all()), name
    session.after_step()
    zeros = {n: (w == 0).clone() for n, w in _linears(model).items()}
    task = session.task
    batch = task.to_device(task.collate([train[i] for i in range(8)]), torch.device("cpu"))
    for _ in range(3):  # training moves the kept weights; the zeros stay
        session.optimizer.zero_grad()
        task.loss(task.forward(model, batch), batch).backward()
        session.optimizer_step()
    for name, w in _linears(model).items():
        assert bool((w[zeros[name]] == 0).all()), name
    assert any(not torch.equal(w.detach(), dense.state_dict()[n]) for n, w in _linears(model).items())


def test_schedule_steps_prune_further_and_keep_earlier_zeros(encoder) -> None:
    dense, train = encoder
    model = copy.deepcopy(dense)
    pruner = SparseGPTPruning(
        params=[hf_tiny.ENCODER_LINEARS],
        init_sparsity=0.25,
        final_sparsity=0.5,
        schedule="linear",
        start=0,
        end=1,
        update_every=1,
        calibration=CALIBRATION,
        mask_block=16,
    )
    session = _session(model, train, [pruner])
    session.before_step()
    session.after_step()
    first = {n: (w == 0).clone() for n, w in _linears(model).items()}
    assert all(int(z.sum()) == z.numel() // 4 for z in first.values())
    session.before_step()
    session.after_step()
    session.before_step()  # step 2 = end: the second one-shot step
    for name, w in _linears(model).items():
        assert int((w == 0).sum()) == w.numel() // 2, name
        assert bool((w[first[name]] == 0).all()), name


def test_joint_pruning_and_quantization_is_one_sweep(encoder) -> None:
    dense, train = encoder
    model = copy.deepcopy(dense)
    x = _first_layer_inputs(copy.deepcopy(dense), train)
    pruner = SparseGPTPruning(
        params=[hf_tiny.ENCODER_LINEARS],
        final_sparsity=0.5,
        start=0,
        end=0,
        calibration=CALIBRATION,
        mask_block=16,
    )
    quant = Quantization(
        params=[hf_tiny.ENCODER_LINEARS], bits=4, group_size=16, start=0, end=0, calibration=CALIBRATION
    )
    session = _session(model, train, [pruner, quant])
    session.before_step()
    session.after_step()
    hessian = 2 * x.T @ x / x.shape[0]
    w0 = _param(dense, f"{QUERY}.weight")
    expected = sparsegpt_prune(w0, hessian, sparsity=0.5, mask_block=16, quantize=QuantSpec(4, True, 16))
    record = read(model, _name(model, f"{QUERY}.weight"), 16)
    assert expected.quantized is not None
    assert torch.equal(record.codes, expected.quantized.codes)
    for name, w in _linears(model).items():
        record = read(model, name, 16)
        assert torch.equal(w.detach(), record.dequantize().to(w.dtype)), name  # on the grid
        pruned = ~session.masks.mask(name).bool()
        assert int(pruned.sum()) == w.numel() // 2 and bool((w[pruned] == 0).all()), name


def test_pruner_listed_after_its_quantization_is_refused(encoder) -> None:
    dense, train = encoder
    pruner = SparseGPTPruning(params=[hf_tiny.ENCODER_LINEARS], final_sparsity=0.5, start=0, end=0)
    quant = Quantization(params=[hf_tiny.ENCODER_LINEARS], bits=8, start=0, end=0)
    session = _session(copy.deepcopy(dense), train, [quant, pruner])
    with pytest.raises(ValueError, match="list it before Quantization"):
        session.before_step()


RECIPE = """version: 1
modifiers:
  - type: {kind}
    params: ["a.weight"]
    final_sparsity: 0.5
    structure: {structure}
    start: 0
    end: 0
"""


@pytest.mark.parametrize(
    ("kind", "structure", "message"),
    [
        ("SparseGPTPruning", "channels", "prunes 'unstructured'"),
        ("WandaPruning", "{blocks: [1, 4]}", "prunes 'unstructured' or {n: N, m: M}"),
        ("SparseGPTPruning", "{blocks: [3, 4]}", "must divide a.weight"),
    ],
)
def test_bad_settings_are_recipe_errors_at_their_line(kind: str, structure: str, message: str) -> None:
    shapes = {"a.weight": (16, 64)}
    with pytest.raises(RecipeError) as error:
        parse_recipe(RECIPE.format(kind=kind, structure=structure), "r.yaml", param_names=shapes)
    assert "r.yaml:6:" in str(error.value) and message in str(error.value)
    recipe = RECIPE.format(kind=kind, structure="unstructured")
    assert parse_recipe(recipe, "r.yaml", param_names=shapes).modifiers[0].type == kind
    with pytest.raises(RecipeError) as ranking:
        parse_recipe(recipe + "    global_ranking: true\n", "r.yaml", param_names=shapes)
    assert "r.yaml:9:" in str(ranking.value)


def test_gpt2_conv1d_layers_are_pruned_along_their_inputs() -> None:
    """GPT-2's Conv1D stores W as (in, out): SparseGPT and Wanda take its transpose, so the first
    block's c_attn equals the math on the transposed weight with H of its inputs recorded by hand,
    and 2:4 ("2:4" written as text) groups run along the inputs (dim 0 of the stored weight)."""
    pytest.importorskip("transformers")
    from compressor.data.code_text import VOCAB_SIZE
    from compressor.models.codelm import gpt2_lm
    from compressor.tasks import ModelLossTask

    torch.manual_seed(0)
    dense = gpt2_lm(VOCAB_SIZE, 16, n_embd=32, n_layer=2, n_head=2, n_inner=64).eval()
    gen = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(0, 256, (16,), generator=gen)} for _ in range(12)]
    for row in data:
        row["labels"] = row["input_ids"].clone()
    pattern = r"re:transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)\.weight"
    calibration = {"samples": 12, "batch_size": 4, "seed": 0}
    rows: list[torch.Tensor] = []
    ln = copy.deepcopy(dense)
    handle = ln.transformer.h[0].attn.c_attn.register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].detach())
    )
    with torch.no_grad():
        for row in data:
            ln(input_ids=row["input_ids"][None])
    handle.remove()
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    w0 = dense.transformer.h[0].attn.c_attn.weight.detach().clone()
    for kind, structure in (
        (SparseGPTPruning, "unstructured"),
        (SparseGPTPruning, "2:4"),
        (WandaPruning, "2:4"),
    ):
        model = copy.deepcopy(dense)
        pruner = kind(
            params=[pattern], final_sparsity=0.5, structure=structure, start=0, end=0, calibration=calibration
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        session = Session([pruner], model, opt, steps_per_epoch=1, data=data, task=ModelLossTask())
        session.before_step()
        session.after_step()
        got = model.transformer.h[0].attn.c_attn.weight.detach()
        if kind is SparseGPTPruning and structure == "unstructured":
            expected = sparsegpt_prune(w0.T, 2 * x.T @ x / x.shape[0], sparsity=0.5)
            assert torch.allclose(got.T.double(), expected.weight, rtol=0, atol=1e-6)
        for name in pruner.names:
            w = dict(model.named_parameters())[name].detach()
            if structure == "2:4":  # (in, out): groups of 4 consecutive inputs of each output
                assert bool(((w.T != 0).reshape(w.shape[1], -1, 4).sum(-1) == 2).all()), name
            else:
                assert int((w == 0).sum()) == w.numel() // 2, name
        assert not torch.equal(model.transformer.wte.weight, torch.zeros_like(model.transformer.wte.weight))
        assert torch.equal(model.transformer.wte.weight, dense.transformer.wte.weight)  # tied head untouched
