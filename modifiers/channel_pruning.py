"""StructuredPruning: remove whole channels (filters, neurons), or attention heads and FFN neurons of
transformer encoders, physically, through torch-pruning.

At ``start`` (one shot; fine-tune afterwards with the rest of the run) every layer selected by
``params`` loses ``channel_sparsity`` of its output channels (floor, at least one kept). A channel is
removed with everything that depends on it, found by torch-pruning's dependency graph: the layer's
output row and bias, the batch-norm entries, the next layers' input columns, and channels coupled by
residual additions or concatenations (those lose the same channels). The model's tensors really
shrink; the checkpoint holds the smaller model, and ``compressor.channel_surgery.match_shapes`` reshapes a
freshly built model to it on resume (and for export).

Importance of channel c:

``magnitude``
    ||w_Q||_2 over everything the group removes for c (weights, biases, batch-norm affine).

``second_order``
    the group OBS saliency w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 with the empirical Fisher
    F = lambda*I + G^T G / m of m = ``num_grads`` sampled mini-batch gradients (``grad_batch_size``
    samples each), block-diagonal with one block per parameter tensor. Q is, with ``scope:
    consumers`` (default), the input slices for c of the layers that read it (the next conv's input
    channel, fc1's 49 columns of a conv2 channel): zeroing exactly those removes the channel, after
    which c's own filter, bias and batch-norm entries have no effect; ``scope: group`` also adds the
    producer's slices as separate blocks (the literal group). The form is *exact*, in m x m algebra
    instead of the k x k block (k = |Q| runs into thousands): with K = m*lambda*I + G_R G_R^T and R
    the other unmasked coordinates of the block (Schur complement),

        w_Q^T ([F^-1]_QQ)^-1 w_Q = lambda * (||w_Q||^2 + (G_Q w_Q)^T K^-1 (G_Q w_Q))

    (``compressor.mfac.obs.schur_group_saliencies``). With ``obs_update`` (default) the OBS update of
    the removal is applied before the surgery, per block: the kept weights move by
    dw_R = G_R^T K^-1 G_Q w_Q for the set Q of all channels removed from the layer (the minimizer of
    the quadratic model with w_Q = 0, ``schur_removal_update``), the correction the saliency assumes.
    ``damp`` is relative by default, as in MFACPruning: lambda = damp * mean(diag(G^T G / m)), the
    mean empirical Fisher diagonal of the layer's sampled gradients over the unmasked coordinates
    of all its blocks (one lambda per layer; ``compressor.mfac.obs.damping``), so one value suits
    every layer and gradient scale; ``relative_damp: false`` makes ``damp`` lambda itself. The
    default damp 1 (lambda = the mean diagonal) was chosen on held-out data; the measurements are in
    bench/results/quality.md (parts e and g). Layers are pruned one after the other in model order,
    each with fresh gradients of the already pruned model.

Transformer units (``units: [heads, neurons]`` with ``mac_sparsity``, instead of ``channel_sparsity``)
----------------------------------------------------------------------------------------------------

For encoders in the layout of transformers' ``BertLayer`` (BERT, MiniLM, RoBERTa, ...; see
``compressor.transformer_surgery``) the units are attention heads and FFN neurons; the hidden size
(the residual stream) is never pruned. A head is its d rows of the query, key and value weights and
biases plus its d input columns of ``attention.output.dense`` (d = ``attention_head_size``, 32 in
all-MiniLM-L6-v2); removing it also updates the attention module's ``num_attention_heads`` and
``all_head_size``. A neuron is a row (and bias) of ``intermediate.dense`` and the matching column of
``output.dense``. ``params`` selects the encoder linears: a layer's heads are candidates when its
query, key, value and attention output weights are all selected, its neurons when its intermediate
and output weights are; a selected weight in no candidate unit is an error. One head and one
neuron always stay in each layer.

The target: the units, ranked together across all layers, are removed cheapest first until the
encoder's MACs per token have dropped by ``mac_sparsity`` (at least that; the overshoot is under
one unit). What is counted, per token: the six linears of every encoder layer, a head costing
``4 * d * hidden`` (49,152 in MiniLM: its rows of q, k, v and its columns of the output
projection) and a neuron ``2 * hidden`` (768); with ``attention_length`` T > 0 a head also costs
``2 * d * T`` for its q.k scores and its weighted sum of values over T positions. Embeddings,
biases, layer norms, softmax and activations are not counted.

The ranking score is importance per MAC, the unit's importance divided by its cost:

``magnitude``
    ||w_Q||_2^2 / macs over all the unit's weights (q/k/v rows and biases, output-projection
    columns; intermediate row and bias, output column). The squared norm is additive over weights
    like a saliency (it is the OBS saliency with F = I), and a unit holds about one weight per MAC
    (4*d*hidden weights for a head, 2*hidden for a neuron), so the score is the unit's mean
    squared weight and comparable between heads and neurons. Within one kind it ranks as ||w_Q||.
``second_order``
    the group OBS saliency rho_Q (the estimated loss increase of removing the unit with the OBS
    correction, in loss units, in the Schur form above) divided by the MACs it saves: the greedy
    knapsack rule, least loss per MAC removed first. With ``scope: consumers`` Q is the unit's
    output-projection columns (for a head: the 32 columns of ``attention.output.dense``, which
    removes it exactly; for a neuron its column of ``output.dense``); ``scope: group`` scores all
    its weights, each tensor a block. Unlike channel mode all units are scored at once, from one set
    of ``num_grads`` sampled gradients of the dense model, with one lambda for all layers (relative:
    damp times the mean Fisher diagonal over every scored entry), so that all saliencies are
    measured under one block-diagonal F and can be ranked globally; ``obs_update`` then moves the
    kept weights of each scored tensor for all its removed units at once. ``scope: unit`` (units
    only) makes each unit, all its weights across tensors, one Fisher block of its own: the
    saliency is then w_Q^T F_QQ w_Q / 2 = (lambda ||w_Q||^2 + mean_i (g_i . w_Q)^2) / 2 and there is
    no OBS update. With tensor blocks m << the tensor's size lets the rest of the tensor absorb the
    gradient term, so those saliencies approach lambda ||w_Q||^2 / 2, magnitude's ranking
    (bench/results/quality_minilm.md, part i).

The surgery calls torch-pruning's linear-layer pruners on the six linears (the grouping is fixed by
the layout, not traced, so it holds for eager and SDPA attention alike), carrying masks of other
pruners. The checkpoint holds the smaller encoder; ``match_shapes`` rebuilds it on resume and export
(trailing heads / neurons removed per layer, no tracing).

After the surgery ``session.params`` is refreshed, masks of other pruners on the touched parameters
shrink with them (``MaskSet`` rebuilt), and the training optimizer is rebound to the new parameters
with the same hyperparameters and a **reset state** (momentum buffers, Adam moments start at zero).
The final classifier (a layer whose channels are the model's output) cannot be selected: ValueError.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field, PrivateAttr, StrictInt, model_validator
from torch import nn

from compressor.channel_surgery import (
    ROOT_TYPES,
    count_parameters,
    dependency_graph,
    example_inputs_of,
    feeds_output,
    out_channels,
    parameter_names,
    prune_group,
    rebind,
)
from compressor.masks import MASK_SUFFIX
from compressor.mfac.obs import damping, schur_group_saliencies, schur_removal_update
from compressor.modifier import Modifier
from compressor.params import match_params, normalize
from compressor.transformer_surgery import EncoderLayer, UnitCut, encoder_layers, encoder_macs, unit_macs

if TYPE_CHECKING:
    from compressor.session import Session


class StructuredPruning(Modifier):
    """One-shot removal of whole output channels of conv/linear layers, or (``units``) of attention
    heads and FFN neurons of BERT-layout encoders to a MAC target (see the module doc)."""

    needs_gradients: ClassVar[bool] = True
    restructures: ClassVar[bool] = True
    one_shot: ClassVar[bool] = True

    type: Literal["StructuredPruning"] = "StructuredPruning"
    params: list[str] = Field(
        min_length=1,
        description="weights of the Conv/Linear layers whose output channels may be removed (with "
        "units: the encoder linears whose heads / neurons may be removed)",
    )
    channel_sparsity: float | None = Field(
        None, gt=0.0, lt=1.0, description="fraction of each layer's channels removed (channel mode)"
    )
    units: list[Literal["heads", "neurons"]] | None = Field(
        None,
        min_length=1,
        description="transformer mode: remove attention heads and/or FFN neurons of BERT-layout "
        "encoder layers, ranked together across layers, instead of channels",
    )
    mac_sparsity: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="units: fraction of the encoder's MACs per token removed (see the module doc)",
    )
    attention_length: int = Field(
        0,
        ge=0,
        description="units: sequence length T at which a head's attention products (2*d*T MACs per "
        "token) are counted; 0 counts the linear layers only",
    )
    importance: Literal["magnitude", "second_order"] = "second_order"
    num_grads: StrictInt = Field(64, ge=1, description="second_order: gradients sampled per layer")
    grad_batch_size: int = Field(32, ge=1, description="second_order: samples per gradient")
    damp: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="second_order: dampening of F, a fraction of mean(diag(G^T G / m)) (else lambda itself)",
    )
    relative_damp: bool = Field(
        True,
        description="second_order: lambda = damp * mean(diag(G^T G / m)) of each layer's gradients",
    )
    obs_update: bool = Field(True, description="second_order: move the kept weights by the OBS update")
    scope: Literal["consumers", "group", "unit"] = Field(
        "consumers",
        description="second_order: the weights Q scored and F's blocks (see the module doc); unit: "
        "units only, one Fisher block per unit",
    )

    _layers: list[str] = PrivateAttr(default_factory=list)
    _unit_layers: list[tuple[str, tuple[str, ...]]] = PrivateAttr(default_factory=list)
    _done: bool = PrivateAttr(default=False)
    _removed: dict[str, list[int]] = PrivateAttr(default_factory=dict)
    _seen_input: Any = PrivateAttr(default=None)
    _hook: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_target(self) -> StructuredPruning:
        if self.units is None:
            if self.channel_sparsity is None:
                raise ValueError("give channel_sparsity (or units and mac_sparsity for heads / neurons)")
            if self.mac_sparsity is not None:
                raise ValueError("mac_sparsity is the target of units: give units too")
        else:
            if self.mac_sparsity is None:
                raise ValueError("units are removed to a MAC target: give mac_sparsity")
            if self.channel_sparsity is not None:
                raise ValueError("units take mac_sparsity, not channel_sparsity")
            if len(set(self.units)) != len(self.units):
                raise ValueError(f"units lists a kind twice: {self.units}")
        if self.scope == "unit" and self.units is None:
            raise ValueError("scope: unit (one Fisher block per head / neuron) needs units")
        return self

    def parameter_patterns(self) -> list[str]:
        return list(self.params)

    def gradient_bytes(self, num_params: int) -> int:
        """float32 gradients of a group (about 3x the selected weights: consumers and batch-norm too;
        units: at most the selected weights, all layers at once)."""
        if self.importance == "magnitude":
            return 0
        return 4 * self.num_grads * (1 if self.units else 3) * num_params

    # ------------------------------------------------------------------ hooks

    def initialize(self, session: Session) -> None:
        super().initialize(session)
        if self.units is not None:
            self._initialize_units(session)
            return
        names = match_params(self.params, session.params)
        modules = _owners(session.model)
        layers = []
        for name in names:
            module, leaf = modules[name]
            if leaf != "weight" or not isinstance(module, ROOT_TYPES):
                raise ValueError(
                    f"{self.type}: {name!r} is not the weight of a Conv or Linear layer; select the "
                    "weights of the layers whose output channels may be removed"
                )
            layers.append(name.rpartition(".")[0])
        self._layers = layers
        if self.importance == "second_order" and getattr(session, "sampler", None) is None:
            raise ValueError(f"{self.type}: second_order samples gradients; give the Session data=...")
        example = example_inputs_of(session)
        if example is not None:
            self._check_groups(session.model, dependency_graph(session.model, example))
        elif not self._done:  # remember a batch of the user's loop for tracing
            self._hook = session.model.register_forward_pre_hook(self._record_input, with_kwargs=True)

    def _record_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep the first sample of the loop's input: a tensor argument, or else the keyword arguments
        (a dict batch called as ``model(**batch)``; tensors cut to their first row)."""
        if args and isinstance(args[0], torch.Tensor):
            self._seen_input = args[0][:1].detach()
        elif not args and kwargs:
            self._seen_input = {
                k: v[:1].detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
            }

    def before_step(self, session: Session) -> None:
        if not self._done and session.step >= self.start_step:
            self.prune(session)

    def finalize(self, session: Session) -> None:
        if not self._done and session.step >= self.start_step:
            self.prune(session)
        self._drop_hook()

    def _drop_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ the surgery

    def _check_groups(self, model: nn.Module, graph: Any) -> None:
        for name in self._layers:
            module = model.get_submodule(_raw_module_name(model, name))
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=[0])
            if feeds_output(group):
                raise ValueError(
                    f"{self.type}: {name} produces the model's output (the classifier); its outputs "
                    "cannot be removed: leave it out of params"
                )

    @torch.no_grad()
    def prune(self, session: Session) -> None:
        """Remove the channels now; refresh params, masks and the optimizer (called by the hooks)."""
        if self.units is not None:
            self._prune_units(session)
            return
        model = session.model
        example = example_inputs_of(session)
        if example is None:
            example = self._seen_input
        if example is None:
            raise ValueError(
                f"{self.type}: no example input to trace the model: give the Session data=..., or start "
                "after the first step (the input of the training loop's forward is used then)"
            )
        graph = dependency_graph(model, example)
        self._check_groups(model, graph)
        before = count_parameters(model)
        old = parameter_names(model)
        done: set[int] = set()
        removed: dict[str, list[int]] = {}
        for index, name in enumerate(self._layers):
            module = model.get_submodule(_raw_module_name(model, name))
            if id(module) in done:  # coupled to a layer pruned earlier: it already lost its channels
                continue
            pruner = graph.get_pruner_of_module(module)
            n = out_channels(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=list(range(n)))
            done |= {
                id(dep.target.module)
                for dep, _ in group
                if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, ROOT_TYPES)
            }
            k = min(n - 1, math.floor(self.channel_sparsity * n + 1e-9))
            if k <= 0:
                continue
            if self.importance == "magnitude":
                scores = GroupL2Importance()(group)
                idxs = sorted(torch.argsort(scores)[:k].tolist())
            else:
                obs = GroupOBSImportance(
                    session.sampler,
                    self.num_grads,
                    self.grad_batch_size,
                    self.damp,
                    key=session.step * 1000 + index,
                    relative=self.relative_damp,
                    consumers_only=self.scope == "consumers",
                )
                scores = obs(group)
                idxs = sorted(torch.argsort(scores)[:k].tolist())
            cut = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=idxs)
            if not graph.check_pruning_group(cut):
                raise ValueError(f"{self.type}: {name} cannot lose {k} of its {n} channels")
            if self.importance == "second_order" and self.obs_update:
                obs.update(idxs)
            prune_group(cut, session.masks)
            removed[name] = idxs
        self._drop_hook()
        rebind(session, old)
        self._removed, self._done = removed, True
        after = count_parameters(model)
        session.log("channel_sparsity", self.channel_sparsity)
        session.log("parameters", after)
        session.log("parameters_removed", 1.0 - after / before)

    # ------------------------------------------------------------------ transformer units

    def _initialize_units(self, session: Session) -> None:
        """The encoder layers whose heads / neurons ``params`` select, checked against ``units``."""
        names = set(match_params(self.params, session.params))
        layers = encoder_layers(session.model)
        if not layers:
            raise ValueError(
                f"{self.type}: units need encoder layers in the BERT layout (attention.self.query/key/"
                "value, attention.output.dense, intermediate.dense, output.dense); the model has none"
            )
        chosen, covered = [], set()
        for layer in layers:
            kinds = []
            for kind, modules in layer.linear_names().items():
                weights = [normalize(f"{m}.weight") for m in modules]
                if kind in (self.units or ()) and all(w in names for w in weights):
                    kinds.append(kind)
                    covered |= set(weights)
            if kinds:
                chosen.append((_module_key(layer.name), tuple(kinds)))
        stray = sorted(names - covered)
        if stray:
            more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
            kinds = ", ".join(self.units or ())
            raise ValueError(
                f"{self.type}: {stray[0]!r}{more} is not part of a unit to remove ({kinds}): "
                "heads need a layer's attention.self.query, key, value and attention.output.dense "
                "weights selected, neurons its intermediate.dense and output.dense weights"
            )
        if not chosen:
            raise ValueError(f"{self.type}: params select no whole unit of any encoder layer")
        self._unit_layers = chosen
        if self.importance == "second_order" and getattr(session, "sampler", None) is None:
            raise ValueError(f"{self.type}: second_order samples gradients; give the Session data=...")
        if not self._done:
            total, removable = self._mac_budget(session.model)
            if removable < (self.mac_sparsity or 0.0) * total:
                raise ValueError(
                    f"{self.type}: mac_sparsity {self.mac_sparsity} is out of reach: the selected units "
                    f"cost {removable / total:.3f} of the encoder's MACs (one head and one neuron stay "
                    "in each layer)"
                )

    def _units_of(self, model: nn.Module) -> tuple[dict[str, EncoderLayer], list[tuple[str, str, int]]]:
        """(layer key -> layer, every candidate unit as (layer key, kind, index now))."""
        by_key = {_module_key(layer.name): layer for layer in encoder_layers(model)}
        units = []
        for key, kinds in self._unit_layers:
            layer = by_key[key]
            for kind in kinds:
                count = layer.heads if kind == "heads" else layer.neurons
                units += [(key, kind, i) for i in range(count)]
        return by_key, units

    def _mac_budget(self, model: nn.Module) -> tuple[int, int]:
        """(the encoder's MACs per token, the most the selected units can remove)."""
        by_key, _ = self._units_of(model)
        total = encoder_macs(list(by_key.values()), self.attention_length)
        removable = 0
        for key, kinds in self._unit_layers:
            layer = by_key[key]
            for kind in kinds:
                count = layer.heads if kind == "heads" else layer.neurons
                removable += (count - 1) * unit_macs(layer, kind, self.attention_length)
        return total, removable

    def _prune_units(self, session: Session) -> None:
        """Score every candidate unit, remove the cheapest per MAC to the target, apply the OBS update."""
        model = session.model
        by_key, units = self._units_of(model)
        total = encoder_macs(list(by_key.values()), self.attention_length)
        costs = torch.tensor(
            [unit_macs(by_key[k], kind, self.attention_length) for k, kind, _ in units], dtype=torch.float64
        )
        consumers = self.importance == "second_order" and self.scope == "consumers"
        coords = unit_coordinates(by_key, self._unit_layers, consumers_only=consumers)
        obs = None
        if self.importance == "magnitude":
            scores = unit_sq_norms(coords, len(units))
        else:
            obs = UnitOBSImportance(
                session.sampler,
                self.num_grads,
                self.grad_batch_size,
                self.damp,
                key=session.step * 1000,
                relative=self.relative_damp,
                per_unit=self.scope == "unit",
            )
            scores = obs(coords, len(units))
        ratio = scores / costs  # loss (or squared magnitude) per MAC saved
        target = (self.mac_sparsity or 0.0) * total
        left = {
            (k, kind): (by_key[k].heads if kind == "heads" else by_key[k].neurons) for k, kind, _ in units
        }
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
        if cut < target:
            raise ValueError(f"{self.type}: mac_sparsity {self.mac_sparsity} is out of reach for this model")
        if obs is not None and self.obs_update:
            obs.update(chosen)
        per_layer: dict[str, dict[str, list[int]]] = {}
        for u in chosen:
            key, kind, index = units[u]
            per_layer.setdefault(key, {"heads": [], "neurons": []})[kind].append(index)
        old = parameter_names(model)
        before = count_parameters(model)
        removed: dict[str, list[int]] = {}
        for key, picked in per_layer.items():
            prune_group(UnitCut(by_key[key], picked["heads"], picked["neurons"]), session.masks)
            for kind, idxs in picked.items():
                if idxs:
                    removed[f"{key}.{kind}"] = sorted(idxs)
        rebind(session, old)
        self._removed, self._done = removed, True
        after = count_parameters(model)
        session.log("mac_sparsity", cut / total)
        session.log("heads_removed", sum(len(v) for k, v in removed.items() if k.endswith(".heads")))
        session.log("neurons_removed", sum(len(v) for k, v in removed.items() if k.endswith(".neurons")))
        session.log("parameters", after)
        session.log("parameters_removed", 1.0 - after / before)

    # ------------------------------------------------------------------ state

    @property
    def removed(self) -> dict[str, list[int]]:
        """Per layer, the channels removed (indices in that layer before the surgery)."""
        return {k: list(v) for k, v in self._removed.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"done": self._done, "removed": self.removed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._done = bool(state.get("done", False))
        self._removed = {k: list(v) for k, v in state.get("removed", {}).items()}


# ---------------------------------------------------------------------- importances


class GroupL2Importance(tp.importance.Importance):
    """||w_Q||_2 per channel of the group root, over every parameter slice the group removes."""

    def __call__(self, group: Any) -> torch.Tensor:
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

    Units are numbered as ``StructuredPruning._units_of`` lists them (per chosen layer and kind, in
    index order). A head owns its rows of query, key and value (weights, biases) and its input
    columns of ``attention.output.dense``; a neuron its row of ``intermediate.dense`` (weight, bias)
    and its column of ``output.dense``. ``consumers_only``: the output-projection columns alone.
    ``alive``: not masked off by an unstructured pruner.
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


# ---------------------------------------------------------------------- names


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """normalized parameter name -> (owning module, leaf)."""
    out = {}
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        out[normalize(name)] = (model.get_submodule(owner), leaf)
    return out


def _module_key(name: str) -> str:
    """A module name normalized as parameter names are (wrapper prefixes dropped)."""
    return normalize(name + ".x")[:-2] if name else ""


def _raw_module_name(model: nn.Module, normalized: str) -> str:
    """The module name as ``model`` spells it (with wrapper prefixes) for a normalized one."""
    for name, _ in model.named_modules():
        if normalize(name) == normalized or (name and normalize(name + ".x")[:-2] == normalized):
            return name
    raise KeyError(f"no module {normalized!r} in the model")
