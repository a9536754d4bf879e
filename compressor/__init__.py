"""compressor: recipe-driven model compression for PyTorch, built around M-FAC.

Kept light on purpose: ``import compressor.mfac`` needs torch alone.
"""

__version__ = "0.1.0"
