"""MFACPruning's two forms of F^-1 (Woodbury and the streamed block Fisher): same masks and weights,
the memory each path is charged in the preflight, and the streamed path on 2 gloo ranks (each rank
sums its own rows, one all-reduce of the block sums) against one process."""

from __future__ import annotations

import datetime
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from compressor.lifecycle.session import Session
from compressor.mfac import BlockFisherInverse
from modifiers.mfac_pruning import MFACPruning

NAMES = ["0.weight", "2.weight"]


def _pruned(settings: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks and weights after one update of MFACPruning(**settings) on a fixed small net and data."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    data = TensorDataset(torch.randn(96, 8, generator=gen), torch.randint(0, 4, (96,), generator=gen))
    modifier = MFACPruning(params=NAMES, start=0, end=0, **settings)
    session = Session(
        [modifier], net, torch.optim.SGD(net.parameters(), lr=0.0), steps_per_epoch=1, data=data
    )
    session.initialize()
    session.before_step()
    session.after_step()
    out = {f"mask/{n}": session.masks.mask(n).clone() for n in NAMES}
    out.update({f"weight/{n}": session.params[n].detach().clone() for n in NAMES})
    return out


def _agree(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    for n in NAMES:
        assert torch.equal(a[f"mask/{n}"], b[f"mask/{n}"]), n
        wa, wb = a[f"weight/{n}"].double(), b[f"weight/{n}"].double()
        assert (wa - wb).abs().max().item() <= rtol * wa.abs().max().item(), n


@pytest.mark.parametrize("structure", ["unstructured", {"n": 2, "m": 4}], ids=["unstructured", "2:4"])
def test_woodbury_and_streamed_give_the_same_masks_and_weights(structure):
    """B = 16 < m = 24 (auto streams), two sub-steps, group OBS for 2:4. The Woodbury path is
    float32 (its OBS update moves weights by F^-1 u to ~1e-5 relative, test_mfac_pruning's bound is
    1e-4); the streamed one float64."""
    settings = {
        "final_sparsity": 0.5,
        "num_grads": 24,
        "block_size": 16,
        "num_recomputations": 2,
        "structure": structure,
    }
    woodbury = _pruned({**settings, "fisher": "woodbury"})
    streamed = _pruned({**settings, "fisher": "streamed"})
    auto = _pruned(settings)
    _agree(woodbury, streamed, 1e-4)
    _agree(streamed, auto, 0.0)  # auto took the streamed path
    assert all((~woodbury[f"mask/{n}"]).sum() > 0 for n in NAMES)


def test_per_parameter_blocks_need_woodbury():
    with pytest.raises(ValidationError, match="streamed needs a block_size"):
        MFACPruning(params=NAMES, final_sparsity=0.5, block_size=None, fisher="streamed")
    with pytest.raises(ValidationError, match="fisher"):
        MFACPruning(params=NAMES, final_sparsity=0.5, fisher="dense")
    auto = MFACPruning(params=NAMES, final_sparsity=0.5, block_size=None, num_grads=4096)
    assert not auto.streamed(4096)


def test_preflight_counts_the_path_taken():
    d = 1_000_000
    streamed = MFACPruning(params=NAMES, final_sparsity=0.5, num_grads=256, block_size=32)
    assert streamed.streamed(256) and streamed.chunk_rows(256) == 16
    sums = BlockFisherInverse.bytes_needed(d, 32)
    assert sums == d * 32 * 8
    assert streamed.gradient_bytes(d) == sums + 16 * d * 4  # the block sums and one chunk of rows
    assert not streamed.gathers_rows()
    woodbury = MFACPruning(params=NAMES, final_sparsity=0.5, num_grads=256, block_size=32, fisher="woodbury")
    assert woodbury.gathers_rows()
    assert woodbury.gradient_bytes(d) == 2 * 4 * 256 * d
    wide = MFACPruning(params=NAMES, final_sparsity=0.5, num_grads=64, block_size=128)  # B >= m: Woodbury
    assert not wide.streamed(64) and wide.gradient_bytes(d) == 2 * 4 * 64 * d
    # a num_grads map: the largest of the sub-steps' needs, each by its own path
    mixed = MFACPruning(params=NAMES, final_sparsity=0.9, num_grads={0.0: 64, 0.5: 1024}, block_size=128)
    assert mixed.gradient_bytes(d) == max(
        2 * 4 * 64 * d, BlockFisherInverse.bytes_needed(d, 128) + 64 * d * 4
    )
    # 10.6M weights, m = 1024, B = 32: streamed 2.7 GB of sums + 0.7 GB of rows; Woodbury 87 GB
    big = MFACPruning(params=NAMES, final_sparsity=0.5, num_grads=1024, block_size=32)
    assert big.gradient_bytes(10_600_000) == 10_600_000 * (32 * 8 + 16 * 4) < 3.4e9


# ---------------------------------------------------------------------- 2 gloo ranks


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result: dict[str, Any] = {}
        # the Fisher alone: each rank adds rows of its own, then one all-reduce
        gen = torch.Generator().manual_seed(7)
        grads = torch.randn(10, 50, generator=gen, dtype=torch.float64)
        fi = BlockFisherInverse(50, 8, 1e-3, dtype=torch.float64)
        fi.add(grads[rank::world])
        fi.all_reduce()
        result["num_grads"] = fi.num_grads
        result["mul"] = fi.mul(grads[0])
        result["pruned"] = _pruned(SETTINGS)  # the streamed pruner: sampler.chunks, all_reduce
        torch.save(result, f"{out}.{rank}.pt")
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


SETTINGS = {"final_sparsity": 0.5, "num_grads": 15, "block_size": 4, "fisher": "streamed"}


def test_two_ranks_all_reduce_the_block_sums_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"out.{r}.pt") for r in range(world)]
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(10, 50, generator=gen, dtype=torch.float64)
    single = BlockFisherInverse(50, 8, 1e-3, dtype=torch.float64)
    single.add(grads)
    alone = _pruned(SETTINGS)
    for r in results:
        assert r["num_grads"] == 10
        torch.testing.assert_close(r["mul"], single.mul(grads[0]), rtol=1e-12, atol=0)
        _agree(r["pruned"], alone, 1e-9)  # 15 rows: 8 on rank 0, 7 on rank 1; sums in another order
