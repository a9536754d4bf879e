"""Quantization: weights to int8 or 4-bit grids, by rounding or by second-order error correction.

At ``start`` (one shot) the weights of ``params`` (Linear and Embedding weights) are quantized:

    method rtn                     round to nearest on each row's (or group's) grid
    method gptq, curvature activations   GPTQ: H = 2 X X^T of each layer's calibration inputs,
                                   layer by layer, each after the layers before it were quantized
    method gptq, curvature fisher  the same OBS step with the M-FAC block inverse Fisher of the
                                   layer's own weights (m sampled gradients of the task's loss)

Grids (``compressor.mfac.grid``): ``bits`` 8 or 4, ``symmetric`` or not, per output channel
(``group_size: null``) or groups of ``group_size`` inputs. Pruned weights stay exactly 0 (0 is on
every grid) and a mask that exists is kept. Codes, scales and zero points live in the model's
buffers (``compressor.core.quantized``): every checkpoint holds them and ``compressor export``
writes them as they are.

After ``start``, the weights stay on their grid: while the modifier is active (``end`` after
``start``; omitted: to the end of training) the optimizer moves latent weights and the model runs
on their quantized values (straight-through fake quantization, the grid fixed); after ``end`` (or
right away when ``end`` equals ``start``) the quantized weights are held as they are.

int8 codes use the reduced range [-64, 64] by default (``reduce_range``): onnxruntime's integer
products of uint8 activations and int8 weights add pairs of products into int16 with saturation on
CPUs without AVX-512 VNNI, which full-range codes reach (measured on MiniLM: bench/quantization.py);
GPTQ recovers most of the bit the smaller range costs. For int8 with dynamically quantized
activations (onnxruntime's integer path): ``auto_fallback: k``
keeps in float the k Linear layers whose outputs lose most to uint8 activations on the calibration
data (measured, ``activation_errors``), ``float_fallback`` names layers to keep in float yourself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from compressor.core import distributed
from compressor.core.modifier import Modifier, update_due
from compressor.core.params import match_params, normalize
from compressor.core.quantized import attach, buffer_shapes, latent, read
from compressor.lifecycle import quantize_layers as layers
from compressor.lifecycle.calibration import Calibration, CalibrationSettings
from compressor.mfac.grid import dequantize, quantize

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


class FisherSettings(BaseModel):
    """The M-FAC block Fisher for ``curvature: fisher``."""

    model_config = ConfigDict(extra="forbid")
    num_grads: int = Field(64, ge=1, description="m: sampled gradients")
    grad_batch_size: int = Field(16, ge=1, description="samples per gradient")
    block_size: int = Field(
        32, ge=1, description="B: Fisher block along each row (divides it, aligned with groups)"
    )
    damp: float = Field(0.1, gt=0, description="lambda relative to the Fisher's mean diagonal")


class Quantization(Modifier):
    """Weights of ``params`` to ``bits``-bit integer grids at ``start`` (module doc)."""

    type: Literal["Quantization"] = "Quantization"
    params: list[str] = Field(min_length=1, description="exact names, globs or re: patterns")
    bits: Literal[4, 8] = 8
    symmetric: bool = True
    reduce_range: bool | None = Field(
        None,
        description="int8 codes in [-64, 64], which onnxruntime's u8s8 products never saturate "
        "(null: true for bits 8)",
    )
    group_size: int | None = Field(None, ge=1, description="inputs per group; null: per output channel")
    method: Literal["rtn", "gptq"] = "gptq"
    curvature: Literal["activations", "fisher"] = "activations"
    damp: float = Field(0.01, gt=0, description="GPTQ: lambda relative to mean diag H")
    block_size: int = Field(128, ge=1, description="GPTQ: columns per lazy batch update")
    act_order: bool = Field(False, description="GPTQ: columns in decreasing diag H")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    fisher: FisherSettings = Field(default_factory=FisherSettings)
    smoothing: float | None = Field(
        None, gt=0, lt=1, description="int8: SmoothQuant's alpha (null: no smoothing)"
    )
    float_fallback: list[str] = Field(default_factory=list, description="patterns of weights kept in float")
    auto_fallback: int = Field(
        0, ge=0, description="int8: keep the k Linear layers losing most to int8 activations"
    )

    _names: list[str] = PrivateAttr(default_factory=list)
    _done: bool = PrivateAttr(default=False)
    _kept_float: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _fallback_is_int8(self) -> Quantization:
        if self.auto_fallback and self.bits != 8:
            raise ValueError("auto_fallback is for int8 (activations are quantized on that path only)")
        if self.reduce_range and self.bits != 8:
            raise ValueError("reduce_range is for int8 (bits: 8)")
        if self.smoothing is not None and self.bits != 8:
            raise ValueError("smoothing is for int8 (activations are quantized on that path only)")
        if self.reduce_range is None:
            self.reduce_range = self.bits == 8
        return self

    # ------------------------------------------------------------------ settings and shapes

    def parameter_patterns(self) -> list[str]:
        return list(self.params)

    def shape_problems(self, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
        """(field, message) for selected weights this quantizer cannot take: not 2-D, a group size
        that does not divide the row, a Fisher block that does not fit the rows and groups."""
        problems: list[tuple[str, str]] = []
        for name, shape in shapes.items():
            if len(shape) != 2:
                problems.append(
                    ("params", f"{name} has shape {list(shape)}: only 2-D weights (Linear, Embedding)")
                )
                continue
            cols = shape[1]
            if self.group_size is not None and cols % self.group_size:
                problems.append(
                    (
                        "group_size",
                        f"group_size {self.group_size} does not divide the {cols} inputs of {name}",
                    )
                )
            if self.method == "gptq" and self.curvature == "fisher":
                b, g = self.fisher.block_size, self.group_size or cols
                if cols % b or (g % b and b % g):
                    problems.append(
                        (
                            "fisher",
                            f"fisher.block_size {b} must divide the {cols} inputs of {name} and be "
                            f"aligned with its groups of {g}",
                        )
                    )
        return problems

    def _formats(self) -> layers.Format:
        return layers.Format(self.bits, self.symmetric, self.group_size, self.reduce_range)

    def model_buffers(self, model: Any) -> dict[str, Any]:
        """Codes, scales, zero points and format of every selected weight, latent weights when
        fine-tuning follows, input smoothing of Linear layers with ``smoothing``:
        ``compressor.core.quantized``."""
        params = {normalize(n): p for n, p in distributed.unwrap(model).named_parameters()}
        names = match_params(self.params, list(params))
        fine_tune = self.end is None or self.end != self.start
        out: dict[str, Any] = {}
        for name in names:
            shape = tuple(params[name].shape)
            if len(shape) == 2 and (self.group_size is None or shape[1] % self.group_size == 0):
                linear = isinstance(layers.owner(distributed.unwrap(model), name), torch.nn.Linear)
                smooth = self.smoothing is not None and linear
                out.update(
                    buffer_shapes(name, shape, self.bits, self.symmetric, self.group_size, fine_tune, smooth)
                )
        return out

    def gradient_bytes(self, num_params: int) -> int:
        """Fisher: the block sums (d * B float64) and a chunk of 16 rows; activations: 0 here, one
        layer's H at a time (reported by ``preflight_bytes``)."""
        if self.method == "gptq" and self.curvature == "fisher":
            return num_params * self.fisher.block_size * 8 + 16 * num_params * 4
        return 0

    def memory_estimate(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, str]:
        """(bytes, what they are) beyond the model, for the memory preflight: GPTQ from activations
        holds one layer's H at a time (cols^2 float64, and as much again for its factor), plus one
        calibration batch's activations; the Fisher curvature holds d * B float64 sums (the streamed
        block Fisher) and a chunk of 16 gradient rows; rounding holds nothing."""
        widths = [shape[-1] for shape in shapes.values() if len(shape) == 2]
        if self.method == "rtn" or not widths:
            return 0, "rounding to nearest"
        if self.curvature == "fisher":
            count = sum(math.prod(shape) for shape in shapes.values())
            return self.gradient_bytes(
                count
            ), f"a block Fisher of {count:,} x {self.fisher.block_size} values"
        return 2 * 8 * max(widths) ** 2, f"one layer's H at a time ({max(widths)} x {max(widths)} float64)"

    # ------------------------------------------------------------------ hooks

    def initialize(self, session: Session) -> None:
        super().initialize(session)
        names = session.match(self.params)
        kept = session.match(self.float_fallback) if self.float_fallback else []
        shapes = {n: tuple(session.params[n].shape) for n in names}
        problems = self.shape_problems(shapes)
        if problems:
            raise ValueError(f"{self.type}: {problems[0][1]}")
        for name in names:
            module = layers.owner(session.model, name)
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or not name.endswith(".weight"):
                raise ValueError(f"{self.type}: {name} is not the weight of a Linear or an Embedding")
        self._names = [n for n in names if n not in kept]
        if not self._names:
            raise ValueError(f"{self.type}: float_fallback keeps every selected weight in float")
        needs_data = self.method == "gptq" or self.auto_fallback or self.smoothing is not None
        if needs_data and getattr(session, "sampler", None) is None:
            raise ValueError(f"{self.type}: {self.method} needs calibration data: give the Session data=...")

    def before_step(self, session: Session) -> None:
        if not self._done and update_due([self.start_step], session.step, None):
            self._quantize(session)

    def after_step(self, session: Session) -> None:
        if self._done:
            self._hold(session, train=self.active(session.step))

    def finalize(self, session: Session) -> None:
        if not self._done and self.start_step <= session.step:
            self._quantize(session)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self._done, "kept_float": list(self._kept_float)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._done = bool(state.get("done", False))
        self._kept_float = list(state.get("kept_float", []))

    # ------------------------------------------------------------------ joint pruning

    def joint_format(self, session: Session) -> tuple[layers.Format, list[str]] | None:
        """For a layer-wise pruner updating at ``session.step``: (the grid, the weights) it may
        quantize in its own sweep (SparseGPT's joint mode), when this modifier quantizes at this very
        step by GPTQ from activations (natural order, no smoothing, no fallback), with the model's
        buffers ready for the records; else None. The pruner hands its records back through
        ``joint_done``."""
        eligible = (
            not self._done
            and self.method == "gptq"
            and self.curvature == "activations"
            and self.smoothing is None
            and not self.auto_fallback
            and not self.act_order
            and self.start_step == session.step
        )
        if not eligible:
            return None
        model = _unwrapped(session.model)
        attach(model, self.model_buffers(model))  # the buffers the pruner writes the records to
        return self._formats(), list(self._names)

    def joint_done(self, session: Session, records: dict[str, Any]) -> None:
        """The pruner quantized the weights of ``records`` (written to the model's buffers): quantize
        the rest of ``params`` now and hold every weight on its grid from here on."""
        self._quantize(session, done=records)

    # ------------------------------------------------------------------ the work

    @torch.no_grad()
    def _quantize(self, session: Session, done: dict[str, Any] | None = None) -> None:
        model = _unwrapped(session.model)
        names = [n for n in self._names if done is None or n not in done]
        problems = self.shape_problems({n: tuple(session.params[n].shape) for n in names})
        if problems:  # the shapes now: a structured pruner may have shrunk them since initialize
            raise ValueError(f"{self.type} at step {session.step}: {problems[0][1]}")
        if done is None:
            attach(model, self.model_buffers(model))
        masks = {n: session.masks.mask(n).to(torch.bool) for n in names if n in session.masks}
        calibration = None
        if self.method == "gptq" or self.auto_fallback or self.smoothing is not None:
            calibration = Calibration.of(model, session.sampler, self.calibration)
        if self.smoothing is not None and calibration is not None:
            layers.smooth(model, names, calibration, self.smoothing)
        if self.auto_fallback and calibration is not None:
            errors = layers.activation_errors(model, names, calibration)
            worst = sorted(errors, key=errors.__getitem__, reverse=True)[: self.auto_fallback]
            self._kept_float = [n for n in names if n in worst]
            names = [n for n in names if n not in worst]
            for name in self._kept_float:
                session.log(f"quantization/kept_float/{name}", errors[name])
        fmt = self._formats()
        if not names:
            records = {}
        elif self.method == "rtn":
            records = layers.rtn(model, names, fmt, masks)
        elif self.curvature == "activations":
            assert calibration is not None
            records = layers.gptq_activations(
                model,
                names,
                fmt,
                masks,
                calibration,
                damp=self.damp,
                block_size=self.block_size,
                act_order=self.act_order,
            )
        else:
            records = layers.gptq_fisher(
                model,
                names,
                fmt,
                masks,
                session.sampler,
                num_grads=self.fisher.num_grads,
                grad_batch_size=self.fisher.grad_batch_size,
                block_size=self.fisher.block_size,
                damp=self.fisher.damp,
                key=session.step,
            )
        self._forget(model)
        records = {**(done or {}), **records}
        for name in records:
            store = latent(model, name)
            if store is not None:
                store.copy_(session.params[name].detach())
        self._done = True
        session.log("quantization/bits", self.bits)
        session.log("quantization/weights", sum(r.codes.numel() for r in records.values()))

    def _forget(self, model: torch.nn.Module) -> None:
        """Weights kept in float lose their buffers' meaning: zero scales say "not quantized"."""
        for name in self._kept_float:
            record = read(model, name, self.group_size)
            record.scales.zero_()

    @torch.no_grad()
    def _hold(self, session: Session, train: bool) -> None:
        """After an optimizer step: with ``train``, move the latent weights by the step the optimizer
        took and re-quantize them (codes change, the grid does not); else put back the codes' values."""
        model = _unwrapped(session.model)
        for name in self._names:
            if name in self._kept_float:
                continue
            param = session.params[name]
            record = read(model, name, self.group_size)
            scale, zero = record.expanded()
            current = dequantize(record.codes, scale, zero)
            store = latent(model, name)
            if train and store is not None:
                store.add_(param.detach().to(torch.float32) - current)
                if name in session.masks:
                    store.mul_(session.masks.mask(name).to(store.dtype))
                bits = self._formats().grid_bits
                record.codes.copy_(quantize(store, scale, zero, bits, self.symmetric))
                current = dequantize(record.codes, scale, zero)
            param.copy_(current.to(param.dtype))


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return distributed.unwrap(model)
