"""MaskSet: masks as persistent buffers, exact zeros through backward, momentum and a resume."""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.masks import MaskSet, mask_names

NAMES = ["0.weight", "3.weight"]


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model is at ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _net(gen: torch.Generator) -> nn.Sequential:
    """Conv (4, 2, 3, 3) -> ReLU -> Flatten -> Linear (3, 4*4*4) on (batch, 2, 6, 6) inputs."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return net


def _random_masks(net: nn.Module, gen: torch.Generator, keep: float = 0.6) -> dict[str, torch.Tensor]:
    params = dict(net.named_parameters())
    return {n: torch.rand(params[n].shape, generator=gen) < keep for n in NAMES}


def _loss(net: nn.Module, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(5, 2, 6, 6, generator=gen)
    return net(x).square().sum()


def test_set_zeros_masked_weights_and_counts_sparsity(gen: torch.Generator) -> None:
    net = _net(gen)
    masks = MaskSet(net, NAMES)
    assert masks.global_sparsity() == 0.0
    chosen = _random_masks(net, gen)
    for name, mask in chosen.items():
        masks.set(name, mask)
    params = dict(net.named_parameters())
    for name, mask in chosen.items():
        assert torch.equal(params[name] != 0, mask)
        assert masks.sparsity(name) == 1 - mask.sum().item() / mask.numel()
    kept = sum(int(m.sum()) for m in chosen.values())
    total = sum(m.numel() for m in chosen.values())
    assert abs(masks.global_sparsity() - (1 - kept / total)) < 1e-12
    assert masks.sparsities() == {n: masks.sparsity(n) for n in NAMES}
    assert torch.count_nonzero(params["0.bias"]) == 4  # unselected params untouched


def test_masks_persist_through_state_dict_into_a_fresh_model(gen: torch.Generator) -> None:
    net = _net(gen)
    masks = MaskSet(net, NAMES)
    chosen = _random_masks(net, gen)
    for name, mask in chosen.items():
        masks.set(name, mask)
    state = net.state_dict()
    assert {"0.weight_mask", "3.weight_mask"} <= set(state)
    assert sorted(mask_names(state)) == sorted(NAMES)

    fresh = _net(gen)
    restored = MaskSet(fresh, mask_names(state))
    fresh.load_state_dict(state)
    for name in NAMES:
        assert torch.equal(restored.mask(name), chosen[name])
        assert torch.equal(dict(fresh.named_parameters())[name], dict(net.named_parameters())[name])
    # A MaskSet built again over the loaded model keeps the loaded masks.
    again = MaskSet(fresh, NAMES)
    assert all(torch.equal(again.mask(n), chosen[n]) for n in NAMES)


def test_masked_gradients_are_zero_after_backward(gen: torch.Generator) -> None:
    net = _net(gen)
    masks = MaskSet(net, NAMES)
    chosen = _random_masks(net, gen)
    for name, mask in chosen.items():
        masks.set(name, mask)
    plain = _net(gen)  # same weights (masked ones zero), no hooks
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.endswith("_mask")})
    state = gen.get_state()
    _loss(net, gen).backward()
    gen.set_state(state)
    _loss(plain, gen).backward()
    params, ref = dict(net.named_parameters()), dict(plain.named_parameters())
    for name, mask in chosen.items():
        grad, expected = params[name].grad, ref[name].grad
        assert torch.all(grad[~mask] == 0) and torch.count_nonzero(expected[~mask]) > 0
        assert torch.equal(grad[mask], expected[mask])


def test_momentum_moves_masked_weights_and_apply_re_zeros_them(gen: torch.Generator) -> None:
    net = _net(gen)
    masks = MaskSet(net, NAMES)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    _loss(net, gen).backward()
    opt.step()  # momentum buffers now hold every coordinate
    chosen = _random_masks(net, gen)
    for name, mask in chosen.items():
        masks.set(name, mask)
    opt.zero_grad()
    _loss(net, gen).backward()
    opt.step()
    params = dict(net.named_parameters())
    moved = sum(int(torch.count_nonzero(params[n][~m])) for n, m in chosen.items())
    assert moved > 0  # the re-apply below is needed
    masks.apply()
    for name, mask in chosen.items():
        assert torch.all(params[name][~mask] == 0)


def test_ddp_style_prefixed_model(gen: torch.Generator) -> None:
    inner = _net(gen)
    wrapped = Wrapper(inner)
    masks = MaskSet(wrapped, ["module.0.weight", "3.weight"])
    assert masks.names == NAMES and "module.3.weight" in masks
    chosen = _random_masks(inner, gen)
    for name, mask in chosen.items():
        masks.set("module." + name, mask)
    assert {"module.0.weight_mask", "module.3.weight_mask"} <= set(wrapped.state_dict())
    assert torch.equal(inner.state_dict()["3.weight_mask"], chosen["3.weight"])
    _loss(wrapped, gen).backward()
    assert torch.all(inner[0].weight.grad[~chosen["0.weight"]] == 0)
    assert torch.equal(inner[3].weight != 0, chosen["3.weight"])


def test_remove_leaves_exact_zeros_and_drops_buffers_and_hooks(gen: torch.Generator) -> None:
    net = _net(gen)
    masks = MaskSet(net, NAMES)
    chosen = _random_masks(net, gen)
    for name, mask in chosen.items():
        masks.set(name, mask)
    masks.remove()
    assert not any(key.endswith("_mask") for key in net.state_dict())
    params = dict(net.named_parameters())
    for name, mask in chosen.items():
        assert torch.all(params[name][~mask] == 0)
    _loss(net, gen).backward()
    grad = params["3.weight"].grad
    assert torch.count_nonzero(grad[~chosen["3.weight"]]) > 0  # no longer masked


def test_wrong_shape_and_unknown_name_are_rejected(gen: torch.Generator) -> None:
    net = _net(gen)
    masks = MaskSet(net, NAMES)
    try:
        masks.set("0.weight", torch.ones(3, 3, dtype=torch.bool))
    except ValueError as err:
        assert "0.weight" in str(err)
    else:
        raise AssertionError("a mask of the wrong shape was accepted")
    try:
        MaskSet(net, ["0.wieght"])
    except KeyError as err:
        assert "0.weight" in str(err)
    else:
        raise AssertionError("an unknown name was accepted")
