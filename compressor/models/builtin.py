"""Built-in models, and "package.module:factory" strings for the user's own.

Models are seeded: ``build_model(..., seed=s)`` gives the same weights for the same ``s`` and leaves
the global torch RNG untouched. ``hf:SOURCE`` loads a pretrained transformers model
(``compressor.models.pretrained``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from compressor.core.factories import PRETRAINED_PREFIX, ZooError, call_factory, is_factory, known
from compressor.models.codelm import build_codelm


class MLP(nn.Module):
    """Flatten, then Linear layers fc1..fcN with ReLU between: (n, *input_shape) -> logits (n, classes)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        widths = (in_features, *hidden, num_classes)
        self.depth = len(widths) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth:
                x = torch.relu(x)
        return x


class SmallCNN(nn.Module):
    """conv1 bn1 relu pool, conv2 bn2 relu pool, fc1 relu fc2: (n, C, H, W) -> logits (n, classes).

    Convolutions are 3x3 with padding 1; each 2x2 max-pool halves H and W (floored).
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int], hidden: int
    ) -> None:
        super().__init__()
        c, h, w = _image_shape(input_shape)
        if h < 4 or w < 4:
            raise ZooError(f"SmallCNN needs images of at least 4x4, got input_shape {input_shape}")
        c1, c2 = channels
        self.conv1, self.bn1 = nn.Conv2d(c, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * (h // 4) * (w // 4), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ZooError(f"expected an image input_shape (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


_MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "digits-mlp": lambda shape, k: MLP(math.prod(shape), (128,), k),
    "digits-cnn": lambda shape, k: SmallCNN(shape, k, channels=(8, 16), hidden=64),
    "mnist-mlp": lambda shape, k: MLP(math.prod(shape), (256, 128), k),
    "mnist-cnn": lambda shape, k: SmallCNN(shape, k, channels=(32, 64), hidden=128),
    "codelm": build_codelm,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """A freshly initialized model, seeded by ``seed`` without touching the global torch RNG.

    Built-ins size their first/last layers from ``input_shape`` (C, H, W) and ``num_classes``:
    digits-mlp (fc1 64->128, fc2 ->10), mnist-mlp (fc1 784->256, fc2 ->128, fc3 ->10),
    mnist-cnn (conv1 1->32, bn1, conv2 32->64, bn2, fc1 64*7*7->128, fc2 ->10; 422k parameters,
    wide enough that its latency is compute-bound) and digits-cnn (the same with 8/16 channels and
    fc1 16*2*2->64). ``codelm`` is a GPT-2 decoder (``compressor.models.codelm``; the ``hf`` extra)
    with input_shape[0] positions and num_classes tokens (``code_text``: 128 and 258; 1.85M
    parameters). ``"package.module:factory"`` calls
    ``factory(input_shape=..., num_classes=...)``, passing only the arguments it accepts.
    ``"hf:DIRECTORY"`` or ``"hf:installed_package"`` loads a pretrained transformers model with its
    saved weights (``compressor.models.pretrained.load_pretrained``; the ``hf`` extra; never a download), for
    which ``input_shape``, ``num_classes`` and ``seed`` play no part.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if name.startswith(PRETRAINED_PREFIX):
        from compressor.models.pretrained import load_pretrained

        model = load_pretrained(name)
        model.train()
        return model
    if is_factory(name):
        kwargs = {"input_shape": input_shape, "num_classes": num_classes}
        make = functools.partial(call_factory, name, "model", kwargs)
    else:
        make = functools.partial(_MODELS[known(name, _MODELS, "model")], input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    if not isinstance(model, nn.Module):
        raise ZooError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
