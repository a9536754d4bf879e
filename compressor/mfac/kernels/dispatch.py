"""The measured dispatch: which kernel beats its PyTorch reference on this machine, and the choice.

Whether a kernel beats the PyTorch path depends on the CPU (vector width, cache sizes, the BLAS
torch ships) and on the thread count. So on first use on a machine, right after the build,
``dispatch_table`` times each kernel wrapper (``ops``) against its reference (``reference``) on a
few small float32 cases (``DISPATCH_CASES``), medians of interleaved repetitions, a few seconds
announced on stderr, and caches the result beside the build as ``dispatch-<threads>t.json``
(``dispatch_file``); later processes read the file (an unreadable or corrupt one is measured again;
delete it to measure again). ``chosen`` then runs a CPU kernel in ``auto`` only where it measured
faster on the nearest case (``measured_faster``). The package's ``factor_blocks``, ``direct_blocks``,
``accumulate_blocks`` and ``blocked_mul`` are the ``ops`` wrappers with this choice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import ops, reference
from .build import build_dir, cache_dir, isa, mode, say

#: The measured dispatch (``auto``): the (m, B) cases each kernel is timed on against the PyTorch
#: path, float32, DISPATCH_DIM * 64 / max(m, 64) coordinates (whole blocks), DISPATCH_REPS
#: interleaved repetitions (medians). A shape uses the decision of the nearest case (log m + log B).
DISPATCH_CASES = {
    "factor_blocks": ((32, 32), (64, 128), (128, 128)),
    "factor_wide_blocks": ((64, 1024), (1024, 1024)),
    "blocked_mul": ((32, 32), (64, 128), (128, 128)),
    "direct_blocks": ((64, 32), (128, 50), (1024, 32)),
    "accumulate_blocks": ((32, 32), (32, 128)),  # (rows per chunk, B)
}
DISPATCH_DIM = 131_072
DISPATCH_REPS = 3
DISPATCH_VERSION = 4
KERNEL_NAMES = tuple(DISPATCH_CASES)
#: The damping of the timed set-ups (FisherInverse's default).
_DAMP = 1e-5

_dispatch_lock = threading.RLock()
_dispatch: dict[tuple[str, ...], dict] = {}  # see _dispatch_key -> the measured table


def dispatch_file() -> Path:
    """The cached measurement for this build and thread count (beside the build, in its cache dir)."""
    return build_dir("cpu") / f"dispatch-{torch.get_num_threads()}t.json"


def _valid(table: object) -> bool:
    if not isinstance(table, dict) or table.get("version") != DISPATCH_VERSION:
        return False
    cases = table.get("cases")
    if not isinstance(cases, dict) or set(cases) != set(KERNEL_NAMES):
        return False
    for rows in cases.values():
        if not isinstance(rows, list) or not rows:
            return False
        for row in rows:
            if not isinstance(row, dict):
                return False
            values = [row.get(k) for k in ("m", "B", "kernel_s", "torch_s")]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
                return False
    return True


def _interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function, alternating them within every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _always(kernel: str, t: torch.Tensor, m: int, size: int) -> bool:
    """The choice while timing: every kernel wherever it applies (no table is asked for)."""
    return True


def measure() -> dict:
    """Time each kernel wrapper against its reference on DISPATCH_CASES (float32, CPU); a few seconds.

    Per (m, B) case, on random rows of DISPATCH_DIM * 64 / max(m, 64) coordinates (whole blocks): the
    set-up by ``ops.factor_blocks`` (``ops.direct_blocks`` for B < m; the reference where the kernel
    does not apply, as FisherInverse falls back) against ``reference``'s; ``blocked_mul`` of one
    vector with that factor; ``accumulate_blocks`` of a chunk of m rows (DISPATCH_DIM * 32 sums) into
    fresh float64 sums, as a new BlockFisherInverse's. Each kernel wrapper runs with ``_always`` (no
    table is asked for while it is measured). At this process's thread count. Returns the table
    ``dispatch_file`` caches.
    """
    gen = torch.Generator().manual_seed(0)
    cases: dict[str, list[dict]] = {k: [] for k in KERNEL_NAMES}
    shapes = sorted({shape for rows in DISPATCH_CASES.values() for shape in rows})
    for m, size in shapes:
        d = max(1, DISPATCH_DIM * 64 // max(m, 64) // size) * size
        grads = torch.randn(m, d, generator=gen).mul_(1e-3)
        xs = torch.randn(d, generator=gen).reshape(1, d)

        def set_up(kernel: bool, grads=grads, size=size) -> torch.Tensor:
            """FisherInverse's set-up: the factor of every block (W, or P for B < m), and a diagonal."""
            direct = size < grads.shape[0]
            args = (grads, 0, grads.shape[1] // size, size, _DAMP, torch.empty_like(grads[0]))
            run = ops.direct_blocks if direct else ops.factor_blocks
            factor = run(*args, choose=_always) if kernel else None
            if factor is None:
                factor = (reference.direct_blocks if direct else reference.factor_blocks)(*args)
            return factor

        factor = set_up(True)  # also the warm-up of both paths
        set_up(False)

        def mul(kernel: bool, factor=factor, xs=xs, m=m) -> torch.Tensor:
            """x - W^T (W x) of every block (the Woodbury form's product, without 1/damp)."""
            out = torch.empty_like(xs)
            if not (kernel and ops.blocked_mul(factor, xs, out, 0, m, choose=_always)):
                reference.blocked_mul(factor, xs, out, 0)
            return out

        for name in ("factor_blocks", "factor_wide_blocks", "direct_blocks"):  # the set-up, by the shape
            if (m, size) in DISPATCH_CASES[name]:
                t = _interleaved(
                    {"kernel": lambda: set_up(True), "torch": lambda: set_up(False)}, DISPATCH_REPS
                )
                cases[name].append({"m": m, "B": size, "kernel_s": t["kernel"], "torch_s": t["torch"]})
        if (m, size) in DISPATCH_CASES["blocked_mul"]:
            mul(True), mul(False)
            t = _interleaved({"kernel": lambda: mul(True), "torch": lambda: mul(False)}, 3 * DISPATCH_REPS)
            cases["blocked_mul"].append({"m": m, "B": size, "kernel_s": t["kernel"], "torch_s": t["torch"]})

    for k, size in DISPATCH_CASES["accumulate_blocks"]:
        d = max(1, DISPATCH_DIM * 32 // size // size) * size  # sums of DISPATCH_DIM * 32 doubles
        chunk = torch.randn(k, d, generator=gen).mul_(1e-3)

        def add(kernel: bool, chunk=chunk, size=size, d=d) -> torch.Tensor:
            """S_b = 0 + G_b^T G_b of every block (the upper triangle from the kernel)."""
            sums = torch.zeros(d // size, size, size, dtype=torch.float64)
            if not (kernel and ops.accumulate_blocks(chunk, 0, sums, choose=_always)):
                reference.accumulate_blocks(chunk, 0, sums)
            return sums

        add(True), add(False)
        t = _interleaved({"kernel": lambda: add(True), "torch": lambda: add(False)}, DISPATCH_REPS)
        cases["accumulate_blocks"].append({"m": k, "B": size, "kernel_s": t["kernel"], "torch_s": t["torch"]})
    return {
        "version": DISPATCH_VERSION,
        "isa": isa(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dim": DISPATCH_DIM,
        "cases": cases,
    }


def dispatch_table() -> dict:
    """The measured table for this build and thread count: from this process's memory, else from
    ``dispatch_file`` (when it is valid), else measured now and cached there."""
    key = _dispatch_key()
    table = _dispatch.get(key)
    if table is not None:
        return table
    with _dispatch_lock:
        table = _dispatch.get(key)
        if table is not None:
            return table
        path = dispatch_file()
        with contextlib.suppress(OSError, ValueError):
            table = json.loads(path.read_text())
        if not _valid(table):
            say(
                "timing the M-FAC cpu kernels against the PyTorch path on this machine (first run only, "
                f"a few seconds; cached in {path})"
            )
            table = measure()
            used = [
                f"{name} {'kernel' if r['torch_s'] > r['kernel_s'] else 'PyTorch'} at m={r['m']}, B={r['B']} "
                f"({r['torch_s'] / r['kernel_s']:.2f}x)"
                for name, rows in table["cases"].items()
                for r in rows
            ]
            say("measured: " + "; ".join(used))
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, indent=1))
                os.replace(tmp, path)
        _dispatch[key] = table
        return table


def _dispatch_key() -> tuple[str, ...]:
    """What selects the table without hashing the sources on every call (they do not change while a
    process runs): the cache, the ISA and sources settings, the thread count."""
    env = (os.environ.get(k, "") for k in ("COMPRESSOR_KERNELS_ISA", "COMPRESSOR_CSRC"))
    return (str(cache_dir()), *env, str(torch.get_num_threads()))


def measured_faster(kernel: str, m: int, size: int) -> bool:
    """Whether ``kernel`` measured faster than the PyTorch path on the case nearest to (m, size)."""
    rows = dispatch_table()["cases"][kernel]
    near = min(rows, key=lambda r: abs(math.log(m / r["m"])) + abs(math.log(size / r["B"])))
    return near["torch_s"] > near["kernel_s"]


def chosen(kernel: str, t: torch.Tensor, m: int, size: int) -> bool:
    """Whether to run ``kernel`` on a shape (m rows, blocks of ``size``) of ``t`` it applies to: always
    in mode ``on`` and off the CPU, else (``auto``, CPU) as measured. ``off`` and unbuilt kernels
    never get here (the wrappers check ``build.module`` first)."""
    if mode() == "on" or t.device.type != "cpu":
        return True
    return measured_faster(kernel, m, size)


# ------------------------------------------------------------- the wrappers with the measured choice


def factor_blocks(
    grads: torch.Tensor, start: int, blocks: int, size: int, damp: float, diag: torch.Tensor
) -> torch.Tensor | None:
    """``ops.factor_blocks`` where ``chosen``: W (blocks, m, size) of ``grads`` (m, d) from ``start``,
    writing ``diag`` (d,) there; None: not run (the caller runs ``reference``)."""
    return ops.factor_blocks(grads, start, blocks, size, damp, diag, choose=chosen)


def direct_blocks(
    grads: torch.Tensor, start: int, blocks: int, size: int, damp: float, diag: torch.Tensor
) -> torch.Tensor | None:
    """``ops.direct_blocks`` where ``chosen``: P = damp * F_b^-1 (blocks, size, size) for size < m,
    writing ``diag``; None: not run."""
    return ops.direct_blocks(grads, start, blocks, size, damp, diag, choose=chosen)


def accumulate_blocks(chunk: torch.Tensor, start: int, sums: torch.Tensor) -> bool:
    """``ops.accumulate_blocks`` where ``chosen``: the upper triangles of ``sums[b] += G_b^T G_b``
    (blocks, size, size) from ``chunk`` (k, d); False: not run."""
    return ops.accumulate_blocks(chunk, start, sums, choose=chosen)


def blocked_mul(
    factor: torch.Tensor, xs: torch.Tensor, out: torch.Tensor, start: int, num_grads: int
) -> bool:
    """``ops.blocked_mul`` where ``chosen``: ``out[:, cols] = xs[:, cols] - W^T (W xs[:, cols])`` for W
    (blocks, num_grads, size) and ``xs``, ``out`` (k, d); False: not run."""
    return ops.blocked_mul(factor, xs, out, start, num_grads, choose=chosen)
