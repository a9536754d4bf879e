"""Compiled kernels for the blocked static M-FAC algorithm, each with the PyTorch path as fallback.

The C++ (CPU) and CUDA sources live in ``csrc/`` and are compiled on first use with
``torch.utils.cpp_extension.load`` into a cache directory; later processes load the cached build.
A first build says so on stderr (and again when it is done); ``build_in_background`` starts it in
a thread so that it overlaps with other work (``compressor run`` does this at set-up). The kernels:

* ``factor_blocks``: per Fisher block, G_b G_b^T, the Cholesky factor L, W_b = L^-1 G_b and the
  diagonal in one fused float64 pass (static.py's set-up, for m <= 128 and B <= 128).
* ``factor_wide_blocks``: the same for wider blocks (m = B = 1024), with BLAS/LAPACK calls per block,
  one block per thread, a blocked Cholesky and one triangular solve L W_b = G_b in float64.
* ``direct_blocks``: for blocks narrower than m, P_b = damp * F_b^-1 from G_b^T G_b, its Cholesky
  factor and inverse in one fused float64 pass per block (static.py's direct form, B <= 256).
* ``blocked_mul``: x_b - W_b^T (W_b x_b) per block in one pass over W (static.py's ``mul``).
* ``accumulate_blocks``: the streamed block Fisher's sums S_b += G_b^T G_b (upper triangle) in
  float64 straight from float32 rows, without converting them first (block_fisher.py's ``add``).

Dispatch by measurement: whether a kernel beats the PyTorch path depends on the CPU (vector width,
cache sizes, the BLAS torch ships) and on the thread count. So on first use on a machine, right
after the build, ``dispatch_table`` times each kernel against the PyTorch path on a few small
float32 cases (``DISPATCH_CASES``: m x B = 32 x 32, 64 x 128, 128 x 128 for the Woodbury form,
64 x 1024 and 1024 x 1024 for its wide blocks, 64 x 32, 128 x 50, 1024 x 32 for the direct form,
chunks of 32 rows at B = 32 and 128 for the streamed sums, at d ~ 131k (less for m > 64), medians
of interleaved repetitions; a few seconds, announced on stderr) and caches the result beside the
build, as ``dispatch-<threads>t.json`` in its cache directory. ``auto`` then uses a kernel for a
shape only where it measured faster on the nearest case (``measured_faster``); later processes read
the file (an unreadable or corrupt one is measured again). Delete the file to measure again.

Each function returns None / False when the kernel does not apply (shape, device, dtype, layout,
mode, or a failed build); the caller then runs its PyTorch path, which is always correct.

Environment:

* ``COMPRESSOR_KERNELS``: ``auto`` (default) builds on first use and uses each CPU kernel where
  it measured faster (above); a failed build prints one warning and the PyTorch path is used (a
  compile error is remembered in the cache, in ``build-failed.txt``, so later processes do not
  retry; delete it or use ``on`` to retry).
  ``on`` forces every kernel wherever its shape applies (no measurement), raises if the build
  fails, and also enables the CUDA kernels (GPU-unverified, so ``auto`` does not use them).
  ``off`` never builds and always uses PyTorch.
* ``COMPRESSOR_KERNELS_ISA``: the target of the CPU build, ``auto`` (default: ``avx512`` where the
  CPU has AVX-512 F/BW/DQ/VL, else ``avx2`` where it has AVX2 and FMA, else ``native``), ``avx512``
  (``-march=x86-64-v4``), ``avx2`` (``-march=x86-64-v3``, e.g. to time an AVX2 machine's build on an
  AVX-512 one) or ``native`` (``-march=native``: NEON on ARM). The kernels take their vector width
  and register tiles from it; each target is its own build in the cache.
* ``COMPRESSOR_KERNELS_DIR``: the build cache (default ``$XDG_CACHE_HOME/compressor/kernels``,
  i.e. ``~/.cache/compressor/kernels``). One sub-directory per source/flags/ISA/torch/CPU version.
* ``COMPRESSOR_CSRC``: the directory holding the sources. Default: the ``csrc/`` of the source
  tree this package was imported from (a checkout or an editable install), else
  ``<prefix>/share/compressor/csrc`` where a wheel installs them (see ``sources_dir``).

Building needs a C++ compiler, the Python headers and ninja (``pip install ninja``); the CUDA
build needs a CUDA torch and nvcc.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import site
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

#: The fused set-up does its ~2 m^2 B flops per block in float64; the PyTorch path does them as
#: batched float32 GEMMs, which are slow for small blocks only. The kernel is used where
#: bench/kernel_speed.py measured it >= 1.5x faster (bench/results/kernels.md): m <= 128, B <= 128.
FUSED_MAX_GRADS = 128
FUSED_MAX_BLOCK = 128
#: Wider blocks (m = B = 1024) go to ``factor_wide_blocks``: BLAS/LAPACK calls per block, one block
#: per thread, a blocked float64 Cholesky and one triangular solve L W = G_b (csrc/mfac_cpu_wide.h),
#: where each block's float64 m x B matrices fit in this many bytes and there are at least two blocks
#: per thread. The PyTorch path runs them as batched calls, each split over the threads: LAPACK's
#: Cholesky of one m = 1024 matrix ran at a sixth of the float64 GEMM rate here.
WIDE_MAX_BLOCK_BYTES = 16 << 20
#: ``blocked_mul`` is used when one block of W fits in this many bytes (it stays in L2 between
#: the two products), or when there are at least MUL_MIN_BLOCKS blocks: the kernel's threads split
#: the blocks, and for blocks wider than L2 its two passes cost what two GEMVs do, where PyTorch's
#: batched products with one column do not (m = B = 1024, d = 250,000: 0.6x two GEMVs against
#: 1.7x, bench/results/kernels.md). A few wide blocks (the unblocked case) use PyTorch's GEMVs.
MUL_MAX_BLOCK_BYTES = 1 << 20
MUL_MIN_BLOCKS = 16
#: The CUDA kernels compile and are tested by csrc/gpu_check.sh but have not been measured yet:
#: ``auto`` leaves them off until a GPU run shows the 1.5x gain; ``on`` enables them.
CUDA_IN_AUTO = False

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
#: The direct form's kernel (blocks narrower than m) holds G_b^T and three S x S float64 matrices.
DIRECT_MAX_BLOCK = 256

_MODES = ("auto", "on", "off")
# -fopenmp: at::parallel_for is inline OpenMP code in torch's headers (serial without it); the
# extension then uses the libgomp torch has already loaded, so torch.set_num_threads applies.
_CPU_FLAGS = ["-O3", "-fopenmp"]
#: Target instruction sets of the CPU build (COMPRESSOR_KERNELS_ISA) and their compiler flags. The
#: kernels take their vector width and register tiles from the target (csrc/mfac_cpu_kernels.h).
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mtune=native"],  # AVX-512 F/BW/DQ/VL: 64-byte vectors, 32 registers
    "avx2": ["-march=x86-64-v3", "-mtune=native"],  # AVX2 + FMA: 32-byte vectors, 16 registers
    "native": ["-march=native"],  # whatever the compiler finds (NEON on ARM, ...)
}
_ISAS = ("auto", *ISA_FLAGS)
_CUDA_FLAGS = ["-O3"]
_CPU_SOURCES = ["mfac_cpu.cpp", "mfac_cpu_kernels.h", "mfac_cpu_wide.h"]
_CUDA_SOURCES = ["mfac_cuda.cpp", "mfac_cuda_kernels.cu", "mfac_cuda_kernels.h"]

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_background: dict[str, threading.Thread] = {}
_background_lock = threading.Lock()


def mode() -> str:
    """``COMPRESSOR_KERNELS``: auto, on or off (read on every call, so tests can switch it)."""
    value = os.environ.get("COMPRESSOR_KERNELS", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"COMPRESSOR_KERNELS must be one of {', '.join(_MODES)}, got {value!r}")
    return value


def isa() -> str:
    """The target of the CPU build: ``COMPRESSOR_KERNELS_ISA`` (avx512, avx2, native), else (auto,
    the default) the widest of avx512 and avx2 this CPU has, else native."""
    value = os.environ.get("COMPRESSOR_KERNELS_ISA", "auto").strip().lower() or "auto"
    if value not in _ISAS:
        raise ValueError(f"COMPRESSOR_KERNELS_ISA must be one of {', '.join(_ISAS)}, got {value!r}")
    if value != "auto":
        return value
    flags = set(_host_tag().split())
    if platform.machine().lower() in ("x86_64", "amd64"):
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            return "avx512"
        if {"avx2", "fma"} <= flags:
            return "avx2"
    return "native"


def sources_dir() -> Path | None:
    """Where the C++/CUDA sources are (the first of these that holds them):

    COMPRESSOR_CSRC; ``compressor/mfac/csrc`` (should a build copy them into the package); the
    ``csrc/`` of the source tree this package was imported from (a checkout, an editable install);
    ``<prefix>/share/compressor/csrc`` (a wheel built with the pyproject ``data-files`` entry in
    csrc/README.md; sys.prefix and the user base).
    """
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("COMPRESSOR_CSRC"), here / "csrc", here.parents[1] / "csrc"]
    candidates += [Path(p) / "share" / "compressor" / "csrc" for p in (sys.prefix, site.getuserbase())]
    for candidate in candidates:
        if candidate and (Path(candidate) / _CPU_SOURCES[0]).is_file():
            return Path(candidate)
    return None


def cache_dir() -> Path:
    """The root of the build cache (COMPRESSOR_KERNELS_DIR, else ~/.cache/compressor/kernels)."""
    if os.environ.get("COMPRESSOR_KERNELS_DIR"):
        return Path(os.environ["COMPRESSOR_KERNELS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compressor" / "kernels"


def _host_tag() -> str:
    """What a -march=native build depends on: the machine and its CPU feature flags."""
    tag = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            tag += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return tag


def _build_name(kind: str, src: Path, files: list[str], flags: list[str], target: str = "") -> str:
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    h.update(repr((flags, torch.__version__, sys.version_info[:2], _host_tag())).encode())
    return f"compressor_mfac_{kind}{'_' + target if target else ''}_{h.hexdigest()[:12]}"


def build_dir(kind: str = "cpu") -> Path:
    """The cache sub-directory of the ``kind`` build for this machine, sources, flags and ISA."""
    src = sources_dir()
    if src is None:
        raise FileNotFoundError("the csrc/ sources were not found (set COMPRESSOR_CSRC)")
    if kind == "cpu":
        target = isa()
        return cache_dir() / _build_name(kind, src, _CPU_SOURCES, _CPU_FLAGS + ISA_FLAGS[target], target)
    return cache_dir() / _build_name(kind, src, _CUDA_SOURCES, _CPU_FLAGS[:1] + _CUDA_FLAGS)


def _build(kind: str) -> ModuleType:
    """Compile (or load from the cache) the ``cpu`` or ``cuda`` extension; raises on failure."""
    src = sources_dir()
    if src is None:
        raise FileNotFoundError("the csrc/ sources were not found (set COMPRESSOR_CSRC)")
    if kind == "cuda" and not (torch.version.cuda and torch.cuda.is_available()):
        raise RuntimeError("this torch has no CUDA device")
    if kind == "cpu":
        files, flags, cuda_flags = _CPU_SOURCES, _CPU_FLAGS + ISA_FLAGS[isa()], None
    else:
        files, flags, cuda_flags = _CUDA_SOURCES, _CPU_FLAGS[:1], _CUDA_FLAGS
    where = build_dir(kind)
    name = where.name
    failed_marker = where / "build-failed.txt"
    if failed_marker.exists() and mode() == "auto":
        raise RuntimeError(f"an earlier build failed, see {failed_marker}")
    where.mkdir(parents=True, exist_ok=True)
    fresh = not any(where.glob(f"{name}*.so")) and not any(where.glob(f"{name}*.pyd"))
    if fresh:
        _say(
            f"building the M-FAC {kind} kernels for this machine with the C++ compiler (first run only: "
            f"later runs load them from {where}); COMPRESSOR_KERNELS=off skips them"
        )
    began = time.perf_counter()
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    try:
        with _build_guard(where):
            built = load(
                name=name,
                sources=[str(src / f) for f in files if not f.endswith(".h")],
                extra_cflags=flags,
                extra_cuda_cflags=cuda_flags,
                extra_ldflags=["-fopenmp"] if kind == "cpu" else None,
                extra_include_paths=[str(src)],
                build_directory=str(where),
                verbose=False,
            )
    except Exception as exc:
        if "Error building extension" in str(exc):  # the compiler ran and failed: do not retry in auto
            with contextlib.suppress(OSError):
                failed_marker.write_text(f"{type(exc).__name__}: {exc}\n(delete this file to retry)\n")
        raise
    if fresh:
        _say(f"the M-FAC {kind} kernels are built ({time.perf_counter() - began:.0f} s)")
    return built


@contextlib.contextmanager
def _build_guard(where: Path) -> Iterator[None]:
    """Hold an OS lock on ``where`` for a build, and clear torch's lock file left by a killed one.

    ``torch.utils.cpp_extension.load`` serializes builds with a plain ``lock`` file, which a build
    killed midway (Ctrl-C, a timeout) leaves behind: every later run would wait for it forever. The
    ``fcntl`` lock taken here is released by the OS when its process dies, so while it is held no
    other compressor process is building in ``where`` and a ``lock`` file there is stale.
    Without ``fcntl`` (Windows) this only yields.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(where / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process's build: wait for it (it is alive)
        try:
            stale = where / "lock"
            if stale.exists():
                _say(f"removing {stale}, left by a build that was killed")
                with contextlib.suppress(OSError):
                    stale.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _say(message: str) -> None:
    """One status line on stderr (a progress bar, if one is showing, prints it above itself)."""
    print(f"compressor: {message}", file=sys.stderr, flush=True)


def build_in_background(kind: str = "cpu") -> None:
    """Start building (or loading) the ``kind`` kernels in a daemon thread and return at once.

    A first run on a machine compiles them; started at a run's set-up, the compile overlaps with
    the training that comes before the first M-FAC step. The first ``module(kind)`` call waits for
    the thread (and says so). A no-op when the kernels are off, already loaded or being built.
    """
    if mode() == "off" or (kind == "cuda" and mode() == "auto" and not CUDA_IN_AUTO):
        return
    with _background_lock:  # not _lock: a build holds that one for its whole length
        if kind in _modules or kind in _background:
            return
        thread = threading.Thread(target=_build_quietly, args=(kind,), name=f"compressor-{kind}-kernels")
        thread.daemon = True
        _background[kind] = thread
    thread.start()


def _build_quietly(kind: str) -> None:
    """``module(kind)`` for the background thread: a failure is remembered there, never raised here."""
    with contextlib.suppress(Exception):
        module(kind, _from_background=True)


def _wait_for_background(kind: str) -> None:
    """Join a background build of ``kind`` started by ``build_in_background`` (other threads only)."""
    thread = _background.get(kind)
    if thread is None or thread is threading.current_thread() or not thread.is_alive():
        return
    _say(f"waiting for the M-FAC {kind} kernels to finish building (first run only) ...")
    thread.join()


def module(kind: str = "cpu", *, _from_background: bool = False) -> ModuleType | None:
    """The compiled ``cpu`` or ``cuda`` extension, or None (mode off, or a failed build in auto).

    Built once per process (and cached on disk). In mode ``on`` a failed build raises.
    """
    current = mode()
    if current == "off" or (kind == "cuda" and current == "auto" and not CUDA_IN_AUTO):
        return None
    if not _from_background:
        _wait_for_background(kind)
    if kind in _modules and (_modules[kind] is not None or current == "auto"):
        return _modules[kind]
    with _lock:
        if kind in _modules and (_modules[kind] is not None or current == "auto"):
            return _modules[kind]
        try:
            _modules[kind] = _build(kind)
        except Exception as exc:
            _modules[kind] = None
            if current == "on":
                raise RuntimeError(
                    f"COMPRESSOR_KERNELS=on, but the {kind} kernels did not build: {exc}"
                ) from exc
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(
                f"compressor.mfac: {kind} kernels unavailable ({type(exc).__name__}: {first_line[:200]}); "
                "using the PyTorch path (COMPRESSOR_KERNELS=off silences this, =on raises)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _modules[kind]


# ------------------------------------------------------------------------------- measured dispatch

_dispatch_lock = threading.RLock()
_dispatch: dict[tuple[str, ...], dict] = {}  # see _dispatch_key -> the measured table
_forced = threading.local()  # .value: True/False while the measurement runs one path


@contextlib.contextmanager
def _forcing(use: bool) -> Iterator[None]:
    """Within this thread, every kernel that applies is used (True) or not (False): for timing."""
    saved = getattr(_forced, "value", None)
    _forced.value = use
    try:
        yield
    finally:
        _forced.value = saved


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


def measure() -> dict:
    """Time each kernel against the PyTorch path on DISPATCH_CASES (float32, CPU); a few seconds.

    ``FisherInverse(G, 1e-5, B)`` with and without ``factor_blocks``, and ``mul`` of one vector with
    and without ``blocked_mul``, at this process's thread count. Returns the table that
    ``dispatch_file`` caches.
    """
    from .static import FisherInverse  # late: static.py imports this module

    gen = torch.Generator().manual_seed(0)
    cases: dict[str, list[dict]] = {k: [] for k in KERNEL_NAMES}
    shapes = sorted({shape for rows in DISPATCH_CASES.values() for shape in rows})
    for m, size in shapes:
        d = max(1, DISPATCH_DIM * 64 // max(m, 64) // size) * size
        grads = torch.randn(m, d, generator=gen).mul_(1e-3)
        x = torch.randn(d, generator=gen)

        def build(use: bool, grads=grads, size=size) -> FisherInverse:
            with _forcing(use):
                return FisherInverse(grads, 1e-5, size)

        inv = build(True)  # also the warm-up of both paths
        build(False)

        def mul(use: bool, inv=inv, x=x) -> torch.Tensor:
            with _forcing(use):
                return inv.mul(x)

        for name in ("factor_blocks", "factor_wide_blocks", "direct_blocks"):  # the set-up, by the shape
            if (m, size) in DISPATCH_CASES[name]:
                t = _interleaved(
                    {"kernel": lambda: build(True), "torch": lambda: build(False)}, DISPATCH_REPS
                )
                cases[name].append({"m": m, "B": size, "kernel_s": t["kernel"], "torch_s": t["torch"]})
        if (m, size) in DISPATCH_CASES["blocked_mul"]:
            mul(True), mul(False)
            t = _interleaved({"kernel": lambda: mul(True), "torch": lambda: mul(False)}, 3 * DISPATCH_REPS)
            cases["blocked_mul"].append({"m": m, "B": size, "kernel_s": t["kernel"], "torch_s": t["torch"]})
    from .block_fisher import BlockFisherInverse

    for k, size in DISPATCH_CASES["accumulate_blocks"]:
        d = max(1, DISPATCH_DIM * 32 // size // size) * size  # sums of DISPATCH_DIM * 32 doubles
        chunk = torch.randn(k, d, generator=gen).mul_(1e-3)

        def add(use: bool, chunk=chunk, size=size, d=d) -> BlockFisherInverse:
            fisher = BlockFisherInverse(d, size)
            with _forcing(use):
                fisher.add(chunk)
            return fisher

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
            _say(
                "timing the M-FAC cpu kernels against the PyTorch path on this machine (first run only, "
                f"a few seconds; cached in {path})"
            )
            with _forcing(False):  # nothing inside may ask for the table being measured
                table = measure()
            used = [
                f"{name} {'kernel' if r['torch_s'] > r['kernel_s'] else 'PyTorch'} at m={r['m']}, B={r['B']} "
                f"({r['torch_s'] / r['kernel_s']:.2f}x)"
                for name, rows in table["cases"].items()
                for r in rows
            ]
            _say("measured: " + "; ".join(used))
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


def _chosen(kernel: str, t: torch.Tensor, m: int, size: int) -> bool:
    """Whether to run ``kernel`` on a shape it applies to: forced (``on``, or the measurement), else
    (``auto``, CPU) as measured. ``off`` and unbuilt kernels are handled by ``_module_for``."""
    forced = getattr(_forced, "value", None)
    if forced is not None:
        return forced
    if mode() == "on" or t.device.type != "cpu":
        return True
    return measured_faster(kernel, m, size)


def _module_for(t: torch.Tensor) -> ModuleType | None:
    if t.device.type == "cpu":
        return module("cpu")
    if t.device.type == "cuda":
        return module("cuda")
    return None


def factor_blocks(
    grads: torch.Tensor, start: int, blocks: int, size: int, damp: float, diag: torch.Tensor
) -> torch.Tensor | None:
    """W (blocks, m, size) for the blocks of ``grads[:, start:start + blocks*size]``, or None.

    Writes ``diag[start:start + blocks*size]``. None when the kernel does not apply or when some
    block's m*damp*I + G G^T is not positive definite in float64 or holds NaN/Inf: the PyTorch
    path then runs (and raises its detailed error).
    """
    m = grads.shape[0]
    if size < m:  # a block narrower than m is static.py's direct form, not Woodbury
        return None
    if not _rows_and_diag_fit(grads, diag):
        return None
    if m <= FUSED_MAX_GRADS and size <= FUSED_MAX_BLOCK:
        name = "factor_blocks"
    elif (
        grads.device.type == "cpu"
        and blocks >= 2 * torch.get_num_threads()
        and m * size * 8 <= WIDE_MAX_BLOCK_BYTES
    ):
        name = "factor_wide_blocks"
    else:
        return None
    ext = _module_for(grads)
    if ext is None or not hasattr(ext, name) or not _chosen(name, grads, m, size):
        return None
    end = start + blocks * size
    factor = torch.empty(blocks, m, size, dtype=grads.dtype, device=grads.device)
    failed = getattr(ext, name)(grads[:, start:end], blocks, size, float(damp), factor, diag[start:end])
    return factor if failed < 0 else None


def _rows_and_diag_fit(grads: torch.Tensor, diag: torch.Tensor) -> bool:
    """Whether the fused block kernels take ``grads`` (m, d) float32/64 with unit column stride and
    write ``diag`` (contiguous, of its dtype and device)."""
    return (
        grads.dtype in (torch.float32, torch.float64)
        and grads.dim() == 2
        and grads.stride(1) == 1
        and diag.dtype == grads.dtype
        and diag.device == grads.device
        and diag.is_contiguous()
    )


def direct_blocks(
    grads: torch.Tensor, start: int, blocks: int, size: int, damp: float, diag: torch.Tensor
) -> torch.Tensor | None:
    """P = damp * F_b^-1 (blocks, size, size) for blocks narrower than m, or None (not run).

    The direct form of static.py for the blocks of ``grads[:, start:start + blocks*size]``; writes
    their ``diag``. None as for ``factor_blocks`` (the PyTorch path then runs and raises its errors).
    """
    m = grads.shape[0]
    if size >= m or size > DIRECT_MAX_BLOCK or not _rows_and_diag_fit(grads, diag):
        return None
    ext = _module_for(grads)
    if ext is None or not hasattr(ext, "direct_blocks") or not _chosen("direct_blocks", grads, m, size):
        return None
    end = start + blocks * size
    factor = torch.empty(blocks, size, size, dtype=grads.dtype, device=grads.device)
    failed = ext.direct_blocks(grads[:, start:end], blocks, size, float(damp), factor, diag[start:end])
    return factor if failed < 0 else None


def accumulate_blocks(chunk: torch.Tensor, start: int, sums: torch.Tensor) -> bool:
    """Upper triangle of ``sums[b] += G_b^T G_b`` for the blocks of ``chunk[:, start:]``; False: not run.

    ``sums`` (blocks, size, size) float64, contiguous; ``chunk`` (k, >= start + blocks*size) float32 or
    float64 rows with unit column stride (block_fisher.py's ``add``). Only the upper triangle of the
    sums is kept (the entries below it are unspecified): the caller factors with ``upper=True``.
    """
    if sums.dim() != 3:
        return False
    blocks, size, _ = sums.shape
    k = chunk.shape[0]
    if (
        sums.dtype != torch.float64
        or not sums.is_contiguous()
        or chunk.dim() != 2
        or chunk.dtype not in (torch.float32, torch.float64)
        or chunk.stride(1) != 1
        or chunk.device != sums.device
        or k == 0
    ):
        return False
    ext = _module_for(sums)
    if ext is None or not hasattr(ext, "accumulate_blocks"):
        return False
    if not _chosen("accumulate_blocks", sums, k, size):
        return False
    ext.accumulate_blocks(chunk[:, start : start + blocks * size], blocks, size, sums)
    return True


def blocked_mul(
    factor: torch.Tensor, xs: torch.Tensor, out: torch.Tensor, start: int, num_grads: int
) -> bool:
    """``out[:, cols] = xs[:, cols] - W^T (W xs[:, cols])`` block by block (no 1/damp); False: not run.

    ``factor`` is a segment's Woodbury factor W (blocks, num_grads, size), ``cols`` its columns
    from ``start``. Anything else (a direct-form block narrower than num_grads) is refused.
    """
    if factor.dim() != 3:
        return False
    blocks, m, size = factor.shape
    if (
        m != num_grads
        or size < m
        or (m * size * factor.element_size() > MUL_MAX_BLOCK_BYTES and blocks < MUL_MIN_BLOCKS)
        or not factor.is_contiguous()
        or xs.dtype != factor.dtype
        or out.dtype != factor.dtype
        or xs.device != factor.device
        or out.device != factor.device
        or xs.stride(1) != 1
        or out.stride(1) != 1
    ):
        return False
    ext = _module_for(factor)
    if ext is None or not _chosen("blocked_mul", factor, m, size):
        return False
    end = start + blocks * size
    ext.blocked_mul(factor, xs[:, start:end], out[:, start:end])
    return True
