"""Where a run computes: ``train.device`` resolved for this rank, and the DDP wrapper."""

from __future__ import annotations

import inspect

import torch

from compressor.core import distributed
from compressor.engine.files import RunError
from compressor.recipe import Recipe, RecipeError


def resolve_device(spec: str, ctx: distributed.Context) -> torch.device:
    """The device that ``train.device`` (``spec``) names for this rank; RunError when it is not there.

    In one process: ``auto`` is the first GPU (``cuda:0``) when CUDA is available, else the CPU;
    ``cuda`` is ``cuda:0``; ``cuda:N`` that GPU; ``cpu`` the CPU. Under torchrun every rank computes
    on the device it joined the process group with (``ctx.device``: ``cuda:LOCAL_RANK`` with nccl,
    the CPU with gloo): ``auto`` is that device, ``cuda`` needs it to be a GPU and ``cpu`` the CPU,
    and ``cuda:N`` is refused (the ranks cannot all use one GPU).
    """
    if ctx.world_size > 1:
        return _rank_device(spec, ctx.device)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec if ":" in spec else "cuda:0")
    except RuntimeError as err:  # an index torch cannot hold (cuda:99999999999)
        raise RunError(f"{spec!r} is not a device torch can use: {err}") from None
    if not torch.cuda.is_available():
        raise RunError(f"{spec!r} asks for a GPU, but {_no_cuda_reason()}; use auto or cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RunError(f"{spec!r}: there is no such GPU; torch sees {count} (cuda:0 to cuda:{count - 1})")
    return device


def _rank_device(spec: str, device: torch.device) -> torch.device:
    """``resolve_device`` under torchrun: the rank's own ``device``, if ``spec`` allows it."""
    if spec.startswith("cuda:"):
        raise RunError(
            f"{spec!r} names one GPU, but under torchrun each rank computes on its own "
            "(cuda:LOCAL_RANK); use cuda or auto"
        )
    if spec == "cuda" and device.type != "cuda":
        raise RunError(f"'cuda' asks for a GPU per rank, but {_no_cuda_reason()}; use auto or cpu")
    if spec == "cpu" and device.type != "cpu":
        raise RunError(
            "'cpu' under torchrun, but the ranks joined with nccl, one GPU each; to train on the CPU, "
            "hide the GPUs (CUDA_VISIBLE_DEVICES= torchrun ...) so that they join with gloo, or use auto"
        )
    return device


def _no_cuda_reason() -> str:
    """Why torch sees no GPU, for messages."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "torch.cuda.is_available() is False (no GPU visible: driver, CUDA_VISIBLE_DEVICES?)"


def recipe_device(recipe: Recipe, ctx: distributed.Context) -> torch.device:
    """``resolve_device`` of the recipe's ``train.device``; a RecipeError at that line when unusable."""
    assert recipe.train is not None
    try:
        return resolve_device(recipe.train.device, ctx)
    except RunError as err:
        source = recipe.source
        raise RecipeError([source.issue(("train", "device"), str(err))]) from None


def check_world(recipe: Recipe, batch_size: int, world: int) -> None:
    """RunError when the recipe cannot run DDP-style on ``world`` ranks."""
    if world <= 1:
        return
    if batch_size % world:
        raise RunError(
            f"train.batch_size {batch_size} is the global batch and must divide evenly over the "
            f"{world} ranks (each takes batch_size / {world}); use a multiple of {world}, "
            f"e.g. --set batch_size=... if the recipe has that variable"
        )
    shrinking = [m.type for m in recipe.modifiers if m.restructures]
    if shrinking:
        raise RunError(
            f"{', '.join(shrinking)} removes channels, which DDP does not support yet; "
            "run this recipe in one process (without torchrun)"
        )


def wrap_ddp(model: torch.nn.Module, ctx: distributed.Context) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else ``model`` itself."""
    if ctx.world_size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Buffers (batch-norm statistics) are synced at init, then copied from rank 0 where they are read
    # (sampling, eval, saving) rather than before every forward.
    sync = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if sync else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)
