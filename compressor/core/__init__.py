"""The foundation every other layer builds on: errors, atomic files, registries, parameter names
and patterns, masks, sparsity schedules, the modifier contract, torch.distributed helpers, the memory
preflight, checkpoint files, factory strings and ONNX constants. It imports no other layer of
compressor (``compressor.mfac`` aside, which imports nothing of the project).
"""
