"""StructuredPruning with units: attention heads and FFN neurons of a BERT encoder removed together to
a MAC target (compressor.surgery.encoder), on a tiny BertForSequenceClassification (no download)."""

from __future__ import annotations

import copy

import hf_tiny  # tests/ is on the path
import pytest
import torch
import transformers
from torch.utils.data import Dataset

from compressor.lifecycle.session import Session
from compressor.surgery.channels import match_shapes
from compressor.surgery.encoder import encoder_layers, encoder_macs, unit_macs
from compressor.tasks import ModelLossTask
from modifiers.channel_pruning import StructuredPruning

LINEARS = hf_tiny.ENCODER_LINEARS
D = hf_tiny.HIDDEN // hf_tiny.HEADS  # head size 8


class Tokens(Dataset):
    """Random token ids with some padding, and labels: what BertForSequenceClassification takes."""

    def __init__(self, n: int = 48, length: int = 12, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 60, (n, length), generator=gen)
        self.mask = torch.ones(n, length, dtype=torch.long)
        for i in range(0, n, 3):
            self.mask[i, length // 2 + i % 4 :] = 0
        self.labels = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(hf_tiny.config(60, num_labels=2))
    with torch.no_grad():  # trained-looking weights: heads and neurons of visibly different sizes
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.1)  # not BERT's zero init: biases must follow their rows
        for layer in encoder_layers(model):
            for h in range(layer.heads):
                rows = slice(h * D, (h + 1) * D)
                scale = 0.3 + h / layer.heads
                for lin in (layer.query, layer.key, layer.value):
                    lin.weight[rows] *= scale
                layer.attention_output.weight[:, rows] *= scale
            layer.output.weight *= torch.linspace(0.2, 2.0, layer.neurons)[torch.randperm(layer.neurons)]
    return model


def _prune(model, **settings):
    settings = {
        "params": [LINEARS],
        "units": ["heads", "neurons"],
        "mac_sparsity": 0.5,
        "num_grads": 8,
        "grad_batch_size": 8,
        **settings,
    }
    modifier = StructuredPruning(type="StructuredPruning", **settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = Tokens()
    session = Session([modifier], model, optimizer, steps_per_epoch=4, data=data, task=ModelLossTask())
    session.before_step()
    return session, modifier


def _blocks(weight: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """The head blocks of a weight along ``dim`` (rows of q/k/v, columns of the output projection)."""
    return list(weight.split(D, dim=dim))


def _kept_heads(new: torch.Tensor, old: torch.Tensor, dim: int) -> list[int]:
    """Which original head each head block of ``new`` is (exact equality; a partial head fails)."""
    olds = _blocks(old, dim)
    kept = []
    for block in _blocks(new, dim):
        assert block.shape[dim] == D, "not a whole head"
        found = [h for h, o in enumerate(olds) if torch.equal(block, o)]
        assert len(found) == 1, "a head block matches no original head"
        kept.append(found[0])
    return kept


def _kept_neurons(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    return [next(j for j in range(old.shape[0]) if torch.equal(row, old[j])) for row in new]


@torch.no_grad()
def _masked_dense(dense, removed_heads: dict[int, list[int]], removed_neurons: dict[int, list[int]]):
    """The dense model with the removed units' output-projection columns zeroed (their effect gone)."""
    ref = copy.deepcopy(dense)
    for i, layer in enumerate(encoder_layers(ref)):
        for h in removed_heads[i]:
            layer.attention_output.weight[:, h * D : (h + 1) * D] = 0.0
        layer.output.weight[:, removed_neurons[i]] = 0.0
    return ref


@pytest.mark.parametrize(
    "importance, scope", [("magnitude", "consumers"), ("second_order", "consumers"), ("second_order", "unit")]
)
def test_whole_heads_and_neurons_go_and_the_model_equals_the_masked_dense_one(importance, scope):
    dense = _model()
    model = copy.deepcopy(dense)
    total = encoder_macs(encoder_layers(dense))
    session, modifier = _prune(model, importance=importance, obs_update=scope == "unit", scope=scope)
    heads, neurons = {}, {}
    for i, (new, old) in enumerate(zip(encoder_layers(model), encoder_layers(dense), strict=True)):
        q = _kept_heads(new.query.weight, old.query.weight, 0)
        assert q == _kept_heads(new.key.weight, old.key.weight, 0)  # q, k, v keep the same heads
        assert q == _kept_heads(new.value.weight, old.value.weight, 0)
        assert q == _kept_heads(new.attention_output.weight, old.attention_output.weight, 1)
        assert q == _kept_heads(new.query.bias.view(-1, 1), old.query.bias.view(-1, 1), 0)
        assert q == sorted(q) and len(q) >= 1
        assert new.attention.num_attention_heads == len(q) and new.attention.all_head_size == len(q) * D
        n = _kept_neurons(new.intermediate.weight, old.intermediate.weight)
        assert torch.equal(new.output.weight, old.output.weight[:, n])
        assert torch.equal(new.intermediate.bias, old.intermediate.bias[n])
        heads[i] = sorted(set(range(old.heads)) - set(q))
        neurons[i] = sorted(set(range(old.neurons)) - set(n))
        assert modifier.removed.get(f"bert.encoder.layer.{i}.heads", []) == heads[i]
        assert modifier.removed.get(f"bert.encoder.layer.{i}.neurons", []) == neurons[i]
    assert sum(map(len, heads.values())) > 0 and sum(map(len, neurons.values())) > 0
    cut = 1.0 - encoder_macs(encoder_layers(model)) / total
    head_cost = unit_macs(encoder_layers(dense)[0], "heads") / total
    assert 0.5 <= cut < 0.5 + head_cost  # the target, overshot by less than one head
    assert model.config.hidden_size == hf_tiny.HIDDEN  # the residual stream is never pruned
    data = Tokens(n=9, length=10, seed=1)
    feed = {"input_ids": data.ids, "attention_mask": data.mask}
    ref = _masked_dense(dense, heads, neurons).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**feed).logits, ref(**feed).logits, atol=1e-5, rtol=1e-5)
    assert all(p.shape == session.params[n].shape for n, p in session.params.items())
    opt_params = {id(p) for g in session.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}  # the optimizer holds the new parameters


def test_obs_update_moves_only_the_kept_consumer_columns():
    dense = _model()
    model = copy.deepcopy(dense)
    _prune(model, importance="second_order", obs_update=True)
    moved = False
    for new, old in zip(encoder_layers(model), encoder_layers(dense), strict=True):
        q = _kept_heads(new.query.weight, old.query.weight, 0)  # producers untouched (scope consumers)
        n = _kept_neurons(new.intermediate.weight, old.intermediate.weight)
        rows = [h * D + i for h in q for i in range(D)]
        moved |= not torch.equal(new.attention_output.weight, old.attention_output.weight[:, rows])
        moved |= not torch.equal(new.output.weight, old.output.weight[:, n])
    assert moved


def test_heads_only_and_the_cost_per_unit():
    model = _model()
    layer = encoder_layers(model)[0]
    assert unit_macs(layer, "heads") == 4 * D * hf_tiny.HIDDEN
    assert unit_macs(layer, "heads", attention_length=16) == 4 * D * hf_tiny.HIDDEN + 2 * D * 16
    assert unit_macs(layer, "neurons") == 2 * hf_tiny.HIDDEN
    heads_only = r"re:.*encoder\.layer\.\d+\.attention\..*(query|key|value|dense)\.weight"
    _prune(model, params=[heads_only], units=["heads"], mac_sparsity=0.2, importance="magnitude")
    assert [x.neurons for x in encoder_layers(model)] == [hf_tiny.INTERMEDIATE] * hf_tiny.LAYERS
    assert sum(x.heads for x in encoder_layers(model)) < hf_tiny.HEADS * hf_tiny.LAYERS


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"units": ["heads"], "mac_sparsity": 0.9}, "out of reach"),
        ({"units": ["heads"], "mac_sparsity": 0.2}, "not part of a unit"),  # FFN weights selected too
    ],
)
def test_unreachable_targets_and_stray_weights_are_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        heads_only = r"re:.*encoder\.layer\.\d+\.attention\..*(query|key|value|dense)\.weight"
        params = [heads_only] if message == "out of reach" else [LINEARS]
        _prune(_model(), params=params, importance="magnitude", **settings)


@pytest.mark.parametrize(
    "settings",
    [
        {"units": ["heads"]},  # no mac_sparsity
        {"units": ["heads"], "mac_sparsity": 0.5, "channel_sparsity": 0.5},
        {"mac_sparsity": 0.5},  # no units
        {},  # nothing
    ],
)
def test_settings_take_one_target(settings):
    with pytest.raises(ValueError):
        StructuredPruning(type="StructuredPruning", params=[LINEARS], **settings)


def test_match_shapes_rebuilds_per_layer_head_counts_without_tracing():
    model = _model()
    _prune(model, importance="magnitude")
    fresh = _model(seed=1)
    state = model.state_dict()
    assert match_shapes(fresh, state, example_inputs=None)  # no example: the layout says it all
    fresh.load_state_dict(state)
    assert [x.attention.num_attention_heads for x in encoder_layers(fresh)] == [
        x.heads for x in encoder_layers(model)
    ]
    data = Tokens(n=5, seed=2)
    feed = {"input_ids": data.ids, "attention_mask": data.mask}
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**feed).logits, model.eval()(**feed).logits)


class FixedGradients:
    """A sampler returning the same random gradients (m, d) for the names asked."""

    def __init__(self, model, m: int = 6, seed: int = 0) -> None:
        self.model, self.m, self.seed = model, m, seed

    def sample(self, names, num_grads, batch_size, key=0):
        params = dict(model_params(self.model))
        d = sum(params[n].numel() for n in names)
        return torch.randn(self.m, d, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float32)


def model_params(model):
    from compressor.core.params import normalize

    return [(normalize(n), p) for n, p in model.named_parameters()]


@pytest.mark.parametrize("scope", ["consumers", "group"])
def test_unit_saliencies_and_the_obs_update_are_the_dense_group_obs_per_block(scope):
    """rho_Q = w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 summed over blocks, and dw = -F^-1 e_Q ([F^-1]_QQ)^-1 w_Q,
    with F = lambda*I + G^T G / m per tensor, computed densely (columns owned by units included)."""
    from compressor.surgery.importance import UnitOBSImportance, unit_coordinates

    model = _model()
    layers = {f"bert.encoder.layer.{i}": x for i, x in enumerate(encoder_layers(model))}
    chosen = [(k, ("heads", "neurons")) for k in layers]
    coords = unit_coordinates(layers, chosen, consumers_only=scope == "consumers")
    n = sum(x.heads + x.neurons for x in layers.values())
    sampler = FixedGradients(model)
    obs = UnitOBSImportance(sampler, 6, 4, damp=0.5, relative=True)
    got = obs(coords, n)
    grads = sampler.sample(_names(model, coords), 6, 4)
    lam = 0.5 * float(grads.double().square().mean())
    want = torch.zeros(n, dtype=torch.float64)
    finvs, offset = [], 0
    for param, owner, _, _ in coords:
        g = grads[:, offset : offset + param.numel()].double()
        offset += param.numel()
        finv = torch.linalg.inv(lam * torch.eye(g.shape[1], dtype=torch.float64) + g.T @ g / g.shape[0])
        w = param.detach().reshape(-1).double()
        finvs.append(finv)
        for u in owner.unique().tolist():
            q = (owner == u).nonzero().flatten()
            want[u] += w[q] @ torch.linalg.solve(finv[q][:, q], w[q]) / 2
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    chosen_units = [0, 3, n - 1, n - 5]
    before = [p.detach().clone().reshape(-1).double() for p, _, _, _ in coords]
    obs.update(chosen_units)
    for (param, owner, _, _), finv, w in zip(coords, finvs, before, strict=True):
        q = torch.isin(owner, torch.tensor(chosen_units)).nonzero().flatten()
        if len(q) == 0:
            assert torch.equal(param.detach().reshape(-1).double(), w)
            continue
        u = torch.zeros_like(w)
        u[q] = torch.linalg.solve(finv[q][:, q], w[q])
        torch.testing.assert_close(param.detach().reshape(-1).double(), w - finv @ u, rtol=0, atol=1e-5)


def _names(model, coords):
    ids = {id(p): n for n, p in model_params(model)}
    return [ids[id(p)] for p, _, _, _ in coords]


def test_unit_scope_is_the_dense_fisher_block_of_each_unit_and_moves_nothing():
    """scope: unit: F block-diagonal with one block per unit (all its weights, across tensors), so
    rho_Q = w_Q^T F_QQ w_Q / 2 with F_QQ = lambda*I + G_Q^T G_Q / m built densely; no OBS update."""
    from compressor.surgery.importance import UnitOBSImportance, unit_coordinates

    model = _model()
    layers = {f"bert.encoder.layer.{i}": x for i, x in enumerate(encoder_layers(model))}
    chosen = [(k, ("heads", "neurons")) for k in layers]
    coords = unit_coordinates(layers, chosen)
    n = sum(x.heads + x.neurons for x in layers.values())
    sampler = FixedGradients(model, m=7, seed=3)
    obs = UnitOBSImportance(sampler, 7, 4, damp=0.3, relative=True, per_unit=True)
    got = obs(coords, n)
    grads = sampler.sample(_names(model, coords), 7, 4).double()
    lam = 0.3 * float(grads.square().mean())
    owner = torch.cat([o for _, o, _, _ in coords])
    w = torch.cat([p.detach().reshape(-1).double() for p, _, _, _ in coords])
    want = torch.zeros(n, dtype=torch.float64)
    for u in range(n):
        q = (owner == u).nonzero().flatten()
        f_qq = lam * torch.eye(len(q), dtype=torch.float64) + grads[:, q].T @ grads[:, q] / grads.shape[0]
        want[u] = w[q] @ f_qq @ w[q] / 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0.0)
    magnitude = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, w.square())
    assert (got - lam * magnitude / 2).min() > 0  # the gradient term counts
    before = [p.detach().clone() for p, _, _, _ in coords]
    obs.update([0, 3, n - 1])
    assert all(torch.equal(p.detach(), b) for (p, _, _, _), b in zip(coords, before, strict=True))


def test_unit_scope_needs_units():
    with pytest.raises(ValueError, match="scope: unit"):
        StructuredPruning(type="StructuredPruning", params=[LINEARS], channel_sparsity=0.5, scope="unit")
