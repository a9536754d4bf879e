"""The dynamic M-FAC window sharded by coordinates across the ranks of a torch.distributed group.

Rank r of P keeps the columns [a_r, b_r) of the window G (m, d): a contiguous slice of the
flattened d-vector, split as evenly as possible (the first d mod P ranks hold one coordinate more;
when d < P the last ranks hold none and still take part). With G_r = G[:, a_r:b_r] and x_r likewise,

    G x            = sum_r G_r x_r                       one all-reduce of m float64 numbers
    K = m*damp*I + G G^T = L L^T                          replicated on every rank (float64)
    (F^-1 x)_r     = (x_r - G_r^T K^-1 (G x)) / damp     each rank its own slice
    F^-1 x         = concat_r (F^-1 x)_r                  one all-gather of d values

An ``update`` writes slice r of g into the slot and all-reduces G g (the new row of G G^T);
``update_mul`` shares it with the product, as in ``SlidingFisherInverse``. Per rank and step: memory
m * ceil(d / P) window values plus the replicated m x m float64 matrices; traffic m float64 numbers
(all-reduce) plus d values (all-gather) per product, O(m + d). The partial products are taken in the
window's dtype and summed in float64, so the Gram matrix has the precision of the unsharded path.

Every rank must call every method with the same arguments (they are collectives): in training the
gradients are identical on all ranks because DDP all-reduces them. Set ``check_inputs = True`` to
have each update compare float64 checksums of g across ranks (one more small all-gather a step).
The result of ``mul``/``update_mul`` is assembled by an all-gather, so it is bitwise identical on
every rank. ``state_dict`` gathers the whole window into the unsharded ``SlidingFisherInverse``
format, so a checkpoint loads at any world size, sharded or not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import _checks
from .dynamic import SlidingFisherInverse
from .group_defaults import bind_group_defaults
from .partition import shard_range

bind_group_defaults()  # before any group exists: see group_defaults

#: One of torch.distributed's ProcessGroup objects, or None for the default (WORLD) group.
Group = Any


class ShardedSlidingFisherInverse(SlidingFisherInverse):
    """``SlidingFisherInverse`` whose window holds only this rank's slice of the coordinates.

    Args:
        dim: d, the length of a (full) gradient; any d >= 1, also d < world size.
        num_grads: m, the number of window slots (zero rows at first).
        damp: the dampening lambda > 0.
        device: where this rank's slice lives and the arithmetic runs (nccl: this rank's GPU).
        dtype: float32 or float64, the dtype of the window; the m x m algebra is float64.
        process_group: the group to shard over; None is the default group, which must be initialized.

    Inputs and outputs are full d-vectors, as for ``SlidingFisherInverse``; ``grads`` is this rank's
    (m, stop - start) slice, ``start``/``stop`` its coordinates. Memory per rank: m * (stop - start)
    values of ``dtype`` plus three m x m float64 matrices. Every method is a collective.
    """

    def __init__(
        self,
        dim: int,
        num_grads: int,
        damp: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        process_group: Group = None,
        *,
        count_scaling: bool = False,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        dim = _checks.check_positive_int(dim, "dim")
        if dtype in _checks.FLOAT_DTYPES and _checks.check_storage_dtype(storage_dtype, dtype) != dtype:
            raise ValueError(
                f"storage_dtype {storage_dtype} (narrower than {dtype}) is not supported with shard=True "
                "yet; shard the window in full precision, or use storage_dtype on a single process"
            )
        # The base checks the settings and builds the m x m state; its window is the slice set below
        # (built for d = 1 here, so that no full (m, d) window is ever allocated).
        super().__init__(1, num_grads, damp, device, dtype, count_scaling=count_scaling)
        bind_group_defaults()  # a group created before compressor was imported: release torch's hold
        self.dim = dim
        self.group = process_group
        self.world_size, self.rank = _membership(process_group)
        self.start, self.stop = shard_range(dim, self.world_size, self.rank)
        self.chunk = -(-dim // self.world_size)  # the widest slice: all-gathers pad to it
        self.grads = torch.zeros(self.num_grads, self.stop - self.start, dtype=dtype, device=self.device)
        self.check_inputs = False  # debug: compare checksums of every update's g across ranks

    # ------------------------------------------------------------------ collectives

    def _all_reduce(self, p: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of this rank's partial products p (m, k), in float64."""
        p = p.to(torch.float64).contiguous()
        if self.world_size > 1:
            dist.all_reduce(p, group=self.group)
        return p

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full (k, d) matrix from every rank's (k, stop - start) columns, identical on all ranks."""
        if self.world_size == 1:
            return local
        k = local.shape[0]
        padded = torch.zeros(k, self.chunk, dtype=local.dtype, device=local.device)
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        ranges = [shard_range(self.dim, self.world_size, r) for r in range(self.world_size)]
        return torch.cat([part[:, : b - a] for part, (a, b) in zip(parts, ranges, strict=True)], dim=1)

    def _check_same_everywhere(self, g: torch.Tensor) -> None:
        """Debug: float64 checksums of g must agree bitwise on every rank."""
        g64 = g.to(device=self.device, dtype=torch.float64)
        mine = torch.stack([g64.sum(), g64.square().sum(), g64[0], g64[-1]]).reshape(1, 4)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        if not all(torch.equal(mine, other) for other in everyone):
            raise ValueError(
                "the gradient differs between ranks; the sharded M-FAC window needs the same gradient on "
                "every rank (wrap the model in DistributedDataParallel, or all-reduce the gradients)"
            )

    # ------------------------------------------------------------------ window

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's columns of x (k, d), in the window's dtype and device."""
        return x[..., self.start : self.stop].to(device=self.device, dtype=self.dtype)

    def _check_gradient(self, g: torch.Tensor, name: str) -> None:
        super()._check_gradient(g, name)
        if self.check_inputs and self.world_size > 1:
            self._check_same_everywhere(g)

    def update_mul(self, g: torch.Tensor) -> torch.Tensor:
        """``update(g)`` then ``mul(g)`` for g (d,), sharing the pass G g; returns F^-1 g (d,)."""
        p = self._insert(g)
        local = self._finish_mul(self._local(g).reshape(1, -1), p.unsqueeze(1))
        return self._all_gather(local).reshape(g.shape).to(device=g.device, dtype=g.dtype)

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """F^-1 x for x (d,) or (k, d), the same on every rank; the result has x's shape, dtype, device."""
        _checks.check_vectors(x, self.dim)
        xs = self._local(x.reshape(-1, self.dim))
        p = self._all_reduce(self.grads @ xs.T)  # (m, k)
        out = self._all_gather(self._finish_mul(xs, p))
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def reset(self, grads: torch.Tensor | None = None) -> None:
        """Empty the window, or fill all m slots with the rows of the full ``grads`` (m, d).

        G G^T is all-reduced before the check for NaN/Inf rows, so every rank raises or none does."""
        if grads is not None:
            _checks.check_grads(grads)
            want = (self.num_grads, self.dim)
            if tuple(grads.shape) != want:
                raise ValueError(f"grads must have shape {want}, got {tuple(grads.shape)}")
        super().reset()
        if grads is None:
            return
        self.grads.copy_(self._local(grads))
        self.gram.copy_(self._all_reduce(self.grads @ self.grads.T))
        bad = _checks.nonfinite_rows(self.gram.diagonal().isfinite())
        if bad:
            super().reset()
            raise ValueError(f"grads rows {bad[:10]} contain NaN or Inf; the window was emptied")
        self.count = self.num_grads

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The whole window in ``SlidingFisherInverse.state_dict`` form, gathered from every rank.

        A collective: every rank must call it and every rank gets the same dict (rank 0 saves it).
        Transient memory per rank: the full (m, d) window plus about 2 m d / P values in flight.
        """
        full = torch.empty(self.num_grads, self.dim, dtype=self.dtype, device=self.device)
        rows = -(-self.num_grads // self.world_size)
        for r0 in range(0, self.num_grads, rows):
            full[r0 : r0 + rows] = self._all_gather(self.grads[r0 : r0 + rows])
        return {"grads": full, "gram": self.gram.clone(), "next_slot": self.next_slot, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a sharded or unsharded window ``state_dict`` saved at any world size; keeps this
        rank's slice of the full (m, d) ``grads`` (load it with ``torch.load(..., mmap=True)`` to avoid
        a full copy in memory)."""
        grads = state.get("grads")
        if isinstance(grads, torch.Tensor):
            want = (self.num_grads, self.dim)
            if tuple(grads.shape) != want:
                raise ValueError(f"window state has shape {tuple(grads.shape)}, this window is {want}")
            state = {**state, "grads": grads[:, self.start : self.stop]}
        super().load_state_dict(state)

    def __repr__(self) -> str:
        rank = f", rank={self.rank}/{self.world_size}, columns=[{self.start}, {self.stop}))"
        return "Sharded" + super().__repr__()[:-1] + rank


def _membership(group: Group) -> tuple[int, int]:
    """(world size, rank) of this process in ``group``; a clear error where there is no such group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard=True needs an initialized torch.distributed process group (run under torchrun and "
            "call torch.distributed.init_process_group); on a single process use shard=False"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process_group")
    return dist.get_world_size(group), rank


def sliding_window(
    dim: int,
    num_grads: int,
    damp: float,
    device: torch.device | str | None,
    dtype: torch.dtype,
    *,
    shard: bool = False,
    process_group: Group = None,
    count_scaling: bool = False,
    storage_dtype: torch.dtype | None = None,
) -> SlidingFisherInverse:
    """A ``SlidingFisherInverse`` (d, m), or its sharded form when ``shard`` is True."""
    check_shard(shard, process_group)
    options = dict(count_scaling=count_scaling, storage_dtype=storage_dtype)
    if not shard:
        return SlidingFisherInverse(dim, num_grads, damp, device, dtype, **options)
    return ShardedSlidingFisherInverse(dim, num_grads, damp, device, dtype, process_group, **options)


def check_shard(shard: bool, process_group: Group = None) -> None:
    """ValueError for a non-bool ``shard`` or a group without it; RuntimeError (from ``_membership``)
    for shard=True where this process is in no initialized process group."""
    if not isinstance(shard, bool):
        raise ValueError(f"shard must be True or False, got {shard!r}")
    if shard:
        _membership(process_group)
    elif process_group is not None:
        raise ValueError("process_group is only used with shard=True")
