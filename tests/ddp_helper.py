"""``compressor.engine.run`` with probes, for tests/test_distributed_run.py (under torchrun or not).

    torchrun --nproc_per_node=2 tests/ddp_helper.py OUT RECIPE PROBES [--resume] [--snapshot EPOCH DIR]
        [--sample M]

Every rank writes PROBES/rank<r>.pt with what ``run_probed`` returns.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def run_probed(
    out: Path, recipe: Path | None, *, snapshot: tuple[int, Path] | None = None, sample: int = 0
) -> dict[str, Any]:
    """Run (resume when ``recipe`` is None) and return this rank's probes.

    ``masks``: {epoch: masks} after each checkpoint; ``restored``: the masks just after a resume
    loaded its checkpoint; ``grads``: (num_grads asked, rows returned) of every GradientSampler call;
    ``summary``: what run() returned; ``sample``: with ``sample`` M, the (M, d) gradients that
    GradientSampler gives for a fresh digits-mlp at this world size (drawn after the first
    checkpoint). ``snapshot`` (epoch, dir): rank 0 copies ``out`` to dir right after that epoch's
    checkpoint (a run killed there).
    """
    from compressor import engine
    from compressor.core import distributed
    from compressor.engine import checkpoints
    from compressor.lifecycle.sampling import GradientSampler

    probe: dict[str, Any] = {"masks": {}, "grads": [], "restored": None}
    originals = (GradientSampler.sample, checkpoints.save, checkpoints.restore)
    sample_fn, save, restore = originals

    def counting_sample(self, names, num_grads, batch_size, **kwargs):
        rows = sample_fn(self, names, num_grads, batch_size, **kwargs)
        probe["grads"].append((num_grads, rows.shape[0]))
        return rows

    def probing_checkpoint(files, session, model, epoch, *rest):
        save(files, session, model, epoch, *rest)
        probe["masks"][epoch] = _masks(session)
        if sample and "sample" not in probe:  # inside the run: the process group is up
            probe["sample"] = fresh_sample(sample)
        if snapshot and epoch == snapshot[0] and distributed.is_main():
            shutil.copytree(files.root, snapshot[1])

    def probing_restore(state, session, *rest):
        result = restore(state, session, *rest)
        probe["restored"] = _masks(session)
        return result

    GradientSampler.sample = counting_sample
    checkpoints.save, checkpoints.restore = probing_checkpoint, probing_restore
    try:
        probe["summary"] = engine.run(recipe, out, resume=recipe is None, progress=False)
    finally:
        GradientSampler.sample, checkpoints.save, checkpoints.restore = originals
    return probe


def _masks(session: Any) -> dict[str, torch.Tensor]:
    return {n: session.masks.mask(n).clone() for n in session.masks.names}


def fresh_sample(m: int) -> torch.Tensor:
    """m gradients of a fresh digits-mlp's weights, drawn at the current world size."""
    from compressor.data import load_data
    from compressor.lifecycle.sampling import GradientSampler
    from compressor.models import build_model

    data = load_data("digits")
    model = build_model("digits-mlp", data.input_shape, data.num_classes, seed=0)
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    return GradientSampler(model, data.train, seed=3).sample(names, m, 16, key=11)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("recipe")
    parser.add_argument("probes", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--snapshot", nargs=2, default=None)
    parser.add_argument("--sample", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    snapshot = (int(args.snapshot[0]), Path(args.snapshot[1])) if args.snapshot else None
    recipe = None if args.resume else Path(args.recipe)
    probe = run_probed(args.out, recipe, snapshot=snapshot, sample=args.sample)
    args.probes.mkdir(parents=True, exist_ok=True)
    torch.save(probe, args.probes / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
