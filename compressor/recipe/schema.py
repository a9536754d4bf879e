"""Pydantic models of a recipe file; every level rejects unknown keys.

``modifiers`` items are dispatched on their ``type`` through the registry and validated by the
modifier's own model; its errors keep their location below ``modifiers[i]``. Optimizer keyword
arguments (``momentum``, ``betas``, ...) are free at load time and checked against the optimizer's
signature by ``OptimizerSection.check_kwargs`` / ``build``.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from compressor.core import registry
from compressor.core.modifier import Modifier
from compressor.recipe.source import Source

if TYPE_CHECKING:
    import torch


def _plain_number(value: Any) -> Any:
    """Refuse booleans and strings where a number is expected (Pydantic's lax mode would coerce them)."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"expected a number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_plain_number)]
Float = Annotated[float, BeforeValidator(_plain_number)]


def _variable_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"a variable must be a number, a string or true/false, got {value!r}")


VariableValue = Annotated[bool | int | float | str, PlainValidator(_variable_value)]


class OptimizerSection(BaseModel):
    """``train.optimizer``: a class name, its learning rate, and keyword arguments passed to the class.

    YAML writes the keyword arguments flat (``{type: SGD, lr: 0.05, momentum: 0.9}``); they are
    gathered into ``kwargs`` here and written flat again when dumped.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: str = "SGD"
    lr: Float = Field(gt=0, description="learning rate")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="other optimizer arguments")

    @model_validator(mode="before")
    @classmethod
    def _gather_kwargs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own = {"type", "lr", "kwargs"}
        extra = {key: value for key, value in data.items() if key not in own}
        given = data.get("kwargs", {})
        if not extra or not isinstance(given, dict):
            return data
        return {**{k: data[k] for k in own if k in data}, "kwargs": {**given, **extra}}

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        return {**{k: v for k, v in out.items() if k != "kwargs"}, **out.get("kwargs", {})}

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        """The class named by ``type``: a registered optimizer, else ``torch.optim.<type>``."""
        import torch

        if self.type in registry.names("optimizers"):
            return registry.get("optimizers", self.type)
        found, found_type = getattr(torch.optim, self.type, None), torch.optim.Optimizer
        if isinstance(found, type) and issubclass(found, found_type):
            return found
        builtin = {
            n for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, found_type)
        }
        known = sorted((set(registry.names("optimizers")) | builtin) - {"Optimizer"})
        same = [k for k in known if k.lower() == self.type.lower()]
        close = same or difflib.get_close_matches(self.type, known, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown optimizer {self.type!r}{hint} (known: {', '.join(known)})")

    def check_kwargs(self, cls: type | None = None) -> dict[str, str]:
        """Keyword argument -> message, for each one the optimizer class does not accept."""
        cls = cls or self.optimizer_class()
        params = inspect.signature(cls).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return {}
        skip = ("self", "params")
        accepted = [n for n, p in params.items() if n not in skip and p.kind != p.VAR_POSITIONAL]
        problems = {}
        for name in self.kwargs:
            if name not in accepted or name == "lr":
                close = difflib.get_close_matches(name, accepted, n=1)
                hint = f"; did you mean {close[0]!r}?" if close and close[0] != name else ""
                problems[name] = (
                    f"optimizer {self.type} has no argument {name!r}{hint} (accepts: {', '.join(accepted)})"
                )
        return problems

    def build(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """``cls(params, lr=lr, **kwargs)``; ValueError naming any argument the class does not accept."""
        cls = self.optimizer_class()
        problems = self.check_kwargs(cls)
        if problems:
            raise ValueError("train.optimizer: " + "; ".join(problems.values()))
        return cls(params, lr=self.lr, **self.kwargs)


class TrainSection(BaseModel):
    """``train``: what ``compressor run`` trains; model, data and task: built-in names or
    ``pkg.mod:factory``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, description="built-in model name or 'package.module:factory'")
    data: str = Field(min_length=1, description="built-in data set name or 'package.module:factory'")
    epochs: Float = Field(
        ge=0,
        description="training length in epochs (fractions allowed; 0: no training, only the one-shot steps)",
    )
    batch_size: Int = Field(64, ge=1, le=2**63 - 1)
    seed: Int = Field(0, ge=-(2**63), le=2**64 - 1, description="any seed torch.manual_seed takes")
    optimizer: OptimizerSection
    loss: str = Field("cross_entropy", description="the classification task's loss")
    task: str = Field(
        "classification",
        min_length=1,
        description="what a batch is and how the model is scored: classification, model-loss or "
        "'package.module:factory' (see compressor.tasks)",
    )
    task_options: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the task (e.g. max_length for contrastive); a factory "
        "task gets them as keyword arguments too",
    )
    grad_accum: Int = Field(1, ge=1, le=2**63 - 1, description="batches per optimizer step")
    max_grad_norm: Float | None = Field(
        None,
        gt=0,
        description="clip the step's gradient to this global L2 norm before the optimizer steps "
        "(torch.nn.utils.clip_grad_norm_ over every parameter; the norm before clipping is logged as "
        "grad_norm); None: no clipping",
    )
    eval_every: Int = Field(
        1, ge=1, description="evaluate on the test split every this many epochs, and after the last one"
    )
    eval_at_start: bool = Field(
        False,
        description="evaluate once before the first step too (a pretrained model's dense figures, "
        "for recipes that prune at step 0)",
    )
    device: str = Field("auto", description="auto (the first GPU if any, else the CPU), cpu, cuda or cuda:N")
    init_from: str | None = Field(
        None,
        min_length=1,
        description="a checkpoint.pt written by `compressor run` whose model weights this run starts "
        "from (a path; relative ones from the current directory); read when the run starts, not when "
        "the recipe is validated",
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str:
        if isinstance(value, str) and (value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value)):
            return value
        raise ValueError(f"expected auto, cpu, cuda or cuda:N (N the index of a GPU), got {value!r}")


def _error(kind: str, loc: tuple[int | str, ...], message: str, value: Any) -> InitErrorDetails:
    """One error with a literal message (no context is given, so braces are kept as written)."""
    return InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)


def validate_modifier(index: int, item: Any) -> tuple[Modifier | None, list[InitErrorDetails]]:
    """Validate one ``modifiers`` item with the model its ``type`` names; errors located below ``index``."""
    if isinstance(item, Modifier):
        return item, []
    if not isinstance(item, dict):
        return None, [
            _error("modifier_item", (index,), f"expected a mapping with a 'type' key, got {item!r}", item)
        ]
    known = ", ".join(registry.names("modifiers")) or "none registered"
    name = item.get("type")
    if name is None:
        return None, [_error("missing", (index, "type"), f"missing 'type' (known: {known})", item)]
    if not isinstance(name, str):
        return None, [
            _error("modifier_type", (index, "type"), f"expected a modifier name, got {name!r}", name)
        ]
    try:
        cls = registry.get("modifiers", name)
    except registry.RegistryError as err:
        return None, [_error("modifier_type", (index, "type"), str(err), name)]
    except Exception as err:  # a broken entry point must not hide the recipe's other errors
        return None, [
            _error("modifier_type", (index, "type"), f"modifier {name!r} failed to load: {err}", name)
        ]
    if not (isinstance(cls, type) and issubclass(cls, Modifier)):
        return None, [_error("modifier_type", (index, "type"), f"{name!r} is not a Modifier class", name)]
    try:
        return cls.model_validate(item), []
    except ValidationError as err:
        errors = err.errors(include_url=False)
        return None, [_error(e["type"], (index, *e["loc"]), e["msg"], e["input"]) for e in errors]


class Recipe(BaseModel):
    """A whole recipe file (``version: 1``) after variable substitution."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    version: Literal[1]
    variables: dict[str, VariableValue] = Field(default_factory=dict, description="resolved variable values")
    train: TrainSection | None = None
    modifiers: list[SerializeAsAny[Modifier]]

    #: Where each value came from (a ``source.Source``) when loaded from YAML; None when built in Python.
    _source: Any = PrivateAttr(default=None)

    @property
    def source(self) -> Source:
        """Where the recipe's values came from: ``_source``, or a placeholder ``<recipe>`` (no positions)
        for a recipe built in Python."""
        return self._source or Source(file="<recipe>", data=None)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value != 1:
            raise ValueError(f"unsupported recipe version {value!r}; this compressor reads version 1")
        return value

    @field_validator("modifiers", mode="before")
    @classmethod
    def _dispatch(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        items, errors = [], []
        for index, item in enumerate(value):
            model, problems = validate_modifier(index, item)
            items.append(model)
            errors += problems
        if errors:
            raise ValidationError.from_exception_data("modifiers", errors)
        return items
