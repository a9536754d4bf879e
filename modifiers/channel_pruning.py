"""StructuredPruning: remove whole channels (filters, neurons), or attention heads and FFN neurons of
transformer encoders, physically, through torch-pruning.

At ``start`` (one shot; fine-tune afterwards with the rest of the run) every layer selected by
``params`` loses ``channel_sparsity`` of its output channels (floor, at least one kept). A channel is
removed with everything that depends on it, found by torch-pruning's dependency graph: the layer's
output row and bias, the batch-norm entries, the next layers' input columns, and channels coupled by
residual additions or concatenations (those lose the same channels). The model's tensors really
shrink; the checkpoint holds the smaller model, and ``compressor.surgery.channels.match_shapes``
reshapes a freshly built model to it on resume (and for export).

Importance of channel c (the formulas: ``compressor.surgery.importance``): ``magnitude`` is
||w_Q||_2 over everything the group removes for c; ``second_order`` the group OBS saliency
w_Q^T ([F^-1]_QQ)^-1 w_Q / 2 with the empirical Fisher F = lambda*I + G^T G / m of m = ``num_grads``
sampled mini-batch gradients (``grad_batch_size`` samples each), one block per parameter tensor,
computed exactly in m x m algebra. With ``scope: consumers`` (default) Q is the input slices for c
of the layers that read it (zeroing exactly those removes the channel); ``scope: group`` adds the
producer's slices as blocks of their own. ``obs_update`` (default) moves the kept weights by the OBS
update of the removal before the surgery. ``damp`` is relative by default, as in MFACPruning:
lambda = damp * mean(diag(G^T G / m)) of the layer's sampled gradients over the unmasked coordinates
of all its blocks (one lambda per layer; ``compressor.mfac.obs.damping``), so one value suits every
layer and gradient scale; ``relative_damp: false`` makes ``damp`` lambda itself. The default damp 1
(lambda = the mean diagonal) was chosen on held-out data; the measurements are in
bench/results/quality.md (parts e and g). Layers are pruned one after the other in model order,
each with fresh gradients of the already pruned model.

Transformer units (``units: [heads, neurons]`` with ``mac_sparsity``, instead of ``channel_sparsity``):
for encoders in the layout of transformers' ``BertLayer`` (BERT, MiniLM, RoBERTa, ...) the units are
attention heads and FFN neurons (defined, costed and cut in ``compressor.surgery.encoder``); the
hidden size is never pruned. ``params`` selects the encoder linears: a layer's heads are candidates
when its query, key, value and attention output weights are all selected, its neurons when its
intermediate and output weights are; a selected weight in no candidate unit is an error. The units,
ranked together across all layers by importance per MAC, are removed cheapest first until the
encoder's MACs per token have dropped by ``mac_sparsity``; one head and one neuron stay in each
layer (what is counted, with ``attention_length``: ``compressor.surgery.selection``). ``magnitude``
scores a unit by ||w_Q||_2^2 over all its weights, ``second_order`` by its group OBS saliency, all
units at once from one set of gradients and one lambda; Q is its output-projection columns
(``scope: consumers``) or all its weights, each tensor a block (``scope: group``). ``scope: unit``
(units only) makes each unit, all its weights across tensors, one Fisher block of its own: the
saliency is then w_Q^T F_QQ w_Q / 2 = (lambda ||w_Q||^2 + mean_i (g_i . w_Q)^2) / 2 and there is no
OBS update. The surgery cuts the six linears by the layout, not a trace, carrying masks of other
pruners; ``match_shapes`` rebuilds the smaller encoder on resume and export (trailing heads /
neurons removed per layer, no tracing).

After the surgery ``session.params`` is refreshed, masks of other pruners on the touched parameters
shrink with them (``MaskSet`` rebuilt), and the training optimizer is rebound to the new parameters
with the same hyperparameters and a **reset state** (momentum buffers, Adam moments start at zero).
The final classifier (a layer whose channels are the model's output) cannot be selected: ValueError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, StrictInt, model_validator
from torch import nn

from compressor.core.modifier import Modifier
from compressor.core.params import match_params
from compressor.surgery.channels import (
    ROOT_TYPES,
    count_parameters,
    dependency_graph,
    example_inputs_of,
    feeds_output,
    parameter_names,
    prune_group,
    rebind,
)
from compressor.surgery.encoder import UnitCut, encoder_layers, encoder_macs
from compressor.surgery.importance import (
    GroupL2Importance,
    GroupOBSImportance,
    UnitOBSImportance,
    unit_coordinates,
    unit_sq_norms,
)
from compressor.surgery.names import parameter_owners, raw_module_name
from compressor.surgery.selection import (
    by_layer,
    channel_group,
    channels_to_remove,
    choose_layers,
    encoder_units,
    mac_budget,
    select_units,
    unit_costs,
)

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


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
        """The ``params`` patterns (the weights this modifier may cut)."""
        return list(self.params)

    def gradient_bytes(self, num_params: int) -> int:
        """float32 gradients of a group (about 3x the selected weights: consumers and batch-norm too;
        units: at most the selected weights, all layers at once)."""
        if self.importance == "magnitude":
            return 0
        return 4 * self.num_grads * (1 if self.units else 3) * num_params

    # ------------------------------------------------------------------ hooks

    def initialize(self, session: Session) -> None:
        """Resolve and check the selected layers (or units); trace now, or record an input for later."""
        super().initialize(session)
        if self.units is not None:
            self._initialize_units(session)
            return
        names = match_params(self.params, session.params)
        modules = parameter_owners(session.model)
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
        """Prune once, at the first step from ``start`` on."""
        if not self._done and session.step >= self.start_step:
            self.prune(session)

    def finalize(self, session: Session) -> None:
        """Prune if not done yet and ``start`` is reached (a run ending at ``start``); drop the input hook."""
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
            module = model.get_submodule(raw_module_name(model, name))
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
            module = model.get_submodule(raw_module_name(model, name))
            if id(module) in done:  # coupled to a layer pruned earlier: it already lost its channels
                continue
            pruner, group, n, coupled = channel_group(graph, module)
            done |= coupled
            k = channels_to_remove(n, self.channel_sparsity)
            if k <= 0:
                continue
            if self.importance == "magnitude":
                scores = GroupL2Importance()(group)
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
        chosen, stray = choose_layers(layers, names, self.units or ())
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
            total, removable = mac_budget(session.model, self._unit_layers, self.attention_length)
            if removable < (self.mac_sparsity or 0.0) * total:
                raise ValueError(
                    f"{self.type}: mac_sparsity {self.mac_sparsity} is out of reach: the selected units "
                    f"cost {removable / total:.3f} of the encoder's MACs (one head and one neuron stay "
                    "in each layer)"
                )

    def _prune_units(self, session: Session) -> None:
        """Score every candidate unit, remove the cheapest per MAC to the target, apply the OBS update."""
        model = session.model
        by_key, units = encoder_units(model, self._unit_layers)
        total = encoder_macs(list(by_key.values()), self.attention_length)
        costs = unit_costs(by_key, units, self.attention_length)
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
        chosen, cut = select_units(ratio, costs, units, by_key, target)
        if cut < target:
            raise ValueError(f"{self.type}: mac_sparsity {self.mac_sparsity} is out of reach for this model")
        if obs is not None and self.obs_update:
            obs.update(chosen)
        per_layer = by_layer(chosen, units)
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
        """Whether the surgery ran, and what it removed (for resume)."""
        return {"done": self._done, "removed": self.removed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s state."""
        self._done = bool(state.get("done", False))
        self._removed = {k: list(v) for k, v in state.get("removed", {}).items()}
