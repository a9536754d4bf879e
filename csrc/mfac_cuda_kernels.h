// Launchers of the CUDA kernels of the blocked static M-FAC algorithm (mfac_cuda_kernels.cu).
//
// Plain C interface over raw device pointers: no torch headers, so the .cu file compiles with nvcc
// alone (tests/test_kernels.py runs `nvcc -c` on it). mfac_cuda.cpp binds them to tensors.
// Every launcher returns a cudaError_t as int (0: launched), runs on `stream` (a cudaStream_t), and
// does not synchronise. Sizes are in elements; ld* are row strides (columns are contiguous).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// out[r, b*S + c] = x[r, b*S + c] - sum_i W[b, i, c] (sum_c' W[b, i, c'] x[r, b*S + c']) for the nb
// blocks of W (nb, m, S) and the k rows of x. `scratch` is null when m values fit in shared
// memory (mfac_cuda_mul_scratch(m, elem_size) == 0), else it holds min(nb, 2^31 - 1) *
// min(k, 65535) * m values.
int64_t mfac_cuda_mul_scratch(int64_t m, int elem_size);
int mfac_cuda_blocked_mul_f32(const float* W, int64_t nb, int64_t m, int64_t S, const float* x, int64_t ldx,
                              float* out, int64_t ldo, int64_t k, float* scratch, void* stream);
int mfac_cuda_blocked_mul_f64(const double* W, int64_t nb, int64_t m, int64_t S, const double* x,
                              int64_t ldx, double* out, int64_t ldo, int64_t k, double* scratch, void* stream);

// For each of the nb blocks of G (m rows, row stride ldg, block b in columns b*S .. b*S+S): the
// float64 Gram K = m*damp*I + G_b G_b^T, its Cholesky factor L, W_b = L^-1 G_b (written to W
// (nb, m, S) in the input dtype) and diag[b*S + c] = (1 - sum_i W_b[i, c]^2) / damp (computed in
// float64). status[b] = 0, or 1 when K is not positive definite in float64 or holds NaN/Inf.
// `workspace` holds chunk * mfac_cuda_factor_workspace(m, S) doubles; blocks run in launches of
// `chunk` blocks.
int64_t mfac_cuda_factor_workspace(int64_t m, int64_t S);
int mfac_cuda_factor_blocks_f32(const float* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp,
                                float* W, float* diag, int* status, double* workspace, int64_t chunk,
                                void* stream);
int mfac_cuda_factor_blocks_f64(const double* G, int64_t ldg, int64_t m, int64_t nb, int64_t S, double damp,
                                double* W, double* diag, int* status, double* workspace, int64_t chunk,
                                void* stream);

#ifdef __cplusplus
}
#endif
