"""One error family: every user-facing error is a CompressorError and keeps its older built-in base."""

from __future__ import annotations

import pytest

from compressor import CompressorError
from compressor.core.checkpoint import CheckpointError
from compressor.core.distributed import DistributedError
from compressor.core.params import PatternError, match_params
from compressor.core.preflight import PreflightError, preflight
from compressor.core.registry import RegistryError
from compressor.engine import RunError
from compressor.lifecycle.session import LifecycleError
from compressor.recipe import RecipeError
from compressor.recipe.expressions import ExpressionError
from exporters.errors import ExportError, VerificationError


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (CheckpointError, ValueError),
        (DistributedError, RuntimeError),
        (PatternError, ValueError),
        (PreflightError, MemoryError),
        (RecipeError, Exception),
        (ExpressionError, ValueError),
        (RegistryError, KeyError),
        (LifecycleError, RuntimeError),
        (RunError, ValueError),
        (ExportError, ValueError),
        (VerificationError, ValueError),
    ],
)
def test_every_user_error_is_a_compressor_error(error: type, builtin: type) -> None:
    assert issubclass(error, CompressorError)
    assert issubclass(error, builtin)


def test_library_users_catch_one_type() -> None:
    with pytest.raises(CompressorError, match="matches no parameter"):
        match_params(["nope.weight"], ["fc.weight"])
    with pytest.raises(CompressorError, match="needs about"):
        preflight("x", 1 << 30, budget=1 << 20)
