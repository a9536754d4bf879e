"""The importance of channels, attention heads and FFN neurons for structured pruning
(``StructuredPruning``): the scores that rank them and the OBS update of removing them.

Channels are torch-pruning groups; ``group_coordinates`` maps a group to the flat entries of each
parameter it removes, by root channel c. Q is the set of weights removed with c.

``GroupL2Importance`` (``importance: magnitude``)
    ||w_Q||_2 over everything the group removes for c (weights, biases, batch-norm affine).
``GroupOBSImportance`` (``importance: second_order``)
    the group OBS saliency w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 with the empirical Fisher
    F = lambda*I + G^T G / m of m sampled mini-batch gradients, block-diagonal with one block per
    parameter tensor. Q is, with ``consumers_only`` (``scope: consumers``), the input slices for c of
    the layers that read it (the next conv's input channel, fc1's 49 columns of a conv2 channel):
    zeroing exactly those removes the channel, after which c's own filter, bias and batch-norm
    entries have no effect; without it (``scope: group``) the producer's slices are added as
    separate blocks (the literal group). The form is *exact*, in m x m algebra instead of the
    k x k block (k = |Q| runs into thousands): with K = m*lambda*I + G_R G_R^T and R the other
    unmasked coordinates of the block (Schur complement),

        w_Q^T ([F^-1]_QQ)^-1 w_Q = lambda * (||w_Q||^2 + (G_Q w_Q)^T K^-1 (G_Q w_Q))

    (``compressor.mfac.obs.schur_group_saliencies``). ``update`` applies the OBS update of the
    removal, per block: the kept weights move by dw_R = G_R^T K^-1 G_Q w_Q for the set Q of all
    channels removed from the layer (the minimizer of the quadratic model with w_Q = 0,
    ``schur_removal_update``), the correction the saliency assumes. lambda is one per layer
    (``compressor.mfac.obs.damping`` of its sampled gradients over the unmasked coordinates of all
    its blocks; relative: damp * mean(diag(G^T G / m))).

Units are the heads and neurons of BERT-layout encoders (``compressor.surgery.encoder``);
``unit_coordinates`` maps them to the entries they own in each tensor.

``unit_sq_norms`` (``importance: magnitude``)
    ||w_Q||_2^2 over all the unit's weights (q/k/v rows and biases, output-projection columns;
    intermediate row and bias, output column). The squared norm is additive over weights like a
    saliency (it is the OBS saliency with F = I), and a unit holds about one weight per MAC
    (4*d*hidden weights for a head, 2*hidden for a neuron), so divided by the unit's MACs it is the
    unit's mean squared weight, comparable between heads and neurons. Within one kind it ranks as
    ||w_Q||.
``UnitOBSImportance`` (``importance: second_order``)
    the group OBS saliency rho_Q (the estimated loss increase of removing the unit with the OBS
    correction, in loss units, in the Schur form above). With ``consumers_only`` Q is the unit's
    output-projection columns (for a head: its d columns of ``attention.output.dense``, 32 in
    MiniLM, which removes it exactly; for a neuron its column of ``output.dense``); without it all
    its weights are scored, each tensor a block. Unlike channels all units are scored at once, from one set of
    sampled gradients of the dense model, with one lambda for all layers (relative: damp times the
    mean Fisher diagonal over every scored entry), so that all saliencies are measured under one
    block-diagonal F and can be ranked globally; ``update`` then moves the kept weights of each
    scored tensor for all its removed units at once. ``per_unit`` (``scope: unit``) makes each
    unit, all its weights across tensors, one Fisher block of its own: the saliency is then
    w_Q^T F_QQ w_Q / 2 = (lambda ||w_Q||^2 + mean_i (g_i . w_Q)^2) / 2 and there is no OBS update.
    With tensor blocks m << the tensor's size lets the rest of the tensor absorb the gradient term,
    so those saliencies approach lambda ||w_Q||^2 / 2, magnitude's ranking
    (bench/results/quality_minilm.md, part i).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from compressor.core.masks import MASK_SUFFIX
from compressor.mfac.obs import damping, schur_group_saliencies, schur_removal_update
from compressor.surgery.channels import parameter_names

if TYPE_CHECKING:
    from compressor.surgery.encoder import EncoderLayer


# ---------------------------------------------------------------------- channels: scores


class GroupL2Importance(tp.importance.Importance):
    """||w_Q||_2 per channel of the group root, over every parameter slice the group removes."""

    def __call__(self, group: Any) -> torch.Tensor:
        """(n,) float64 norms, one per root channel of the torch-pruning ``group``."""
        n = len(group[0].idxs)
        sq = torch.zeros(n, dtype=torch.float64)
        for param, root_of, _ in group_coordinates(group):
            w = param.detach().reshape(-1).to(torch.float64).cpu()
            sel = root_of >= 0
            sq.index_add_(0, root_of[sel], w[sel].square())
        return sq.sqrt()


class GroupOBSImportance(tp.importance.Importance):
    """Group OBS saliency w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 per channel of the root (see the module doc).

    F is block-diagonal with one block per parameter tensor, damped by one lambda
    (``compressor.mfac.obs.damping`` of the sampled gradients of the unmasked coordinates). The
    saliency is computed in m x m algebra (``schur_group_saliencies``). ``update(removed)`` after a
    call applies the OBS update for removing those root channels, with the gradients of that call.
    """

    def __init__(
        self,
        sampler: Any,
        num_grads: int,
        batch_size: int,
        damp: float,
        key: int = 0,
        relative: bool = False,
        consumers_only: bool = True,
    ) -> None:
        self.sampler, self.num_grads, self.batch_size = sampler, num_grads, batch_size
        self.damp, self.key, self.relative, self.consumers_only = damp, key, relative, consumers_only
        self._blocks: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._lambda = damp

    def __call__(self, group: Any) -> torch.Tensor:
        """(n,) float64 saliencies (loss units), one per root channel of the torch-pruning ``group``."""
        n = len(group[0].idxs)
        coords = group_coordinates(group, consumers_only=self.consumers_only)
        names = parameter_names(self.sampler.model)
        grads = self.sampler.sample(
            [names[id(p)] for p, _, _ in coords], self.num_grads, self.batch_size, key=self.key
        )
        alive = torch.cat([a for _, _, a in coords]).to(grads.device)
        self._lambda = damping(grads[:, alive], self.damp, self.relative)
        saliency = torch.zeros(n, dtype=torch.float64)
        self._blocks = []
        offset = 0
        for param, root_of, live in coords:
            size = param.numel()
            g = grads[:, offset : offset + size].to(torch.float64).cpu()
            offset += size
            g[:, ~live] = 0.0  # masked coordinates take no part
            w = param.detach().reshape(-1).to(torch.float64).cpu().masked_fill(~live, 0.0)
            self._blocks.append((param, root_of, g))
            saliency += schur_group_saliencies(g, w, root_of, n, self._lambda)
        return saliency

    @torch.no_grad()
    def update(self, removed: list[int]) -> None:
        """Move the kept weights of each block by dw_R = G_R^T K^-1 G_Q w_Q (Q: all ``removed``)."""
        drop = torch.tensor(sorted(removed), dtype=torch.int64)
        for param, root_of, g in self._blocks:
            q = torch.isin(root_of, drop)
            if not q.any():
                continue
            w = param.detach().reshape(-1).to(torch.float64).cpu()
            dw = schur_removal_update(g, w, q, self._lambda)  # masked columns of g are zero already
            param.add_(dw.view_as(param).to(device=param.device, dtype=param.dtype))


# ---------------------------------------------------------------------- transformer units: scores


#: (parameter, unit of each flat entry, alive entries, the axis units index: 0 rows, 1 columns)
UnitSlices = tuple[nn.Parameter, torch.Tensor, torch.Tensor, int]


def unit_coordinates(
    layers: dict[str, EncoderLayer], chosen: list[tuple[str, tuple[str, ...]]], consumers_only: bool = False
) -> list[UnitSlices]:
    """Per parameter the units live in: (param, unit of each flat entry, alive, axis).

    Units are numbered as ``compressor.surgery.selection.encoder_units`` lists them (per chosen
    layer and kind, in index order). A head owns its rows of query, key and value (weights, biases)
    and its input columns of ``attention.output.dense``; a neuron its row of ``intermediate.dense``
    (weight, bias) and its column of ``output.dense``. ``consumers_only``: the output-projection
    columns alone. ``alive``: not masked off by an unstructured pruner.
    """
    out: list[UnitSlices] = []
    base = 0
    for key, kinds in chosen:
        layer = layers[key]
        for kind in kinds:
            if kind == "heads":
                count = layer.heads
                of_row = base + torch.arange(count * layer.head_size) // layer.head_size
                producers, consumer = (layer.query, layer.key, layer.value), layer.attention_output
            else:
                count = layer.neurons
                of_row = base + torch.arange(count)
                producers, consumer = (layer.intermediate,), layer.output
            slices = (
                [] if consumers_only else [(m, leaf, 0) for m in producers for leaf in ("weight", "bias")]
            )
            for module, leaf, dim in [*slices, (consumer, "weight", 1)]:
                param = getattr(module, leaf, None)
                if not isinstance(param, nn.Parameter):
                    continue
                owner = of_row if param.dim() == 1 else of_row.unsqueeze(1 - dim).expand(param.shape)
                mask = module._buffers.get(leaf + MASK_SUFFIX)
                alive = (
                    torch.ones(param.numel(), dtype=torch.bool)
                    if mask is None
                    else mask.reshape(-1).cpu() > 0
                )
                out.append((param, owner.reshape(-1).clone(), alive, dim))
            base += count
    return out


def unit_sq_norms(coords: list[UnitSlices], n: int) -> torch.Tensor:
    """||w_Q||^2 per unit over its unmasked entries (float64, (n,))."""
    sq = torch.zeros(n, dtype=torch.float64)
    for param, owner, alive, _ in coords:
        w = param.detach().reshape(-1).to(torch.float64).cpu()
        sel = (owner >= 0) & alive
        sq.index_add_(0, owner[sel], w[sel].square())
    return sq


class UnitOBSImportance:
    """Group OBS saliency per unit (heads, neurons) of all chosen layers at once, in m x m algebra.

    One set of ``num_grads`` sampled gradients over every scored tensor; F block-diagonal with one
    block per tensor and one lambda for all (relative: damp times the mean Fisher diagonal over all
    scored unmasked entries), so the saliencies of all layers are measured under one F and can be
    ranked together. ``update(chosen)`` applies the OBS update of removing those units, per block.
    A block whose units are columns is scored transposed (each unit's entries consecutive: the
    saliency's no-gather path; F's value does not depend on the order of a block's coordinates).

    ``per_unit`` (``scope: unit``): F is block-diagonal with one block per unit instead, all of the
    unit's weights across its tensors. Then [F^-1]_QQ^-1 = F_QQ and the saliency is
    w_Q^T F_QQ w_Q / 2 = (lambda ||w_Q||^2 + mean_i (g_i . w_Q)^2) / 2 (g_i . w_Q summed over the
    unit's tensors before squaring), and the OBS update is zero: no kept weight shares a block with
    a removed one. (With a tensor's block the other m-dimensional directions of the tensor absorb
    G_Q w_Q almost entirely when the tensor is much wider than m, and the saliency tends to
    lambda ||w_Q||^2 / 2: magnitude's ranking.)
    """

    def __init__(
        self,
        sampler: Any,
        num_grads: int,
        batch_size: int,
        damp: float,
        key: int = 0,
        relative: bool = True,
        per_unit: bool = False,
    ) -> None:
        self.sampler, self.num_grads, self.batch_size = sampler, num_grads, batch_size
        self.damp, self.key, self.relative, self.per_unit = damp, key, relative, per_unit
        self._blocks: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, int, torch.Tensor]] = []
        self._lambda = damp

    def __call__(self, coords: list[UnitSlices], n: int) -> torch.Tensor:
        """(n,) float64 saliencies (loss units) of the ``n`` units that ``coords`` number."""
        names = parameter_names(self.sampler.model)
        grads = self.sampler.sample(
            [names[id(c[0])] for c in coords], self.num_grads, self.batch_size, key=self.key
        )
        alive = torch.cat([c[2] for c in coords]).to(grads.device)
        self._lambda = damping(grads if bool(alive.all()) else grads[:, alive], self.damp, self.relative)
        saliency = torch.zeros(n, dtype=torch.float64)
        self._blocks = []
        if self.per_unit:
            return self._per_unit(coords, grads, n)
        offset = 0
        for param, owner, live, dim in coords:
            size = param.numel()
            g32 = grads[:, offset : offset + size]
            offset += size
            self._blocks.append((param, owner, live, dim, g32))
            g, w, own = self._block(param, owner, live, dim, g32)
            lo, hi = int(own.min()), int(own.max())  # a block's units are consecutive ids
            saliency[lo : hi + 1] += schur_group_saliencies(g, w, own - lo, hi - lo + 1, self._lambda)
        return saliency

    def _per_unit(self, coords: list[UnitSlices], grads: torch.Tensor, n: int) -> torch.Tensor:
        """(lambda ||w_Q||^2 + ||G_Q w_Q||^2 / m) / 2 per unit: F_QQ of one block per unit."""
        m = grads.shape[0]
        gw = torch.zeros(m, n, dtype=torch.float64)  # G_Q w_Q, summed over the unit's tensors
        offset = 0
        for param, owner, live, dim in coords:
            size = param.numel()
            g, w, own = self._block(param, owner, live, dim, grads[:, offset : offset + size])
            offset += size
            gw.index_add_(1, own, g * w)
        return (self._lambda * unit_sq_norms(coords, n) + gw.square().sum(dim=0) / m) / 2.0

    @staticmethod
    def _block(
        param: nn.Parameter, owner: torch.Tensor, live: torch.Tensor, dim: int, g32: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 (gradients, weights, owner) of a block, masked entries zero, columns made rows."""
        g = g32.to(torch.float64).cpu()
        w = param.detach().reshape(-1).to(torch.float64).cpu()
        if not bool(live.all()):
            g[:, ~live] = 0.0  # masked coordinates take no part
            w = w.masked_fill(~live, 0.0)
        if dim == 1 and param.dim() == 2:
            rows, cols = param.shape
            g = g.view(-1, rows, cols).transpose(1, 2).reshape(g.shape[0], -1)
            w, owner = w.view(rows, cols).t().reshape(-1), owner.view(rows, cols).t().reshape(-1)
        return g, w, owner

    @torch.no_grad()
    def update(self, chosen: list[int]) -> None:
        """Move the kept weights of each block by dw_R = G_R^T K^-1 G_Q w_Q (Q: the ``chosen`` units)."""
        drop = torch.tensor(sorted(chosen), dtype=torch.int64)
        for param, owner, live, dim, g32 in self._blocks:
            if not bool(torch.isin(owner, drop).any()):
                continue
            g, w, own = self._block(param, owner, live, dim, g32)
            dw = schur_removal_update(g, w, torch.isin(own, drop), self._lambda)
            if dim == 1 and param.dim() == 2:
                dw = dw.view(param.shape[1], param.shape[0]).t()
            param.add_(dw.reshape(param.shape).to(device=param.device, dtype=param.dtype))


# ---------------------------------------------------------------------- group -> parameter coordinates


def group_coordinates(
    group: Any, consumers_only: bool = False
) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
    """Per parameter the group removes from: (param, root channel of each flat entry or -1, alive).

    ``alive``: the entries not masked off by an unstructured pruner (all True without a mask).
    Supported: Conv (output channels, and input channels of ungrouped convs), Linear, BatchNorm;
    the slices of other layer types are removed by the surgery but not scored. ``consumers_only``:
    only the input-channel slices of the layers that read the channels.
    """
    graph = group._DG
    out: dict[int, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        if consumers_only and not _consumes(graph, dep):
            continue
        roots = torch.as_tensor(list(group[i].root_idxs), dtype=torch.int64)
        index = torch.as_tensor(list(idxs), dtype=torch.int64)
        for leaf, dim in _slices(module, graph.is_out_channel_pruning_fn(dep.handler)):
            param = getattr(module, leaf, None)
            if not isinstance(param, nn.Parameter):
                continue
            if id(param) not in out:
                mask = module._buffers.get(leaf + MASK_SUFFIX)
                alive = (
                    torch.ones(param.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
                )
                out[id(param)] = (param, torch.full((param.numel(),), -1, dtype=torch.int64), alive)
            root_of = out[id(param)][1]
            pos = torch.arange(param.numel()).view(param.shape).movedim(dim, 0)[index]  # (len, rest)
            root_of[pos.reshape(len(index), -1)] = roots.unsqueeze(1).expand(len(index), pos[0].numel())
    return list(out.values())


def _consumes(graph: Any, dep: Any) -> bool:
    """An input-channel cut of a layer that mixes channels (Conv that is not depthwise, Linear)."""
    module = dep.target.module
    if not graph.is_in_channel_pruning_fn(dep.handler) or graph.is_out_channel_pruning_fn(dep.handler):
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _slices(module: nn.Module, is_out: bool) -> list[tuple[str, int]]:
    """(parameter leaf, dim) that a channel pruning of ``module`` cuts (out- or in-channels)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [("weight", 0), ("bias", 0)]
    if isinstance(module, nn.Linear):
        return [("weight", 0), ("bias", 0)] if is_out else [("weight", 1)]
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.out_channels
        if depthwise:
            return [("weight", 0), ("bias", 0)]
        if module.groups > 1:
            return []
        if is_out:
            return [("weight", 1 if module.transposed else 0), ("bias", 0)]
        return [("weight", 0 if module.transposed else 1)]
    return []
