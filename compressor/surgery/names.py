"""Module and parameter names as the structured pruners address them: normalized as parameter names
are (``compressor.core.params.normalize``: wrapper prefixes such as ``module.`` dropped), and
back to the spelling of the model at hand.
"""

from __future__ import annotations

from torch import nn

from compressor.core.params import normalize


def parameter_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """normalized parameter name -> (owning module, leaf)."""
    out = {}
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        out[normalize(name)] = (model.get_submodule(owner), leaf)
    return out


def module_key(name: str) -> str:
    """A module name normalized as parameter names are (wrapper prefixes dropped)."""
    return normalize(name + ".x")[:-2] if name else ""


def raw_module_name(model: nn.Module, normalized: str) -> str:
    """The module name as ``model`` spells it (with wrapper prefixes) for a normalized one."""
    for name, _ in model.named_modules():
        if normalize(name) == normalized or (name and normalize(name + ".x")[:-2] == normalized):
            return name
    raise KeyError(f"no module {normalized!r} in the model")
