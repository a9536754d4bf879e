"""StructuredPruning and compressor.surgery.channels: channel removal, its scores, resume and export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from compressor import engine
from compressor.cli import app
from compressor.core import registry
from compressor.core.checkpoint import load_checkpoint
from compressor.core.params import normalize
from compressor.data import load_data
from compressor.engine import checkpoints
from compressor.lifecycle.session import Session
from compressor.mfac import FisherInverse
from compressor.models import build_model
from compressor.recipe import load_recipe
from compressor.surgery.channels import SurgeryError, dependency_graph, match_shapes
from compressor.surgery.importance import GroupOBSImportance, group_coordinates
from modifiers.channel_pruning import StructuredPruning
from modifiers.magnitude import MagnitudePruning

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mnist_channels_50.yaml"
LAYERS = ["conv1.weight", "conv2.weight", "fc1.weight"]
ce = nn.functional.cross_entropy


@pytest.fixture(autouse=True, scope="module")
def _setup():
    """Register the modifier (until pyproject declares it) and use one thread (tiny models, shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry.register("modifiers", "StructuredPruning", StructuredPruning)
    yield
    registry.unregister("modifiers", "StructuredPruning")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """digits-cnn trained 6 epochs (about a second)."""
    torch.manual_seed(0)
    model = build_model("digits-cnn", digits.input_shape, digits.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(digits.train, batch_size=64, shuffle=True)
    for _ in range(6):
        for x, y in loader:
            opt.zero_grad()
            ce(model(x), y).backward()
            opt.step()
    return model


def _prune(model, data, extra=(), optimizer=None, **settings):
    """Prune ``model`` in place at step 0 through a Session; returns (session, modifier)."""
    settings = {"params": LAYERS, "channel_sparsity": 0.5, **settings}
    modifier = StructuredPruning(type="StructuredPruning", **settings)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session = Session([*extra, modifier], model, optimizer, steps_per_epoch=10, data=data)
    session.before_step()
    return session, modifier


@torch.no_grad()
def _accuracy(model, data):
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def test_channels_are_removed_and_the_classifier_keeps_its_outputs(trained, digits):
    model = copy.deepcopy(trained)
    before = sum(p.numel() for p in model.parameters())
    x = digits.test.tensors[0][:5]
    session, modifier = _prune(model, digits.train, importance="magnitude")
    assert (model.conv1.out_channels, model.conv2.in_channels, model.conv2.out_channels) == (4, 4, 8)
    assert (model.bn1.num_features, model.bn2.num_features) == (4, 8)
    assert (model.fc1.in_features, model.fc1.out_features) == (8 * 2 * 2, 32)
    assert (model.fc2.in_features, model.fc2.out_features) == (32, 10)
    assert model.bn2.running_mean.shape == (8,) and model.conv2.weight.shape == (8, 4, 3, 3)
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.4 * before
    assert model(x).shape == (5, 10)
    assert {k: len(v) for k, v in modifier.removed.items()} == {"conv1": 4, "conv2": 8, "fc1": 32}
    # the session follows: params, and an optimizer over the new tensors with a fresh state
    assert all(session.params[normalize(n)] is p for n, p in model.named_parameters())
    opt_params = [p for g in session.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for p in model.parameters()}
    assert session.optimizer is session.base_optimizer and not session.optimizer.state
    assert session.optimizer.param_groups[0]["lr"] == 0.05
    loss = ce(model(x), digits.test.tensors[1][:5])
    loss.backward()
    session.optimizer.step()  # trains on


def test_a_user_loop_without_data_and_a_rebuilt_mfac_optimizer(trained, digits):
    """No data given: the input of the loop's last forward is used for tracing. MFAC (window size fixed at
    construction) is rebuilt over the smaller parameters with every setting it was built with, in place:
    the object the loop holds (wrapped, with an LR scheduler) trains on."""
    from compressor.mfac import MFAC

    model = copy.deepcopy(trained)
    optimizer = MFAC(model.parameters(), lr=1e-3, num_grads=8, damp=1e-4, momentum=0.5, count_scaling=True)
    modifier = StructuredPruning(
        type="StructuredPruning",
        params=LAYERS,
        channel_sparsity=0.5,
        importance="magnitude",
        start={"step": 1},
    )
    session = Session([modifier], model, optimizer, steps_per_epoch=10)
    wrapped = session.wrap(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=1, gamma=0.5)
    x, y = digits.train.tensors[0][:32], digits.train.tensors[1][:32]
    for _ in range(3):
        wrapped.zero_grad()
        ce(model(x), y).backward()
        wrapped.step()
        scheduler.step()
    assert model.conv2.out_channels == 8 and session.step == 3
    assert session.optimizer is optimizer is session.base_optimizer
    assert optimizer.window.dim == sum(p.numel() for p in model.parameters())
    assert (optimizer.num_grads, optimizer.damp, optimizer.param_groups[0]["momentum"]) == (8, 1e-4, 0.5)
    assert optimizer.window.count_scaling and optimizer.constructor_kwargs()["count_scaling"]
    assert optimizer.window.count == 2  # rebuilt at step 1, then steps 1 and 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 8)  # the scheduler drives it on


def test_a_rebuilt_mfac_keeps_its_masks(trained, digits):
    """MFAC's masks follow the surgery: the session's mask where the session masks the parameter, the
    given tensor where the shape did not change; a mask that no longer fits is refused."""
    from compressor.mfac import MFAC

    model = copy.deepcopy(trained)
    bias_mask = torch.rand(model.fc2.bias.shape) > 0.5
    own = {model.fc2.weight: torch.ones_like(model.fc2.weight, dtype=torch.bool), model.fc2.bias: bias_mask}
    optimizer = MFAC(model.parameters(), lr=1e-3, num_grads=4, masks=own)
    magnitude = MagnitudePruning(
        type="MagnitudePruning", params=["fc2.weight"], final_sparsity=0.5, start=0, end=0
    )
    session, _ = _prune(model, digits.train, extra=[magnitude], importance="magnitude", optimizer=optimizer)
    masks = optimizer.constructor_kwargs()["masks"]
    assert masks[model.fc2.weight] is session.masks.mask("fc2.weight") and masks[model.fc2.bias] is bias_mask
    assert model.fc2.weight.shape == (10, 32)
    kept = int(session.masks.mask("fc2.weight").sum()) + int(bias_mask.sum())
    assert optimizer.window.dim == sum(p.numel() for p in model.parameters()) - 10 * 32 - 10 + kept

    model = copy.deepcopy(trained)
    stale = {model.conv2.weight: torch.ones_like(model.conv2.weight, dtype=torch.bool)}
    optimizer = MFAC(model.parameters(), lr=1e-3, num_grads=4, masks=stale)
    with pytest.raises(SurgeryError, match=r"its 'masks' holds a tensor of shape \(16, 8, 3, 3\) for conv2"):
        _prune(model, digits.train, importance="magnitude", optimizer=optimizer)


class Nudge(torch.optim.Optimizer):
    """p -= lr * scale * grad; ``scale`` is a per-group setting (in defaults), ``clip`` is not."""

    def __init__(self, params, lr=0.1, scale=1.0, *, clip=None):
        super().__init__(params, {"lr": lr, "scale": scale})
        self._clip = clip  # kept under another name: only constructor_kwargs() can say what it was

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * group["scale"])


class ToldNudge(Nudge):
    """Nudge that says how it was built."""

    def constructor_kwargs(self):
        return {"clip": self._clip}


def test_a_custom_optimizer_is_rebuilt_with_its_settings_or_refused(trained, digits):
    model = copy.deepcopy(trained)
    optimizer = ToldNudge(model.parameters(), lr=0.2, scale=3.0, clip=0.5)
    optimizer.param_groups[0]["scale"] = 4.0  # a group's own setting, changed after construction
    session, _ = _prune(model, digits.train, importance="magnitude", optimizer=optimizer)
    assert session.optimizer is optimizer and optimizer._clip == 0.5
    assert optimizer.defaults == {"lr": 0.2, "scale": 3.0}
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["scale"]) == (0.2, 4.0)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.parameters()}

    model = copy.deepcopy(trained)
    optimizer = Nudge(model.parameters(), lr=0.2, clip=0.5)
    with pytest.raises(SurgeryError, match=r"cannot rebuild Nudge .* constructor argument\(s\) 'clip'"):
        _prune(model, digits.train, importance="magnitude", optimizer=optimizer)


def test_a_run_refuses_an_optimizer_it_could_not_rebuild_before_training(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        SMALL.replace("{type: SGD, lr: 0.05, momentum: 0.9}", "{type: Nudge, lr: 0.05, clip: 0.5}")
    )
    registry.register("optimizers", "Nudge", Nudge)
    try:
        with pytest.raises(SurgeryError, match="cannot rebuild Nudge"):
            engine.run(recipe, tmp_path / "out", progress=False)
    finally:
        registry.unregister("optimizers", "Nudge")
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_the_classifier_cannot_be_selected(trained, digits):
    with pytest.raises(ValueError, match="fc2 produces the model's output"):
        _prune(copy.deepcopy(trained), digits.train, params=["fc1.weight", "fc2.weight"])
    with pytest.raises(ValueError, match="not the weight of a Conv or Linear"):
        _prune(copy.deepcopy(trained), digits.train, params=["bn1.weight"])


class _TwoUnits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_magnitude_and_second_order_pick_different_channels():
    """Unit 0 has large weights on an input that is always 0 (useless); unit 1 small ones on the
    feature that decides the class. Magnitude drops unit 1, second order drops unit 0."""
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(512, generator=gen)
    x = torch.stack([torch.zeros(512), feature], dim=1)
    data = TensorDataset(x, (feature > 0).long())
    picks, accuracy = {}, {}
    for importance in ("magnitude", "second_order"):
        model = _TwoUnits()
        with torch.no_grad():
            model.fc1.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.5]]))
            model.fc1.bias.zero_()
            model.fc2.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            model.fc2.bias.zero_()
        _, modifier = _prune(model, data, params=["fc1.weight"], importance=importance)
        picks[importance] = modifier.removed["fc1"]
        accuracy[importance] = _accuracy(model, data)
    assert picks == {"magnitude": [1], "second_order": [0]}
    assert accuracy["second_order"] > 0.95 > 0.6 > accuracy["magnitude"]


def test_group_saliency_matches_fisher_inverse_submatrices(trained, digits):
    """The m x m form equals w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 from FisherInverse, block per parameter."""
    model = copy.deepcopy(trained)
    session = Session(
        [], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1, data=digits.train
    )
    graph = dependency_graph(model, digits.train.tensors[0][:1])
    import torch_pruning as tp

    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(8)))
    damp, m = 1e-3, 16
    for scope in (True, False):
        obs = GroupOBSImportance(session.sampler, m, 16, damp, key=7, consumers_only=scope)
        saliency = obs(group)
        coords = group_coordinates(group, consumers_only=scope)
        names = {id(p): normalize(n) for n, p in model.named_parameters()}
        grads = session.sampler.sample([names[id(p)] for p, _, _ in coords], m, 16, key=7).double()
        expected = torch.zeros(8, dtype=torch.float64)
        offset = 0
        for param, root_of, _ in coords:
            g = grads[:, offset : offset + param.numel()]
            offset += param.numel()
            fi = FisherInverse(g, damp)
            w = param.detach().reshape(-1).double()
            for c in range(8):
                q = torch.nonzero(root_of == c).reshape(-1)
                if len(q):
                    sub = fi.submatrices(q.unsqueeze(0))[0]
                    expected[c] += w[q] @ torch.linalg.solve(sub, w[q]) / 2
        torch.testing.assert_close(saliency, expected, rtol=1e-5, atol=0)


def test_relative_damp_is_the_mean_fisher_diagonal_and_scale_free(trained, digits):
    """lambda = damp * mean(diag(G^T G / m)) over the unmasked coordinates of all the layer's blocks
    (MFACPruning's definition); gradients x1000 give saliencies x1e6, the same channels and the
    same OBS update of the weights."""
    import torch_pruning as tp

    damp, m = 0.5, 16
    runs = []
    for scale in (1.0, 1000.0):
        model = copy.deepcopy(trained)
        session = Session(
            [], model, torch.optim.SGD(model.parameters(), lr=0.1), steps_per_epoch=1, data=digits.train
        )
        inner = session.sampler.sample
        session.sampler.sample = lambda *a, _inner=inner, _s=scale, **k: _inner(*a, **k) * _s
        graph = dependency_graph(model, digits.train.tensors[0][:1])
        group = graph.get_pruning_group(model.conv2, tp.prune_conv_out_channels, idxs=list(range(16)))
        obs = GroupOBSImportance(session.sampler, m, 16, damp, key=3, relative=True, consumers_only=False)
        saliency = obs(group)
        coords = group_coordinates(group)
        names = {id(p): normalize(n) for n, p in model.named_parameters()}
        grads = session.sampler.sample([names[id(p)] for p, _, _ in coords], m, 16, key=3).double()
        alive = torch.cat([a for _, _, a in coords])
        assert obs._lambda == pytest.approx(damp * float(grads[:, alive].square().mean()), rel=1e-6)
        removed = sorted(torch.argsort(saliency)[:8].tolist())
        obs.update(removed)
        runs.append((saliency, removed, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (small, removed_small, after_small), (large, removed_large, after_large) = runs
    torch.testing.assert_close(large, small * 1e6, rtol=1e-4, atol=0)
    assert removed_small == removed_large
    for name, value in after_small.items():
        torch.testing.assert_close(after_large[name], value, rtol=1e-4, atol=1e-6)


def test_second_order_one_shot_beats_magnitude(trained, digits):
    """Measured: 50% of conv1/conv2/fc1 channels, no fine-tuning (digits-cnn: ~0.9 vs ~0.5 over seeds)."""
    dense = _accuracy(trained, digits.test)
    accuracy = {}
    for importance in ("magnitude", "second_order"):
        model = copy.deepcopy(trained)
        _prune(model, digits.train, importance=importance)
        accuracy[importance] = _accuracy(model, digits.test)
    assert dense > 0.95
    print(f"one-shot accuracy: dense {dense:.3f}, {accuracy}")
    assert accuracy["second_order"] >= accuracy["magnitude"] + 0.1, accuracy


def test_masks_of_other_pruners_shrink_with_their_parameters(trained, digits):
    model = copy.deepcopy(trained)
    magnitude = MagnitudePruning(
        type="MagnitudePruning", params=["conv2.weight", "fc1.weight"], final_sparsity=0.5, start=0, end=0
    )
    session, _ = _prune(model, digits.train, extra=[magnitude], importance="magnitude")
    for name in ("conv2.weight", "fc1.weight"):
        mask, param = session.masks.mask(name), session.params[name]
        assert mask.shape == param.shape
        assert torch.equal(param[~mask], torch.zeros_like(param[~mask]))
        assert 0.3 < session.masks.sparsity(name) < 0.7
    assert model.conv2.weight_mask.shape == (8, 4, 3, 3)
    model(digits.test.tensors[0][:2]).sum().backward()
    assert torch.equal(
        model.fc1.weight.grad[~model.fc1.weight_mask], torch.zeros(int((~model.fc1.weight_mask).sum()))
    )


def test_match_shapes_round_trip(trained, digits):
    model = copy.deepcopy(trained)
    _prune(model, digits.train, importance="magnitude")
    state = copy.deepcopy(model.state_dict())
    fresh = build_model("digits-cnn", digits.input_shape, digits.num_classes, seed=3)
    example = digits.train.tensors[0][:1]
    assert match_shapes(fresh, state, example) is True
    fresh.load_state_dict(state)
    x = digits.test.tensors[0][:16]
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    assert match_shapes(fresh, state, example) is False
    dense = build_model("digits-cnn", digits.input_shape, digits.num_classes).state_dict()
    with pytest.raises(ValueError, match="channels can only be removed"):
        match_shapes(fresh, dense, example)
    with pytest.raises(ValueError, match="cannot match shapes"):
        match_shapes(fresh, {**state, "conv1.weight": torch.zeros(4, 2, 3, 3)}, example)


SMALL = """
version: 1
train:
  model: digits-cnn
  data: digits
  epochs: 4
  batch_size: 64
  optimizer: {type: SGD, lr: 0.05, momentum: 0.9}
modifiers:
  - type: MagnitudePruning
    params: [fc1.weight]
    start: 1
    end: 1
    final_sparsity: 0.5
  - type: StructuredPruning
    params: [conv1.weight, conv2.weight, fc1.weight]
    start: 2
    channel_sparsity: 0.5
    num_grads: 16
"""


def test_a_structured_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMALL)
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
    cut_state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert cut_state["model"]["conv2.weight"].shape == (8, 4, 3, 3)  # already pruned: a smaller model
    resumed = engine.run(None, tmp_path / "cut", resume=True, progress=False)
    assert resumed["eval"] == whole["eval"]
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["fc1.weight_mask"].shape == (32, 32)


def test_recipe_validates():
    assert CliRunner().invoke(app, ["validate", str(RECIPE)]).exit_code == 0
    recipe = load_recipe(RECIPE)
    data = load_data(recipe.train.data)
    model = build_model(recipe.train.model, data.input_shape, data.num_classes)
    loaded = load_recipe(RECIPE, param_names=[normalize(n) for n, _ in model.named_parameters()])
    assert loaded.modifiers[0].importance == "second_order"
    with pytest.raises(ValueError, match="one-shot"):
        StructuredPruning(type="StructuredPruning", params=LAYERS, channel_sparsity=0.5, start=1, end=2)
