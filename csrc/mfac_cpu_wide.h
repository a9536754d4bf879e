// Wide Fisher blocks (m or B above the fused kernel's limits, e.g. m = B = 1024): W_b = L^-1 G_b and
// diag(F^-1) per block with ATen's BLAS/LAPACK calls, one block per thread.
//
// The PyTorch path (static.py) runs these as batched calls over a page of blocks, each call split
// over the threads. At m = 1024 that loses three ways: LAPACK's Cholesky of one 1024 x 1024 float64
// matrix runs at a fraction of the GEMM rate (about 10 GFLOP/s here, against 60 for a float64 GEMM);
// forming L^-1 and then L^-1 G costs a triangular solve and a GEMM where one solve does; and the
// Gram matrix is a full GEMM where its lower triangle would do. Here each thread takes whole blocks
// (BLAS called from inside at::parallel_for runs on the calling thread), forms the lower triangle of
// K by panels, factors it left-looking (most of the work in GEMMs) and solves L W = G_b once, in
// float64, in the layout LAPACK takes without a copy.
//
// For a float32 G the Gram matrix is formed from the block's rows widened to float64 (exact products,
// float64 sums, as the PyTorch path forms it: a float32 Gram's rounding, amplified by cond(K), moved
// diag(F^-1) by several eps32 / damp); the Cholesky factor and the solve are float64, and W is
// rounded to float32 once.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mfac_cpu_wide {

// Panels of the Gram matrix and of the blocked Cholesky factorization (rows).
constexpr int64_t GRAM_PANEL = 256;
constexpr int64_t CHOLESKY_PANEL = 64;

// One thread's buffers, reused from block to block (fresh 8 MiB tensors for every block cost page
// faults and scaled worse over threads): K (m x m float64), a float64 Gram panel, and G_b and W_b
// in float64 (m x S, row-major: their transposes are the column-major operands of the triangular
// solve).
struct Workspace {
  at::Tensor K, panel, rhs, sol;
  Workspace(int64_t m, int64_t S, const at::TensorOptions& rows)
      : K(at::empty({m, m}, rows.dtype(at::kDouble))),
        panel(at::empty({std::min(m, GRAM_PANEL) * m}, rows.dtype(at::kDouble))),
        rhs(at::empty({m, S}, rows.dtype(at::kDouble))),
        sol(at::empty({m, S}, rows.dtype(at::kDouble))) {}
};

// ws.K := the lower triangle of g g^T (m x m float64; the diagonal blocks whole, the panels above
// them zero) for g (m x S float64: the block's rows, widened): one GEMM per panel of rows against the
// rows up to its end. 10/16 of a full product at m = 4 panels.
inline void gram_lower(const at::Tensor& g, Workspace& ws) {
  const int64_t m = g.size(0);
  ws.K.zero_();
  for (int64_t i = 0; i < m; i += GRAM_PANEL) {
    const int64_t e = std::min(i + GRAM_PANEL, m);
    at::Tensor part = ws.panel.narrow(0, 0, (e - i) * e).view({e - i, e});
    at::mm_out(part, g.slice(0, i, e), g.slice(0, 0, e).t());
    ws.K.slice(0, i, e).slice(1, 0, e).copy_(part);
  }
}

// In place: the lower triangle of K (n x n float64, as gram_lower leaves it) := its Cholesky factor
// L, the strict upper triangle := 0. Left-looking by panels of columns: each panel is first updated
// with the factor's columns to its left (one GEMM), then its diagonal block is factored (LAPACK) and
// the rows below it solved. False when K is not positive definite (or holds NaN).
inline bool cholesky_blocked(at::Tensor K) {
  const int64_t n = K.size(0);
  for (int64_t j = 0; j < n; j += CHOLESKY_PANEL) {
    const int64_t e = std::min(j + CHOLESKY_PANEL, n);
    if (j > 0) {
      K.slice(0, j, n).slice(1, j, e).addmm_(K.slice(0, j, n).slice(1, 0, j), K.slice(0, j, e).slice(1, 0, j).mT(),
                                             /*beta=*/1, /*alpha=*/-1);
    }
    at::Tensor D = K.slice(0, j, e).slice(1, j, e);
    auto result = at::linalg_cholesky_ex(D, /*upper=*/false, /*check_errors=*/false);
    if (std::get<1>(result).item<int64_t>() != 0) return false;
    D.copy_(std::get<0>(result));
    if (e < n) {
      at::Tensor below = K.slice(0, e, n).slice(1, j, e);
      below.copy_(at::linalg_solve_triangular(D.mT(), below, /*upper=*/true, /*left=*/false));
      K.slice(0, j, e).slice(1, e, n).zero_();
    }
  }
  return true;
}

// One block: g (m x S view) -> W_b (m x S, written) and diag (S, written). False when the Gram
// matrix holds NaN/Inf or m*damp*I + g g^T is not positive definite in float64.
inline bool factor_wide_block(const at::Tensor& g, double damp, at::Tensor W, at::Tensor diag, Workspace& ws) {
  const int64_t m = g.size(0);
  ws.rhs.copy_(g);  // G_b in float64: the Gram matrix's operand, then the solve's right-hand side
  gram_lower(ws.rhs, ws);
  at::Tensor K = ws.K;
  at::Tensor on_diagonal = K.diagonal();
  if (!on_diagonal.isfinite().all().item<bool>()) return false;
  on_diagonal.add_(static_cast<double>(m) * damp);
  if (!cholesky_blocked(K)) return false;
  // W = L^-1 G as W^T = G^T L^-T: G^T of the row-major float64 copy is column-major, as LAPACK
  // takes it, and so is the result (a third faster than solving L W = G on row-major G here).
  // No check of W: a finite Gram diagonal means finite rows of G, a Cholesky factor means a finite L
  // with a positive diagonal, and the rows of W have norms below 1 (W^T W = G^T K^-1 G < I).
  at::Tensor out = ws.sol.mT();
  at::linalg_solve_triangular_out(out, K.mT(), ws.rhs.mT(), /*upper=*/true, /*left=*/false);
  const at::Tensor& w = ws.sol;
  W.copy_(w);
  diag.copy_(w.square().sum(0).neg_().add_(1.0).div_(damp));
  return true;
}

// grads (m, >= nb*S) float32/64 with unit column stride; W (nb, m, S) and diag (nb*S) contiguous,
// of its dtype. Returns -1, or a block that failed (the caller then runs the PyTorch path, which
// raises the detailed error).
inline int64_t factor_wide_blocks(const at::Tensor& grads, int64_t nb, int64_t S, double damp, at::Tensor W,
                                  at::Tensor diag) {
  std::atomic<int64_t> failed{-1};
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    Workspace ws(grads.size(0), S, grads.options());
    for (int64_t b = b0; b < b1; ++b) {
      if (failed.load(std::memory_order_relaxed) >= 0) return;
      if (!factor_wide_block(grads.narrow(1, b * S, S), damp, W[b], diag.narrow(0, b * S, S), ws)) {
        int64_t none = -1;
        failed.compare_exchange_strong(none, b);
        return;
      }
    }
  });
  return failed.load();
}

}  // namespace mfac_cpu_wide
