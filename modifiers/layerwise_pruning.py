"""Layer-wise one-shot pruners from calibration inputs, no gradients: SparseGPT and Wanda.

Both prune each selected Linear weight to the target of the schedule (the same for every layer),
layer by layer in the order the model runs them, each layer's inputs taken after the layers before
it were pruned (``compressor.lifecycle.prune_layers``; the math: ``compressor.mfac.sparsegpt``).
They need ``calibration`` samples of the training data (drawn through the Task) and no Fisher:
memory is one layer's statistic plus one block's inputs, whatever the model's size.

    SparseGPTPruning   OBS over the columns with H = 2 X X^T: masks chosen during the sweep, the
                       kept weights updated to compensate; unstructured, N:M, or {blocks: [r, c]}
    WandaPruning       |W_ij| ||X_j|| per output row, no update; unstructured or N:M

Schedules are those of every pruner: one shot (start == end), or several one-shot steps with
training between (each step prunes further; pruned weights stay pruned; later modifiers keep the
masks). A ``SparseGPTPruning`` and a ``Quantization`` (GPTQ from activations) updating at the same step
run as one sweep: pruned weights 0, kept weights on the grid (list the pruner first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from compressor.core import distributed
from compressor.lifecycle import prune_layers
from compressor.lifecycle.calibration import Calibration, CalibrationSettings
from compressor.mfac.sparsegpt import Tiles
from compressor.sparsity.patterns import NM, Blocks, Structure
from compressor.sparsity.pruner import PruningModifier

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


class _LayerwisePruning(PruningModifier):
    """What SparseGPT and Wanda share: calibration, per-layer targets, Linear weights only."""

    structures: ClassVar[tuple[type, ...]] = (NM,)

    global_ranking: Literal[False] = Field(False, description="layer-wise: each layer to the target")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)

    @field_validator("structure")
    @classmethod
    def _supported(cls, structure: Structure) -> Structure:
        if structure != "unstructured" and not isinstance(structure, cls.structures):
            forms = ["'unstructured'", "{n: N, m: M}"] + (
                ["{blocks: [r, c]}"] if Blocks in cls.structures else []
            )
            raise ValueError(f"{cls.__name__} prunes {' or '.join(forms)}, got {structure!r}")
        return structure

    def shape_problems(self, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
        """(field, message) for selected weights it cannot prune: not 2-D (Linear)."""
        return [
            ("params", f"{name} has shape {list(shape)}: layer-wise pruning takes 2-D Linear weights")
            for name, shape in shapes.items()
            if len(shape) != 2
        ]

    def memory_estimate(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, str]:
        """(bytes, what) beyond the model: one layer's statistic at a time (H and its factor for
        SparseGPT, cols^2 float64), besides one block's inputs for every calibration sample."""
        widths = [shape[-1] for shape in shapes.values() if len(shape) == 2]
        width = max(widths, default=0)
        return self.statistic_bytes(width), (
            f"one layer's statistic at a time ({width} inputs), plus one block's inputs for "
            f"{self.calibration.samples} calibration samples"
        )

    def statistic_bytes(self, width: int) -> int:
        """Bytes of one layer's statistic for ``width`` inputs."""
        return 8 * width

    def initialize(self, session: Session) -> None:
        problems = self.shape_problems(
            {n: tuple(session.params[n].shape) for n in session.match(self.params)}
        )
        if problems:
            raise ValueError(f"{self.type}: {problems[0][1]}")
        super().initialize(session)
        model = distributed.unwrap(session.model)
        modules = dict(model.named_modules())
        for name in self._names:
            module = modules.get(name.rpartition(".")[0])
            if not isinstance(module, torch.nn.Linear) and not prune_layers.is_conv1d(module):
                raise ValueError(f"{self.type}: {name} is not the weight of a Linear layer")
        if getattr(session, "sampler", None) is None:
            raise ValueError(f"{self.type} needs calibration data: give the Session data=...")

    def calibration_of(self, session: Session) -> Calibration:
        """The calibration samples of ``calibration`` over the session's data."""
        return Calibration.of(distributed.unwrap(session.model), session.sampler, self.calibration)

    def _nm(self) -> tuple[int, int] | None:
        return (self.structure.n, self.structure.m) if isinstance(self.structure, NM) else None


class SparseGPTPruning(_LayerwisePruning):
    """SparseGPT (Frantar and Alistarh, 2023): OBS over each layer's columns with H = 2 X X^T of its
    calibration inputs (module doc)."""

    structures: ClassVar[tuple[type, ...]] = (NM, Blocks)

    type: Literal["SparseGPTPruning"] = "SparseGPTPruning"
    damp: float = Field(0.01, gt=0, description="lambda relative to mean diag H")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    mask_block: int = Field(128, ge=1, description="columns per mask selection (unstructured, blocks)")

    def shape_problems(self, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
        """As the base, and {blocks: [r, c]} tiles that do not divide the rows, the columns and
        ``mask_block``."""
        problems = super().shape_problems(shapes)
        if isinstance(self.structure, Blocks):
            r, c = self.structure.blocks
            for name, shape in shapes.items():
                if len(shape) == 2 and (shape[0] % r or shape[1] % c or self.mask_block % c):
                    problems.append(
                        (
                            "structure",
                            f"blocks [{r}, {c}] must divide {name}'s {list(shape)} and c the "
                            f"mask_block {self.mask_block}",
                        )
                    )
        return problems

    def statistic_bytes(self, width: int) -> int:
        return 3 * 8 * width * width  # H, its inverse and the factor (float64)

    def initialize(self, session: Session) -> None:
        super().initialize(session)
        for other in session.modifiers[: session.modifiers.index(self)]:
            if callable(getattr(other, "joint_format", None)) and other.start == self.start:
                raise ValueError(
                    f"{self.type}: list it before {other.type}, which starts at the same step, so that "
                    "both run as one sweep (pruned weights 0, kept weights on the grid)"
                )

    def new_masks(
        self, session: Session, names: list[str], target: float, current: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """SparseGPT of every layer to ``target``, joint with a Quantization due at this step."""
        partner, joint = None, None
        for other in session.modifiers:
            offer = getattr(other, "joint_format", None)
            if other is not self and callable(offer):
                plan = offer(session)
                if plan is not None:
                    partner, joint = other, (plan[0], [n for n in plan[1] if n in names])
                    break
        structure: Any = self._nm()
        if isinstance(self.structure, Blocks):
            structure = Tiles(*self.structure.blocks)
        new, records = prune_layers.sparsegpt(
            distributed.unwrap(session.model),
            names,
            target,
            structure,
            {n: m.to(torch.bool) for n, m in current.items()},
            self.calibration_of(session),
            damp=self.damp,
            block_size=self.block_size,
            mask_block=self.mask_block,
            joint=joint,
        )
        if partner is not None:
            partner.joint_done(session, records)
            session.log("sparsity/joint_quantized", len(records))
        return new


class WandaPruning(_LayerwisePruning):
    """Wanda (Sun et al., 2023): per output row, the weights of least |W_ij| ||X_j|| pruned, no
    update (module doc)."""

    type: Literal["WandaPruning"] = "WandaPruning"

    def new_masks(
        self, session: Session, names: list[str], target: float, current: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Wanda of every layer to ``target``."""
        return prune_layers.wanda(
            distributed.unwrap(session.model),
            names,
            target,
            self._nm(),
            {n: m.to(torch.bool) for n, m in current.items()},
            self.calibration_of(session),
        )
