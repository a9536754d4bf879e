// CPU kernels for the blocked static M-FAC algorithm (compressor/mfac/static.py), bound to tensors.
//
//   factor_blocks:  W_b = L^-1 G_b and diag(F^-1) = (1 - colsum(W_b^2)) / damp for every block, one
//                   fused pass per block (Gram, Cholesky, forward substitution, column sums), all in
//                   float64 in an L2-resident scratch, W_b rounded to the input dtype once.
//   direct_blocks:  for blocks narrower than m, P_b = damp * F_b^-1 (S x S) and its diagonal, one
//                   fused float64 pass per block (G_b^T G_b, Cholesky, inverse).
//   accumulate_blocks: the streamed block Fisher's sums S_b += G_b^T G_b (upper triangle, float64)
//                   straight from float32 or float64 rows (block_fisher.py's add).
//   factor_wide_blocks: the same outputs as factor_blocks for blocks too wide for its L2-resident
//                   scratch (m = B = 1024): BLAS/LAPACK per block, one block per thread
//                   (mfac_cpu_wide.h).
//   blocked_mul:    y_b = x_b - W_b^T (W_b x_b) for every block and vector, one pass over W (the block
//                   stays in cache between the two products). The caller divides by damp.
//
// The per-block math is in mfac_cpu_kernels.h; here blocks run in parallel (at::parallel_for).
// Built on first use by compressor/mfac/kernels/build.py (torch.utils.cpp_extension.load).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "mfac_cpu_kernels.h"
#include "mfac_cpu_wide.h"

namespace {

template <typename T>
int64_t factor_blocks_impl(const T* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp, T* W,
                           T* diag) {
  std::atomic<int64_t> failed{-1};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, m * S));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    std::vector<double> buf(mfac_cpu::scratch_doubles(m, S));
    const mfac_cpu::Scratch s = mfac_cpu::make_scratch(m, S, buf.data());
    for (int64_t b = b0; b < b1; ++b) {
      if (failed.load(std::memory_order_relaxed) >= 0) return;
      if (!mfac_cpu::factor_block(G + b * S, ldg, damp, s, W + b * m * S, diag + b * S)) {
        int64_t none = -1;
        failed.compare_exchange_strong(none, b);
        return;
      }
    }
  });
  return failed.load();
}

template <typename T>
int64_t direct_blocks_impl(const T* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp, T* P,
                           T* diag) {
  std::atomic<int64_t> failed{-1};
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, m * S));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    std::vector<double> buf(mfac_cpu::direct_scratch_doubles(m, S));
    const mfac_cpu::DirectScratch s = mfac_cpu::make_direct_scratch(m, S, buf.data());
    for (int64_t b = b0; b < b1; ++b) {
      if (failed.load(std::memory_order_relaxed) >= 0) return;
      if (!mfac_cpu::direct_block(G + b * S, ldg, damp, s, P + b * S * S, diag + b * S)) {
        int64_t none = -1;
        failed.compare_exchange_strong(none, b);
        return;
      }
    }
  });
  return failed.load();
}

template <typename T>
void accumulate_blocks_impl(const T* G, int64_t ldg, int64_t k, int64_t nb, int64_t S, double* sums) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, k * S));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) mfac_cpu::accumulate_block(G + b * S, ldg, k, S, sums + b * S * S);
  });
}

template <typename T>
void blocked_mul_impl(const T* W, int64_t m, int64_t nb, int64_t S, const T* X, int64_t ldx, T* Y,
                      int64_t ldy, int64_t k) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, m * S));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    std::vector<T> t(m);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < k; ++r)  // the block stays in cache across the k vectors
        mfac_cpu::block_mul(W + b * m * S, m, S, X + r * ldx + b * S, Y + r * ldy + b * S, t.data());
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit column stride");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64");
}

// The arguments of factor_blocks and factor_wide_blocks.
void check_factor_args(const torch::Tensor& grads, int64_t nb, int64_t S, double damp, const torch::Tensor& W,
                       const torch::Tensor& diag) {
  check_rows(grads, "grads");
  const int64_t m = grads.size(0);
  TORCH_CHECK(m >= 1 && nb >= 1 && S >= 1 && grads.size(1) >= nb * S, "grads has fewer than nb*S columns");
  TORCH_CHECK(W.device().is_cpu() && W.is_contiguous() && W.dim() == 3 && W.size(0) == nb && W.size(1) == m &&
                  W.size(2) == S && W.scalar_type() == grads.scalar_type(),
              "W must be a contiguous (nb, m, S) CPU tensor of the grads' dtype");
  TORCH_CHECK(diag.device().is_cpu() && diag.is_contiguous() && diag.numel() == nb * S &&
                  diag.scalar_type() == grads.scalar_type(),
              "diag must be a contiguous CPU tensor of nb*S values of the grads' dtype");
  TORCH_CHECK(damp > 0.0, "damp must be > 0");
}

// grads: (m, >= nb*S), unit column stride (a view from the segment's first column). Writes W
// (nb, m, S) and diag (nb*S), both contiguous, of the grads' dtype. Returns -1, or a block whose K
// is not positive definite in float64 or holds NaN/Inf (the caller then runs the PyTorch path,
// which raises the detailed error).
int64_t factor_blocks(const torch::Tensor& grads, int64_t nb, int64_t S, double damp, torch::Tensor W,
                      torch::Tensor diag) {
  check_factor_args(grads, nb, S, damp, W, diag);
  const int64_t m = grads.size(0);
  int64_t failed = -1;
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "factor_blocks", [&] {
    failed = factor_blocks_impl<scalar_t>(grads.data_ptr<scalar_t>(), grads.stride(0), m, nb, S, damp,
                                          W.data_ptr<scalar_t>(), diag.data_ptr<scalar_t>());
  });
  return failed;
}

// As factor_blocks, for wide blocks (mfac_cpu_wide.h): BLAS per block, one block per thread.
int64_t factor_wide_blocks(const torch::Tensor& grads, int64_t nb, int64_t S, double damp, torch::Tensor W,
                           torch::Tensor diag) {
  check_factor_args(grads, nb, S, damp, W, diag);
  return mfac_cpu_wide::factor_wide_blocks(grads, nb, S, damp, W, diag);
}

// grads: (m, >= nb*S) as for factor_blocks. Writes P = damp * F_b^-1 (nb, S, S) and diag(F^-1)
// (nb*S), contiguous, of the grads' dtype (the direct form of blocks narrower than m). Returns -1,
// or a block whose m*damp*I + G_b^T G_b is not positive definite in float64 or holds NaN/Inf.
int64_t direct_blocks(const torch::Tensor& grads, int64_t nb, int64_t S, double damp, torch::Tensor P,
                      torch::Tensor diag) {
  check_rows(grads, "grads");
  const int64_t m = grads.size(0);
  TORCH_CHECK(m >= 1 && nb >= 1 && S >= 1 && grads.size(1) >= nb * S, "grads has fewer than nb*S columns");
  TORCH_CHECK(P.device().is_cpu() && P.is_contiguous() && P.dim() == 3 && P.size(0) == nb && P.size(1) == S &&
                  P.size(2) == S && P.scalar_type() == grads.scalar_type(),
              "P must be a contiguous (nb, S, S) CPU tensor of the grads' dtype");
  TORCH_CHECK(diag.device().is_cpu() && diag.is_contiguous() && diag.numel() == nb * S &&
                  diag.scalar_type() == grads.scalar_type(),
              "diag must be a contiguous CPU tensor of nb*S values of the grads' dtype");
  TORCH_CHECK(damp > 0.0, "damp must be > 0");
  int64_t failed = -1;
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "direct_blocks", [&] {
    failed = direct_blocks_impl<scalar_t>(grads.data_ptr<scalar_t>(), grads.stride(0), m, nb, S, damp,
                                          P.data_ptr<scalar_t>(), diag.data_ptr<scalar_t>());
  });
  return failed;
}

// chunk: (k, >= nb*S) rows with unit column stride; sums: (nb, S, S) float64, contiguous. Adds
// G_b^T G_b to the upper triangle of each block's sum (the entries below it are left unspecified).
void accumulate_blocks(const torch::Tensor& chunk, int64_t nb, int64_t S, torch::Tensor sums) {
  check_rows(chunk, "chunk");
  const int64_t k = chunk.size(0);
  TORCH_CHECK(nb >= 1 && S >= 1 && chunk.size(1) >= nb * S, "chunk has fewer than nb*S columns");
  TORCH_CHECK(sums.device().is_cpu() && sums.is_contiguous() && sums.dim() == 3 && sums.size(0) == nb &&
                  sums.size(1) == S && sums.size(2) == S && sums.scalar_type() == at::kDouble,
              "sums must be a contiguous (nb, S, S) float64 CPU tensor");
  if (k == 0) return;
  AT_DISPATCH_FLOATING_TYPES(chunk.scalar_type(), "accumulate_blocks", [&] {
    accumulate_blocks_impl<scalar_t>(chunk.data_ptr<scalar_t>(), chunk.stride(0), k, nb, S,
                                     sums.data_ptr<double>());
  });
}

// W: (nb, m, S) contiguous; x, out: (k, >= nb*S) views with unit column stride, W's dtype, not
// overlapping. out[:, :nb*S] = x - W^T (W x) block by block (no division by damp).
void blocked_mul(const torch::Tensor& W, const torch::Tensor& x, torch::Tensor out) {
  TORCH_CHECK(W.device().is_cpu() && W.dim() == 3 && W.is_contiguous(),
              "W must be a contiguous (nb, m, S) CPU tensor");
  check_rows(x, "x");
  check_rows(out, "out");
  const int64_t nb = W.size(0), m = W.size(1), S = W.size(2), k = x.size(0);
  TORCH_CHECK(x.scalar_type() == W.scalar_type() && out.scalar_type() == W.scalar_type(),
              "x and out must have W's dtype");
  TORCH_CHECK(out.size(0) == k && x.size(1) >= nb * S && out.size(1) >= nb * S, "shape mismatch");
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "blocked_mul", [&] {
    blocked_mul_impl<scalar_t>(W.data_ptr<scalar_t>(), m, nb, S, x.data_ptr<scalar_t>(), x.stride(0),
                               out.data_ptr<scalar_t>(), out.stride(0), k);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "compressor.mfac CPU kernels (blocked static M-FAC)";
  mod.def("factor_blocks", &factor_blocks, "W_b = L^-1 G_b and diag(F^-1) for every block (fused, float64)");
  mod.def("factor_wide_blocks", &factor_wide_blocks, "factor_blocks for wide blocks: BLAS per block, a block per thread");
  mod.def("direct_blocks", &direct_blocks, "P = damp * F_b^-1 and diag(F^-1) for blocks narrower than m (float64)");
  mod.def("accumulate_blocks", &accumulate_blocks, "upper triangle of S_b += G_b^T G_b, float64 sums");
  mod.def("blocked_mul", &blocked_mul, "x - W^T (W x) block by block, one pass over W");
}
