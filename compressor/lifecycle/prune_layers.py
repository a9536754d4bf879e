"""Prune a model's Linear weights layer by layer from calibration inputs: SparseGPT and Wanda (the
math: ``compressor.mfac.sparsegpt``).

Both walk the selected layers in the order the model runs them (``Calibration.walk``): each layer's
inputs are taken after the layers before it were pruned, layers reading the same input (query, key,
value) share one statistic, and each layer gets the same target sparsity (no ranking across layers).

``sparsegpt``: H = 2 X X^T / n of each layer's inputs, then the OBS sweep over the columns with the
mask chosen on the fly; the kept weights move to compensate. With ``joint`` the same sweep puts the
kept weights of the named layers on their quantization grid (SparseGPT's joint mode): one pass,
pruned weights exactly 0, the records written to the model's buffers
(``compressor.core.quantized``). Memory: one layer's H (cols^2 float64) and its factor, plus the
calibration's block cache.

Linear layers, and transformers' ``Conv1D`` (GPT-2: the weight stored (in, out)), taken transposed.

``wanda``: ||X_j|| of each layer's inputs, the weights of least |W_ij| ||X_j|| pruned per output row;
no update. Memory: one vector per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compressor.lifecycle.calibration import Calibration
from compressor.lifecycle.quantize_layers import Format, owner, store
from compressor.mfac.gptq import HessianAccumulator
from compressor.mfac.grid import QuantizedWeight
from compressor.mfac.sparsegpt import NormAccumulator, QuantSpec, Structure, sparsegpt_prune, wanda_mask


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer: y = x W + b with W
    stored (in, out), the transpose of a Linear's)."""
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and getattr(module, "weight", None) is not None
    )


def _modules(model: nn.Module, names: list[str]) -> tuple[dict[str, str], dict[str, nn.Module]]:
    """(module path -> weight name, module path -> module) of the Linear (or Conv1D) weights ``names``."""
    linear = {n.rpartition(".")[0]: n for n in names}
    modules = {path: owner(model, name) for path, name in linear.items()}
    for path, module in modules.items():
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            raise ValueError(f"{linear[path]} is not the weight of a Linear layer")
    return linear, modules


def _rows_by_inputs(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of ``module`` as (outputs, inputs): transposed for a Conv1D."""
    return t.T if is_conv1d(module) else t


@torch.no_grad()
def sparsegpt(
    model: nn.Module,
    names: list[str],
    sparsity: float,
    structure: Structure,
    masks: dict[str, torch.Tensor],
    calibration: Calibration,
    *,
    damp: float,
    block_size: int,
    mask_block: int,
    joint: tuple[Format, list[str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """SparseGPT on every Linear weight of ``names`` to ``sparsity`` (or the N:M / tile
    ``structure``); the weights change in place. ``masks``: masks already in force (kept pruned).
    ``joint``: (grid, weight names) quantized in the same sweep. Returns (new masks, records)."""
    linear, modules = _modules(model, names)
    spec = None
    quantized: set[str] = set()
    if joint is not None:
        fmt, joint_names = joint
        spec = QuantSpec(fmt.grid_bits, fmt.symmetric, fmt.group_size)
        quantized = set(joint_names)
    new: dict[str, torch.Tensor] = {}
    records: dict[str, QuantizedWeight] = {}
    for stage in calibration.walk(modules):
        head = modules[stage.names[0]]
        first = _rows_by_inputs(head, head.weight)
        acc = HessianAccumulator(first.shape[1], device=first.device)
        stage.capture(acc.add)
        hessian = acc.hessian()
        for path in stage.names:
            name = linear[path]
            module = modules[path]
            weight = _rows_by_inputs(module, module.weight)  # a view: writes reach the parameter
            if name in quantized and is_conv1d(module):
                raise ValueError(f"{name}: joint quantization takes Linear layers (this is a Conv1D)")
            mask = masks.get(name)
            result = sparsegpt_prune(
                weight.detach(),
                hessian,
                sparsity=None if isinstance(structure, tuple) else sparsity,
                structure=structure,
                damp=damp,
                block_size=block_size,
                mask_block=mask_block,
                mask=None if mask is None else _rows_by_inputs(module, mask),
                quantize=spec if name in quantized else None,
            )
            new[name] = _rows_by_inputs(module, result.mask)
            if result.quantized is not None:
                store(model, name, result.quantized, records)  # the weight: its dequantized codes
            else:
                weight.copy_(result.weight.to(weight.dtype))
            if progress is not None:
                progress(name)
    return new, records


@torch.no_grad()
def wanda(
    model: nn.Module,
    names: list[str],
    sparsity: float,
    structure: tuple[int, int] | None,
    masks: dict[str, torch.Tensor],
    calibration: Calibration,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Wanda on every Linear weight of ``names``: per output row, the weights of least
    |W_ij| ||X_j|| pruned to ``sparsity`` (or N:M); pruned weights set to 0 in place, the others
    unchanged. Returns the new masks."""
    linear, modules = _modules(model, names)
    new: dict[str, torch.Tensor] = {}
    for stage in calibration.walk(modules):
        head = modules[stage.names[0]]
        first = _rows_by_inputs(head, head.weight)
        acc = NormAccumulator(first.shape[1], device=first.device)
        stage.capture(acc.add)
        norms = acc.norms()
        for path in stage.names:
            name = linear[path]
            module = modules[path]
            weight = _rows_by_inputs(module, module.weight)
            mask = masks.get(name)
            keep = wanda_mask(
                weight.detach(),
                norms,
                sparsity=None if structure is not None else sparsity,
                structure=structure,
                mask=None if mask is None else _rows_by_inputs(module, mask),
            )
            weight.mul_(keep.to(weight.dtype))
            new[name] = _rows_by_inputs(module, keep)
            if progress is not None:
                progress(name)
    return new
