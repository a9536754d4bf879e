"""Building and loading the compiled extension: ``mode``, the build cache, the locked JIT build.

The C++ (CPU) and CUDA sources in ``csrc/`` (``sources_dir``) are compiled on first use with
``torch.utils.cpp_extension.load`` into ``build_dir(kind)``, one sub-directory of ``cache_dir`` per
``build_key`` (everything the build depends on: sources, flags, target, compiler, the Python
environment, torch and its headers, CUDA), so two environments on one machine never share a build
(torch's builder would recompile whenever the other one had built last); later processes load that
build. Every compile says so on stderr, a rebuild too (``_announced``). ``module(kind)`` returns the
extension (or None), once per process; ``build_in_background`` starts the build in a thread.
The environment variables are described in the package docstring (``compressor.mfac.kernels``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import site
import subprocess
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


def _file_id(path: str | None) -> str:
    """A program's resolved path, size and modification time (an upgrade in place changes them)."""
    if not path:
        return "not found"
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return real
    return f"{real} {info.st_size} {info.st_mtime_ns}"


def _cuda_home() -> str:
    """Where torch's builder finds CUDA: CUDA_HOME, CUDA_PATH, the nvcc on PATH, /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = shutil.which("nvcc")
        home = str(Path(nvcc).resolve().parents[1]) if nvcc else "/usr/local/cuda"
    return home


def build_key(kind: str = "cpu") -> dict[str, str]:
    """Everything the ``kind`` build depends on, as strings; ``build_dir`` is named by its hash.

    The sources (names and bytes), the compiler flags and target ISA, the CPU (``-march`` and
    ``-mtune=native``), the C++ compiler (``CXX``, else ``c++``: resolved path, size and mtime), the
    Python environment (executable, ``sys.prefix``, version), torch (version, folder: its headers
    are ``<folder>/include``, CUDA version); for ``cuda`` also CUDA_HOME, its nvcc and the target
    architectures (``TORCH_CUDA_ARCH_LIST``, else the visible GPUs'). torch's builder writes the
    include paths and the compiler into its build commands, so two environments sharing one folder
    would recompile on each switch (and one load the other's module).
    """
    src = sources_dir()
    if src is None:
        raise FileNotFoundError("the csrc/ sources were not found (set COMPRESSOR_CSRC)")
    if kind == "cpu":
        files, target, flags = _CPU_SOURCES, isa(), _CPU_FLAGS + ISA_FLAGS[isa()]
    else:
        files, target, flags = _CUDA_SOURCES, "", _CPU_FLAGS[:1] + _CUDA_FLAGS
    sources = hashlib.sha256()
    for name in files:
        sources.update(name.encode() + b"\0" + (src / name).read_bytes())
    cxx = os.environ.get("CXX", "c++")
    key = {
        "kind": kind,
        "target": target,
        "flags": " ".join(flags),
        "sources": sources.hexdigest(),
        "host": _host_tag(),
        "compiler": f"{cxx}: {_file_id(shutil.which(cxx))}",
        "python": sys.executable,
        "prefix": sys.prefix,
        "python_version": sys.version,
        "torch": torch.__version__,
        "torch_dir": str(Path(torch.__file__).resolve().parent),
        "torch_cuda": str(torch.version.cuda),
    }
    if kind == "cuda":
        home = _cuda_home()
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not archs and torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            archs = " ".join(f"{a}.{b}" for a, b in sorted(caps))
        key.update(cuda_home=home, nvcc=_file_id(str(Path(home) / "bin" / "nvcc")), cuda_archs=archs)
    return key


def build_dir(kind: str = "cpu") -> Path:
    """The cache sub-directory of the ``kind`` build: ``compressor_mfac_<kind>[_<isa>]_<hash>``, the
    hash of ``build_key(kind)``."""
    key = build_key(kind)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    target = f"_{key['target']}" if key["target"] else ""
    return cache_dir() / f"compressor_mfac_{kind}{target}_{digest}"


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
    if not (where / "key.json").exists():  # what this folder is built for, for a reader
        with contextlib.suppress(OSError):
            (where / "key.json").write_text(json.dumps(build_key(kind), indent=1) + "\n")
    fresh = not any(where.glob(f"{name}*.so")) and not any(where.glob(f"{name}*.pyd"))
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    try:
        with _build_guard(where), _announced(kind, where, fresh) as compiled:
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
    if compiled:
        say(f"the M-FAC {kind} kernels are built ({time.perf_counter() - compiled[0]:.0f} s)")
    return built


def _ninja_has_work(where: Path) -> bool:
    """Whether ninja would run a build step in ``where`` (its dry run, ``ninja -n``, on the
    build.ninja there); True when there is none or the dry run fails."""
    if not (where / "build.ninja").is_file():
        return True
    try:
        done = subprocess.run(["ninja", "-n"], cwd=where, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return True
    return done.returncode != 0 or "no work to do" not in done.stdout


@contextlib.contextmanager
def _announced(kind: str, where: Path, fresh: bool) -> Iterator[list[float]]:
    """Say "building the M-FAC <kind> kernels ..." whenever torch's builder is about to compile in
    ``where``; yields a list that then holds the time the compile started (empty: nothing compiled).

    ``torch.utils.cpp_extension.load`` writes its build.ninja and runs ninja, which recompiles when
    a source, a header or a build command changed, and says nothing unless verbose. Its ninja step
    (the private ``_run_ninja_build``) is wrapped while ``load`` runs: ninja's dry run in the build
    folder tells whether anything will compile. ``fresh``: no module was built there before (the
    first-run message, else the rebuild one). A torch without that step: the dry run on the
    build.ninja already there, before ``load``.
    """
    import torch.utils.cpp_extension as cpp_extension

    started: list[float] = []

    def announce() -> None:
        started.append(time.perf_counter())
        if fresh:
            say(
                f"building the M-FAC {kind} kernels for this machine with the C++ compiler (first run only: "
                f"later runs load them from {where}); COMPRESSOR_KERNELS=off skips them"
            )
        else:
            say(
                f"building the M-FAC {kind} kernels again in {where}: the build there is out of date (its "
                "sources, headers or build commands changed); COMPRESSOR_KERNELS=off skips them"
            )

    run_ninja = getattr(cpp_extension, "_run_ninja_build", None)
    if run_ninja is None:
        if fresh or _ninja_has_work(where):
            announce()
        yield started
        return

    def run(build_directory: str, *args: object, **kwargs: object) -> object:
        ours = Path(build_directory).resolve() == where.resolve()  # not another thread's extension
        if ours and not started and _ninja_has_work(where):
            announce()
        return run_ninja(build_directory, *args, **kwargs)

    cpp_extension._run_ninja_build = run
    try:
        yield started
    finally:
        cpp_extension._run_ninja_build = run_ninja


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
    say(f"waiting for the M-FAC {kind} kernels to finish building or loading ...")
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
