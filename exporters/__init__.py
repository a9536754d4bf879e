"""Exporters: sparse ONNX export, verification against onnxruntime, and the sparsity report.

They depend on ``compressor`` and are found through the registry, never imported by it.
"""
