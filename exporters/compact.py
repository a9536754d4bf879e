"""Compact storage: sparse initializers (values + int64 linear indices) where they take fewer bytes.

onnxruntime loads sparse initializers (it densifies them when the session starts) and
``onnx.checker`` accepts them with int64 indices. A tensor is stored sparse only when its values
plus indices are smaller than its dense bytes (for float32: above 2/3 sparsity).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

INDEX_BYTES = 8  # int64


def to_sparse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every initializer that shrinks moved to sparse form; their names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph_inputs = {i.name for i in graph.input}
    keep, moved = [], []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        flat = array.reshape(-1)
        nz = np.flatnonzero(flat)
        shrinks = len(nz) * (flat.itemsize + INDEX_BYTES) < flat.nbytes
        if array.dtype.kind != "f" or not shrinks or init.name in graph_inputs:
            keep.append(init)
            continue
        values = numpy_helper.from_array(flat[nz], name=init.name)
        indices = numpy_helper.from_array(nz.astype(np.int64), name=f"{init.name}_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
        moved.append(init.name)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return out, moved
