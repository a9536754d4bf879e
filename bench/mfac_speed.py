"""Benchmark compressor.mfac against the dense BLAS calls it is built from.

Run from the repository root (no install needed)::

    python bench/mfac_speed.py            # d = 1,000,000, m in {64, 256, 512} plus "m=64, B=128"
    python bench/mfac_speed.py --quick    # d = 200,000, m in {32, 128} plus "m=32, B=128" (docs/speed.md)
    python bench/mfac_speed.py --grads 64 --block-grads 32 64 128 --block-size 32 50 128 1024
                                    # blocked rows: every m of --block-grads with every B

G is an (m, d) float32 matrix of N(0, 1) * 1e-3 entries (a realistic gradient scale). Every figure is a
ratio to a baseline timed in the same run, with baseline and op repetitions interleaved, medians of both:

* precompute / GEMM       -- ``FisherInverse(G, damp, block_size)`` vs one ``G @ G.T``.
* blocked / unblocked     -- blocked rows only: ``FisherInverse(G, damp, B)`` vs ``FisherInverse(G, damp)``
  on the same G, the GEMM, the unblocked and the blocked precompute interleaved in every repetition.
* diag / GEMV             -- ``inv.diag()`` vs one pass ``G @ x``.
* mul / 2 GEMV            -- ``inv.mul(x)`` vs ``t = G @ x`` then ``G.T @ t`` (timed together).
* update_mul / 2 GEMV     -- ``SlidingFisherInverse.update_mul(g)`` on a full window of m gradients vs the
  same two GEMVs (not run for the blocked row: the sliding window has no blocks).
* peak / size of G        -- (VmHWM - VmRSS before) / G.nbytes around one precompute, i.e. the memory the
  precompute needs beyond its input, including what the FisherInverse object keeps.

The absolute seconds are printed next to each ratio. Peak memory is read from /proc/self/status after
resetting the high-water mark through /proc/self/clear_refs; where that file is not writable each
precompute runs in a fresh 'spawn' subprocess instead. A float64 Woodbury reference
(F = damp * I + G^T G / m, block-diagonal for the blocked row) checks mul, diag, entry and the sliding
window's mul; errors are relative to the size of the low-rank correction, not to x / damp.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GRAD_SCALE = 1e-3
FALLBACK_DAMP = 1e-4
# Acceptance thresholds, checked on the largest unblocked m: (row key, limit, label).
TARGETS = (
    ("precompute", 4.0, "precompute <= 4x GEMM"),
    ("diag", 2.0, "diag <= 2x GEMV"),
    ("mul", 1.3, "mul <= 1.3x two GEMVs"),
    ("update_mul", 1.3, "update_mul <= 1.3x two GEMVs"),
    ("peak", 1.3, "peak memory <= 1.3x size of G"),
)


@dataclass
class Config:
    """One table row: m gradients, optionally blocked."""

    m: int
    block_size: int | None = None

    @property
    def label(self) -> str:
        return f"m={self.m}" if self.block_size is None else f"m={self.m}, B={self.block_size}"


@dataclass
class Timing:
    """Interleaved repetitions of an op and its baseline (seconds)."""

    op: list[float]
    base: list[float]

    @property
    def op_s(self) -> float:
        return statistics.median(self.op)

    @property
    def base_s(self) -> float:
        return statistics.median(self.base)

    @property
    def ratio(self) -> float:
        return self.op_s / self.base_s


@dataclass
class Row:
    """Everything measured for one configuration."""

    config: Config
    damp: float
    damp_note: str = ""
    timings: dict[str, Timing] = field(default_factory=dict)
    peak_bytes: int = 0
    g_bytes: int = 0
    checks: dict[str, float] = field(default_factory=dict)

    def ratio(self, key: str) -> float | None:
        if key == "blocked":  # the blocked precompute over the unblocked one (blocked rows only)
            t = self.timings.get("blocked")
            return t.ratio if t else None
        if key == "peak":
            return self.peak_bytes / self.g_bytes
        return self.timings[key].ratio if key in self.timings else None


# ----------------------------------------------------------------------------------------------- helpers


def load_mfac() -> tuple[type, type]:
    """Import the classes under test (late, so --help works without them)."""
    from compressor.mfac import FisherInverse, SlidingFisherInverse

    return FisherInverse, SlidingFisherInverse


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def make_grads(m: int, d: int, seed: int) -> torch.Tensor:
    """(m, d) float32 N(0, 1) * 1e-3, scaled in place so that no temporary of G's size is made."""
    torch.manual_seed(seed)
    return torch.randn(m, d).mul_(GRAD_SCALE)


def fmt_s(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(r: float) -> str:
    return f"**{r:.2f}**" if r >= 0.01 else f"**{r:.0e}**"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call takes; the result is returned so that freeing it is not timed."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved3(
    op: Callable[[], Any], base: Callable[[], Any], ref: Callable[[], Any], reps: int
) -> tuple[Timing, Timing, Any]:
    """Alternate baseline, reference and op ``reps`` times: (op vs base, op vs ref, last op result)."""
    vs_base, vs_ref, last = Timing([], []), Timing([], []), None
    for _ in range(reps):
        seconds, _ = timed(base)
        vs_base.base.append(seconds)
        seconds, _ = timed(ref)
        vs_ref.base.append(seconds)
        last = None
        seconds, last = timed(op)
        vs_base.op.append(seconds)
        vs_ref.op.append(seconds)
    return vs_base, vs_ref, last


def interleaved(op: Callable[[], Any], base: Callable[[], Any], reps: int) -> tuple[Timing, Any]:
    """Alternate baseline and op ``reps`` times; return the timings and the last op result."""
    timing, last = Timing([], []), None
    for _ in range(reps):
        seconds, _ = timed(base)
        timing.base.append(seconds)
        last = None  # free the previous result before building the next one
        seconds, last = timed(op)
        timing.op.append(seconds)
    return timing, last


def two_gemv(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The data movement a mat-vec with a rank-m matrix cannot avoid: G @ x, then G^T @ t."""
    return g.T @ (g @ x)


# ------------------------------------------------------------------------------------------------ memory


def status_kb(field_name: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field_name} not in /proc/self/status")
    return int(match.group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def clear_refs_works() -> bool:
    """True when writing /proc/self/clear_refs really lowers VmHWM after a freed 256 MiB spike."""
    try:
        spike = torch.ones(64 * 2**20)
        del spike
        gc.collect()
        high = status_kb("VmHWM")
        reset_peak_rss()
        return status_kb("VmHWM") < high - 128 * 1024
    except OSError:
        return False


def warm_up(block_sizes: list[int] | int | None) -> None:
    """Run every op once on a tiny problem so that loading libraries and thread pools is not measured."""
    fisher_inverse, sliding_inverse = load_mfac()
    grads = make_grads(4, 4096, 0)
    x = grads[0].clone()
    if not isinstance(block_sizes, list):
        block_sizes = [block_sizes] if block_sizes else []
    for block in {None, *block_sizes}:
        inv = fisher_inverse(grads, damp=1e-2, block_size=block)
        inv.mul(x), inv.diag(), inv.entry(0, 1)
    sliding = sliding_inverse(4096, 4, damp=1e-2)
    sliding.reset(grads)
    sliding.update_mul(x), sliding.mul(x)
    for block in {None, *block_sizes}:
        Woodbury(grads, 1e-2, block).correction(x)
    two_gemv(grads, x), grads @ grads.T


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident bytes added while ``fn`` runs (its result stays alive until the peak is read)."""
    gc.collect()
    reset_peak_rss()
    before = status_kb("VmRSS")
    out = fn()
    peak = status_kb("VmHWM")
    del out
    gc.collect()
    return (peak - before) * 1024


def _child_peak(m: int, d: int, seed: int, damp: float, block_size: int | None, threads: int) -> int:
    """Spawned subprocess: build G, then measure one precompute with VmHWM - VmRSS (G already resident)."""
    torch.set_num_threads(threads)
    warm_up(block_size)
    fisher_inverse, _ = load_mfac()
    grads = make_grads(m, d, seed)
    gc.collect()
    before = status_kb("VmRSS")
    inv = fisher_inverse(grads, damp=damp, block_size=block_size)
    peak = status_kb("VmHWM")
    del inv
    return (peak - before) * 1024


def spawned_peak_bytes(config: Config, d: int, seed: int, damp: float) -> int:
    """Fallback when clear_refs is unavailable: one fresh process per precompute."""
    with mp.get_context("spawn").Pool(1) as pool:
        args = (config.m, d, seed, damp, config.block_size, torch.get_num_threads())
        return pool.apply(_child_peak, args)


# --------------------------------------------------------------------------------------------- reference


def block_view(grads: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """(nb, m, B) view of G (a zero-padded copy when B does not divide d)."""
    m, d = grads.shape
    b = block_size or d
    nb = math.ceil(d / b)
    if nb * b != d:
        grads = torch.nn.functional.pad(grads, (0, nb * b - d))
    return grads.view(m, nb, b).transpose(0, 1)


class Woodbury:
    """float64-solved reference for F = damp * I + G^T G / m (block-diagonal when block_size is set)."""

    def __init__(self, grads: torch.Tensor, damp: float, block_size: int | None) -> None:
        self.d, self.damp, self.block_size = grads.shape[1], damp, block_size
        self.gb = block_view(grads, block_size)
        nb, m, _ = self.gb.shape
        gram = torch.bmm(self.gb, self.gb.transpose(1, 2)).double()
        eye = torch.eye(m, dtype=torch.float64).expand(nb, m, m)
        self.minv = torch.linalg.inv(gram + m * damp * eye)  # (nb, m, m)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """G^T (m damp I + G G^T)^-1 G x / damp, the part of F^-1 x that is not x / damp."""
        xb = block_view(x[None], self.block_size).transpose(1, 2)  # (nb, B, 1)
        t = torch.bmm(self.minv, torch.bmm(self.gb, xb).double()).float()
        return torch.bmm(self.gb.transpose(1, 2), t).reshape(-1)[: self.d] / self.damp

    def _column(self, i: int) -> tuple[int, torch.Tensor]:
        b = self.block_size or self.d
        return i // b, self.gb[i // b, :, i % b].double()

    def entry_correction(self, i: int, j: int) -> float:
        """g_i^T M g_j / damp; zero across blocks."""
        (bi, gi), (bj, gj) = self._column(i), self._column(j)
        return float(gi @ self.minv[bi] @ gj) / self.damp if bi == bj else 0.0


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def check_static(inv: Any, ref: Woodbury, x: torch.Tensor, seed: int) -> dict[str, float]:
    """Relative errors of mul, diag (sampled) and entry against the reference corrections."""
    d, damp = ref.d, ref.damp
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(d, (16,), generator=gen).tolist()
    diag_got = 1.0 / damp - inv.diag()[idx]
    diag_ref = torch.tensor([ref.entry_correction(i, i) for i in idx])
    pairs = [*zip(idx[:8], idx[8:], strict=True), (idx[0], min(idx[0] + 1, d - 1))]
    entry_got = torch.tensor([-inv.entry(i, j) + (damp**-1 if i == j else 0.0) for i, j in pairs])
    entry_ref = torch.tensor([ref.entry_correction(i, j) for i, j in pairs])
    return {
        "mul": rel_err(x / damp - inv.mul(x), ref.correction(x)),
        "diag": rel_err(diag_got, diag_ref),
        "entry": rel_err(entry_got, entry_ref),
    }


# -------------------------------------------------------------------------------------------- one row


def first_precompute(config: Config, grads: torch.Tensor, args: argparse.Namespace) -> Row:
    """Run the first precompute (memory measurement and warm-up); fall back to damp 1e-4 if it raises."""
    fisher_inverse, _ = load_mfac()
    block = config.block_size
    damps = [args.damp] + ([FALLBACK_DAMP] if args.damp != FALLBACK_DAMP else [])
    note = ""
    for damp in damps:
        try:
            if args.mem_method == "spawn":
                peak = spawned_peak_bytes(config, args.dim, args.seed, damp)
                fisher_inverse(grads, damp=damp, block_size=block)  # in-process warm-up
            else:
                peak = peak_extra_bytes(lambda d=damp: fisher_inverse(grads, damp=d, block_size=block))
        except Exception as exc:  # any failure at this damp means: try the fallback
            if damp == damps[-1]:
                raise
            note = f"damp={damp:g} raised {type(exc).__name__}: {exc}"
            log(f"  {config.label}: {note}; retrying with damp={FALLBACK_DAMP:g}")
            continue
        return Row(config, damp, note, peak_bytes=peak, g_bytes=grads.nbytes)
    raise AssertionError("unreachable")


def bench_static(row: Row, grads: torch.Tensor, x: torch.Tensor, args: argparse.Namespace) -> None:
    """precompute vs GEMM, diag vs GEMV, mul vs two GEMVs, plus the accuracy checks."""
    fisher_inverse, _ = load_mfac()
    block = row.config.block_size
    grads @ grads.T  # warm the GEMM (the first precompute already warmed the op)
    if block is None:
        row.timings["precompute"], inv = interleaved(
            lambda: fisher_inverse(grads, damp=row.damp, block_size=block), lambda: grads @ grads.T, args.reps
        )
    else:  # the blocked precompute against the GEMM and the unblocked precompute, all interleaved
        fisher_inverse(grads, damp=row.damp)  # warm-up
        row.timings["precompute"], row.timings["blocked"], inv = interleaved3(
            lambda: fisher_inverse(grads, damp=row.damp, block_size=block),
            lambda: grads @ grads.T,
            lambda: fisher_inverse(grads, damp=row.damp),
            args.reps,
        )
    if args.check:
        row.checks.update(check_static(inv, Woodbury(grads, row.damp, block), x, args.seed))
    inv.diag(), inv.mul(x), grads @ x  # warm-up
    row.timings["diag"], _ = interleaved(inv.diag, lambda: grads @ x, args.reps)
    row.timings["mul"], _ = interleaved(lambda: inv.mul(x), lambda: two_gemv(grads, x), args.reps)


def fresh_vectors(d: int, count: int, seed: int) -> Iterator[torch.Tensor]:
    """New gradient-scale vectors for update_mul, one per call."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(d, generator=gen).mul_(GRAD_SCALE)


def bench_sliding(row: Row, grads: torch.Tensor, x: torch.Tensor, args: argparse.Namespace) -> None:
    """update_mul on a full window vs two GEMVs, plus the sliding window's mul vs the reference."""
    _, sliding_inverse = load_mfac()
    m, d = grads.shape
    sliding = sliding_inverse(d, m, damp=row.damp)
    sliding.reset(grads)
    if args.check:
        ref = Woodbury(grads, row.damp, None)
        row.checks["sliding_mul"] = rel_err(x / row.damp - sliding.mul(x), ref.correction(x))
        del ref
    vectors = fresh_vectors(d, args.reps + 1, args.seed + 1)
    sliding.update_mul(next(vectors))  # warm-up
    row.timings["update_mul"], _ = interleaved(
        lambda: sliding.update_mul(next(vectors)), lambda: two_gemv(grads, x), args.reps
    )


def bench_row(config: Config, args: argparse.Namespace) -> Row:
    grads = make_grads(config.m, args.dim, args.seed)
    x = torch.randn(args.dim, generator=torch.Generator().manual_seed(args.seed + 2))
    row = first_precompute(config, grads, args)
    log(f"  {config.label}: peak {fmt_bytes(row.peak_bytes)} for G of {fmt_bytes(row.g_bytes)}")
    bench_static(row, grads, x, args)
    gc.collect()  # the FisherInverse is gone before the sliding window is built
    if config.block_size is None:
        bench_sliding(row, grads, x, args)
    gc.collect()
    return row


# -------------------------------------------------------------------------------------------- report


COLUMNS = (
    "precompute",
    "GEMM",
    "ratio",
    "unblocked",
    "blocked / unblocked",
    "diag",
    "GEMV",
    "ratio",
    "mul",
    "2 GEMV",
    "ratio",
    "update_mul",
    "2 GEMV",
    "ratio",
    "peak extra",
    "size G",
    "ratio",
)


def row_cells(row: Row) -> list[str]:
    cells = [row.config.label]
    for key in ("precompute", "diag", "mul", "update_mul"):
        t = row.timings.get(key)
        cells += [fmt_s(t.op_s), fmt_s(t.base_s), fmt_ratio(t.ratio)] if t else ["—", "—", "—"]
        if key == "precompute":
            b = row.timings.get("blocked")
            cells += [fmt_s(b.base_s), fmt_ratio(b.ratio)] if b else ["—", "—"]
    cells += [fmt_bytes(row.peak_bytes), fmt_bytes(row.g_bytes), fmt_ratio(row.peak_bytes / row.g_bytes)]
    return cells


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def target_row(rows: list[Row]) -> Row:
    """The row the acceptance thresholds apply to: the largest unblocked m."""
    return max((r for r in rows if r.config.block_size is None), key=lambda r: r.config.m)


def target_results(rows: list[Row]) -> list[dict[str, Any]]:
    row = target_row(rows)
    out = []
    for key, limit, label in TARGETS:
        ratio = row.ratio(key)
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= limit else "FAIL")
        out.append({"key": key, "label": label, "limit": limit, "ratio": ratio, "verdict": verdict})
    return out


def damp_line(rows: list[Row]) -> str:
    line = "damp = " + ", ".join(f"{d:g}" for d in sorted({r.damp for r in rows}))
    notes: dict[str, list[str]] = {}
    for r in rows:
        if r.damp_note:
            notes.setdefault(r.damp_note, []).append(r.config.label)
    falls = "; ".join(f"{note} for {', '.join(labels)}" for note, labels in notes.items())
    return line + (f" (fallback used: {falls})" if falls else "")


def report(rows: list[Row], args: argparse.Namespace) -> str:
    title = (
        f"### M-FAC vs dense BLAS, d = {args.dim:,}, float32, CPU, {torch.get_num_threads()} threads, "
        f"median of {args.reps}, {damp_line(rows)}"
    )
    parts = [title, "", markdown_table(["config", *COLUMNS], [row_cells(r) for r in rows]), ""]
    target = target_row(rows)
    parts.append(f"Targets on the {target.config.label} row:")
    for t in target_results(rows):
        figure = "—" if t["ratio"] is None else f"{t['ratio']:.3g}x"
        parts.append(f"- {t['label']}: {figure} → {t['verdict']}")
    blocked = [r for r in rows if r.config.block_size]
    if blocked:
        parts += ["", "Blocked rows (precompute <= 1.5x unblocked at the same m; mul <= 1.3x two GEMVs):"]
        for r in blocked:
            vs_un, mul = r.ratio("blocked"), r.ratio("mul")
            verdicts = ("PASS" if vs_un <= 1.5 else "FAIL", "PASS" if mul <= 1.3 else "FAIL")
            parts.append(
                f"- {r.config.label}: {vs_un:.2f}x unblocked ({verdicts[0]}), "
                f"{r.ratio('precompute'):.2f}x GEMM; mul {mul:.2f}x two GEMVs ({verdicts[1]})"
            )
    if args.check:
        parts += ["", "Accuracy vs float64 Woodbury (F = damp I + GᵀG/m), error relative to the correction:"]
        for r in rows:
            parts.append(f"- {r.config.label}: " + ", ".join(f"{k} {v:.1e}" for k, v in r.checks.items()))
    return "\n".join(parts)


def to_json(rows: list[Row], args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    data_rows = []
    for r in rows:
        item = asdict(r)
        item["label"] = r.config.label
        item["medians"] = {
            k: {"op_s": t.op_s, "base_s": t.base_s, "ratio": t.ratio} for k, t in r.timings.items()
        }
        item["peak_ratio"] = r.peak_bytes / r.g_bytes
        data_rows.append(item)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": settings,
        "rows": data_rows,
        "targets": target_results(rows),
    }


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=1_000_000, help="d, the number of parameters")
    p.add_argument("--grads", type=int, nargs="+", default=[64, 256, 512], help="values of m")
    p.add_argument(
        "--block-size", type=int, nargs="+", default=[128], help="B of the blocked rows (0: no blocked row)"
    )
    p.add_argument("--block-grads", type=int, nargs="+", default=[64], help="m of the blocked rows")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median is reported)")
    p.add_argument("--damp", type=float, default=1e-5, help=f"damping (falls back to {FALLBACK_DAMP:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--mem-method",
        choices=("auto", "clear_refs", "spawn"),
        default="auto",
        help="peak-RSS technique; auto uses clear_refs when it works, else spawn",
    )
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the accuracy checks")
    p.add_argument(
        "--quick",
        action="store_true",
        help="d=200,000, m in {32, 128}, blocked row at m=32, 2 reps (well under a minute)",
    )
    p.add_argument("--json", metavar="PATH", help="also save the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.grads, args.block_grads, args.reps = 200_000, [32, 128], [32], 2
    return args


def resolve_mem_method(requested: str) -> str:
    works = clear_refs_works()
    if requested == "clear_refs" and not works:
        raise SystemExit("/proc/self/clear_refs does not reset VmHWM here; use --mem-method spawn")
    return requested if requested != "auto" else ("clear_refs" if works else "spawn")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.mem_method = resolve_mem_method(args.mem_method)
    configs = [Config(m) for m in args.grads]
    blocks = [b for b in args.block_size if b]
    configs += [Config(m, b) for m in args.block_grads for b in blocks]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.dim:,}, "
        f"m={args.grads}, blocked rows m={args.block_grads} B={blocks or 'off'}, "
        f"reps={args.reps}, damp={args.damp:g}, G ~ N(0,1)*{GRAD_SCALE:g} float32, seed={args.seed}, "
        f"peak RSS via {args.mem_method}",
        flush=True,
    )
    warm_up(blocks)
    rows = []
    for config in configs:
        log(f"{config.label} ...")
        rows.append(bench_row(config, args))
    print(report(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rows, args), f, indent=2)


if __name__ == "__main__":
    main()
