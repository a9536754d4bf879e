"""The files of a run folder, and the recipe text a run (or its resume) starts from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.core.errors import CompressorError


class RunError(CompressorError, ValueError):
    """A user error in how a run was asked for (bad recipe for a run, resume mismatch)."""


@dataclass
class RunFiles:
    """The files of a run folder."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        """checkpoint.pt: model, masks, optimizer, schedule, RNG (every epoch)."""
        return self.root / "checkpoint.pt"

    @property
    def recipe(self) -> Path:
        """recipe.yaml: the resolved recipe."""
        return self.root / "recipe.yaml"

    @property
    def raw_recipe(self) -> Path:
        """recipe.raw.yaml: the recipe as given."""
        return self.root / "recipe.raw.yaml"

    @property
    def metrics(self) -> Path:
        """metrics.csv: long-format metrics."""
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        """summary.json: final accuracy, sparsity, wall time."""
        return self.root / "summary.json"


def recipe_text(files: RunFiles, recipe_path: str | Path | None, resume: bool, allow_change: bool) -> str:
    """The raw recipe text: the given file, or on resume the stored copy (refusing a changed recipe)."""
    if not resume:
        if recipe_path is None:
            raise RunError("a recipe file is needed (or --resume DIR to continue a run)")
        path = Path(recipe_path)
        if not path.is_file():
            raise RunError(f"{path}: no such recipe file")
        return path.read_text()
    if not files.checkpoint.is_file() or not files.raw_recipe.is_file():
        raise RunError(f"{files.root}: nothing to resume (no checkpoint.pt and recipe.raw.yaml)")
    stored = files.raw_recipe.read_text()
    if recipe_path is None:
        return stored
    given = Path(recipe_path).read_text()
    if given != stored and not allow_change:
        raise RunError(
            f"{recipe_path} differs from the recipe of the run in {files.root}; "
            "pass --allow-recipe-change to resume with it anyway"
        )
    return given
