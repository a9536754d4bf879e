// CUDA kernels of the blocked static M-FAC algorithm; plain CUDA C++ (no torch headers).
// The launchers (extern "C", raw pointers) are declared in mfac_cuda_kernels.h and bound to
// tensors in mfac_cuda.cpp. No limits on m or S beyond memory: per-block scratch lives in
// shared memory when it fits and in a caller-provided global workspace otherwise.
//
// GPU-unverified at the time of writing: compile-checked with nvcc; csrc/gpu_check.sh runs the
// tests and the benchmark on a GPU.

#include <cuda_runtime.h>
#include <stdint.h>

#include "mfac_cuda_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr size_t kSharedBytes = 48 * 1024;  // without the opt-in for more

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------------------------------ blocked_mul

// One thread block per (Fisher block b, vector r): t = W_b x_b (a warp per row, shuffled sums),
// then y_b = x_b - W_b^T t (a thread per column, coalesced rows). The block of W is read twice, the
// second time mostly from L1/L2.
template <typename T>
__global__ void blocked_mul_kernel(const T* __restrict__ W, int64_t m, int64_t S, const T* __restrict__ X,
                                   int64_t ldx, T* __restrict__ Y, int64_t ldy, int64_t r0,
                                   T* __restrict__ scratch) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t b = blockIdx.x, r = r0 + blockIdx.y;
  T* t = scratch ? scratch + (b * gridDim.y + blockIdx.y) * m : reinterpret_cast<T*>(smem_raw);
  const T* w = W + b * m * S;
  const T* x = X + r * ldx + b * S;
  T* y = Y + r * ldy + b * S;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int64_t i = warp; i < m; i += warps) {
    const T* wi = w + i * S;
    T s = 0;
    for (int64_t c = lane; c < S; c += kWarp) s += wi[c] * x[c];
    s = warp_sum(s);
    if (lane == 0) t[i] = s;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < S; c += blockDim.x) {
    T acc = x[c];
    for (int64_t i = 0; i < m; ++i) acc -= t[i] * w[i * S + c];
    y[c] = acc;
  }
}

template <typename T>
int blocked_mul(const T* W, int64_t nb, int64_t m, int64_t S, const T* x, int64_t ldx, T* out, int64_t ldo,
                int64_t k, T* scratch, void* stream) {
  if (nb <= 0 || k <= 0) return 0;
  const size_t shared = scratch ? 0 : static_cast<size_t>(m) * sizeof(T);
  const int threads = S >= kThreads ? kThreads : (S <= 64 ? 64 : 128);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int64_t r0 = 0; r0 < k; r0 += 65535) {  // gridDim.y <= 65535
    const unsigned ky = static_cast<unsigned>(k - r0 < 65535 ? k - r0 : 65535);
    for (int64_t b0 = 0; b0 < nb; b0 += 2147483647LL) {
      const unsigned bx = static_cast<unsigned>(nb - b0 < 2147483647LL ? nb - b0 : 2147483647LL);
      // scratch (if any) is indexed by (block, vector) within a launch; launches on one stream
      // run in order, so they share it.
      blocked_mul_kernel<T><<<dim3(bx, ky), threads, shared, st>>>(W + b0 * m * S, m, S, x + b0 * S, ldx,
                                                                  out + b0 * S, ldo, r0, scratch);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

// ---------------------------------------------------------------------------------- factor_blocks

// One thread block per Fisher block; its float64 scratch A (m x S, G_b then W_b) and K (m x m, the
// Gram then L, lower, row-major) is in `work`. Steps, separated by __syncthreads:
//   1. A = G_b (float64);
//   2. K = m*damp*I + A A^T, lower triangle, one entry per thread at a time;
//   3. left-looking Cholesky, one column per step: warp 0 reduces the pivot, all threads the rows;
//   4. forward substitution, one column of A per thread (columns are independent), writing W_b in
//      the output dtype and diag from the float64 column sums.
template <typename T>
__global__ void factor_blocks_kernel(const T* __restrict__ G, int64_t ldg, int64_t m, int64_t S,
                                     int64_t b0, double damp, T* __restrict__ W, T* __restrict__ diag,
                                     int* __restrict__ status, double* __restrict__ work, int64_t per_block) {
  __shared__ int bad;
  const int64_t b = b0 + blockIdx.x;
  double* A = work + blockIdx.x * per_block;
  double* K = A + m * S;
  const int tid = threadIdx.x, nt = blockDim.x;
  const T* g = G + b * S;
  for (int64_t idx = tid; idx < m * S; idx += nt) {
    const int64_t i = idx / S, c = idx % S;
    A[idx] = static_cast<double>(g[i * ldg + c]);
  }
  if (tid == 0) bad = 0;
  __syncthreads();
  const double shift = static_cast<double>(m) * damp;
  const int64_t pairs = m * (m + 1) / 2;
  for (int64_t p = tid; p < pairs; p += nt) {
    // p -> (i, j), j <= i: i = floor((sqrt(8p + 1) - 1) / 2), corrected for rounding.
    int64_t i = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) * 0.5);
    while (i * (i + 1) / 2 > p) --i;
    while ((i + 1) * (i + 2) / 2 <= p) ++i;
    const int64_t j = p - i * (i + 1) / 2;
    const double* ai = A + i * S;
    const double* aj = A + j * S;
    double s = 0.0;
    for (int64_t c = 0; c < S; ++c) s += ai[c] * aj[c];
    K[i * m + j] = (i == j) ? s + shift : s;
  }
  __syncthreads();
  const int lane = tid % kWarp, warp = tid / kWarp;
  for (int64_t j = 0; j < m; ++j) {
    double* kj = K + j * m;
    if (warp == 0) {
      double s = 0.0;
      for (int64_t q = lane; q < j; q += kWarp) s += kj[q] * kj[q];
      s = warp_sum(s);
      if (lane == 0) {
        const double piv = kj[j] - s;
        if (!(piv > 0.0) || !isfinite(piv)) {
          bad = 1;
        } else {
          kj[j] = sqrt(piv);
        }
      }
    }
    __syncthreads();
    if (bad) {
      if (tid == 0) status[b] = 1;
      return;  // uniform: every thread read the same flag
    }
    const double inv = 1.0 / kj[j];
    for (int64_t i = j + 1 + tid; i < m; i += nt) {
      double* ki = K + i * m;
      double s = ki[j];
      for (int64_t q = 0; q < j; ++q) s -= ki[q] * kj[q];
      ki[j] = s * inv;
    }
    __syncthreads();
  }
  T* w = W + b * m * S;
  const double inv_damp = 1.0 / damp;
  for (int64_t c = tid; c < S; c += nt) {
    double colsum = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const double* ki = K + i * m;
      double acc = A[i * S + c];
      for (int64_t q = 0; q < i; ++q) acc -= ki[q] * A[q * S + c];
      acc /= ki[i];
      A[i * S + c] = acc;
      w[i * S + c] = static_cast<T>(acc);
      colsum += acc * acc;
    }
    diag[b * S + c] = static_cast<T>((1.0 - colsum) * inv_damp);
  }
  if (tid == 0) status[b] = 0;
}

template <typename T>
int factor_blocks(const T* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp, T* W, T* diag,
                  int* status, double* workspace, int64_t chunk, void* stream) {
  if (nb <= 0) return 0;
  if (chunk <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t per_block = mfac_cuda_factor_workspace(m, S);
  const int threads = (S >= 256 || m >= 256) ? 256 : 128;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  for (int64_t b0 = 0; b0 < nb; b0 += chunk) {
    const int64_t n = nb - b0 < chunk ? nb - b0 : chunk;
    factor_blocks_kernel<T><<<static_cast<unsigned>(n), threads, 0, st>>>(G, ldg, m, S, b0, damp, W, diag,
                                                                          status, workspace, per_block);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace

extern "C" {

int64_t mfac_cuda_mul_scratch(int64_t m, int elem_size) {
  return static_cast<size_t>(m) * static_cast<size_t>(elem_size) <= kSharedBytes ? 0 : m;
}

int mfac_cuda_blocked_mul_f32(const float* W, int64_t nb, int64_t m, int64_t S, const float* x, int64_t ldx,
                              float* out, int64_t ldo, int64_t k, float* scratch, void* stream) {
  return blocked_mul<float>(W, nb, m, S, x, ldx, out, ldo, k, scratch, stream);
}

int mfac_cuda_blocked_mul_f64(const double* W, int64_t nb, int64_t m, int64_t S, const double* x,
                              int64_t ldx, double* out, int64_t ldo, int64_t k, double* scratch, void* stream) {
  return blocked_mul<double>(W, nb, m, S, x, ldx, out, ldo, k, scratch, stream);
}

int64_t mfac_cuda_factor_workspace(int64_t m, int64_t S) { return m * S + m * m; }

int mfac_cuda_factor_blocks_f32(const float* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp,
                                float* W, float* diag, int* status, double* workspace, int64_t chunk,
                                void* stream) {
  return factor_blocks<float>(G, ldg, m, nb, S, damp, W, diag, status, workspace, chunk, stream);
}

int mfac_cuda_factor_blocks_f64(const double* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp,
                                double* W, double* diag, int* status, double* workspace, int64_t chunk,
                                void* stream) {
  return factor_blocks<double>(G, ldg, m, nb, S, damp, W, diag, status, workspace, chunk, stream);
}

}  // extern "C"
