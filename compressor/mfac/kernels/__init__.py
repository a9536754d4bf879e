"""Compiled kernels for the blocked static M-FAC algorithm, each with the PyTorch path as fallback.

The C++ (CPU) and CUDA sources live in ``csrc/`` and are compiled on first use with
``torch.utils.cpp_extension.load`` into a cache directory; later processes load the cached build.
Every compile says so on stderr (a first build, and a rebuild of an out-of-date one; again when
it is done); ``build_in_background`` starts it in a thread so that it overlaps with other work
(``compressor run`` does this at set-up). The kernels:

* ``factor_blocks``: per Fisher block, G_b G_b^T, the Cholesky factor L, W_b = L^-1 G_b and the
  diagonal in one fused float64 pass (static.py's set-up, for m <= 128 and B <= 128).
* ``factor_wide_blocks``: the same for wider blocks (m = B = 1024), with BLAS/LAPACK calls per block,
  one block per thread, a blocked Cholesky and one triangular solve L W_b = G_b in float64 (reached
  through ``factor_blocks``).
* ``direct_blocks``: for blocks narrower than m, P_b = damp * F_b^-1 from G_b^T G_b, its Cholesky
  factor and inverse in one fused float64 pass per block (static.py's direct form, B <= 256).
* ``blocked_mul``: x_b - W_b^T (W_b x_b) per block in one pass over W (static.py's ``mul``).
* ``accumulate_blocks``: the streamed block Fisher's sums S_b += G_b^T G_b (upper triangle) in
  float64 straight from float32 rows, without converting them first (block_fisher.py's ``add``).

Dispatch by measurement: whether a kernel beats the PyTorch path depends on the CPU (vector width,
cache sizes, the BLAS torch ships) and on the thread count. So on first use on a machine, right
after the build, ``dispatch_table`` times each kernel against its PyTorch reference on a few small
float32 cases (``DISPATCH_CASES``: m x B = 32 x 32, 64 x 128, 128 x 128 for the Woodbury form,
64 x 1024 and 1024 x 1024 for its wide blocks, 64 x 32, 128 x 50, 1024 x 32 for the direct form,
chunks of 32 rows at B = 32 and 128 for the streamed sums, at d ~ 131k (less for m > 64), medians
of interleaved repetitions; a few seconds, announced on stderr) and caches the result beside the
build, as ``dispatch-<threads>t.json`` in its cache directory. ``auto`` then uses a kernel for a
shape only where it measured faster on the nearest case (``measured_faster``); later processes read
the file (an unreadable or corrupt one is measured again). Delete the file to measure again.

Each function returns None / False when the kernel does not apply (shape, device, dtype, layout,
mode, or a failed build); the caller then runs its PyTorch path (``reference``), which is always
correct.

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
  i.e. ``~/.cache/compressor/kernels``). One sub-directory per ``build_key``: the sources, flags, ISA
  and CPU, the compiler, the Python environment (two virtual environments never share a build),
  torch and its headers, CUDA; its ``key.json`` says which.
* ``COMPRESSOR_CSRC``: the directory holding the sources. Default: the ``csrc/`` of the source
  tree this package was imported from (a checkout or an editable install), else
  ``<prefix>/share/compressor/csrc`` where a wheel installs them (see ``sources_dir``).

Building needs a C++ compiler, the Python headers and ninja (``pip install ninja``); the CUDA
build needs a CUDA torch and nvcc.

Modules: ``build`` (mode, cache, the locked JIT build, ``module``), ``reference`` (each kernel's
PyTorch math; torch only), ``ops`` (the wrappers, given a choice), ``dispatch`` (the measurement,
its cache and the choice; the names below). The constants here are copies for reading: to change
one, set it on its module (e.g. ``kernels.ops.MUL_MAX_BLOCK_BYTES``).
"""

from . import build, dispatch, ops, reference
from .build import (
    CUDA_IN_AUTO,
    ISA_FLAGS,
    build_dir,
    build_in_background,
    build_key,
    cache_dir,
    isa,
    mode,
    module,
    sources_dir,
)
from .dispatch import (
    DISPATCH_CASES,
    DISPATCH_DIM,
    DISPATCH_REPS,
    DISPATCH_VERSION,
    KERNEL_NAMES,
    accumulate_blocks,
    blocked_mul,
    chosen,
    direct_blocks,
    dispatch_file,
    dispatch_table,
    factor_blocks,
    measure,
    measured_faster,
)
from .ops import (
    DIRECT_MAX_BLOCK,
    FUSED_MAX_BLOCK,
    FUSED_MAX_GRADS,
    MUL_MAX_BLOCK_BYTES,
    MUL_MIN_BLOCKS,
    WIDE_MAX_BLOCK_BYTES,
)

__all__ = [
    "CUDA_IN_AUTO",
    "DIRECT_MAX_BLOCK",
    "DISPATCH_CASES",
    "DISPATCH_DIM",
    "DISPATCH_REPS",
    "DISPATCH_VERSION",
    "FUSED_MAX_BLOCK",
    "FUSED_MAX_GRADS",
    "ISA_FLAGS",
    "KERNEL_NAMES",
    "MUL_MAX_BLOCK_BYTES",
    "MUL_MIN_BLOCKS",
    "WIDE_MAX_BLOCK_BYTES",
    "accumulate_blocks",
    "blocked_mul",
    "build",
    "build_dir",
    "build_in_background",
    "build_key",
    "cache_dir",
    "chosen",
    "direct_blocks",
    "dispatch",
    "dispatch_file",
    "dispatch_table",
    "factor_blocks",
    "isa",
    "measure",
    "measured_faster",
    "mode",
    "module",
    "ops",
    "reference",
    "sources_dir",
]
