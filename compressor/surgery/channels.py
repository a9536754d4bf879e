"""Physical channel surgery: shrinking a model's layers, and matching a model to a smaller state dict.

Structured pruning (``modifiers/channel_pruning.py``) removes whole channels through torch-pruning's
dependency graph, so the model's parameters get smaller and are new ``nn.Parameter`` objects. Three
things then need care, and live here so that the trainer, the exporter and modifiers share them:

``match_shapes(model, state_dict, example_inputs)``
    A checkpoint of a channel-pruned run holds the smaller model, while a model built afresh from the
    recipe has the original shapes. ``match_shapes`` removes trailing channels from the fresh model
    (values do not matter: the state dict is loaded next) until every parameter and buffer has the
    shape of the state dict; ValueError when no channel removal can get there.

``prune_group(group, masks)``
    ``group.prune()`` that also carries the pruning masks (``<leaf>_mask`` buffers, which
    torch-pruning does not know about) and the masked parameters' gradients through the surgery.

``rebind(session, old_names)``
    After surgery: ``session.params`` refreshed, the MaskSet rebuilt on the new parameters, and the
    base optimizer pointed at the new parameters. Optimizer state (momentum, Adam moments) is reset;
    the optimizer object stays the same (LR schedulers, ``Session.wrap`` and step hooks stay attached).
    A ``torch.optim`` optimizer keeps its hyperparameters and gets an empty state. Any other optimizer
    (for example ``compressor.mfac.MFAC``, whose window size is fixed at construction) is built again
    from its class with every constructor argument it was built with: those its ``constructor_kwargs()``
    method returns (MFAC has one), else those in its ``defaults``; each group keeps its own settings.
    An optimizer with a constructor argument found in neither is refused (``SurgeryError``) rather
    than rebuilt with a default in place of the value it was given.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.masks import MASK_SUFFIX, MaskSet
from compressor.core.params import normalize
from compressor.surgery.encoder import match_encoder_shapes

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


class SurgeryError(CompressorError, ValueError):
    """Channel surgery cannot carry the session along (an optimizer that cannot be rebuilt, say)."""


#: Module types whose output channels can be the root of a pruning group.
ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


# ---------------------------------------------------------------------- the dependency graph


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Tracing runs a forward pass: in eval mode, batch-norm running statistics stay untouched."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """A torch-pruning DependencyGraph of ``model``, traced in eval mode (running stats untouched)."""
    import torch_pruning as tp

    with _eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)


def out_channels(module: nn.Module) -> int:
    """Output channels of a Conv or Linear layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    raise TypeError(f"{type(module).__name__} is not a Conv or Linear layer")


def _weight_out_channels(module: nn.Module, weight_shape: torch.Size) -> int:
    """Output channels that a Conv/Linear ``weight`` of ``weight_shape`` implies for ``module``."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return weight_shape[1] * module.groups
    return weight_shape[0]


def feeds_output(group: Any) -> bool:
    """True when pruning ``group`` would change the model's output: no layer consumes its channels.

    Channels that reach another layer show up as an in-channel pruning operation on a layer that
    mixes channels (Conv that is not depthwise, Linear, multi-head attention). A group that only holds
    output channels and channel-wise layers (batch-norm, depthwise conv, ...) is an output layer's.
    """
    graph = group._DG
    for dep, _ in group:
        module = dep.target.module
        if not graph.is_in_channel_pruning_fn(dep.handler):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            continue
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
            return False
    return True


# ---------------------------------------------------------------------- match_shapes


def match_shapes(model: nn.Module, state_dict: Mapping[str, Any], example_inputs: Any) -> bool:
    """Remove channels from ``model`` until its parameters and buffers have ``state_dict``'s shapes.

    For a checkpoint of a channel-pruned model, loaded into a model built afresh. Encoder layers of
    the BERT layout first lose their trailing attention heads and FFN neurons (whole heads, by
    layout, no tracing: ``compressor.surgery.encoder.match_encoder_shapes``). Then, for every
    Conv or Linear layer with more output channels than the state dict's weight, its trailing channels are
    removed through torch-pruning's dependency graph (coupled layers, batch-norm and the consumers'
    input channels shrink with it). Values are not meaningful afterwards: load the state dict next.
    Mask buffers (``<leaf>_mask``) are resized with their parameter.

    Args:
        model: the model to reshape in place (built from the same recipe / factory as the checkpoint).
        state_dict: the checkpoint's ``model.state_dict()`` (keys as ``model.state_dict()`` has them).
        example_inputs: an input batch for tracing (a tensor or a tuple of tensors; one sample is enough).

    Returns:
        True if anything was changed, False if the shapes already matched.

    Raises:
        ValueError: a state dict shape is larger than the model's, or shapes remain different after
            removing channels (the checkpoint comes from another architecture), naming the tensors.
    """
    targets = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not _mismatches(model, targets):
        return False
    if match_encoder_shapes(model, targets):  # attention heads / FFN neurons: by layout, no tracing
        _resize_mask_buffers(model, targets)
        if not _mismatches(model, targets):
            return True
    graph = dependency_graph(model, example_inputs)
    modules = dict(model.named_modules())
    changed = True
    while changed:  # coupled layers shrink together, so recheck after every group
        changed = False
        for name, module in modules.items():
            key = f"{name}.weight" if name else "weight"
            if not isinstance(module, ROOT_TYPES) or key not in targets or module not in graph.module2node:
                continue
            have, want = out_channels(module), _weight_out_channels(module, torch.Size(targets[key]))
            if want > have:
                raise ValueError(
                    f"cannot match shapes: {key} has {want} output channels in the state dict but "
                    f"{have} in the model (channels can only be removed)"
                )
            if want < have:
                pruner = graph.get_pruner_of_module(module)
                group = graph.get_pruning_group(
                    module, pruner.prune_out_channels, idxs=list(range(want, have))
                )
                if not graph.check_pruning_group(group):
                    raise ValueError(f"cannot match shapes: {name} cannot lose {have - want} channels")
                group.prune()
                changed = True
    _resize_mask_buffers(model, targets)
    left = _mismatches(model, targets)
    if left:
        listed = "; ".join(f"{k}: model {tuple(a)} vs state dict {tuple(b)}" for k, a, b in left[:8])
        raise ValueError(f"cannot match shapes by removing channels: {listed}")
    return True


def _mismatches(model: nn.Module, targets: Mapping[str, tuple[int, ...]]) -> list[tuple[str, Any, Any]]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [
        (k, tuple(t.shape), targets[k]) for k, t in tensors if k in targets and tuple(t.shape) != targets[k]
    ]


def _resize_mask_buffers(model: nn.Module, targets: Mapping[str, tuple[int, ...]]) -> None:
    """A ``<leaf>_mask`` buffer whose parameter now has the state dict's shape gets that shape too."""
    for owner_name, module in model.named_modules():
        prefix = f"{owner_name}." if owner_name else ""
        for buf_name, buf in list(module._buffers.items()):
            if buf is None or not buf_name.endswith(MASK_SUFFIX):
                continue
            leaf = buf_name[: -len(MASK_SUFFIX)]
            param = module._parameters.get(leaf)
            want = targets.get(prefix + buf_name)
            if param is not None and want is not None and tuple(buf.shape) != want == tuple(param.shape):
                module._buffers[buf_name] = torch.ones(want, dtype=buf.dtype, device=buf.device)


# ---------------------------------------------------------------------- surgery carrying the masks


def prune_group(group: Any, masks: MaskSet | None) -> None:
    """``group.prune()``, carrying mask buffers and masked parameters' gradients through the surgery.

    torch-pruning index-selects parameters (and their ``.grad``) but not our ``<leaf>_mask`` buffers.
    Each masked parameter's data is swapped for the float64 position code 0..n-1 during the prune, so
    the surviving codes say exactly which entries were kept; values, gradient and mask are then
    gathered with them. Call ``rebind`` afterwards (the masks' grad hooks sit on the old parameters).
    """
    entries = list(masks._entries.values()) if masks is not None else []
    saved = []
    with torch.no_grad():
        for entry in entries:
            param = getattr(entry.module, entry.leaf)
            saved.append((entry, param.detach().clone(), param.grad, entry.mask.clone()))
            param.grad = None
            param.data = torch.arange(param.numel(), dtype=torch.float64, device=param.device).view_as(param)
    try:
        group.prune()
    finally:
        with torch.no_grad():
            for entry, data, grad, mask in saved:
                param = getattr(entry.module, entry.leaf)
                codes = param.detach().round().long()
                if codes.numel() and (codes.min() < 0 or codes.max() >= data.numel()):
                    raise RuntimeError(f"channel surgery changed {entry.leaf!r} in an unexpected way")
                param.data = data.reshape(-1)[codes]
                if grad is not None:
                    param.grad = grad.reshape(-1)[codes]
                entry.module._buffers[entry.buffer] = mask.reshape(-1)[codes]


# ---------------------------------------------------------------------- after surgery


def parameter_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> normalized name; take it *before* surgery and give it to ``rebind``."""
    return {id(p): normalize(n) for n, p in model.named_parameters()}


def rebind(session: Session, old_names: Mapping[int, str]) -> None:
    """Point ``session`` at the parameters of its model after channel surgery.

    ``old_names``: ``parameter_names(model)`` from before the surgery. Refreshes ``session.params``,
    rebuilds ``session.masks`` on the new parameters (keeping the mask buffers) and rebinds the base
    optimizer in place (state reset; see the module doc). A swapped-in optimizer of another modifier
    cannot be rebound, nor an optimizer whose constructor arguments are unknown: SurgeryError.
    """
    model = session.model
    session.params = {normalize(n): p for n, p in model.named_parameters()}
    session.masks = MaskSet(model, session.masks.names)
    swapped = session.optimizer is not session.base_optimizer
    if swapped and _refers_to_old(session.optimizer, old_names, session.params):
        raise SurgeryError(
            "channel surgery while another modifier's optimizer is swapped in; prune before it starts"
        )
    rebind_optimizer(session.base_optimizer, session.params, old_names, session.masks)


def _refers_to_old(optimizer: torch.optim.Optimizer, old_names: Mapping[int, str], params: Mapping) -> bool:
    return any(
        id(p) in old_names and params.get(old_names[id(p)]) is not p
        for group in optimizer.param_groups
        for p in group["params"]
    )


def rebind_optimizer(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, nn.Parameter],
    old_names: Mapping[int, str],
    masks: MaskSet | None = None,
) -> torch.optim.Optimizer:
    """``optimizer`` over the new ``params`` (by name), same groups and settings, empty state.

    The same object is changed in place and returned. A ``torch.optim`` optimizer gets the new
    parameters in its groups; another class is built again with its constructor arguments
    (``constructor_arguments``; a mapping keyed by parameters, such as MFAC's masks, follows the
    surgery: the session's ``masks`` of a parameter it masks, else the same tensor if the shape is
    unchanged) and the new one's attributes moved into ``optimizer``, whose hooks and own attributes
    (a patched ``step``) stay. SurgeryError when it cannot be rebuilt.
    """
    groups = []
    for group in optimizer.param_groups:
        new_params = [params[old_names[id(p)]] if id(p) in old_names else p for p in group["params"]]
        groups.append({**group, "params": new_params})
    if type(optimizer).__module__.startswith("torch.optim"):
        for group, new in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = new["params"]
        optimizer.state = defaultdict(dict)
        return optimizer
    kwargs = constructor_arguments(optimizer)
    kwargs = {k: _follow(v, params, old_names, masks, type(optimizer).__name__, k) for k, v in kwargs.items()}
    _transplant(_rebuild(type(optimizer), groups, kwargs), into=optimizer)
    return optimizer


def check_rebuildable(optimizer: torch.optim.Optimizer) -> None:
    """SurgeryError before any surgery, rather than after it, when ``rebind_optimizer`` could not
    rebuild ``optimizer`` (its constructor arguments are unknown)."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        constructor_arguments(optimizer)


def constructor_arguments(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The keyword arguments, besides the parameters, that build ``optimizer``'s class again as it is.

    Each constructor argument comes from ``optimizer.constructor_kwargs()`` when the class has that
    method, else from ``optimizer.defaults`` (a ``**kwargs`` constructor also gets the other entries
    of ``defaults``). SurgeryError naming the class and the arguments whose value is not known.
    """
    cls = type(optimizer)
    own = getattr(optimizer, "constructor_kwargs", None)
    known: dict[str, Any] = dict(own()) if callable(own) else {}
    defaults = dict(getattr(optimizer, "defaults", {}))
    kwargs, unknown, var_keyword = {}, [], False
    for name, param in list(inspect.signature(cls).parameters.items())[1:]:  # [0]: the parameters
        if param.kind is param.VAR_KEYWORD:
            var_keyword = True
        elif param.kind is param.VAR_POSITIONAL:
            continue
        elif name in known or name in defaults:
            kwargs[name] = known[name] if name in known else defaults[name]
        else:
            unknown.append(name)
    if unknown:
        listed = ", ".join(repr(n) for n in unknown)
        raise SurgeryError(
            f"cannot rebuild {cls.__name__} over the channel-pruned parameters: the value of its "
            f"constructor argument(s) {listed} is unknown (not in its defaults, and {cls.__name__} has "
            "no constructor_kwargs() method returning them); add one, keep them in defaults, or "
            "use a torch.optim optimizer"
        )
    if var_keyword:
        kwargs.update({k: v for k, v in {**defaults, **known}.items() if k not in kwargs})
    return kwargs


def _follow(
    value: Any,
    params: Mapping[str, nn.Parameter],
    old_names: Mapping[int, str],
    masks: MaskSet | None,
    owner: str,
    argument: str,
) -> Any:
    """A constructor argument carried through the surgery: a mapping keyed by old parameters (MFAC's
    ``masks``) is keyed by the new ones, each tensor value replaced by the session's mask of that
    parameter (or kept, if it still has the parameter's shape)."""
    if not isinstance(value, Mapping) or not any(id(k) in old_names for k in value):
        return value
    out = {}
    for key, item in value.items():
        name = old_names.get(id(key))
        if name is None:
            out[key] = item
            continue
        new = params[name]
        if masks is not None and name in masks and isinstance(item, torch.Tensor):
            item = masks.mask(name)
        elif isinstance(item, torch.Tensor) and item.shape != new.shape:
            raise SurgeryError(
                f"cannot rebuild {owner} over the channel-pruned parameters: its {argument!r} holds a "
                f"tensor of shape {tuple(item.shape)} for {name}, now {tuple(new.shape)}"
            )
        out[new] = item
    return out


def _rebuild(cls: type, groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        return cls(groups, **kwargs)
    except Exception as err:
        raise SurgeryError(
            f"cannot rebuild {cls.__name__} over the channel-pruned parameters ({type(err).__name__}: {err})"
        ) from err


def _transplant(fresh: torch.optim.Optimizer, into: torch.optim.Optimizer) -> None:
    """Make ``into`` the optimizer ``fresh`` is, keeping its identity, its registered hooks and the
    attributes that ``fresh`` does not set (a patched ``step``, an LR scheduler's marks)."""
    kept = {k: v for k, v in vars(into).items() if k not in vars(fresh) or _is_hooks(k)}
    vars(into).clear()
    vars(into).update(vars(fresh))
    vars(into).update(kept)


def _is_hooks(attribute: str) -> bool:
    """An Optimizer's registry of hooks (``_optimizer_step_pre_hooks``, ...): their handles point at it."""
    return attribute.startswith("_optimizer_") and attribute.endswith("_hooks")


# ---------------------------------------------------------------------- resume


def example_inputs_of(session: Session) -> Any:
    """The model's inputs for a batch of the first sample of the session's data (for tracing), on the
    model's device, or None when it has no data.

    The session's task collates the sample and says what the model takes (``Task.model_inputs``):
    for classification the input tensor (1, *input_shape), for ``model-loss`` the dict of keyword
    arguments (each tensor with a leading dim of 1).
    """
    sampler = getattr(session, "sampler", None)
    if sampler is None or len(sampler.data) == 0:
        return None
    task = sampler.task
    device = next(iter(session.params.values())).device if session.params else torch.device("cpu")
    return task.model_inputs(task.to_device(sampler.collate([sampler.data[0]]), device))


def resume_shapes(session: Session, state_dict: Mapping[str, Any], example_inputs: Any = None) -> bool:
    """Before ``model.load_state_dict``: match the session's model to a (channel-pruned) checkpoint.

    Runs ``match_shapes`` (example inputs default to one sample of the session's data) and, if it
    changed the model, ``rebind`` so that params, masks and the base optimizer follow. Returns whether
    anything changed.
    """
    model = session.model
    targets = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not _mismatches(model, targets):
        return False
    if example_inputs is None:
        example_inputs = example_inputs_of(session)
        if example_inputs is None:
            raise ValueError(
                "the checkpoint's shapes differ from the model's; matching them needs example inputs"
            )
    old = parameter_names(model)
    changed = match_shapes(model, state_dict, example_inputs)
    if changed:
        rebind(session, old)
    return changed


def count_parameters(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Number of parameter entries of ``model`` (or of the named ones)."""
    chosen = None if names is None else set(names)
    return sum(p.numel() for n, p in model.named_parameters() if chosen is None or normalize(n) in chosen)
