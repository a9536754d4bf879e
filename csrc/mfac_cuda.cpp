// Torch binding of the CUDA kernels (mfac_cuda_kernels.cu): checks the tensors, allocates outputs
// and workspaces with the caching allocator, and launches on the current stream. Compiled only
// where torch has CUDA (compressor/mfac/kernels/). Same functions and signatures as the CPU
// module (mfac_cpu.cpp), so that the Python side calls either one.
//
// GPU-unverified at the time of writing: csrc/gpu_check.sh tests and times it on a GPU.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "mfac_cuda_kernels.h"

namespace {

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit column stride");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64");
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// Workspace budget of factor_blocks: blocks run in chunks of at most this many float64 bytes.
constexpr int64_t kWorkspaceBytes = int64_t{256} << 20;

// As in mfac_cpu.cpp: writes W (nb, m, S) and diag (nb*S); returns -1 or the first failed block.
int64_t factor_blocks(const torch::Tensor& grads, int64_t nb, int64_t S, double damp, torch::Tensor W,
                      torch::Tensor diag) {
  check_rows(grads, "grads");
  const int64_t m = grads.size(0);
  TORCH_CHECK(m >= 1 && nb >= 1 && S >= 1 && grads.size(1) >= nb * S, "grads has fewer than nb*S columns");
  TORCH_CHECK(W.device() == grads.device() && W.is_contiguous() && W.dim() == 3 && W.size(0) == nb &&
                  W.size(1) == m && W.size(2) == S && W.scalar_type() == grads.scalar_type(),
              "W must be a contiguous (nb, m, S) tensor of the grads' dtype and device");
  TORCH_CHECK(diag.device() == grads.device() && diag.is_contiguous() && diag.numel() == nb * S &&
                  diag.scalar_type() == grads.scalar_type(),
              "diag must be a contiguous tensor of nb*S values of the grads' dtype and device");
  TORCH_CHECK(damp > 0.0, "damp must be > 0");
  const c10::cuda::CUDAGuard guard(grads.device());
  auto status = torch::empty({nb}, grads.options().dtype(torch::kInt));
  const int64_t per_block = mfac_cuda_factor_workspace(m, S);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(nb, kWorkspaceBytes / (8 * per_block)));
  auto work = torch::empty({chunk * per_block}, grads.options().dtype(torch::kDouble));
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  int err = 0;
  if (grads.scalar_type() == at::kFloat) {
    err = mfac_cuda_factor_blocks_f32(grads.data_ptr<float>(), grads.stride(0), m, nb, S, damp,
                                      W.data_ptr<float>(), diag.data_ptr<float>(), status.data_ptr<int>(),
                                      work.data_ptr<double>(), chunk, stream);
  } else {
    err = mfac_cuda_factor_blocks_f64(grads.data_ptr<double>(), grads.stride(0), m, nb, S, damp,
                                      W.data_ptr<double>(), diag.data_ptr<double>(), status.data_ptr<int>(),
                                      work.data_ptr<double>(), chunk, stream);
  }
  check_launch(err, "factor_blocks");
  const auto bad = status.nonzero();  // synchronises
  return bad.numel() ? bad[0][0].item<int64_t>() : -1;
}

void blocked_mul(const torch::Tensor& W, const torch::Tensor& x, torch::Tensor out) {
  TORCH_CHECK(W.is_cuda() && W.dim() == 3 && W.is_contiguous(), "W must be a contiguous (nb, m, S) CUDA tensor");
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(x.device() == W.device() && out.device() == W.device(), "W, x and out must share a device");
  const int64_t nb = W.size(0), m = W.size(1), S = W.size(2), k = x.size(0);
  TORCH_CHECK(x.scalar_type() == W.scalar_type() && out.scalar_type() == W.scalar_type(),
              "x and out must have W's dtype");
  TORCH_CHECK(out.size(0) == k && x.size(1) >= nb * S && out.size(1) >= nb * S, "shape mismatch");
  const c10::cuda::CUDAGuard guard(W.device());
  torch::Tensor scratch;
  if (mfac_cuda_mul_scratch(m, static_cast<int>(W.element_size())) > 0) {
    const int64_t blocks = std::min<int64_t>(nb, 2147483647LL), rows = std::min<int64_t>(k, 65535);
    scratch = torch::empty({blocks * rows * m}, W.options());
  }
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  int err = 0;
  if (W.scalar_type() == at::kFloat) {
    err = mfac_cuda_blocked_mul_f32(W.data_ptr<float>(), nb, m, S, x.data_ptr<float>(), x.stride(0),
                                    out.data_ptr<float>(), out.stride(0), k,
                                    scratch.defined() ? scratch.data_ptr<float>() : nullptr, stream);
  } else {
    err = mfac_cuda_blocked_mul_f64(W.data_ptr<double>(), nb, m, S, x.data_ptr<double>(), x.stride(0),
                                    out.data_ptr<double>(), out.stride(0), k,
                                    scratch.defined() ? scratch.data_ptr<double>() : nullptr, stream);
  }
  check_launch(err, "blocked_mul");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "compressor.mfac CUDA kernels (blocked static M-FAC)";
  mod.def("factor_blocks", &factor_blocks, "W_b = L^-1 G_b and diag(F^-1) for every block (fused, float64)");
  mod.def("blocked_mul", &blocked_mul, "x - W^T (W x) block by block");
}
