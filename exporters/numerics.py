"""onnxruntime against PyTorch on real inputs: the largest absolute and relative differences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

#: Batches of this size (plus one shorter remainder) exercise a dynamic batch axis.
DYNAMIC_CHUNK = 64


@dataclass
class Numerics:
    """max_rel_diff is max |onnx - torch| / max |torch| over all outputs (relative to the output scale).

    samples: rows compared over all runs. For keyword-input models: ``runs`` (model calls compared)
    and ``sequence_lengths`` (the padded lengths of the token inputs, one per batch side); else None.
    """

    samples: int
    batch_sizes: list[int]
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    runs: int | None = None
    sequence_lengths: list[int] | None = None

    @property
    def ok(self) -> bool:
        """Both differences within their thresholds."""
        return self.max_abs_diff <= self.atol and self.max_rel_diff <= self.rtol

    def failure(self, what: str = "onnxruntime") -> str | None:
        """A message with the numbers when a threshold is exceeded, else None."""
        if self.ok:
            return None
        return (
            f"{what} differs from PyTorch on {self.samples} test samples: max |diff| "
            f"{self.max_abs_diff:.3g} (atol {self.atol:g}), max relative diff {self.max_rel_diff:.3g} "
            f"(rtol {self.rtol:g})"
        )


def session(model: onnx.ModelProto):  # -> onnxruntime.InferenceSession
    """A CPU onnxruntime session over the serialized ``model`` (no spinning threads: shared machines)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare(
    model: onnx.ModelProto,
    torch_model: nn.Module,
    inputs: torch.Tensor,
    batch: int | None,
    atol: float,
    rtol: float,
) -> Numerics:
    """Run both on ``inputs`` in batches of ``batch`` (dynamic: DYNAMIC_CHUNK and a remainder)."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    size = batch or DYNAMIC_CHUNK
    usable = len(inputs) if batch is None else len(inputs) // batch * batch
    worst_abs, scale, sizes = 0.0, 0.0, []
    with torch.no_grad():
        for start in range(0, usable, size):
            chunk = inputs[start : start + size]
            ref = _flat(torch_model(chunk))
            got = sess.run(None, {name: chunk.numpy()})
            worst_abs, scale = _diff(got, ref, worst_abs, scale)
            sizes.append(len(chunk))
    rel = worst_abs / scale if scale > 0 else (0.0 if worst_abs == 0 else float("inf"))
    return Numerics(usable, sorted(set(sizes), reverse=True), worst_abs, rel, atol, rtol)


def compare_named(
    model: onnx.ModelProto, torch_model: nn.Module, inputs: Any, atol: float, rtol: float
) -> Numerics:
    """Run both on every batch of ``inputs`` (``NamedInputs``): ``torch_model`` (a ``KeywordModel``)
    on the batch's tensors in ``inputs.names`` order, the ONNX session fed by input name (int64 token
    ids and masks as they are)."""
    from .named import describe

    sess = session(model)
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in inputs.names]
    if missing:
        raise ValueError(f"the ONNX model takes {missing}, which the task's inputs ({inputs.names}) lack")
    worst_abs, scale = 0.0, 0.0
    with torch.no_grad():
        for batch in inputs.batches:
            ref = _flat(torch_model(*(batch[n] for n in inputs.names)))
            got = sess.run(None, {n: batch[n].numpy() for n in wanted})
            worst_abs, scale = _diff(got, ref, worst_abs, scale)
    rel = worst_abs / scale if scale > 0 else (0.0 if worst_abs == 0 else float("inf"))
    seen = describe(inputs)
    return Numerics(
        inputs.samples,
        seen["batch_sizes"],
        worst_abs,
        rel,
        atol,
        rtol,
        runs=seen["runs"],
        sequence_lengths=seen["sequence_lengths"],
    )


def _diff(
    got: list[np.ndarray], ref: list[np.ndarray], worst_abs: float, scale: float
) -> tuple[float, float]:
    """The running (max |diff|, max |ref|) with one more run's outputs."""
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref, strict=False)):
        shapes = [g.shape for g in got], [r.shape for r in ref]
        raise ValueError(f"onnxruntime output shapes {shapes[0]} differ from PyTorch's {shapes[1]}")
    for g, r in zip(got, ref, strict=True):
        diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
        scale = max(scale, float(np.abs(r).max()))
    return worst_abs, scale


def _flat(out: object) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    if isinstance(out, (tuple, list)):
        return [a for item in out for a in _flat(item)]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}")
