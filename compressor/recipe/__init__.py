"""Recipe files: YAML that says what to train and which modifiers compress it, and when.

    version: 1                                     # required; the only version so far
    variables: {epochs: 12, target: 0.9}           # optional: numbers, strings, true/false
    train:                                         # optional: what `compressor run` trains
      model: digits-cnn                            # built-in name or "package.module:factory" (opt-in)
      data: digits
      epochs: ${epochs}
      optimizer: {type: SGD, lr: 0.05, momentum: 0.9}   # other keys go to the optimizer class
    modifiers:                                     # required (may be empty)
      - type: MFACPruning                          # registry name; the other keys are its settings
        params: ["re:.*conv.*weight", "fc1.weight"]
        start: 1                                   # epoch (float) or {step: 500}
        end: ${epochs - 3}
        final_sparsity: ${target}

Rules: YAML is safe-loaded (``1e-5`` is a float; only ``true``/``false`` are booleans; duplicate keys
are errors); every mapping rejects unknown keys. ``${...}`` is restricted arithmetic over variables
(numbers, names, ``+ - * / // % **``, ``min max round abs int float``), never Python ``eval``; a value
that is exactly one ``${...}`` becomes its number, inside longer text it is interpolated, ``$${``
is a literal ``${``. Variables may use other variables; ``--set name=value`` overrides one. All
problems are reported together as ``FILE:LINE:COL: path.to.field: message``.

Loading a recipe never imports code. A "package.module:factory" in ``train`` is imported and
called only when the person running the recipe allows it (``--allow-import MODULE`` or
``--trust-recipe-code``; ``allow_imports=`` in Python): see ``compressor.recipe.imports``.
"""

from compressor.recipe.errors import RecipeError, RecipeIssue
from compressor.recipe.imports import AllowImports, check_imports, factory_imports
from compressor.recipe.loader import (
    SetError,
    load_recipe,
    parse_recipe,
    parse_sets,
    resolved_yaml,
    validate_command,
)
from compressor.recipe.schema import OptimizerSection, Recipe, TrainSection

__all__ = [
    "AllowImports",
    "OptimizerSection",
    "Recipe",
    "RecipeError",
    "RecipeIssue",
    "SetError",
    "TrainSection",
    "check_imports",
    "factory_imports",
    "load_recipe",
    "parse_recipe",
    "parse_sets",
    "resolved_yaml",
    "validate_command",
]
