"""Magnitude pruning (score |w|) and ConstantPruning (hold the current zeros while fine-tuning)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr

from compressor.core.modifier import Modifier
from compressor.core.params import match_params
from compressor.sparsity.pruner import PruningModifier

if TYPE_CHECKING:
    from compressor.lifecycle.session import Session


class MagnitudePruning(PruningModifier):
    """Gradual magnitude pruning: the weights of smallest |w| go first."""

    type: Literal["MagnitudePruning"] = "MagnitudePruning"

    def scores(self, session: Session, names: list[str]) -> dict[str, torch.Tensor]:
        """|w| per weight of each parameter (the smallest are pruned)."""
        return {name: session.params[name].detach().abs() for name in names}


class ConstantPruning(Modifier):
    """Hold the zeros that ``params`` have at ``start`` while active, on [start, end); at ``end`` the
    masks are released.

    Use it to fine-tune (or quantize) a pruned model without losing its sparsity; with ``end``
    unset the zeros are held to the end of training. With start == end it holds nothing. It sets
    the masks; the session applies them after every step.
    """

    prunes: ClassVar[bool] = True

    type: Literal["ConstantPruning"] = "ConstantPruning"
    params: list[str] = Field(min_length=1, description="exact names, globs or re: patterns")

    _names: list[str] = PrivateAttr(default_factory=list)
    _phase: str = PrivateAttr(default="waiting")  # waiting -> holding -> released

    def parameter_patterns(self) -> list[str]:
        return list(self.params)

    def initialize(self, session: Session) -> None:
        super().initialize(session)
        self._names = match_params(self.params, session.params)

    @torch.no_grad()
    def before_step(self, session: Session) -> None:
        if self._phase == "waiting" and self.active(session.step):
            for name in self._names:
                session.masks.set(name, session.masks.mask(name) & (session.params[name] != 0))
            session.log("sparsity", _sparsity(session, self._names))
            self._phase = "holding"
        if self._phase == "holding" and not self.active(session.step):
            for name in self._names:
                session.masks.set(name, torch.ones_like(session.masks.mask(name)))
            self._phase = "released"

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self._phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._phase = state.get("phase", "waiting")


def _sparsity(session: Session, names: list[str]) -> float:
    """Fraction of masked-off weights over ``names``."""
    total = sum(session.masks.mask(n).numel() for n in names)
    kept = sum(int(session.masks.mask(n).sum()) for n in names)
    return 1.0 - kept / total if total else 0.0
