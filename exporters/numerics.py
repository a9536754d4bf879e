"""onnxruntime against PyTorch on real inputs: the largest absolute and relative differences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

#: Batches of this size (plus one shorter remainder) exercise a dynamic batch axis.
DYNAMIC_CHUNK = 64


@dataclass
class Numerics:
    """max_rel_diff is max |onnx - torch| / max |torch| over all outputs (relative to the output scale)."""

    samples: int
    batch_sizes: list[int]
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float

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
            if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref, strict=False)):
                shapes = [g.shape for g in got], [r.shape for r in ref]
                raise ValueError(f"onnxruntime output shapes {shapes[0]} differ from PyTorch's {shapes[1]}")
            for g, r in zip(got, ref, strict=True):
                diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
                worst_abs = max(worst_abs, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
                scale = max(scale, float(np.abs(r).max()))
            sizes.append(len(chunk))
    rel = worst_abs / scale if scale > 0 else (0.0 if worst_abs == 0 else float("inf"))
    return Numerics(usable, sorted(set(sizes), reverse=True), worst_abs, rel, atol, rtol)


def _flat(out: object) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.numpy()]
    if isinstance(out, (tuple, list)):
        return [a for item in out for a in _flat(item)]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}")
