"""The Quantization modifier: codes on the grid, masks kept, the calibration curvature equal to
2 X X^T of inputs recorded by hand, stages, fine-tuning on the grid, bit-exact resume, fallbacks and
recipe errors at their line."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import pytest
import torch
from conftest import SESSION_SEED
from torch import nn

from compressor.core.quantized import pop_records, read
from compressor.lifecycle import quantize_layers
from compressor.lifecycle.calibration import Calibration
from compressor.lifecycle.session import Session
from compressor.mfac import gptq
from compressor.mfac.grid import dynamic_quantize
from compressor.recipe import RecipeError, parse_recipe
from compressor.tasks import ClassificationTask
from modifiers.magnitude import MagnitudePruning
from modifiers.quantization import Quantization


class Net(nn.Module):
    """Embedding-free MLP with a shared-input pair (``a`` and ``b`` read the same tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.head(torch.tanh(self.a(h)) * torch.sigmoid(self.b(h)))


def _data(n: int = 256, seed: int = SESSION_SEED) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen) @ torch.randn(32, 32, generator=gen)  # correlated inputs
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def _session(model: nn.Module, modifiers: list, data=None, epochs: float = 1.0, lr: float = 0.0) -> Session:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Session(modifiers, model, opt, steps_per_epoch=4, total_epochs=epochs, data=data or _data())


def _train(session: Session, steps: int, data=None, offset: int = 0) -> None:
    x, y = (data or _data()).tensors
    for i in range(offset, offset + steps):
        rows = slice((i % 4) * 64, (i % 4 + 1) * 64)
        session.optimizer.zero_grad()
        nn.functional.cross_entropy(session.model(x[rows]), y[rows]).backward()
        session.optimizer_step()


WEIGHTS = ["first.weight", "a.weight", "b.weight", "head.weight"]


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 8, "method": "rtn"},
        {"bits": 8, "method": "rtn", "reduce_range": False},
        {"bits": 8, "symmetric": False, "method": "gptq"},
        {"bits": 4, "group_size": 16, "method": "gptq", "act_order": True},
        {
            "bits": 4,
            "group_size": 16,
            "method": "gptq",
            "curvature": "fisher",
            "fisher": {"num_grads": 16, "block_size": 8},
        },
    ],
)
def test_one_shot_weights_are_their_codes(settings: dict) -> None:
    torch.manual_seed(SESSION_SEED)
    model = Net()
    session = _session(
        model, [Quantization(params=WEIGHTS[:3], end=0, calibration={"samples": 64}, **settings)]
    )
    session.before_step()
    session.after_step()
    full = settings.get("reduce_range") is False
    lo, hi = ((-128, 127) if full else (-64, 64)) if settings["bits"] == 8 else (0, 15)
    for name in WEIGHTS[:3]:
        record = read(model, name, settings.get("group_size"))
        assert torch.equal(record.dequantize(), dict(model.named_parameters())[name].detach())
        assert lo <= int(record.codes.min()) and int(record.codes.max()) <= hi
        assert record.scales.gt(0).all()
        if settings["bits"] == 8 and settings.get(
            "symmetric", True
        ):  # each row's largest |w| is the top code
            assert torch.equal(
                record.codes.abs().amax(dim=1), torch.full((record.shape[0],), hi, dtype=torch.int8)
            )
    untouched = read(model, "head.weight", None) if hasattr(model.head, "weight_qscale") else None
    assert untouched is None  # not selected: no buffers


def test_masks_are_kept_and_pruned_weights_stay_zero() -> None:
    torch.manual_seed(SESSION_SEED)
    model = Net()
    prune = MagnitudePruning(params=WEIGHTS[:3], final_sparsity=0.5, start=0, end=0, global_ranking=False)
    quant = Quantization(params=WEIGHTS[:3], bits=4, group_size=16, end=0, calibration={"samples": 64})
    session = _session(model, [prune, quant], lr=0.05)
    _train(session, 3)
    for name in WEIGHTS[:3]:
        mask = session.masks.mask(name)
        weight = dict(model.named_parameters())[name].detach()
        assert 0.45 < 1 - mask.float().mean() < 0.55
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
        record = read(model, name, 16)
        assert torch.equal(record.dequantize(), weight)  # held on the grid after training steps
        zero = record.expanded()[1]
        assert torch.equal(record.codes[~mask], zero[~mask])


def test_calibration_curvature_is_2xxt_of_inputs_recorded_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer's H equals 2 X X^T / n of its inputs in the model as it is when that layer is
    quantized (the layers before it quantized already), recorded with plain forward hooks; the layers
    that read one tensor (a, b) share one H."""
    torch.manual_seed(SESSION_SEED)
    model = Net()
    seen: list[torch.Tensor] = []
    real = gptq.gptq_quantize

    def spy(w, hessian, **kw):
        seen.append(hessian.clone())
        return real(w, hessian, **kw)

    monkeypatch.setattr(quantize_layers, "gptq_quantize", spy)
    quant = Quantization(
        params=WEIGHTS, bits=4, group_size=16, end=0, calibration={"samples": 96, "batch_size": 40}
    )
    session = _session(model, [quant])
    session.before_step()
    session.after_step()
    assert len(seen) == 4
    assert torch.equal(seen[1], seen[2])  # a and b: one stage, one H

    calib = Calibration(model, _data(), ClassificationTask(), samples=96, batch_size=40, seed=0)
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in ("first", "a", "head")}
    handles = [
        getattr(model, n).register_forward_pre_hook(
            lambda _m, args, n=n: recorded[n].append(args[0].detach())
        )
        for n in recorded
    ]
    x = _data().tensors[0]
    with torch.no_grad():
        for start in range(0, 96, 40):
            model(x[calib.indices[start : start + 40]])
    for h in handles:
        h.remove()
    for name, h in zip(("first", "a", "head"), (seen[0], seen[1], seen[3]), strict=True):
        xs = torch.cat(recorded[name]).to(torch.float64)
        by_hand = 2 * xs.T @ xs / xs.shape[0]
        assert torch.allclose(h, by_hand, rtol=1e-10, atol=1e-12), name


def test_fine_tuning_stays_on_the_grid_and_resumes_bit_exactly() -> None:
    torch.manual_seed(SESSION_SEED)
    base = Net()

    def build(model: nn.Module) -> tuple[Session, Quantization]:
        quant = Quantization(params=WEIGHTS[:3], bits=4, group_size=16, method="rtn", start=0, end=None)
        return _session(model, [quant], epochs=2.0, lr=0.2), quant

    straight = copy.deepcopy(base)
    session, _ = build(straight)
    _train(session, 1)
    early = read(straight, "a.weight", 16).codes.clone()
    latent_early = straight.a.weight_qlatent.clone()
    _train(session, 7, offset=1)
    assert not torch.equal(read(straight, "a.weight", 16).codes, early)  # the codes follow the latent weights
    assert not torch.equal(straight.a.weight_qlatent, latent_early)
    for name in WEIGHTS[:3]:
        record = read(straight, name, 16)
        assert torch.equal(record.dequantize(), dict(straight.named_parameters())[name].detach())

    first = copy.deepcopy(base)
    session, _ = build(first)
    _train(session, 3)
    state = {
        "model": copy.deepcopy(first.state_dict()),
        "opt": copy.deepcopy(session.optimizer.state_dict()),
        "session": copy.deepcopy(session.state_dict()),
    }
    resumed = copy.deepcopy(base)
    again, _ = build(resumed)  # the session registers the buffers the checkpoint fills
    resumed.load_state_dict(state["model"])
    again.optimizer.load_state_dict(state["opt"])
    again.load_state_dict(state["session"])
    _train(again, 5, offset=3)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_auto_fallback_keeps_the_layers_that_lose_most_to_int8_activations() -> None:
    torch.manual_seed(SESSION_SEED)
    model = Net()
    dense = copy.deepcopy(model)
    quant = Quantization(
        params=WEIGHTS, bits=8, method="rtn", auto_fallback=1, end=0, calibration={"samples": 64}
    )
    session = _session(model, [quant])
    session.before_step()
    session.after_step()
    calib = Calibration(dense, _data(), ClassificationTask(), samples=64, batch_size=16, seed=0)
    errors = {}
    for name in ("first", "a", "b", "head"):
        module = getattr(dense, name)
        xs: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda _m, args, xs=xs: xs.append(args[0].detach()))
        with torch.no_grad():
            for call in calib.calls():
                call()
        handle.remove()
        w = module.weight.detach()
        num = sum(float(((x - dynamic_quantize(x)) @ w.T).square().sum()) for x in xs)
        den = sum(float((x @ w.T).square().sum()) for x in xs)
        errors[name] = num / den
    worst = max(errors, key=errors.__getitem__)
    assert quant.state_dict()["kept_float"] == [f"{worst}.weight"]
    kept = getattr(model, worst).weight
    assert torch.equal(kept, getattr(dense, worst).weight)
    records = pop_records(dict(model.state_dict()))
    assert f"{worst}.weight" not in records and len(records) == 3


RECIPE = """\
version: 1
modifiers:
  - type: Quantization
    params: [a.weight]
    bits: {bits}
    group_size: {group}
"""


def test_bad_settings_are_recipe_errors_at_their_line() -> None:
    shapes = {n: tuple(p.shape) for n, p in Net().named_parameters()}
    with pytest.raises(RecipeError) as bits:
        parse_recipe(RECIPE.format(bits=3, group="null"), "r.yaml", param_names=shapes)
    assert "r.yaml:5:" in str(bits.value) and "bits" in str(bits.value)
    with pytest.raises(RecipeError) as group:
        parse_recipe(RECIPE.format(bits=4, group=24), "r.yaml", param_names=shapes)
    assert "r.yaml:6:" in str(group.value) and "does not divide the 64 inputs of a.weight" in str(group.value)
    with pytest.raises(RecipeError) as nothing:
        parse_recipe(
            RECIPE.format(bits=4, group=16).replace("a.weight", "nothing.weight"),
            "r.yaml",
            param_names=shapes,
        )
    assert "r.yaml:4:" in str(nothing.value)
    assert parse_recipe(RECIPE.format(bits=4, group=16), "r.yaml", param_names=shapes).modifiers[0].bits == 4


def test_session_refuses_what_it_cannot_quantize(tmp_path: Path) -> None:
    model = Net()
    with pytest.raises(ValueError, match="does not divide"):
        _session(model, [Quantization(params=["a.weight"], bits=4, group_size=24)]).initialize()
    with pytest.raises(ValueError, match="only 2-D"):
        _session(Net(), [Quantization(params=["a.bias"], method="rtn")]).initialize()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="calibration data"):
        Session([Quantization(params=["a.weight"])], Net(), opt, steps_per_epoch=1).initialize()


def test_the_memory_preflight_names_one_layers_curvature(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ holds one layer's H (widest input: 64 here) at a time; the Fisher curvature d * B sums;
    the preflight says which, and stops a run that cannot fit."""
    from compressor.core import preflight as memory
    from compressor.core.preflight import PreflightError
    from compressor.engine.setup import preflight_gradients

    quant = Quantization(params=WEIGHTS[:3])
    shapes = {n: tuple(p.shape) for n, p in Net().named_parameters() if n in WEIGHTS[:3]}
    assert quant.memory_estimate(shapes) == (2 * 8 * 64 * 64, "one layer's H at a time (64 x 64 float64)")
    fisher = Quantization(params=WEIGHTS[:3], curvature="fisher", fisher={"block_size": 16})
    d = 32 * 64 + 2 * 64 * 32
    assert fisher.memory_estimate(shapes)[0] == d * 16 * 8 + 16 * d * 4
    assert Quantization(params=WEIGHTS[:3], method="rtn").memory_estimate(shapes)[0] == 0

    recipe = types.SimpleNamespace(modifiers=[quant])
    session = _session(Net(), [quant])
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    with pytest.raises(PreflightError, match=r"one layer's H at a time \(64 x 64 float64\), needs about"):
        preflight_gradients(recipe, session)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    preflight_gradients(recipe, session)


def test_smoothing_keeps_the_function_and_moves_outliers_into_the_weights() -> None:
    """SmoothQuant: with the input factors 1/s and the columns times s, the float model computes the
    same outputs (before rounding); an outlier input channel shrinks; a and b share one s."""
    torch.manual_seed(SESSION_SEED)
    model = Net()
    with torch.no_grad():
        model.first.weight[5] *= 40.0  # hidden channel 5 becomes an activation outlier for a and b
    x = _data().tensors[0][:64]
    before = model(x).detach()
    quant = Quantization(params=WEIGHTS, bits=8, smoothing=0.5, end=0, calibration={"samples": 128})
    session = _session(model, [quant])
    session.initialize()
    calib = Calibration(model, _data(), ClassificationTask(), samples=128, batch_size=16, seed=0)
    factors = quantize_layers.smooth(model, WEIGHTS, calib, 0.5)
    assert torch.allclose(model(x).detach(), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(factors["a.weight"], factors["b.weight"])
    assert float(factors["a.weight"][5]) < 0.5 * float(factors["a.weight"].median())  # the outlier shrinks
    assert torch.equal(model.a.weight_qsmooth, factors["a.weight"])


def test_smoothed_int8_checkpoint_exports_with_its_input_factors(tmp_path: Path) -> None:
    """A run with smoothing: the exported graph multiplies each smoothed input by its factors and
    onnxruntime agrees with the model."""
    from compressor.engine import run
    from exporters.export import export_checkpoint

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\ntrain:\n  model: digits-mlp\n  data: digits\n  epochs: 1\n  batch_size: 64\n"
        "  optimizer: {type: SGD, lr: 0.1}\nmodifiers:\n  - type: Quantization\n"
        "    params: [fc1.weight, fc2.weight]\n    smoothing: 0.5\n    calibration: {samples: 64}\n"
        "    start: 1\n"
    )
    run(recipe, tmp_path / "run", progress=False)
    report = export_checkpoint(tmp_path / "run" / "checkpoint.pt", samples=50)
    assert report.passed and report.quantization is not None and report.quantization.tensors == 2
    import onnx

    graph = onnx.load(report.output).graph
    consumers = {i for n in graph.node if n.op_type == "DynamicQuantizeMatMul" for i in n.input[:1]}
    products = {n.output[0] for n in graph.node if n.op_type == "Mul"}
    assert consumers and consumers <= products  # every integer product reads a smoothed input
