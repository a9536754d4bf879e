"""compressor: recipe-driven model compression for PyTorch, built around M-FAC.

Kept light on purpose: ``import compressor.mfac`` needs torch alone. The engine's names
(``Session``, ``load_recipe``, ``Recipe``, ``RecipeError``, ``CompressorError``) load on first use.
``CompressorError`` is the base of every error a user can cause (``compressor.core.errors``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CompressorError": ("compressor.core.errors", "CompressorError"),
    "Session": ("compressor.lifecycle.session", "Session"),
    "load_recipe": ("compressor.recipe", "load_recipe"),
    "Recipe": ("compressor.recipe", "Recipe"),
    "RecipeError": ("compressor.recipe", "RecipeError"),
}

__all__ = ["CompressorError", "Recipe", "RecipeError", "Session", "__version__", "load_recipe"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
