"""Attention heads and FFN neurons of BERT-family encoders: finding them, their cost, removing them.

An encoder layer in the layout of transformers' ``BertLayer`` (BERT, RoBERTa, MiniLM, ELECTRA, ...)::

    layer.attention.self.{query,key,value}   Linear(hidden, heads * head_size) each
    layer.attention.output.dense             Linear(heads * head_size, hidden)
    layer.intermediate.dense                 Linear(hidden, ffn)
    layer.output.dense                       Linear(ffn, hidden)

holds two kinds of units that can be removed without touching the hidden size (the residual stream):

head h
    rows ``h*d .. (h+1)*d - 1`` (d = ``attention_head_size``) of the query, key and value weights and
    biases, and the same input columns of ``attention.output.dense``. Removed, the layer computes
    exactly what the dense layer computes with that head's context vectors zeroed (its columns of
    ``attention.output.dense`` multiply zeros), so its query, key and value rows have no effect.
neuron j
    row j (and bias j) of ``intermediate.dense`` and input column j of ``output.dense``.

Cost in multiply-accumulates per token (``unit_macs``): a head ``4 * d * hidden`` in the linears (its
d rows of query, key and value, its d columns of the output projection) plus, when an attention
length T is given, ``2 * d * T`` for its scores q.k and its weighted sum of values over T positions; a
neuron ``2 * hidden``. Biases, layer norms, softmax and the activation are not counted.

The surgery (``UnitCut``) uses torch-pruning's layer pruners (``prune_linear_out_channels`` /
``prune_linear_in_channels``) on the six linears directly, rather than a traced dependency graph, so
the head grouping is fixed by the layout above whatever attention implementation (eager, SDPA) the
model runs, and updates the attention module's ``num_attention_heads`` and ``all_head_size``. At least
one head and one neuron stay in each layer (transformers' ``view(..., -1, head_size)`` cannot infer an
empty head axis). ``match_encoder_shapes`` gives a freshly built model the per-layer head and neuron
counts of a checkpoint (resume, export).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

#: unit kinds, in the order units of a layer are numbered (heads first, then neurons)
KINDS = ("heads", "neurons")


@dataclass
class EncoderLayer:
    """The linears of one BERT-layout encoder layer (``name``: its module name in the model)."""

    name: str
    attention: nn.Module  # the self-attention module (query, key, value, attention_head_size)
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_output: nn.Linear
    intermediate: nn.Linear
    output: nn.Linear

    @property
    def head_size(self) -> int:
        return int(self.attention.attention_head_size)

    @property
    def hidden(self) -> int:
        return int(self.query.in_features)

    @property
    def heads(self) -> int:
        return self.query.out_features // self.head_size

    @property
    def neurons(self) -> int:
        return int(self.intermediate.out_features)

    def linear_names(self) -> dict[str, list[str]]:
        """unit kind -> the (raw) module names of the linears its units live in."""
        p = f"{self.name}." if self.name else ""
        return {
            "heads": [
                f"{p}attention.self.query",
                f"{p}attention.self.key",
                f"{p}attention.self.value",
                f"{p}attention.output.dense",
            ],
            "neurons": [f"{p}intermediate.dense", f"{p}output.dense"],
        }

    def head_rows(self, heads: list[int]) -> list[int]:
        """The rows of query/key/value (= input columns of the output projection) of ``heads``."""
        d = self.head_size
        return [h * d + i for h in sorted(heads) for i in range(d)]


def encoder_layers(model: nn.Module) -> list[EncoderLayer]:
    """Every module of ``model`` laid out as a BERT encoder layer (see the module doc), in model order."""
    out = []
    for name, module in model.named_modules():
        attention = getattr(module, "attention", None)
        self_attention = getattr(attention, "self", None)
        linears = (
            getattr(self_attention, "query", None),
            getattr(self_attention, "key", None),
            getattr(self_attention, "value", None),
            getattr(getattr(attention, "output", None), "dense", None),
            getattr(getattr(module, "intermediate", None), "dense", None),
            getattr(getattr(module, "output", None), "dense", None),
        )
        if not all(isinstance(x, nn.Linear) for x in linears):
            continue
        if not isinstance(getattr(self_attention, "attention_head_size", None), int):
            continue
        out.append(EncoderLayer(name, self_attention, *linears))  # type: ignore[arg-type]
    return out


def unit_macs(layer: EncoderLayer, kind: str, attention_length: int = 0) -> int:
    """MACs per token of one unit of ``kind`` in ``layer`` (see the module doc for what is counted)."""
    if kind == "heads":
        return 4 * layer.head_size * layer.hidden + 2 * layer.head_size * attention_length
    if kind == "neurons":
        return 2 * layer.hidden
    raise ValueError(f"unknown unit kind {kind!r}; expected one of {', '.join(KINDS)}")


def encoder_macs(layers: list[EncoderLayer], attention_length: int = 0) -> int:
    """MACs per token of the six linears of every layer (plus the attention products at length T)."""
    return sum(
        layer.heads * unit_macs(layer, "heads", attention_length)
        + layer.neurons * unit_macs(layer, "neurons", attention_length)
        for layer in layers
    )


class UnitCut:
    """Removes ``heads`` and ``neurons`` (indices in the layer as it is now) of ``layer`` on ``prune()``.

    Shaped like a torch-pruning group (``prune()``), so ``channel_surgery.prune_group`` carries mask
    buffers and gradients through it.
    """

    def __init__(self, layer: EncoderLayer, heads: list[int], neurons: list[int]) -> None:
        if heads and len(set(heads)) >= layer.heads:
            raise ValueError(f"{layer.name}: cannot remove all {layer.heads} heads (one must stay)")
        if neurons and len(set(neurons)) >= layer.neurons:
            raise ValueError(f"{layer.name}: cannot remove all {layer.neurons} neurons (one must stay)")
        self.layer, self.heads, self.neurons = layer, sorted(set(heads)), sorted(set(neurons))

    def prune(self) -> None:
        import torch_pruning as tp

        layer = self.layer
        if self.heads:
            rows = layer.head_rows(self.heads)
            for linear in (layer.query, layer.key, layer.value):
                tp.prune_linear_out_channels(linear, rows)
            tp.prune_linear_in_channels(layer.attention_output, rows)
            set_head_count(layer)
        if self.neurons:
            tp.prune_linear_out_channels(layer.intermediate, self.neurons)
            tp.prune_linear_in_channels(layer.output, self.neurons)


def set_head_count(layer: EncoderLayer) -> None:
    """The attention module's ``num_attention_heads`` / ``all_head_size`` from its query's rows."""
    layer.attention.num_attention_heads = layer.query.out_features // layer.head_size
    layer.attention.all_head_size = layer.query.out_features


def match_encoder_shapes(model: nn.Module, targets: Mapping[str, tuple[int, ...]]) -> bool:
    """Remove trailing heads / neurons of ``model``'s encoder layers to the shapes in ``targets``.

    ``targets``: state-dict key -> shape (keys as ``model.state_dict()`` spells them). A layer whose
    query weight has fewer rows in ``targets`` loses its last heads, one whose intermediate weight has
    fewer rows its last neurons (values are meaningless: load the state dict next). Returns whether
    anything changed; ValueError when the targets are larger or not whole heads.
    """
    changed = False
    for layer in encoder_layers(model):
        names = layer.linear_names()
        want_rows = targets.get(f"{names['heads'][0]}.weight")
        if want_rows is not None and want_rows[0] != layer.query.out_features:
            rows, d = int(want_rows[0]), layer.head_size
            if rows > layer.query.out_features or rows % d or rows == 0:
                raise ValueError(
                    f"cannot match shapes: {names['heads'][0]}.weight has {rows} rows in the state dict, "
                    f"the model {layer.query.out_features} (whole heads of {d} can only be removed)"
                )
            UnitCut(layer, list(range(rows // d, layer.heads)), []).prune()
            changed = True
        want_ffn = targets.get(f"{names['neurons'][0]}.weight")
        if want_ffn is not None and want_ffn[0] != layer.neurons:
            n = int(want_ffn[0])
            if n > layer.neurons or n == 0:
                raise ValueError(
                    f"cannot match shapes: {names['neurons'][0]}.weight has {n} rows in the state dict, "
                    f"the model {layer.neurons} (neurons can only be removed)"
                )
            UnitCut(layer, [], list(range(n, layer.neurons))).prune()
            changed = True
    return changed


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per encoder layer: its head and neuron counts (for logs and reports)."""
    return {layer.name: {"heads": layer.heads, "neurons": layer.neurons} for layer in encoder_layers(model)}
