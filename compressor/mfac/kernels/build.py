"""Building and loading the compiled extension: ``mode``, the build cache, the locked JIT build.

The C++ (CPU) and CUDA sources in ``csrc/`` (``sources_dir``) are compiled on first use with
``torch.utils.cpp_extension.load`` into ``build_dir(kind)``, one sub-directory of ``cache_dir`` per
source/flags/ISA/torch/CPU version; later processes load that build. ``module(kind)`` returns the
extension (or None), once per process; ``build_in_background`` starts the build in a thread.
The environment variables are described in the package docstring (``compressor.mfac.kernels``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import site
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

#: The CUDA kernels compile and are tested by csrc/gpu_check.sh but have not been measured yet:
#: ``auto`` leaves them off until a GPU run shows the 1.5x gain; ``on`` enables them.
CUDA_IN_AUTO = False

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
    mfac = Path(__file__).resolve().parents[1]  # compressor/mfac (this file is in its kernels/)
    candidates = [os.environ.get("COMPRESSOR_CSRC"), mfac / "csrc", mfac.parents[1] / "csrc"]
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
        say(
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
        say(f"the M-FAC {kind} kernels are built ({time.perf_counter() - began:.0f} s)")
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
                say(f"removing {stale}, left by a build that was killed")
                with contextlib.suppress(OSError):
                    stale.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def say(message: str) -> None:
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
    say(f"waiting for the M-FAC {kind} kernels to finish building (first run only) ...")
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
