"""A run's checkpoint: everything to resume, written every epoch, and its restore.

The file format (atomic writes, ``weights_only`` loading) is ``compressor.core.checkpoint``'s.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from compressor.core import distributed, quantized
from compressor.core.checkpoint import fork_rank_rngs, rng_state, save_checkpoint, set_rng_state
from compressor.engine.files import RunFiles
from compressor.engine.report import read_metrics
from compressor.lifecycle.session import Session
from compressor.recipe import Recipe, resolved_yaml
from compressor.surgery.channels import resume_shapes


def save(
    files: RunFiles, session: Session, model: Any, epoch: int, elapsed: float, raw: str, recipe: Recipe
) -> None:
    """Everything to resume, plus the resolved recipe so that the checkpoint alone rebuilds the model.

    Collective under torch.distributed: rank 0's buffers and every rank's RNG state are gathered,
    and rank 0 alone writes the file (atomically); an error there is raised on every rank.
    """
    distributed.broadcast_buffers(model)
    rngs = distributed.all_gather_objects(rng_state())
    state = {
        "model": model.state_dict(),
        "optimizer": session.base_optimizer.state_dict(),  # a swapped-in one saves itself
        "session": session.state_dict(),
        "rng": rngs[0],
        "epoch": epoch,
        "elapsed": elapsed,
        "recipe_sha256": hashlib.sha256(raw.encode()).hexdigest(),
        "recipe": resolved_yaml(recipe),
    }
    if len(rngs) > 1:
        state["rng_ranks"] = rngs  # per-rank RNG, restored when resuming at the same world size

    def write() -> None:
        # the rows logged so far: a resume drops the ones logged after this save (at this step too)
        state["metrics_rows"] = len(read_metrics(files.metrics)) if files.metrics.exists() else 0
        save_checkpoint(files.checkpoint, state)

    distributed.on_main(write)


def restore(
    state: dict[str, Any], session: Session, model: Any, ctx: distributed.Context
) -> tuple[int, float]:
    """Load a checkpoint's state into a fresh model and session (any world size wrote it)."""
    weights = dict(state["model"])
    buffers = {k: v for k, v in weights.items() if k.endswith(quantized.SUFFIXES)}
    # channel-pruned checkpoint: shrink the fresh model to it (on the weights; then the quantization
    # buffers as the checkpoint has them: its shapes, latent weights only while fine-tuning ran)
    resume_shapes(session, {k: v for k, v in weights.items() if k not in buffers})
    quantized.attach(model, {k: torch.zeros_like(v) for k, v in buffers.items()})
    model.load_state_dict(weights)
    session.base_optimizer.load_state_dict(state["optimizer"])
    session.load_state_dict(state["session"])
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == ctx.world_size:
        set_rng_state(ranks[ctx.rank])
    else:  # another world size: every rank continues from rank 0's state, forked for ranks > 0
        set_rng_state(state["rng"])
        fork_rank_rngs(ctx.rank)
    return int(state["epoch"]), float(state.get("elapsed", 0.0))
