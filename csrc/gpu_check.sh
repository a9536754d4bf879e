#!/usr/bin/env bash
# Check the CUDA kernels on a GPU machine that has torch (with CUDA) and nvcc, nothing else needed
# beyond pytest and ninja (no pydantic, no network, no install; run from anywhere).
#
#   bash csrc/gpu_check.sh     # about 4-5 minutes on one H100; step timeouts add up to < 8 minutes
#
# 1. builds the CPU and the CUDA extension in parallel (cache: $COMPRESSOR_KERNELS_DIR, default
#    ~/.cache/compressor/kernels), for this GPU's architecture only;
# 2. runs tests/test_kernels.py (CUDA kernels against the CPU kernels, nvcc compile check) and
#    tests/test_static.py, tests/test_dynamic.py (their CUDA tests go through the CUDA kernels)
#    with COMPRESSOR_KERNELS=on, so a kernel that fails to build fails the check;
# 3. prints bench/kernel_speed.py's table for the GPU (and a quick CPU one).
# Exit status: 0 when every step passed. When the CUDA kernels pass and the table shows >= 1.5x,
# set CUDA_IN_AUTO = True in compressor/mfac/kernels/build.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COMPRESSOR_KERNELS=on
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || exit 1
  export TORCH_CUDA_ARCH_LIST
fi
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' || exit 1
nvcc --version | tail -1
$PY -c 'import pytest' 2>/dev/null || { echo "pytest is missing: pip install pytest (or a carried wheel)"; exit 1; }
# torch.utils.cpp_extension.load needs ninja: the pip package, or any ninja binary on PATH
# (e.g. a copy of .venv/lib/python3*/site-packages/ninja/data/bin/ninja carried along as ./ninja).
[ -x ./ninja ] && export PATH="$PWD:$PATH"
$PY -c 'from torch.utils.cpp_extension import verify_ninja_availability as v; v()' 2>/dev/null \
  || { echo "ninja is missing: pip install ninja, or put a ninja binary on PATH"; exit 1; }

step "build the CPU and CUDA kernels (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
build() { timeout 210 $PY -c "from compressor.mfac import kernels; print('$1:', kernels.module('$1'))"; }
build cpu > /tmp/mfac_build_cpu.log 2>&1 & cpu_pid=$!
build cuda > /tmp/mfac_build_cuda.log 2>&1 & cuda_pid=$!
wait $cpu_pid || { status=1; echo "CPU build FAILED:"; tail -40 /tmp/mfac_build_cpu.log; }
wait $cuda_pid || { status=1; echo "CUDA build FAILED:"; tail -60 /tmp/mfac_build_cuda.log; }
tail -1 /tmp/mfac_build_cpu.log; tail -1 /tmp/mfac_build_cuda.log
[ $status -eq 0 ] || exit $status

step "tests on the GPU"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_static.py tests/test_dynamic.py \
  || status=1

step "benchmark: CUDA"
timeout 60 $PY bench/kernel_speed.py --device cuda --configs 64x128,128x128,64x2000,256x1024 || status=1
step "benchmark: CPU (quick)"
timeout 50 $PY bench/kernel_speed.py --quick --reps 2 || status=1

step "done: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
