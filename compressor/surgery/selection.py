"""Which channels, attention heads and FFN neurons ``StructuredPruning`` removes.

Channels: a layer loses ``channels_to_remove`` of its n output channels (floor of sparsity * n, at
least one kept); ``channel_group`` is the torch-pruning group of all of them, which also names the
layers coupled to it (residual additions, concatenations) that lose the same channels.

Units of BERT-layout encoders (``compressor.surgery.encoder``): a unit is (layer key, kind, index in
the layer now), kind ``"heads"`` or ``"neurons"``; the chosen layers are (layer key, kinds) pairs,
the key a module name normalized as parameter names are (``compressor.surgery.names.module_key``).
The units, ranked together across all layers, are removed cheapest first until the encoder's MACs
per token have dropped by the target (at least that; the overshoot is under one unit):
``select_units`` is the greedy knapsack rule, units in ascending order of score per MAC, one head
and one neuron always staying in each layer. Counted per token (``unit_macs``, ``encoder_macs``)
are the six linears of every encoder layer: a head costs ``4 * d * hidden`` (d =
``attention_head_size``; 49,152 in all-MiniLM-L6-v2: its rows of q, k, v and its columns of the
output projection) and a neuron ``2 * hidden`` (768); with an attention length T > 0 a head also
costs ``2 * d * T`` for its q.k scores and its weighted sum of values over T positions. Embeddings,
biases, layer norms, softmax and activations are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compressor.core.params import normalize
from compressor.surgery.channels import ROOT_TYPES, out_channels
from compressor.surgery.encoder import EncoderLayer, encoder_layers, encoder_macs, unit_macs
from compressor.surgery.names import module_key

# ---------------------------------------------------------------------- channels


def channels_to_remove(n: int, sparsity: float) -> int:
    """How many of a layer's ``n`` output channels go at ``sparsity``: floor, at least one kept."""
    return min(n - 1, math.floor(sparsity * n + 1e-9))


def channel_group(graph: Any, module: nn.Module) -> tuple[Any, Any, int, set[int]]:
    """(torch-pruning pruner of ``module``, the group removing all its n output channels, n, the ids
    of the Conv / Linear layers whose output channels the group removes: ``module`` and the layers
    coupled to it) in the dependency ``graph``."""
    pruner = graph.get_pruner_of_module(module)
    n = out_channels(module)
    group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=list(range(n)))
    coupled = {
        id(dep.target.module)
        for dep, _ in group
        if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, ROOT_TYPES)
    }
    return pruner, group, n, coupled


# ---------------------------------------------------------------------- transformer units

#: A candidate unit: (layer key, kind "heads" / "neurons", index in the layer now).
Unit = tuple[str, str, int]
#: The chosen layers: (layer key, the kinds of unit removable there).
ChosenLayers = list[tuple[str, tuple[str, ...]]]


def choose_layers(
    layers: list[EncoderLayer], names: set[str], kinds: Sequence[str]
) -> tuple[ChosenLayers, list[str]]:
    """(per encoder layer of ``layers``, the ``kinds`` of unit whose linears' weights are all among the
    normalized parameter ``names``; the names that are part of no such unit, sorted)."""
    chosen, covered = [], set()
    for layer in layers:
        picked = []
        for kind, modules in layer.linear_names().items():
            weights = [normalize(f"{m}.weight") for m in modules]
            if kind in kinds and all(w in names for w in weights):
                picked.append(kind)
                covered |= set(weights)
        if picked:
            chosen.append((module_key(layer.name), tuple(picked)))
    return chosen, sorted(names - covered)


def encoder_units(model: nn.Module, chosen: ChosenLayers) -> tuple[dict[str, EncoderLayer], list[Unit]]:
    """(layer key -> encoder layer of ``model``, every candidate unit of the ``chosen`` layers, per
    chosen layer and kind in index order)."""
    by_key = {module_key(layer.name): layer for layer in encoder_layers(model)}
    units = []
    for key, kinds in chosen:
        layer = by_key[key]
        for kind in kinds:
            count = layer.heads if kind == "heads" else layer.neurons
            units += [(key, kind, i) for i in range(count)]
    return by_key, units


def mac_budget(model: nn.Module, chosen: ChosenLayers, attention_length: int) -> tuple[int, int]:
    """(the encoder's MACs per token, the most the units of the ``chosen`` layers can remove: all
    but one of each kind per layer); ``attention_length`` T as in ``unit_macs``."""
    by_key, _ = encoder_units(model, chosen)
    total = encoder_macs(list(by_key.values()), attention_length)
    removable = 0
    for key, kinds in chosen:
        layer = by_key[key]
        for kind in kinds:
            count = layer.heads if kind == "heads" else layer.neurons
            removable += (count - 1) * unit_macs(layer, kind, attention_length)
    return total, removable


def unit_costs(layers: dict[str, EncoderLayer], units: list[Unit], attention_length: int) -> torch.Tensor:
    """(len(units),) float64: the MACs per token each unit costs."""
    return torch.tensor(
        [unit_macs(layers[k], kind, attention_length) for k, kind, _ in units], dtype=torch.float64
    )


def select_units(
    ratio: torch.Tensor,
    costs: torch.Tensor,
    units: list[Unit],
    layers: dict[str, EncoderLayer],
    target: float,
) -> tuple[list[int], float]:
    """(positions in ``units`` of the units removed, in the order chosen; the MACs they remove).

    Units are taken in ascending (stable) order of ``ratio`` (score per MAC, (len(units),)) until
    the removed MACs (``costs``) reach ``target``, skipping a layer's last head / neuron. The MACs
    removed fall short of ``target`` only when no unit is left to take.
    """
    left = {(k, kind): (layers[k].heads if kind == "heads" else layers[k].neurons) for k, kind, _ in units}
    chosen: list[int] = []
    cut = 0.0
    for u in torch.argsort(ratio, stable=True).tolist():
        if cut >= target:
            break
        key, kind, _ = units[u]
        if left[(key, kind)] <= 1:  # the last head / neuron of a layer stays
            continue
        left[(key, kind)] -= 1
        chosen.append(u)
        cut += float(costs[u])
    return chosen, cut


def by_layer(chosen: list[int], units: list[Unit]) -> dict[str, dict[str, list[int]]]:
    """layer key -> {"heads": indices, "neurons": indices} of the ``chosen`` positions in ``units``."""
    per_layer: dict[str, dict[str, list[int]]] = {}
    for u in chosen:
        key, kind, index = units[u]
        per_layer.setdefault(key, {"heads": [], "neurons": []})[kind].append(index)
    return per_layer
