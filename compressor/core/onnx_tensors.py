"""The constant tensors of an ONNX graph as NumPy arrays: initializers, sparse initializers
(densified) and Constant nodes, by name."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def densify(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a SparseTensorProto (linear (nnz,) or coordinate (nnz, rank) indices)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    dense[indices] = values
    return dense.reshape(dims)


def constant_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Name -> array of every constant of the main graph (subgraphs are not searched)."""
    graph = model.graph
    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    out.update({s.values.name: densify(s) for s in graph.sparse_initializer})
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                out[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name == "sparse_value" and attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                out[node.output[0]] = densify(attr.sparse_tensor)
    return out
