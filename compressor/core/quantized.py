"""Quantized weights kept in the model as buffers beside each weight, so every checkpoint holds them.

For a quantized parameter ``<module>.<param>`` (a Linear's or an Embedding's (rows, cols) weight) the
module holds, as masks are held (``compressor.core.masks``):

    <param>_qcodes   (rows, cols) int8      the integer codes q
    <param>_qscale   (rows, groups) float32 the scales s (all 0 until the weight is quantized)
    <param>_qzero    (rows, groups) int8    the zero points z
    <param>_qformat  (2,) int8              [bits, symmetric]
    <param>_qlatent  (rows, cols) float32   only while quantization-aware fine-tuning runs: the
                                            latent weights the optimizer moves (straight-through)
    <param>_qsmooth  (cols,) float32        only with activation smoothing (SmoothQuant): the
                                            module's input is multiplied by it (a forward pre-hook,
                                            a Mul in the exported graph) and the weight's columns
                                            were divided by it, so the product is unchanged

and the parameter itself equals (q - z) * s exactly (``compressor.mfac.grid``). The buffers are in
the model's ``state_dict``: a run's checkpoint, a Hugging Face Trainer checkpoint and
``save_pretrained`` all carry them; ``records`` reads them back (the exporters take them from a
state dict with ``pop_records``). They must exist before a checkpoint is loaded into a fresh model:
``attach`` registers them (the ``Quantization`` modifier's ``model_buffers`` gives their shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

from compressor.core.params import normalize
from compressor.mfac.grid import QuantizedWeight

CODES, SCALE, ZERO, FORMAT, LATENT = "_qcodes", "_qscale", "_qzero", "_qformat", "_qlatent"
SMOOTH = "_qsmooth"
SUFFIXES = (CODES, SCALE, ZERO, FORMAT, LATENT, SMOOTH)
#: The buffers of the integer record (``pop_records`` takes them out of a state dict).
RECORD = (CODES, SCALE, ZERO, FORMAT, LATENT)


def buffer_shapes(
    name: str,
    shape: tuple[int, ...],
    bits: int,
    symmetric: bool,
    group_size: int | None,
    latent: bool,
    smooth: bool = False,
) -> dict[str, torch.Tensor]:
    """The initial buffers of parameter ``name`` (full names -> tensors), not yet quantized."""
    rows, cols = shape
    groups = 1 if group_size is None else cols // group_size
    out = {
        name + CODES: torch.zeros(rows, cols, dtype=torch.int8),
        name + SCALE: torch.zeros(rows, groups, dtype=torch.float32),
        name + ZERO: torch.zeros(rows, groups, dtype=torch.int8),
        name + FORMAT: torch.tensor([bits, int(symmetric)], dtype=torch.int8),
    }
    if latent:
        out[name + LATENT] = torch.zeros(rows, cols, dtype=torch.float32)
    if smooth:
        out[name + SMOOTH] = torch.ones(cols, dtype=torch.float32)
    return out


def attach(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    """Register each ``module.path.buffer`` of ``buffers`` on its module (idempotent: an existing
    buffer of the same shape is kept), on the device of the module's parameters."""
    modules = {normalize(n): m for n, m in model.named_modules()}
    for full, initial in buffers.items():
        path, _, attr = full.rpartition(".")
        module = modules.get(path)
        if module is None:
            raise ValueError(f"no module {path!r} for the quantization buffer {full!r}")
        existing = getattr(module, attr, None)
        if not (isinstance(existing, torch.Tensor) and existing.shape == initial.shape):
            device = next((p.device for p in module.parameters(recurse=False)), initial.device)
            module.register_buffer(attr, initial.to(device))
        if attr.endswith(SMOOTH):
            _smooth_inputs(module, attr)


def _smooth_inputs(module: nn.Module, attr: str) -> None:
    """Multiply ``module``'s input by its buffer ``attr`` before every forward (once per module)."""
    if getattr(module, "_compressor_smoothing", None) == attr:
        return

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        factor = getattr(mod, attr)
        return (args[0] * factor.to(args[0].dtype), *args[1:])

    module.register_forward_pre_hook(hook)
    module._compressor_smoothing = attr  # type: ignore[assignment]


def smoothing_buffers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The smoothing buffers of a state dict (to ``attach`` to a fresh model before loading it)."""
    return {k: torch.ones_like(v) for k, v in state_dict.items() if k.endswith(SMOOTH)}


def _module_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    modules = {normalize(n): m for n, m in model.named_modules()}
    return modules[path], attr


def write(model: nn.Module, name: str, record: QuantizedWeight) -> None:
    """Store ``record`` in ``name``'s buffers and set the parameter to its dequantized values."""
    module, attr = _module_of(model, name)
    with torch.no_grad():
        getattr(module, attr + CODES).copy_(record.codes)
        getattr(module, attr + SCALE).copy_(record.scales)
        getattr(module, attr + ZERO).copy_(record.zero_points)
        getattr(module, attr).copy_(record.dequantize().to(getattr(module, attr).dtype))


def read(model: nn.Module, name: str, group_size: int | None) -> QuantizedWeight:
    """The record held in ``name``'s buffers."""
    module, attr = _module_of(model, name)
    fmt = getattr(module, attr + FORMAT)
    return QuantizedWeight(
        codes=getattr(module, attr + CODES),
        scales=getattr(module, attr + SCALE),
        zero_points=getattr(module, attr + ZERO),
        bits=int(fmt[0]),
        symmetric=bool(fmt[1]),
        group_size=group_size,
    )


def latent(model: nn.Module, name: str) -> torch.Tensor | None:
    """The latent weights of ``name`` (quantization-aware fine-tuning), or None."""
    module, attr = _module_of(model, name)
    value = getattr(module, attr + LATENT, None)
    return value if isinstance(value, torch.Tensor) else None


def pop_records(state_dict: MutableMapping[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """Remove the record buffers (all but the smoothing ones, which the model needs to compute)
    from ``state_dict``; the records of the quantized weights (scales not all zero), by normalized
    parameter name."""
    names = [k[: -len(FORMAT)] for k in list(state_dict) if k.endswith(FORMAT)]
    out: dict[str, QuantizedWeight] = {}
    for name in names:
        parts = {s: state_dict.pop(name + s, None) for s in RECORD}
        scales, codes = parts[SCALE], parts[CODES]
        if scales is None or codes is None or not bool((scales != 0).any()):
            continue
        groups = int(scales.shape[1])
        cols = int(codes.shape[1])
        fmt = parts[FORMAT]
        out[normalize(name)] = QuantizedWeight(
            codes=codes,
            scales=scales,
            zero_points=parts[ZERO],
            bits=int(fmt[0]),
            symmetric=bool(fmt[1]),
            group_size=None if groups == 1 else cols // groups,
        )
    for key in [k for k in state_dict if k.endswith(RECORD)]:
        del state_dict[key]
    return out
