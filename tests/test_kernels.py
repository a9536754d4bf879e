"""The compiled kernels (compressor/mfac/kernels/, csrc/) against the PyTorch path they replace.

Each kernel gets fresh random inputs (m not a multiple of 32, blocks that do not divide d, a tail
block, float32 and float64); its outputs are filled with NaN before the call, and are wider than
the region it may write, so a missed or a stray write shows. Tolerances: float64 agrees with the
PyTorch path to 1e-10 (relative); in float32 the kernel's error against a float64 evaluation of
the same math must not exceed the PyTorch path's own float32 error by more than a small factor
(the kernel keeps the m x m algebra and W = L^-1 G in float64, so it is usually smaller).

The CPU extension is built once per session (module fixture; ~45 s cold, cached afterwards). CUDA
tests run only where torch sees a GPU. Without one, the CUDA sources are still compile-checked
(nvcc -c for the .cu, c++ -fsyntax-only for the torch binding) and the .cu kernels run on CPU
threads under csrc/cuda_emu.h against the CPU kernels; these jobs run in the background during
the build.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import realistic_grads

from compressor.mfac import BlockFisherInverse, FisherInverse, kernels

F64, F32 = torch.float64, torch.float32
EPS = {F32: torch.finfo(F32).eps, F64: torch.finfo(F64).eps}
CSRC = Path(__file__).resolve().parents[1] / "csrc"
HAS_CUDA = torch.cuda.is_available() and bool(torch.version.cuda)
_JOB = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "start_new_session": True}


def _cuda_home() -> Path | None:
    """CUDA_HOME / CUDA_PATH, else /usr/local/cuda, else the folder above the nvcc on PATH."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parents[1] if nvcc else None


def _emulated_source(cu: str) -> str:
    """mfac_cuda_kernels.cu rewritten for csrc/cuda_emu.h: CPU threads instead of a GPU."""
    cu = cu.replace("#include <cuda_runtime.h>", '#include "cuda_emu.h"')
    cu = cu.replace(
        "extern __shared__ __align__(16) unsigned char smem_raw[];", "unsigned char* smem_raw = emu_smem;"
    )
    cu = cu.replace("static_cast<cudaStream_t>(stream)", "stream")
    launch = re.compile(r"(\w+<T>)<<<(.+?),\s*(\w+),\s*\w+,\s*\w+>>>\((.*?)\);", re.S)
    cu, count = launch.subn(lambda m: f"emu_launch(dim3({m[2]}), {m[3]}, [&] {{ {m[1]}({m[4]}); }});", cu)
    assert count == 2, f"expected 2 kernel launches to rewrite, found {count}"
    return cu


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def compile_checks():
    """Start the nvcc / g++ compile checks of the CUDA sources now, so they overlap the CPU build."""
    home, jobs, tmp = _cuda_home(), {}, tempfile.mkdtemp(prefix="mfac-cuda-check-")
    if home is not None:
        nvcc = shutil.which("nvcc") if not (home / "bin" / "nvcc").is_file() else str(home / "bin" / "nvcc")
        cmd = [nvcc, "-c", "-O3", "-std=c++17", "-arch=sm_90", f"-I{CSRC}", "-o", f"{tmp}/k.o"]
        jobs["nvcc"] = subprocess.Popen([*cmd, str(CSRC / "mfac_cuda_kernels.cu")], **_JOB)
        include = Path(torch.__file__).parent / "include"
        cuda_include = home / "include"
        cxx = shutil.which("c++") or shutil.which("g++")
        if cxx and (cuda_include / "cuda_runtime_api.h").is_file():
            stub = Path(tmp) / "stub"
            if not (include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():  # a CPU torch lacks it
                (stub / "c10/cuda/impl").mkdir(parents=True)
                (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n")
            flags = [cxx, "-std=c++20", "-fsyntax-only", f"-I{CSRC}", f"-I{stub}", f"-I{include}"]
            flags += [f"-I{include}/torch/csrc/api/include", f"-I{cuda_include}"]
            flags += [f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=check"]
            jobs["binding"] = subprocess.Popen([*flags, str(CSRC / "mfac_cuda.cpp")], **_JOB)
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:  # the CUDA kernels' logic on CPU threads (csrc/cuda_emu.h), against the CPU kernels
        emu = Path(tmp) / "kernels_emu.cpp"
        emu.write_text(_emulated_source((CSRC / "mfac_cuda_kernels.cu").read_text()))
        build = [cxx, "-std=c++20", "-O1", "-pthread", "-Wno-psabi", f"-I{CSRC}", f'-DKERNELS_EMU="{emu}"']
        build += [str(CSRC / "cuda_emu_check.cpp"), "-o", f"{tmp}/emu"]
        jobs["emulation"] = subprocess.Popen(f"{shlex.join(build)} && {tmp}/emu", shell=True, **_JOB)
    yield jobs
    for job in jobs.values():
        if job.poll() is None:  # its own process group: the compiler under a shell goes too
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ext():
    """The CPU extension, built (or loaded from the cache) once; the tests fail if it cannot build."""
    saved = os.environ.get("COMPRESSOR_KERNELS")
    os.environ["COMPRESSOR_KERNELS"] = "on"
    try:
        yield kernels.module("cpu")
    finally:
        if saved is None:
            os.environ.pop("COMPRESSOR_KERNELS", None)
        else:
            os.environ["COMPRESSOR_KERNELS"] = saved


@pytest.fixture
def kernels_on(ext, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "on")
    return ext


def _pytorch_path(grads, damp, block_size, monkeypatch) -> FisherInverse:
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")
    try:
        return FisherInverse(grads, damp, block_size)
    finally:
        monkeypatch.setenv("COMPRESSOR_KERNELS", "on")


def _relmax(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


# (m, columns before the segment, blocks, block size, columns after): m not a multiple of 32;
# one block per thread task and many; a size not a multiple of the vector width; size == m; float32
# rows whose Gram matrix is summed in float32 straight from G (m a multiple of 4, B of 16, B >= 128)
# and from a padded copy (m = 37).
CASES = [
    (64, 5, 3, 128, 2),
    (8, 0, 5, 192, 1),
    (37, 5, 9, 128, 3),
    (7, 0, 40, 33, 11),
    (64, 17, 3, 100, 0),
    (45, 0, 1, 45, 2),
    (130, 3, 2, 257, 1),
    (1, 2, 6, 50, 7),
]
# factor_wide_blocks: Gram panels of 256 rows (2 at m = 300, 3 at 600) and Cholesky panels of 64 (a
# last one of 44 and 24 rows), a block size not a multiple of 64, m = S, many blocks per thread, one
# row.
WIDE_CASES = [
    (300, 3, 3, 300, 2),
    (600, 0, 2, 700, 5),
    (37, 5, 9, 129, 3),
    (1, 2, 5, 20, 0),
]
# The direct form's blocks are narrower than m: B = 50 and 32, a size not a multiple of the tile, B = 1.
DIRECT_CASES = [
    (64, 5, 7, 50, 3),
    (37, 0, 9, 32, 11),
    (130, 3, 4, 33, 1),
    (9, 0, 3, 1, 0),
    (300, 1, 2, 128, 5),
]


# ----------------------------------------------------------------------------------- factor_blocks


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-nb{}-S{}".format(*c[:1], *c[2:4]))
def test_factor_blocks_matches_the_pytorch_path(ext, gen, monkeypatch, dtype, case):
    _factor_matches_the_pytorch_path(ext.factor_blocks, gen, monkeypatch, dtype, case)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: "m{}-nb{}-S{}".format(*c[:1], *c[2:4]))
def test_factor_wide_blocks_matches_the_pytorch_path(ext, gen, monkeypatch, dtype, case):
    _factor_matches_the_pytorch_path(ext.factor_wide_blocks, gen, monkeypatch, dtype, case)


def _factor_matches_the_pytorch_path(run, gen, monkeypatch, dtype, case) -> None:
    """W and the diagonal from ``run`` (ext.factor_blocks or ext.factor_wide_blocks) against the
    PyTorch path: to 1e-10 in float64; in float32, against the float64 path on the same inputs, no
    worse than twice the PyTorch path's own float32 error."""
    m, before, nb, size, after = case
    damp = 1e-5
    g64 = realistic_grads(m, before + nb * size + after, gen)
    grads = g64.to(dtype)
    seg = grads[:, before : before + nb * size]
    W = torch.full((nb, m, size), float("nan"), dtype=dtype)
    diag = torch.full((before + nb * size + after,), float("nan"), dtype=dtype)
    failed = run(grads[:, before:], nb, size, damp, W, diag[before : before + nb * size])
    assert failed == -1
    assert diag[:before].isnan().all() and diag[before + nb * size :].isnan().all()  # no stray writes
    diag = diag[before : before + nb * size]
    assert W.isfinite().all() and diag.isfinite().all()
    torch_path = _pytorch_path(seg.contiguous(), damp, size, monkeypatch)
    if dtype == F64:
        assert _relmax(W, torch_path._factors[0]) <= 1e-10
        assert _relmax(diag, torch_path.diag()) <= 1e-10
        return
    exact = _pytorch_path(seg.to(F64).contiguous(), damp, size, monkeypatch)  # same float32 inputs
    ours, theirs = _relmax(W, exact._factors[0]), _relmax(torch_path._factors[0], exact._factors[0])
    assert ours <= max(2 * theirs, 10 * EPS[F32]), (ours, theirs)
    d_ours, d_theirs = _relmax(diag, exact.diag()), _relmax(torch_path.diag(), exact.diag())
    assert d_ours <= max(2 * d_theirs, 10 * EPS[F32]), (d_ours, d_theirs)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_factor_blocks_when_m_exceeds_the_block(ext, gen, monkeypatch, dtype):
    """m > B (and m > d): FisherInverse uses its direct form there, but the kernel's Woodbury
    factor is still exact: I - W_b^T W_b = damp * F_b^-1, the direct form's P."""
    m, nb, size = 40, 3, 24
    grads = realistic_grads(m, nb * size, gen).to(dtype)
    W = torch.full((nb, m, size), float("nan"), dtype=dtype)
    diag = torch.full((nb * size,), float("nan"), dtype=dtype)
    assert ext.factor_blocks(grads, nb, size, 1e-5, W, diag) == -1
    direct = _pytorch_path(grads.to(F64), 1e-5, size, monkeypatch)
    assert direct._direct == [True]
    eye = torch.eye(size, dtype=F64)
    tol = 1e-9 if dtype == F64 else 1e-4
    assert _relmax(eye - W.double().mT @ W.double(), direct._factors[0]) <= tol
    assert _relmax(diag, direct.diag()) <= tol


@pytest.mark.parametrize("kernel", ["factor_blocks", "factor_wide_blocks"])
def test_factor_blocks_reports_a_nan_block_and_the_pytorch_path_raises(ext, gen, monkeypatch, kernel):
    grads = realistic_grads(20, 300, gen).to(F32)
    grads[3, 150] = float("nan")
    W, diag = torch.empty(3, 20, 100), torch.empty(300)
    assert getattr(ext, kernel)(grads, 3, 100, 1e-5, W, diag) == 1  # the block holding column 150
    monkeypatch.setenv("COMPRESSOR_KERNELS", "on")
    with pytest.raises(ValueError, match="NaN or Inf"):  # the PyTorch path's error
        FisherInverse(grads, 1e-5, 100)


# ----------------------------------------------------------------------------------- direct_blocks


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: "m{}-nb{}-S{}".format(*c[:1], *c[2:4]))
def test_direct_blocks_match_the_pytorch_path(ext, gen, monkeypatch, dtype, case):
    m, before, nb, size, after = case
    damp = 1e-5
    grads = realistic_grads(m, before + nb * size + after, gen).to(dtype)
    seg = grads[:, before : before + nb * size]
    P = torch.full((nb, size, size), float("nan"), dtype=dtype)
    diag = torch.full((before + nb * size + after,), float("nan"), dtype=dtype)
    assert ext.direct_blocks(grads[:, before:], nb, size, damp, P, diag[before : before + nb * size]) == -1
    assert diag[:before].isnan().all() and diag[before + nb * size :].isnan().all()  # no stray writes
    diag = diag[before : before + nb * size]
    assert P.isfinite().all() and diag.isfinite().all()
    exact = _pytorch_path(seg.to(F64).contiguous(), damp, size, monkeypatch)  # same inputs, float64
    assert exact._direct == [True]
    tol = 1e-10 if dtype == F64 else 2 * EPS[F32]  # float64 throughout; rounded once to float32
    assert _relmax(P, exact._factors[0]) <= tol
    assert _relmax(diag, exact.diag()) <= tol
    assert torch.allclose(P, P.mT, rtol=0, atol=tol * P.abs().max().item())  # symmetric


@pytest.mark.parametrize("kernel", ["factor_blocks", "factor_wide_blocks", "direct_blocks"])
def test_zero_and_duplicate_rows(ext, gen, monkeypatch, kernel):
    """Zero rows and repeated rows (a rank-deficient G G^T or G^T G): m*damp*I keeps K definite."""
    direct = kernel == "direct_blocks"
    m, size, nb = 24, (16 if direct else 40), 5
    grads = realistic_grads(m, nb * size, gen)
    grads[3] = 0.0
    grads[7] = grads[8] = grads[9]
    grads[:, size : 2 * size] = 0.0  # a block of zero columns
    W = torch.full((nb, m if not direct else size, size), float("nan"), dtype=F64)
    diag = torch.full((nb * size,), float("nan"), dtype=F64)
    assert getattr(ext, kernel)(grads, nb, size, 1e-5, W, diag) == -1
    ref = _pytorch_path(grads, 1e-5, size, monkeypatch)
    assert ref._direct == [direct]
    assert _relmax(W, ref._factors[0]) <= 1e-10
    assert _relmax(diag, ref.diag()) <= 1e-10
    assert _relmax(diag[size : 2 * size], torch.full((size,), 1e5, dtype=F64)) <= 1e-12  # 1 / damp


def test_direct_blocks_report_a_nan_block_and_the_pytorch_path_raises(ext, gen, monkeypatch):
    grads = realistic_grads(40, 96, gen).to(F32)
    grads[3, 50] = float("inf")
    P, diag = torch.empty(3, 32, 32), torch.empty(96)
    assert ext.direct_blocks(grads, 3, 32, 1e-5, P, diag) == 1
    monkeypatch.setenv("COMPRESSOR_KERNELS", "on")
    with pytest.raises(ValueError, match="NaN or Inf"):
        FisherInverse(grads, 1e-5, 32)


# ------------------------------------------------------------------------------- accumulate_blocks


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "case", [(32, 3, 9, 32, 5), (1, 0, 4, 50, 0), (17, 2, 3, 7, 1), (5, 0, 2, 3, 2), (64, 1, 2, 130, 0)]
)
def test_accumulate_blocks_adds_the_exact_products_to_the_upper_triangles(ext, gen, dtype, case):
    """(k rows, columns before, blocks, B, columns after): the float32 rows' products are exact in
    float64, so the sums match a float64 G^T G of the same rows to float64 rounding."""
    k, before, nb, size, after = case
    rows = realistic_grads(k, before + nb * size + after, gen).to(dtype)
    rows[0] = 0.0  # a zero row
    start = torch.randn(nb, size, size, generator=gen, dtype=F64)
    sums = start.clone()
    ext.accumulate_blocks(rows[:, before:], nb, size, sums)
    g = rows[:, before : before + nb * size].to(F64).unflatten(1, (nb, size)).transpose(0, 1)
    expected = start + g.mT @ g
    upper = torch.ones(size, size, dtype=torch.bool).triu()
    assert _relmax(sums[:, upper], expected[:, upper]) <= 1e-14
    assert sums.isfinite().all()


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_block_fisher_with_and_without_the_kernel(kernels_on, gen, monkeypatch, dtype):
    """BlockFisherInverse over d = 1000, B = 96 (a tail of 40), chunks of 1, 0, 17 and the rest:
    the kernel (upper triangles) and the PyTorch path (whole products) give the same F^-1."""
    grads = realistic_grads(45, 1000, gen).to(dtype)
    used = []
    real = kernels.accumulate_blocks
    monkeypatch.setattr(kernels, "accumulate_blocks", lambda *a: used.append(real(*a)) or used[-1])
    results = {}
    for mode in ("on", "off"):
        monkeypatch.setenv("COMPRESSOR_KERNELS", mode)
        fi = BlockFisherInverse(1000, 96, 1e-5)
        for chunk in (grads[:1], grads[1:1], grads[1:18], grads[18:]):
            fi.add(chunk)
        results[mode] = (fi.mul(grads[:3].to(F64)), fi.diag(), fi.entry(5, 7))
    assert used.count(True) == 6 and not any(used[6:])  # 3 non-empty chunks x 2 segments, then off
    (y_on, d_on, e_on), (y_off, d_off, e_off) = results["on"], results["off"]
    assert _relmax(y_on, y_off) <= 1e-9 and _relmax(d_on, d_off) <= 1e-9
    assert abs(e_on - e_off) <= 1e-9 * abs(d_off[5].item())


# ------------------------------------------------------------------------------------- blocked_mul


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-nb{}-S{}".format(*c[:1], *c[2:4]))
@pytest.mark.parametrize("k", [1, 3])
def test_blocked_mul_matches_the_pytorch_path(ext, gen, dtype, case, k):
    m, before, nb, size, after = case
    d = before + nb * size + after
    W = torch.randn(nb, m, size, generator=gen, dtype=F64) / (m * size) ** 0.5
    x = torch.randn(k, d, generator=gen, dtype=F64)
    x[0, before : before + nb * size] = torch.einsum(
        "bms,bm->bs", W, torch.randn(nb, m, generator=gen, dtype=F64)
    ).flatten()  # in the span
    W, x = W.to(dtype), x.to(dtype)
    out = torch.full((k, d), float("nan"), dtype=dtype)
    cols = slice(before, before + nb * size)
    ext.blocked_mul(W, x[:, cols], out[:, cols])
    assert out[:, :before].isnan().all() and out[:, cols.stop :].isnan().all()  # no stray writes
    xb = x[:, cols].unflatten(1, (nb, size)).transpose(0, 1)  # (nb, k, size)

    def reference(w, xs):
        return (xs - (xs @ w.mT) @ w).transpose(0, 1).flatten(1)

    exact = reference(W.double(), xb.double())
    ours = out[:, cols]
    assert ours.isfinite().all()
    if dtype == F64:
        assert _relmax(ours, exact) <= 1e-12
    else:
        theirs = reference(W, xb)
        assert _relmax(ours, exact) <= max(4 * _relmax(theirs, exact), 20 * EPS[F32])


# -------------------------------------------------------------------------------- FisherInverse


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_fisher_inverse_uses_the_kernels_and_agrees_with_the_fallback(kernels_on, gen, monkeypatch, dtype):
    """Blocks of 96 over d = 1000 (a tail of 40 < m: direct form, no kernel), m = 45."""
    grads = realistic_grads(45, 1000, gen).to(dtype)
    used = {"factor": 0, "mul": 0}
    real_factor, real_mul = kernels.factor_blocks, kernels.blocked_mul

    def factor_spy(*a, **kw):
        out = real_factor(*a, **kw)
        used["factor"] += out is not None
        return out

    def mul_spy(*a, **kw):
        ran = real_mul(*a, **kw)
        used["mul"] += ran
        return ran

    monkeypatch.setattr(kernels, "factor_blocks", factor_spy)
    monkeypatch.setattr(kernels, "blocked_mul", mul_spy)
    fast = FisherInverse(grads, 1e-5, 96)
    x = torch.randn(3, 1000, generator=gen, dtype=F64).to(dtype)
    y_fast = fast.mul(x)
    assert used["factor"] >= 1 and used["mul"] >= 1
    slow = _pytorch_path(grads, 1e-5, 96, monkeypatch)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")
    y_slow = slow.mul(x)
    tol = 1e-10 if dtype == F64 else 1e-3
    assert _relmax(y_fast, y_slow) <= tol
    assert _relmax(fast.diag(), slow.diag()) <= tol
    assert abs(fast.entry(5, 7) - slow.entry(5, 7)) <= tol * abs(slow.entry(5, 5))


def test_shapes_the_kernels_refuse(kernels_on, gen):
    grads = realistic_grads(50, 40, gen).to(F32)  # m > d: one block narrower than m (direct form)
    diag = torch.empty(40)
    assert kernels.factor_blocks(grads, 0, 1, 40, 1e-5, diag) is None
    big = torch.zeros(kernels.FUSED_MAX_GRADS + 1, 300)
    assert kernels.factor_blocks(big, 0, 1, 300, 1e-5, torch.empty(300)) is None
    wide = kernels.FUSED_MAX_BLOCK + 1  # one wide block: the PyTorch path's threaded GEMMs
    assert kernels.factor_blocks(torch.ones(8, wide), 0, 1, wide, 1e-5, torch.empty(wide)) is None
    many = 2 * torch.get_num_threads()  # wide blocks, at least two per thread: factor_wide_blocks
    ones = torch.ones(8, many * wide)
    assert kernels.factor_blocks(ones, 0, many, wide, 1e-5, torch.empty(many * wide)) is not None
    assert kernels.factor_blocks(ones[:, wide:], 0, many - 1, wide, 1e-5, torch.empty(ones.shape[1])) is None
    assert kernels.factor_blocks(grads.T.contiguous().T, 0, 1, 40, 1e-5, diag) is None  # column stride
    W = torch.zeros(2, 8, 16)
    xs = torch.zeros(1, 32)
    assert not kernels.blocked_mul(W, xs, torch.empty(1, 32), 0, num_grads=9)  # not this m
    assert not kernels.blocked_mul(torch.zeros(2, 16, 8), xs[:, :16], torch.empty(1, 16), 0, 16)  # S < m
    assert not kernels.blocked_mul(W, xs.double(), torch.empty(1, 32, dtype=F64), 0, 8)  # dtype
    assert kernels.blocked_mul(W, xs, torch.empty(1, 32), 0, 8)


def test_blocked_mul_takes_wide_blocks_only_when_there_are_many(kernels_on, monkeypatch):
    """Blocks wider than MUL_MAX_BLOCK_BYTES: PyTorch's GEMVs for a few, the kernel for many."""
    monkeypatch.setattr(kernels.ops, "MUL_MAX_BLOCK_BYTES", 8 * 16 * 4 - 1)  # one (8, 16) float32 block
    few, many = kernels.MUL_MIN_BLOCKS - 1, kernels.MUL_MIN_BLOCKS
    assert not kernels.blocked_mul(
        torch.zeros(few, 8, 16), torch.zeros(1, few * 16), torch.empty(1, few * 16), 0, 8
    )
    out = torch.empty(1, many * 16)
    assert kernels.blocked_mul(torch.zeros(many, 8, 16), torch.ones(1, many * 16), out, 0, 8)
    assert torch.equal(out, torch.ones(1, many * 16))  # x - W^T (W x) with W = 0


# ------------------------------------------------------------------------------- mode and loader


def test_off_never_builds_and_uses_pytorch(monkeypatch, gen):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")
    monkeypatch.setattr(kernels.build, "_modules", {})
    monkeypatch.setattr(
        kernels.build, "_build", lambda kind: pytest.fail("built with COMPRESSOR_KERNELS=off")
    )
    assert kernels.module("cpu") is None
    grads = realistic_grads(20, 256, gen)
    assert kernels.factor_blocks(grads, 0, 2, 128, 1e-5, torch.empty(256, dtype=F64)) is None
    fi = FisherInverse(grads, 1e-5, 128)
    assert fi.mul(grads[0]).isfinite().all()


def test_a_failed_build_warns_once_then_uses_pytorch(monkeypatch, gen):
    def broken(kind):
        raise RuntimeError("compiler exploded\nsecond line of the log")

    monkeypatch.setattr(kernels.build, "_modules", {})
    monkeypatch.setattr(kernels.build, "_build", broken)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.module("cpu") is None
        assert kernels.module("cpu") is None
        fi = FisherInverse(realistic_grads(10, 100, gen), 1e-5, 50)
    assert [str(w.message).count("\n") for w in caught] == [0]
    assert "compiler exploded" in str(caught[0].message) and "PyTorch path" in str(caught[0].message)
    assert fi.diag().isfinite().all()
    monkeypatch.setenv("COMPRESSOR_KERNELS", "on")
    with pytest.raises(RuntimeError, match="COMPRESSOR_KERNELS=on"):
        kernels.module("cpu")


def _fake_builder(monkeypatch) -> list[str]:
    """torch's builder without a compiler: ``load`` writes a build.ninja whose one step copies
    ``source.txt`` to the module file and runs it through ``_run_ninja_build``, as torch's ``load``
    does (ninja builds what is out of date). Returns the build folders where the step ran."""
    import torch.utils.cpp_extension as cpp_extension

    compiled: list[str] = []

    def run_ninja(build_directory, verbose, error_prefix):
        done = subprocess.run(["ninja"], cwd=build_directory, capture_output=True, text=True, check=True)
        if "no work to do" not in done.stdout:
            compiled.append(build_directory)

    def load(name, build_directory, **kwargs):
        where = Path(build_directory)
        if not (where / "source.txt").exists():
            (where / "source.txt").write_text("the sources")
        rule = "rule copy\n  command = cp $in $out\n"
        (where / "build.ninja").write_text(f"{rule}build {name}.so: copy source.txt\n")
        cpp_extension._run_ninja_build(build_directory, False, "Error building extension")
        return f"module {name}"

    monkeypatch.setattr(cpp_extension, "_run_ninja_build", run_ninja)
    monkeypatch.setattr(cpp_extension, "load", load)
    return compiled


@pytest.mark.skipif(shutil.which("ninja") is None or sys.platform == "win32", reason="needs ninja and cp")
def test_every_compile_says_so_a_rebuild_too_and_a_load_is_silent(monkeypatch, tmp_path, capsys):
    """A first build, a load of it, and a rebuild (an input newer than the module: ninja runs the
    step again, as torch's builder did when another environment had rewritten the build commands)."""
    import torch.utils.cpp_extension as cpp_extension

    compiled = _fake_builder(monkeypatch)
    ninja_step = cpp_extension._run_ninja_build
    monkeypatch.setenv("COMPRESSOR_KERNELS_DIR", str(tmp_path))
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    where = kernels.build_dir("cpu")
    assert kernels.build._build("cpu") == f"module {where.name}"
    first = capsys.readouterr().err
    assert compiled == [str(where)]
    assert "building the M-FAC cpu kernels for this machine" in first and "first run only" in first
    assert "kernels are built" in first
    assert json.loads((where / "key.json").read_text()) == kernels.build_key("cpu")
    assert kernels.build._build("cpu") == f"module {where.name}"  # up to date: loaded
    assert capsys.readouterr().err == "" and len(compiled) == 1
    newer = (where / f"{where.name}.so").stat().st_mtime_ns + 10**10
    os.utime(where / "source.txt", ns=(newer, newer))
    kernels.build._build("cpu")
    again = capsys.readouterr().err
    assert len(compiled) == 2
    assert f"building the M-FAC cpu kernels again in {where}" in again and "kernels are built" in again
    assert cpp_extension._run_ninja_build is ninja_step  # torch's step is itself again after a build


def test_the_build_folder_is_keyed_by_everything_the_build_depends_on(monkeypatch, tmp_path):
    """Two environments (another virtual environment, torch, compiler, flags or sources) get two
    folders; the same environment the same one."""
    monkeypatch.setenv("COMPRESSOR_KERNELS_DIR", str(tmp_path))
    here = kernels.build_dir("cpu")
    assert kernels.build_dir("cpu") == here and here.parent == tmp_path
    sources = tmp_path / "csrc"
    shutil.copytree(CSRC, sources)
    with (sources / "mfac_cpu_kernels.h").open("a") as f:
        f.write("// one more line\n")
    changes = {
        "prefix": lambda mp: mp.setattr(sys, "prefix", "/elsewhere/.venv"),
        "python": lambda mp: mp.setattr(sys, "executable", "/elsewhere/.venv/bin/python"),
        "torch": lambda mp: mp.setattr(torch, "__version__", "9.9.9"),
        "torch_dir": lambda mp: mp.setattr(torch, "__file__", "/elsewhere/torch/__init__.py"),
        "torch_cuda": lambda mp: mp.setattr(torch.version, "cuda", "12.9"),
        "compiler": lambda mp: mp.setenv("CXX", "clang++-99"),
        "flags": lambda mp: mp.setattr(kernels.build, "_CPU_FLAGS", ["-O2", "-fopenmp"]),
        "sources": lambda mp: mp.setenv("COMPRESSOR_CSRC", str(sources)),
    }
    folders = {}
    for what, change in changes.items():
        with monkeypatch.context() as mp:
            change(mp)
            folders[what] = kernels.build_dir("cpu")
            assert kernels.build_dir("cpu") == folders[what], what  # the same environment again
            assert kernels.build_key("cpu")[what] != "", what
        assert kernels.build_dir("cpu") == here, what  # and back
    assert len({here, *folders.values()}) == len(changes) + 1


def test_a_lock_file_left_by_a_killed_build_does_not_hang_the_next(monkeypatch, tmp_path, capsys):
    """torch's ``lock`` file survives a build killed midway; the next build removes it and goes on."""
    import torch.utils.cpp_extension as cpp_extension

    seen = []

    def fake_load(name, build_directory, **kwargs):
        seen.append((Path(build_directory) / "lock").exists())  # torch's own baton would wait on it
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("COMPRESSOR_KERNELS_DIR", str(tmp_path))
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    where = kernels.build_dir("cpu")
    where.mkdir(parents=True)
    (where / "lock").write_bytes(b"")  # what a killed torch build leaves
    assert kernels.build._build("cpu") == "module"
    assert seen == [False]
    assert "left by a build that was killed" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl")
def test_a_build_in_progress_in_another_process_is_waited_for(monkeypatch, tmp_path):
    """While another live process holds the build lock, its ``lock`` file is not touched."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("COMPRESSOR_KERNELS_DIR", str(tmp_path))
    where = kernels.build_dir("cpu")
    where.mkdir(parents=True)
    (where / "lock").write_bytes(b"")
    holder = subprocess.Popen(  # holds the OS lock for 1.5 s, then removes its lock file and exits
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; f = open(sys.argv[1] + '/build.flock', 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5); "
            "os.unlink(sys.argv[1] + '/lock')",
            str(where),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    began = time.perf_counter()
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: "module")
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    assert kernels.build._build("cpu") == "module"
    assert time.perf_counter() - began >= 1.0  # it waited for the live build
    assert holder.wait(10) == 0  # and the holder found its own lock file still there


def test_a_background_build_runs_while_the_caller_works_and_module_waits_for_it(monkeypatch, capsys):
    import threading

    release, started = threading.Event(), threading.Event()

    def slow_build(kind):
        started.set()
        assert release.wait(10)
        return f"{kind} kernels"

    monkeypatch.setattr(kernels.build, "_modules", {})
    monkeypatch.setattr(kernels.build, "_background", {})
    monkeypatch.setattr(kernels.build, "_build", slow_build)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    kernels.build_in_background("cpu")
    assert started.wait(10)  # building, and this thread is free meanwhile
    thread = kernels.build._background["cpu"]
    assert thread.is_alive() and "cpu" not in kernels.build._modules
    kernels.build_in_background("cpu")  # a second start is a no-op
    assert kernels.build._background["cpu"] is thread
    threading.Timer(0.2, release.set).start()
    assert kernels.module("cpu") == "cpu kernels"  # waits for the thread, then has the module
    assert not thread.is_alive()
    assert "waiting for the M-FAC cpu kernels" in capsys.readouterr().err


def test_background_build_is_a_no_op_when_off(monkeypatch):
    monkeypatch.setattr(kernels.build, "_modules", {})
    monkeypatch.setattr(kernels.build, "_background", {})
    monkeypatch.setattr(
        kernels.build, "_build", lambda kind: pytest.fail("built with COMPRESSOR_KERNELS=off")
    )
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")
    kernels.build_in_background("cpu")
    assert kernels.build._background == {}


def test_bad_mode_and_sources(monkeypatch):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="COMPRESSOR_KERNELS"):
        kernels.mode()
    monkeypatch.delenv("COMPRESSOR_CSRC", raising=False)
    assert kernels.sources_dir() == CSRC
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    assert not kernels.CUDA_IN_AUTO or HAS_CUDA  # auto never builds CUDA code that was not measured


def test_the_target_isa_comes_from_the_cpu_or_the_environment_and_names_the_build(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_KERNELS_DIR", str(tmp_path))
    monkeypatch.setattr(kernels.build.platform, "machine", lambda: "x86_64")
    names = {}
    for flags, expected in (
        ("flags : fpu avx2 fma avx512f avx512bw avx512dq avx512vl", "avx512"),
        ("flags : fpu avx2 fma", "avx2"),
        ("flags : fpu sse2", "native"),
    ):
        monkeypatch.setattr(kernels.build, "_host_tag", lambda flags=flags: "x86_64" + flags)
        monkeypatch.delenv("COMPRESSOR_KERNELS_ISA", raising=False)
        assert kernels.isa() == expected
        names[expected] = kernels.build_dir("cpu").name
        assert f"_{expected}_" in names[expected]
    assert len(set(names.values())) == 3  # one build per target
    monkeypatch.setenv("COMPRESSOR_KERNELS_ISA", "AVX2")
    assert kernels.isa() == "avx2"
    monkeypatch.setenv("COMPRESSOR_KERNELS_ISA", "sse9")
    with pytest.raises(ValueError, match="COMPRESSOR_KERNELS_ISA"):
        kernels.isa()


# ---------------------------------------------------------------------------------- measured dispatch


def _table(faster: dict[str, bool]) -> dict:
    """A dispatch table in which each kernel measured faster (True) or slower on every case."""
    cases = {
        name: [
            {"m": m, "B": b, "kernel_s": 1.0, "torch_s": 2.0 if faster.get(name, True) else 0.5}
            for m, b in kernels.DISPATCH_CASES[name]
        ]
        for name in kernels.KERNEL_NAMES
    }
    return {"version": kernels.DISPATCH_VERSION, "isa": "test", "threads": 1, "dim": 1, "cases": cases}


@pytest.fixture
def dispatch(ext, monkeypatch, tmp_path):
    """auto mode, a private dispatch cache (the build itself stays where the ext fixture put it), and
    a fake measurement that counts its calls; ``dispatch.result`` is what it returns."""

    class Fake:
        calls = 0
        result = _table({"factor_blocks": True, "blocked_mul": True})

        def __call__(self):
            self.calls += 1
            return self.result

    fake = Fake()
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    monkeypatch.setattr(kernels.dispatch, "_dispatch", {})
    monkeypatch.setattr(kernels.dispatch, "measure", fake)
    monkeypatch.setattr(kernels.dispatch, "dispatch_file", lambda: tmp_path / "dispatch-1t.json")
    return fake


def _uses(grads, block) -> dict[str, int]:
    """How often each kernel ran (the extension itself was called) in FisherInverse + mul."""
    used = {"factor_blocks": 0, "blocked_mul": 0}
    ext = kernels.build._modules["cpu"]

    class Spy:
        def __getattr__(self, name):
            def call(*a):
                used[name] += 1
                return getattr(ext, name)(*a)

            return call

    saved = kernels.build._modules["cpu"]
    kernels.build._modules["cpu"] = Spy()
    try:
        FisherInverse(grads, 1e-5, block).mul(grads[0])
    finally:
        kernels.build._modules["cpu"] = saved
    return used


def test_the_measurement_is_cached_beside_the_build_and_reused(dispatch, gen, tmp_path, capsys):
    grads = realistic_grads(20, 300, gen).to(F32)
    assert _uses(grads, 100) == {"factor_blocks": 1, "blocked_mul": 1}
    assert dispatch.calls == 1
    assert "timing the M-FAC cpu kernels" in capsys.readouterr().err
    assert json.loads((tmp_path / "dispatch-1t.json").read_text()) == dispatch.result
    _uses(grads, 100)
    kernels.dispatch._dispatch.clear()  # a new process: reads the file, does not measure again
    _uses(grads, 100)
    assert dispatch.calls == 1
    assert capsys.readouterr().err == ""


def test_a_kernel_measured_slower_is_not_used_and_the_environment_overrides(dispatch, gen, monkeypatch):
    dispatch.result = _table({"factor_blocks": False, "blocked_mul": True})
    grads = realistic_grads(20, 300, gen).to(F32)
    assert _uses(grads, 100) == {"factor_blocks": 0, "blocked_mul": 1}
    monkeypatch.setenv("COMPRESSOR_KERNELS", "on")
    assert _uses(grads, 100) == {"factor_blocks": 1, "blocked_mul": 1}
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")
    monkeypatch.setattr(kernels.build, "_modules", {})
    assert kernels.factor_blocks(grads, 0, 3, 100, 1e-5, torch.empty(300)) is None
    assert dispatch.calls == 1


def test_the_nearest_measured_case_decides(dispatch):
    table = _table({"factor_blocks": True, "blocked_mul": True})
    for row in table["cases"]["factor_blocks"]:  # slower on the small case only
        row["torch_s"] = 0.5 if (row["m"], row["B"]) == (32, 32) else 2.0
    dispatch.result = table
    assert not kernels.measured_faster("factor_blocks", 32, 40)
    assert not kernels.measured_faster("factor_blocks", 20, 24)
    assert kernels.measured_faster("factor_blocks", 64, 100)
    assert kernels.measured_faster("factor_blocks", 128, 128)


@pytest.mark.parametrize(
    "content", ["{not json", '{"version": 1}', json.dumps({"version": 1, "cases": 3}), ""]
)
def test_a_corrupt_cache_file_is_measured_again(dispatch, tmp_path, content):
    (tmp_path / "dispatch-1t.json").write_text(content)
    assert kernels.measured_faster("blocked_mul", 64, 128)
    assert dispatch.calls == 1
    assert json.loads((tmp_path / "dispatch-1t.json").read_text()) == dispatch.result


def test_the_real_measurement_times_both_paths_and_a_slower_kernel_loses(ext, monkeypatch, tmp_path):
    """measure() on tiny cases, its timer faked so that the kernel is the slower on the Woodbury
    set-up: the table is valid, and auto then runs the PyTorch path there, the kernels elsewhere."""
    monkeypatch.setenv("COMPRESSOR_KERNELS", "auto")
    monkeypatch.setattr(kernels.dispatch, "_dispatch", {})
    monkeypatch.setattr(kernels.dispatch, "dispatch_file", lambda: tmp_path / "dispatch-1t.json")
    cases = {"factor_blocks": ((8, 16),), "blocked_mul": ((8, 16),), "direct_blocks": ((8, 4),)}
    cases["accumulate_blocks"] = ((3, 16),)
    cases["factor_wide_blocks"] = ((8, 16),)  # the same set-up twice: only the table's shape counts
    monkeypatch.setattr(kernels.dispatch, "DISPATCH_CASES", cases)
    monkeypatch.setattr(kernels.dispatch, "DISPATCH_DIM", 64)
    ran = []
    real = kernels.dispatch._interleaved

    def fake_timer(fns, reps):
        real(fns, reps)  # runs both paths for real
        ran.append(sorted(fns))
        return {"kernel": 2.0, "torch": 1.0} if len(ran) == 2 else {"kernel": 1.0, "torch": 3.0}

    monkeypatch.setattr(kernels.dispatch, "_interleaved", fake_timer)
    table = kernels.dispatch_table()  # (8, 4): direct; (8, 16): factor, wide, mul; then accumulate
    assert kernels.dispatch._valid(table) and ran == [["kernel", "torch"]] * 5
    assert table["cases"]["factor_blocks"] == [{"m": 8, "B": 16, "kernel_s": 2.0, "torch_s": 1.0}]
    assert not kernels.measured_faster("factor_blocks", 64, 128)
    assert kernels.measured_faster("blocked_mul", 64, 128)
    assert kernels.measured_faster("direct_blocks", 64, 32)
    assert kernels.measured_faster("accumulate_blocks", 32, 32)
    assert kernels.measured_faster("factor_wide_blocks", 1024, 1024)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_the_measurement_times_the_pytorch_path_itself(gen, monkeypatch, dtype):
    """What measure() times each kernel against (kernels.reference) is what FisherInverse and
    BlockFisherInverse run without the kernels, bit for bit: the Woodbury and the direct set-up (one
    page, and pages of 2 blocks), mul, and the streamed sums."""
    reference = kernels.reference
    monkeypatch.setenv("COMPRESSOR_KERNELS", "off")
    for m, size in ((20, 100), (45, 32)):  # size >= m: Woodbury; size < m: direct
        grads = realistic_grads(m, 3 * size, gen).to(dtype)
        run = reference.factor_blocks if size >= m else reference.direct_blocks
        for page_bytes in (None, 2 * size * m * grads.element_size()):
            fi = FisherInverse(grads, 1e-5, size, page_bytes=page_bytes)
            diag = torch.full((3 * size,), float("nan"), dtype=dtype)
            pages = {} if page_bytes is None else {"page_bytes": page_bytes}
            factor = run(grads, 0, 3, size, 1e-5, diag, **pages)
            assert fi._direct == [size < m]
            assert torch.equal(factor, fi._factors[0]) and torch.equal(diag, fi.diag())
    woodbury = FisherInverse(realistic_grads(20, 300, gen).to(dtype), 1e-5, 100)
    xs = torch.randn(2, 300, generator=gen, dtype=F64).to(dtype)
    out = torch.full_like(xs, float("nan"))
    reference.blocked_mul(woodbury._factors[0], xs, out, 0)
    assert torch.equal(out.div_(1e-5), woodbury.mul(xs))
    chunk = realistic_grads(17, 300, gen).to(dtype)
    streamed = BlockFisherInverse(300, 100)
    streamed.add(chunk)
    sums = torch.zeros(3, 100, 100, dtype=F64)
    reference.accumulate_blocks(chunk, 0, sums)
    assert torch.equal(sums, streamed._blocks[0])


def test_the_kernels_package_imports_neither_the_classes_it_serves_nor_the_project():
    """kernels/ lies below static.py and block_fisher.py: it times their PyTorch math in reference.py,
    never the classes, so no import (inside functions included) leaves the package; reference.py
    needs torch alone."""
    root = Path(kernels.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("..", "compressor")), f"{path.name} imports {name}"
                assert path.name != "reference.py" or not name.startswith("."), f"reference.py imports {name}"


def test_import_needs_torch_alone():
    code = "import sys, compressor.mfac; assert 'torch.utils.cpp_extension' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CSRC.parent)


# -------------------------------------------------------------------------------------------- CUDA


def _finished(job: subprocess.Popen, name: str) -> None:
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, f"{name}:\n{out.decode(errors='replace')[-4000:]}"


def test_cuda_kernels_compile_with_nvcc(compile_checks):
    """mfac_cuda_kernels.cu includes no torch header: nvcc alone compiles it."""
    if "nvcc" not in compile_checks:
        pytest.skip("nvcc not found")
    _finished(compile_checks["nvcc"], "nvcc -c mfac_cuda_kernels.cu")


def test_cuda_kernels_logic_under_cpu_emulation(compile_checks):
    """The .cu kernels run on CPU threads (csrc/cuda_emu.h) and match the CPU kernels, NaN-poisoned
    outputs fully written, no stray writes, chunked launches, global scratch, the NaN-block status."""
    if "emulation" not in compile_checks:
        pytest.skip("no C++ compiler")
    _finished(compile_checks["emulation"], "CUDA kernels under cuda_emu.h")


def test_cuda_binding_compiles(compile_checks):
    """mfac_cuda.cpp against torch's headers (a stub for the one CUDA-build-only header)."""
    if "binding" not in compile_checks:
        pytest.skip("no CUDA headers or C++ compiler")
    _finished(compile_checks["binding"], "c++ -fsyntax-only mfac_cuda.cpp")


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-nb{}-S{}".format(*c[:1], *c[2:4]))
def test_cuda_kernels_match_the_cpu_kernels(ext, gen, monkeypatch, dtype, case):
    monkeypatch.setenv("COMPRESSOR_KERNELS", "on")
    cuda = kernels.module("cuda")
    m, before, nb, size, after = case
    d = before + nb * size + after
    grads = realistic_grads(m, d, gen).to(dtype)
    cols = slice(before, before + nb * size)
    results = {}
    for dev, module in (("cpu", ext), ("cuda", cuda)):
        g = grads.to(dev)
        W = torch.full((nb, m, size), float("nan"), dtype=dtype, device=dev)
        diag = torch.full((d,), float("nan"), dtype=dtype, device=dev)
        assert module.factor_blocks(g[:, before:], nb, size, 1e-5, W, diag[cols]) == -1
        x = g[:2].clone()
        out = torch.full_like(x, float("nan"))
        module.blocked_mul(W, x[:, cols], out[:, cols])
        results[dev] = [t.cpu() for t in (W, diag, out)]
    tol = 1e-10 if dtype == F64 else 1e-4
    for ours, ref in zip(results["cuda"], results["cpu"], strict=True):
        assert ours.isnan().equal(ref.isnan())  # the same entries were written
        assert _relmax(ours.nan_to_num(), ref.nan_to_num()) <= tol
    bad = grads.to("cuda")
    bad[1, before] = float("inf")
    W = torch.empty(nb, m, size, dtype=dtype, device="cuda")
    assert (
        cuda.factor_blocks(
            bad[:, before:], nb, size, 1e-5, W, torch.empty(nb * size, dtype=dtype, device="cuda")
        )
        == 0
    )
