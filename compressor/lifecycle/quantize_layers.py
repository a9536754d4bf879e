"""Quantize a model's weights in place: round to nearest, GPTQ from calibration activations, or the
OBS quantization step with an M-FAC block inverse Fisher (the math: ``compressor.mfac.gptq``).

Each quantized weight ends as (q - z) * s exactly, with its codes, scales and zero points in the
model's buffers (``compressor.core.quantized``). Weights of embeddings are rounded to nearest by
every method: an embedding's inputs are one-hot rows, so its H = 2 X X^T is diagonal and GPTQ's
update is zero.

``gptq_activations``: H = 2 X X^T / n of each layer's inputs, layer by layer in the order the model
runs them, each layer's inputs taken after the layers before it were quantized; layers that read the
same input (query, key, value) share one H (``compressor.lifecycle.calibration``). Memory: one
layer's H (cols^2 float64) and one calibration batch's activations.

``gptq_fisher``: m gradients of the loss over all selected Linear weights (at the weights before
quantization), accumulated into the streamed block-diagonal Fisher (``BlockFisherInverse``, blocks of
B coordinates along each row, B dividing the row and aligned with the groups); each block's F_b^-1
takes H^-1's place in the same sequential step. Memory: d * B float64 values (d: the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from compressor.core import distributed
from compressor.core.params import normalize
from compressor.core.quantized import SMOOTH, write
from compressor.lifecycle.calibration import Calibration
from compressor.lifecycle.sampling import GradientSampler
from compressor.mfac import BlockFisherInverse
from compressor.mfac.gptq import (
    HessianAccumulator,
    block_inverses,
    fisher_quantize,
    gptq_quantize,
    smoothing_scales,
)
from compressor.mfac.grid import QuantizedWeight, dynamic_quantize, quantize_rtn


@dataclass(frozen=True)
class Format:
    """The grid of every weight: ``bits`` (4 or 8), ``symmetric``, ``group_size`` (None: per row),
    ``reduce_range`` (int8 codes in the 7-bit range, ``compressor.mfac.grid``)."""

    bits: int
    symmetric: bool
    group_size: int | None
    reduce_range: bool = False

    @property
    def grid_bits(self) -> int:
        """The bits of the grid the math uses: 7 for reduced-range int8."""
        return 7 if self.bits == 8 and self.reduce_range else self.bits


def owner(model: nn.Module, name: str) -> nn.Module:
    """The module holding parameter ``name`` (normalized)."""
    path = name.rpartition(".")[0]
    modules = {normalize(n): m for n, m in model.named_modules()}
    return modules[path]


def is_embedding(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the weight of an ``nn.Embedding``."""
    return isinstance(owner(model, name), nn.Embedding)


def store(model: nn.Module, name: str, record: QuantizedWeight, out: dict[str, QuantizedWeight]) -> None:
    if record.bits == 7:  # reduced-range int8: stored (and exported) as int8
        record = replace(record, bits=8)
    write(model, name, record)
    out[name] = record


@torch.no_grad()
def rtn(
    model: nn.Module, names: list[str], fmt: Format, masks: dict[str, torch.Tensor]
) -> dict[str, QuantizedWeight]:
    """Round every weight of ``names`` to nearest on its own grid; masked-off weights stay 0."""
    params = dict(model.named_parameters())
    out: dict[str, QuantizedWeight] = {}
    for name in names:
        w = _param(params, name)
        record = quantize_rtn(w.detach(), fmt.grid_bits, fmt.symmetric, fmt.group_size, masks.get(name))
        store(model, name, record, out)
    return out


def _param(params: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter:
    for key, p in params.items():
        if normalize(key) == name:
            return p
    raise KeyError(name)


@torch.no_grad()
def gptq_activations(
    model: nn.Module,
    names: list[str],
    fmt: Format,
    masks: dict[str, torch.Tensor],
    calibration: Calibration,
    *,
    damp: float,
    block_size: int,
    act_order: bool,
    progress: Callable[[str], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """GPTQ of every Linear weight of ``names`` with H from its calibration inputs, stage by stage;
    embeddings by ``rtn``."""
    embeddings = [n for n in names if is_embedding(model, n)]
    out = rtn(model, embeddings, fmt, masks)
    linear = {n.rpartition(".")[0]: n for n in names if n not in embeddings}
    modules = {path: owner(model, name) for path, name in linear.items()}
    for stage in calibration.walk(modules):
        w0 = modules[stage.names[0]].weight
        acc = HessianAccumulator(w0.shape[1], device=w0.device)
        stage.capture(acc.add)
        hessian = acc.hessian()
        for path in stage.names:
            name = linear[path]
            w = modules[path].weight.detach()
            result = gptq_quantize(
                w,
                hessian,
                bits=fmt.grid_bits,
                symmetric=fmt.symmetric,
                group_size=fmt.group_size,
                damp=damp,
                block_size=block_size,
                act_order=act_order,
                mask=masks.get(name),
            )
            store(model, name, result.quantized, out)
            if progress is not None:
                progress(name)
    return out


@torch.no_grad()
def gptq_fisher(
    model: nn.Module,
    names: list[str],
    fmt: Format,
    masks: dict[str, torch.Tensor],
    sampler: GradientSampler,
    *,
    num_grads: int,
    grad_batch_size: int,
    block_size: int,
    damp: float,
    key: int,
) -> dict[str, QuantizedWeight]:
    """The OBS quantization step of every Linear weight of ``names`` with the M-FAC block inverse
    Fisher of their coordinates (``damp`` relative to the Fisher's mean diagonal); embeddings by
    ``rtn``."""
    embeddings = [n for n in names if is_embedding(model, n)]
    out = rtn(model, embeddings, fmt, masks)
    linear = [n for n in names if n not in embeddings]
    params = dict(model.named_parameters())
    weights = [_param(params, n) for n in linear]
    dim = sum(w.numel() for w in weights)
    fi = BlockFisherInverse(dim, block_size, dtype=torch.float64, device=weights[0].device)
    rows = max(1, min(num_grads, 16))
    for chunk in sampler.chunks(linear, num_grads, grad_batch_size, key=key, chunk_rows=rows):
        fi.add(chunk)
    if distributed.world_size() > 1:
        fi.all_reduce()
    fi.damp = damp * fi.mean_fisher_diagonal() if fi.mean_fisher_diagonal() > 0 else damp
    blocks = block_inverses(fi)
    start = 0
    for name, w in zip(linear, weights, strict=True):
        count = w.numel() // block_size
        result = fisher_quantize(
            w.detach(),
            blocks[start : start + count],
            bits=fmt.grid_bits,
            symmetric=fmt.symmetric,
            group_size=fmt.group_size,
            mask=masks.get(name),
        )
        start += count
        store(model, name, result.quantized, out)
    return out


@torch.no_grad()
def smooth(
    model: nn.Module, names: list[str], calibration: Calibration, alpha: float
) -> dict[str, torch.Tensor]:
    """SmoothQuant: per input channel j of every Linear weight of ``names``, s_j = max|x_j|^alpha /
    max|W_:,j|^(1 - alpha) (``smoothing_scales``; x over the calibration inputs' real tokens, W over
    the layers that read the same input); the weight's column j is multiplied by s_j and the
    layer's input by 1 / s_j (its ``_qsmooth`` buffer), so every output is unchanged while the
    activations' outlier channels shrink. Returns 1 / s by weight name."""
    linear = {n.rpartition(".")[0]: n for n in names if not is_embedding(model, n)}
    modules = {path: owner(model, name) for path, name in linear.items()}
    stages = calibration.stages(modules)
    peaks: dict[nn.Module, torch.Tensor] = {}

    def track(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor | None], None]:
        def consume(x: torch.Tensor, keep: torch.Tensor | None) -> None:
            rows = x if keep is None else x[keep]
            peak = rows.abs().amax(dim=0).to(torch.float64) if rows.numel() else torch.zeros(x.shape[1])
            peaks[module] = torch.maximum(peaks[module], peak) if module in peaks else peak

        return consume

    calibration.observe({modules[stage[0]]: track(modules[stage[0]]) for stage in stages})
    out: dict[str, torch.Tensor] = {}
    for stage in stages:
        weights = [modules[path].weight for path in stage]
        column_peak = torch.stack([w.detach().abs().amax(dim=0).to(torch.float64) for w in weights]).amax(
            dim=0
        )
        scale = smoothing_scales(peaks[modules[stage[0]]].cpu(), column_peak.cpu(), alpha)
        for path, w in zip(stage, weights, strict=True):
            factor = scale.to(device=w.device)
            w.mul_(factor.to(w.dtype))
            buffer = getattr(modules[path], "weight" + SMOOTH)
            buffer.copy_(1.0 / factor)
            out[linear[path]] = buffer
    return out


@torch.no_grad()
def activation_errors(model: nn.Module, names: list[str], calibration: Calibration) -> dict[str, float]:
    """Per Linear weight of ``names``: ||(X - dq(X)) W^T||^2 / ||X W^T||^2 over the calibration
    inputs X (real tokens), where dq is onnxruntime's dynamic uint8 quantization of each whole input
    tensor (padding included, as deployed): how much of
    the layer's output the int8 activations lose (the layers to keep in float lose most)."""
    sums: dict[str, list[float]] = {}
    consumers = {}
    for name in names:
        if is_embedding(model, name):
            continue
        module = owner(model, name)
        sums[name] = [0.0, 0.0]

        def consume(
            x: torch.Tensor, keep: torch.Tensor | None, name: str = name, module: nn.Module = module
        ) -> None:
            w = module.weight.detach().to(torch.float32)
            x = x.to(torch.float32)
            e = x - dynamic_quantize(x)  # one grid over the whole tensor, padding included, as deployed
            if keep is not None:  # the error that matters: on real tokens
                x, e = x[keep], e[keep]
            y, e = x @ w.T, e @ w.T
            sums[name][0] += float(e.square().sum())
            sums[name][1] += float(y.square().sum())

        consumers[module] = consume
    calibration.observe(consumers)
    return {n: (s[0] / s[1] if s[1] > 0 else 0.0) for n, s in sums.items()}
