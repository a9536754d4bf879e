"""torch.distributed helpers: the process group under torchrun, rank queries, and collectives.

Everything here works without a process group (one process): rank 0 of a world of 1, collectives
return their input. ``launched()`` tells whether torchrun (or a compatible launcher) set the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from compressor.core.errors import CompressorError
from compressor.mfac.group_defaults import bind_group_defaults

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks (env COMPRESSOR_DIST_TIMEOUT_S overrides).
DEFAULT_TIMEOUT_S = 900.0


class DistributedError(CompressorError, RuntimeError):
    """A rank failed (its message is carried), or the torchrun environment is unusable."""


def active() -> bool:
    """True when a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank() == 0


def local_world_size() -> int:
    """Ranks on this host (torchrun's LOCAL_WORLD_SIZE; the world size when it is not set)."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else world_size()


def launched() -> bool:
    """True when the environment of torchrun is present (WORLD_SIZE and RANK set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def timeout_s() -> float:
    """Seconds a collective waits for the other ranks (COMPRESSOR_DIST_TIMEOUT_S, default 900)."""
    value = os.environ.get("COMPRESSOR_DIST_TIMEOUT_S", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise DistributedError(f"COMPRESSOR_DIST_TIMEOUT_S={value!r}: expected seconds") from exc


@dataclass(frozen=True)
class Context:
    """What a rank needs to know: its rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True: ``distributed()`` created the group and destroys it at the end


@contextmanager
def distributed() -> Iterator[Context]:
    """Join the torchrun process group for the duration of the block (or run as one process).

    Backend nccl with device cuda:LOCAL_RANK when CUDA is available, else gloo on CPU. A group that
    the caller already initialized is used as is (and left alone). The group is destroyed at the
    end, on error too, so that the other ranks fail fast instead of waiting for a dead peer.
    """
    if dist.is_available() and dist.is_initialized():
        yield Context(rank(), world_size(), _device(), owns_group=False)
        return
    if not launched() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Context(0, 1, torch.device("cpu"), owns_group=False)
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    bind_group_defaults()  # else the first optimizer pins the group past its destruction
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the torchrun process group: {exc}") from exc
    try:
        yield Context(rank(), world_size(), _device(), owns_group=True)
    except RuntimeError as exc:
        if isinstance(exc, CompressorError) or not _peer_lost(exc):
            raise
        raise RankLostError(
            f"lost contact with another rank ({_first_line(exc)}): it stopped or was killed, and this "
            "rank stops too (torchrun's summary names the rank that failed first). Nothing before the "
            "last checkpoint is lost: `compressor run --resume OUTPUT_DIR` under torchrun with the same "
            "number of ranks continues the run as if it had not stopped"
        ) from exc
    finally:
        dist.destroy_process_group()


class RankLostError(DistributedError):
    """A collective failed because another rank is gone (killed, crashed) or silent past the timeout."""


#: What gloo and c10d say when the other end of a collective died or went silent.
_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout", "connection refused")


def _peer_lost(exc: RuntimeError) -> bool:
    """True for a collective's failure that means a lost peer, not a bug or a bad input."""
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc).lower()
    if backend_error and isinstance(exc, backend_error):
        return True
    from_c10d = any(where in text for where in ("gloo", "c10d", "processgroup", "nccl"))
    return from_c10d and any(p in text for p in _PEER_LOST)


def _first_line(exc: BaseException) -> str:
    """The first sentence of ``exc``'s message without gloo's source location, at most 200 characters."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0].rstrip(".")[:200]  # gloo goes on with advice and an emoji


def _device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the current CUDA device with nccl, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank when any rank failed.

    A rank raises its own exception if it has one, else the first failing rank's (as is when it
    pickles, else a DistributedError with its text). Exceptions of ranks other than the first
    failing one get ``reported_by_rank`` set to that rank, so that only one rank prints the message.
    """
    if not active():
        if error is not None:
            raise error
        return
    errors = all_gather_objects(_portable(error))
    failed = [i for i, e in enumerate(errors) if e is not None]
    if not failed:
        return
    first = failed[0]
    raised = error if error is not None else errors[first]
    if not isinstance(raised, BaseException):
        raised = DistributedError(f"rank {first}: {raised}")
    if first != rank():
        with contextlib.suppress(AttributeError):
            raised.reported_by_rank = first  # type: ignore[union-attr]
    raise raised


def _portable(error: BaseException | None) -> BaseException | str | None:
    """The exception if it survives pickling, else its text."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return f"{type(error).__name__}: {error}"
    return error


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result (or raise its exception) on every rank."""
    if not active():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # carried to the other ranks, re-raised everywhere
            error = exc
    agree(error)
    return broadcast_object(result)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s floating buffers (batch-norm statistics) to every rank."""
    if not active():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.broadcast(buffer.data, src=src)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside a DistributedDataParallel / DataParallel wrapper."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
