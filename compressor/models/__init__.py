"""Models: the built-in ones (``digits-mlp``, ``mnist-cnn``, ...; ``compressor.models.builtin``; the
GPT-2 decoder ``codelm``, ``compressor.models.codelm``) and pretrained Hugging Face transformers loaded
offline (``hf:DIRECTORY`` or ``hf:installed_package``; ``compressor.models.pretrained``, which imports
transformers only when used).
"""

from compressor.models.builtin import MLP, SmallCNN, build_model

__all__ = ["MLP", "SmallCNN", "build_model"]
