// Per-block CPU kernels of the blocked static M-FAC algorithm; plain C++ (no torch headers), so that
// they can be built and timed on their own. mfac_cpu.cpp runs them over blocks with at::parallel_for.
//
// Block b holds the gradient slice G_b (m x S). With K_b = m*damp*I + G_b G_b^T = L L^T and
// W_b = L^-1 G_b:  F_b^-1 x = (x - W_b^T (W_b x)) / damp  and  diag(F_b^-1) = (1 - colsum(W_b^2)) / damp.
//
// The inner loops use GCC/Clang vector extensions as wide as the target's registers (64 bytes with
// AVX-512, 32 with AVX/AVX2, 16 otherwise: SSE, NEON), so the same source vectorises for each; the
// register tiles are sized from the target's number of vector registers (32 with AVX-512 and on
// AArch64, else 16) so that the accumulators never spill. compressor/mfac/kernels/build.py picks the
// target (COMPRESSOR_KERNELS_ISA) and compiles one build per target.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mfac_cpu {

#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#elif defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int NREG = 32;
#else
constexpr int NREG = 16;
#endif

typedef float vf __attribute__((vector_size(VBYTES)));
typedef double vd __attribute__((vector_size(VBYTES)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef vf type;
};
template <>
struct Vec<double> {
  typedef vd type;
};

template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void storeu(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Horizontal sums as a tree of half-width vector adds (a 64-byte vector: 32-, then 16-byte halves,
// then the last lanes). A lane-by-lane loop compiles to a serial chain of scalar adds (16 for a
// float vector, ~64 cycles of latency), which dominated the kernels' short rows (B = 32: two vectors
// per row, one sum per row) and their Gram tiles.
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd2 __attribute__((vector_size(16)));
#if defined(__AVX__) || defined(__AVX512F__)
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd4 __attribute__((vector_size(32)));
#endif

template <typename H, typename V>
inline H fold(const V& v) {  // the two halves of v, added
  H lo, hi;
  std::memcpy(&lo, &v, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
  return lo + hi;
}

inline float hsum(const vf& v) {
#if defined(__AVX512F__)
  const vf4 q = fold<vf4>(fold<vf8>(v));
#elif defined(__AVX__)
  const vf4 q = fold<vf4>(v);
#else
  const vf4 q = v;
#endif
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline double hsum(const vd& v) {
#if defined(__AVX512F__)
  const vd2 q = fold<vd2>(fold<vd4>(v));
#elif defined(__AVX__)
  const vd2 q = fold<vd2>(v);
#else
  const vd2 q = v;
#endif
  return q[0] + q[1];
}

constexpr int DL = VBYTES / 8;  // doubles per vector
constexpr int RT = 4;           // rows per register tile (and the padding of m)
// Gram tiles: RT rows against GC rows (RT*GC accumulators + RT + GC operands in registers).
constexpr int GC = NREG >= 32 ? 4 : 2;
// Forward-substitution tiles: RT rows by up to TV vectors (RT*TV accumulators, TV operands and one
// multiplier at a time: 16 of 16 registers with AVX2).
constexpr int TV = NREG >= 32 ? 4 : 3;

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// ------------------------------------------------------------------------------------ factor_block

constexpr int FL = VBYTES / 4;  // floats per vector
constexpr int64_t F32_GRAM_MIN = 8 * FL;

// The lanes of v summed in float64 (a float32 vector: its two halves added in float32 first).
inline double hsum_wide(const vd& v) { return hsum(v); }
inline double hsum_wide(const vf& v) {
  typedef float vh __attribute__((vector_size(VBYTES / 2)));
  return hsum(__builtin_convertvector(fold<vh>(v), vd));
}

// K[j][i] = row i . row j of A for rows i0..i0+RT and j0..j0+GC (A row-major with row stride lda,
// float64 or float32, sp a whole number of vectors): each lane sums sp / lanes products in T, then
// the lanes are summed in float64.
template <typename T>
inline void gram_tile(const T* A, int64_t mp, int64_t lda, int64_t sp, int64_t i0, int64_t j0, double* K) {
  typedef typename Vec<T>::type V;
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[RT][GC];
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < GC; ++q) acc[r][q] = V{};
  for (int64_t c = 0; c < sp; c += L) {
    V x[RT], y[GC];
    for (int r = 0; r < RT; ++r) x[r] = loadu<V>(A + (i0 + r) * lda + c);
    for (int q = 0; q < GC; ++q) y[q] = loadu<V>(A + (j0 + q) * lda + c);
    for (int r = 0; r < RT; ++r)
      for (int q = 0; q < GC; ++q) acc[r][q] += x[r] * y[q];
  }
  for (int q = 0; q < GC; ++q)
    for (int r = 0; r < RT; ++r) K[(j0 + q) * mp + i0 + r] = hsum_wide(acc[r][q]);
}

// Upper triangle of K = A A^T (K[j][i] for j <= i) for A (mp x sp, row stride lda) row-major,
// mp % RT == 0, sp a whole number of vectors: RT x GC register tiles, dot products along the
// columns. float64 rows: exact products of float32 inputs, float64 sums. float32 rows: float32
// products and lane sums of at most B / FL <= 16 terms each (the lanes then summed in float64), at
// twice the rate; factor_block uses them for rows of at least F32_GRAM_MIN values only: on shorter
// ones the horizontal sums at the end of each tile cost more than the float64 products save
// (measured: B = 32 slower, B = 128 faster, AVX2 and AVX-512). Their rounding (a few eps32 of
// |g_i| |g_j| per entry, amplified by cond(K) in diag(F^-1)) measured no larger than the PyTorch
// path's error from rounding W to float32 (that path forms its Gram matrix in float64).
template <typename T>
inline void gram_upper(const T* A, int64_t mp, int64_t lda, int64_t sp, double* K) {
  for (int64_t i0 = 0; i0 < mp; i0 += RT)
    for (int64_t j0 = 0; j0 < i0 + RT; j0 += GC) gram_tile(A, mp, lda, sp, i0, j0, K);
}

// In-place Cholesky of the upper triangle of K (mp x mp, row-major, mp % RT == 0): K = U^T U, with
// U = L^T upper, so that column j of L is row j of U (contiguous). Right-looking by panels of RT
// rows: factor the panel, then one rank-RT update of the trailing upper triangle, row by row
// (contiguous loops). Returns false when a pivot is not a finite positive number (K not positive
// definite in float64, or NaN/Inf in G).
inline bool cholesky_upper(double* K, int64_t mp) {
  for (int64_t j0 = 0; j0 < mp; j0 += RT) {
    for (int64_t j = j0; j < j0 + RT; ++j) {  // the panel: rows j0..j0+RT
      double* uj = K + j * mp;
      const double p = uj[j];
      if (!(p > 0.0) || !std::isfinite(p)) return false;
      const double d = std::sqrt(p), inv = 1.0 / d;
      uj[j] = d;
#pragma omp simd
      for (int64_t i = j + 1; i < mp; ++i) uj[i] *= inv;
      for (int64_t k = j + 1; k < j0 + RT; ++k) {
        double* kk = K + k * mp;
        const double u = uj[k];
#pragma omp simd
        for (int64_t i = k; i < mp; ++i) kk[i] -= u * uj[i];
      }
    }
    const double* u0 = K + (j0 + 0) * mp;
    const double* u1 = K + (j0 + 1) * mp;
    const double* u2 = K + (j0 + 2) * mp;
    const double* u3 = K + (j0 + 3) * mp;
    // Trailing rows, two at a time (the four rows of U loaded once for both): K[k][i] -= sum_p
    // U[p][k] U[p][i] for i >= k. mp - j0 - RT is a multiple of RT, so the rows come in pairs.
    for (int64_t k = j0 + RT; k < mp; k += 2) {
      double* k0 = K + k * mp;
      double* k1 = k0 + mp;
      const double a0 = u0[k], a1 = u1[k], a2 = u2[k], a3 = u3[k];
      const double b0 = u0[k + 1], b1 = u1[k + 1], b2 = u2[k + 1], b3 = u3[k + 1];
      k0[k] -= a0 * u0[k] + a1 * u1[k] + a2 * u2[k] + a3 * u3[k];
#pragma omp simd
      for (int64_t i = k + 1; i < mp; ++i) {
        const double v0 = u0[i], v1 = u1[i], v2 = u2[i], v3 = u3[i];
        k0[i] -= a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
        k1[i] -= b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3;
      }
    }
  }
  return true;
}

// Output of the forward substitution: W (m x S, contiguous) in the input dtype, and the column sums
// of W^2 in float64 (sp values).
template <typename T>
struct FactorOut {
  T* W;
  int64_t m, S;
  double* colsum;
};

// Rows i0..i0+RT of A := L^-1 A (forward substitution), NV vectors of columns from c0; rows < i0 of
// A already hold W. L[i][j] = U[j][i]: the RT multipliers of step j are contiguous in row j of U.
// The finished rows are also rounded into out.W and squared into out.colsum.
template <int NV, typename T>
inline void trsm_tile(const double* U, int64_t mp, double* A, int64_t sp, int64_t i0, int64_t c0,
                      const FactorOut<T>& out) {
  vd acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = loadu<vd>(A + (i0 + r) * sp + c0 + q * DL);
  for (int64_t j = 0; j < i0; ++j) {
    const double* aj = A + j * sp + c0;
    const double* uj = U + j * mp + i0;
    vd w[NV];
    for (int q = 0; q < NV; ++q) w[q] = loadu<vd>(aj + q * DL);
    for (int r = 0; r < RT; ++r) {
      const double l = uj[r];
      for (int q = 0; q < NV; ++q) acc[r][q] -= l * w[q];
    }
  }
  for (int r = 0; r < RT; ++r) {  // the RT x RT diagonal triangle, row by row
    for (int s = 0; s < r; ++s) {
      const double l = U[(i0 + s) * mp + i0 + r];
      for (int q = 0; q < NV; ++q) acc[r][q] -= l * acc[s][q];
    }
    const double inv = 1.0 / U[(i0 + r) * mp + i0 + r];
    for (int q = 0; q < NV; ++q) acc[r][q] *= inv;
  }
  for (int q = 0; q < NV; ++q) {
    vd cs = loadu<vd>(out.colsum + c0 + q * DL);
    for (int r = 0; r < RT; ++r) cs += acc[r][q] * acc[r][q];  // padded rows and columns are zero
    storeu(out.colsum + c0 + q * DL, cs);
  }
  for (int r = 0; r < RT; ++r) {
    for (int q = 0; q < NV; ++q) storeu(A + (i0 + r) * sp + c0 + q * DL, acc[r][q]);
    if (i0 + r >= out.m) continue;
    T* w = out.W + (i0 + r) * out.S;
    for (int q = 0; q < NV; ++q) {
      const int64_t c = c0 + q * DL;
      if (c + DL <= out.S) {
        typedef T vt __attribute__((vector_size(DL * sizeof(T))));
        storeu(w + c, __builtin_convertvector(acc[r][q], vt));
      } else {
        for (int l = 0; c + l < out.S; ++l) w[c + l] = static_cast<T>(acc[r][q][l]);
      }
    }
  }
}

// A := L^-1 A in place, A (mp x sp), L = U^T with U upper (mp x mp); writes out.W and out.colsum
// (which must start at zero).
template <typename T>
inline void trsm_lower(const double* U, int64_t mp, double* A, int64_t sp, const FactorOut<T>& out) {
  for (int64_t i0 = 0; i0 < mp; i0 += RT) {
    int64_t c0 = 0;
    for (; c0 + TV * DL <= sp; c0 += TV * DL) trsm_tile<TV>(U, mp, A, sp, i0, c0, out);
    for (; c0 < sp; c0 += DL) trsm_tile<1>(U, mp, A, sp, i0, c0, out);
  }
}

// Scratch for factor_block: A (mp x sp) and K (mp x mp) in float64, colsum (sp), and Af, a float32
// copy of G (mp x spf) for the Gram matrix of float32 inputs. Zero-initialised once: the padding
// (rows m..mp, columns S..sp of A and S..spf of Af) stays zero from block to block, because zero
// rows of G give zero off-diagonal rows of L and zero rows of W.
struct Scratch {
  int64_t m, S, mp, sp, spf;
  double *A, *K, *colsum;
  float* Af;
};

inline int64_t scratch_doubles(int64_t m, int64_t S) {
  const int64_t mp = round_up(m, RT), sp = round_up(S, DL), spf = round_up(S, FL);
  return mp * sp + mp * mp + sp + (mp * spf + 1) / 2;
}

inline Scratch make_scratch(int64_t m, int64_t S, double* buf) {
  Scratch s{m, S, round_up(m, RT), round_up(S, DL), round_up(S, FL), nullptr, nullptr, nullptr, nullptr};
  s.A = buf;
  s.K = s.A + s.mp * s.sp;
  s.colsum = s.K + s.mp * s.mp;
  s.Af = reinterpret_cast<float*>(s.colsum + s.sp);
  std::fill(buf, buf + scratch_doubles(m, S), 0.0);
  return s;
}

// One block: G (m x S, row stride ldg) -> W (m x S, contiguous) and diag (S). False when K is not
// positive definite in float64 or G holds NaN/Inf (W and diag are then left unspecified). The Gram
// matrix of float32 rows of at least F32_GRAM_MIN values is summed in float32 lanes (gram_upper);
// everything else in float64.
template <typename T>
inline bool factor_block(const T* G, int64_t ldg, double damp, const Scratch& s, T* W, T* diag) {
  const int64_t m = s.m, S = s.S, mp = s.mp, sp = s.sp;
  double* A = s.A;
  double* K = s.K;
  for (int64_t i = 0; i < m; ++i) {
    const T* g = G + i * ldg;
    double* a = A + i * sp;
#pragma omp simd
    for (int64_t c = 0; c < S; ++c) a[c] = static_cast<double>(g[c]);
  }
  if (std::is_same_v<T, float> && S >= F32_GRAM_MIN) {
    if (S % FL == 0 && m == mp) {  // the rows of G as they are (no padding needed)
      gram_upper(reinterpret_cast<const float*>(G), mp, ldg, S, K);
    } else {
      for (int64_t i = 0; i < m; ++i) std::memcpy(s.Af + i * s.spf, G + i * ldg, S * sizeof(T));
      gram_upper(s.Af, mp, s.spf, s.spf, K);
    }
  } else {
    gram_upper(A, mp, sp, sp, K);
  }
  const double shift = static_cast<double>(m) * damp;
  for (int64_t i = 0; i < mp; ++i) K[i * mp + i] += (i < m) ? shift : 1.0;  // padding: identity
  if (!cholesky_upper(K, mp)) return false;
  double* colsum = s.colsum;
  std::fill(colsum, colsum + sp, 0.0);
  trsm_lower(K, mp, A, sp, FactorOut<T>{W, m, S, colsum});
  const double inv = 1.0 / damp;
#pragma omp simd
  for (int64_t c = 0; c < S; ++c) diag[c] = static_cast<T>((1.0 - colsum[c]) * inv);
  return true;
}

// ----------------------------------------------------------------------------------- direct_block

// DL values of row g from column c as a float64 vector (float32 converted exactly).
inline vd load_wide(const double* g) { return loadu<vd>(g); }
inline vd load_wide(const float* g) {
  typedef float vh __attribute__((vector_size(VBYTES / 2)));
  return __builtin_convertvector(loadu<vh>(g), vd);
}

// Rows i0..i0+RT, NV vectors of columns from c0 of S += G^T G (Sum's row stride S): RT x NV
// accumulators over the rows t0..k of G.
template <int NV, typename T>
inline void syrk_tile(const T* G, int64_t ldg, int64_t k, int64_t S, int64_t i0, int64_t c0, double* Sum,
                      int64_t t0 = 0) {
  vd acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = loadu<vd>(Sum + (i0 + r) * S + c0 + q * DL);
  for (int64_t t = t0; t < k; ++t) {
    const T* g = G + t * ldg;
    vd y[NV];
    for (int q = 0; q < NV; ++q) y[q] = load_wide(g + c0 + q * DL);
    for (int r = 0; r < RT; ++r) {
      const double a = static_cast<double>(g[i0 + r]);
      for (int q = 0; q < NV; ++q) acc[r][q] += a * y[q];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) storeu(Sum + (i0 + r) * S + c0 + q * DL, acc[r][q]);
}

// A block narrower than m (S < m) in its direct form: P = damp * F_b^-1 = m*damp * K^-1 for the S x S
// matrix K = m*damp*I + G_b^T G_b (= m F_b). With K = U^T U (Cholesky) and V = U^-T (lower):
// K^-1 = V^T V. Scratch, all float64: A = G_b^T (Sp x mq, zero padding), K / then P (Sp x Sp), V.
struct DirectScratch {
  int64_t m, S, Sp, mq, Vs;  // Vs: the row stride of V and P, whole vectors
  double *A, *K, *V;
};

// The row stride of A = G^T: an odd number of vectors, so that the S rows written column by column
// while converting G do not all fall into one L1 set (a power-of-two stride, m = 1024, thrashed it).
inline int64_t direct_stride(int64_t m) {
  const int64_t mq = round_up(m, DL);
  return (mq / DL) % 2 == 0 ? mq + DL : mq;
}

inline int64_t direct_scratch_doubles(int64_t m, int64_t S) {
  const int64_t Sp = round_up(S, RT), mq = direct_stride(m), Vs = round_up(Sp, DL);
  return Sp * mq + 2 * Sp * Vs;
}

inline DirectScratch make_direct_scratch(int64_t m, int64_t S, double* buf) {
  DirectScratch s{m, S, round_up(S, RT), direct_stride(m), round_up(round_up(S, RT), DL), nullptr, nullptr, nullptr};
  s.A = buf;
  s.K = s.A + s.Sp * s.mq;
  s.V = s.K + s.Sp * s.Vs;
  std::fill(buf, buf + direct_scratch_doubles(m, S), 0.0);  // A's padding stays zero
  return s;
}

// Rows i0..i0+RT, NV vectors of columns from c0 of V = L^-1 (L = U^T, U upper n x n with row stride
// n; V row stride vs): V[i][c] = (e_i[c] - sum_{c0 <= j < i} L[i][j] V[j][c]) / L[i][i], where rows
// j < c0 drop out because V[j][c] = 0 for c > j.
template <int NV>
inline void lower_inverse_tile(const double* U, int64_t n, double* V, int64_t vs, int64_t i0, int64_t c0) {
  vd acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) {
      acc[r][q] = vd{};
      const int64_t at = i0 + r - (c0 + q * DL);  // the unit entry of row i0 + r, if in this vector
      if (at >= 0 && at < DL) acc[r][q][at] = 1.0;
    }
  for (int64_t j = c0; j < i0; ++j) {
    const double* vj = V + j * vs + c0;
    const double* uj = U + j * n + i0;
    const double l0 = uj[0], l1 = uj[1], l2 = uj[2], l3 = uj[3];
    for (int q = 0; q < NV; ++q) {
      const vd w = loadu<vd>(vj + q * DL);
      acc[0][q] -= l0 * w;
      acc[1][q] -= l1 * w;
      acc[2][q] -= l2 * w;
      acc[3][q] -= l3 * w;
    }
  }
  for (int r = 0; r < RT; ++r) {  // the RT x RT diagonal triangle
    for (int s = 0; s < r; ++s) {
      const double l = U[(i0 + s) * n + i0 + r];
      for (int q = 0; q < NV; ++q) acc[r][q] -= l * acc[s][q];
    }
    const double inv = 1.0 / U[(i0 + r) * n + i0 + r];
    for (int q = 0; q < NV; ++q) acc[r][q] *= inv;
  }
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) storeu(V + (i0 + r) * vs + c0 + q * DL, acc[r][q]);
}

// V = L^-1 (lower, n x n, n % RT == 0) for L = U^T, U the upper Cholesky factor (row stride n); V's
// row stride vs >= round_up(n, DL), its entries above the diagonal (up to column vs) come out zero.
// Register tiles, only the vectors that reach the diagonal: n^3 / 6 multiply-adds.
inline void lower_inverse(const double* U, int64_t n, double* V, int64_t vs) {
  for (int64_t i0 = 0; i0 < n; i0 += RT) {
    const int64_t end = round_up(i0 + RT, DL);  // vectors past the diagonal stay zero
    int64_t c = 0;
    for (; c + TV * DL <= end; c += TV * DL) lower_inverse_tile<TV>(U, n, V, vs, i0, c);
    for (; c < end; c += DL) lower_inverse_tile<1>(U, n, V, vs, i0, c);
    for (int64_t r = i0; r < i0 + RT; ++r) std::fill(V + r * vs + end, V + r * vs + vs, 0.0);
  }
}

// One block: G (m x S, row stride ldg) -> P (S x S, contiguous) and diag(F_b^-1) (S). False when K
// is not positive definite in float64 or G holds NaN/Inf (P and diag are then unspecified).
template <typename T>
inline bool direct_block(const T* G, int64_t ldg, double damp, const DirectScratch& s, T* P, T* diag) {
  const int64_t m = s.m, S = s.S, Sp = s.Sp, mq = s.mq;
  double* A = s.A;
  double* K = s.K;
  double* V = s.V;
  for (int64_t r = 0; r < m; ++r) {  // A = G^T in float64
    const T* g = G + r * ldg;
    for (int64_t c = 0; c < S; ++c) A[c * mq + r] = static_cast<double>(g[c]);
  }
  gram_upper(A, Sp, mq, mq, K);  // upper triangle of G^T G
  const double shift = static_cast<double>(m) * damp;
  for (int64_t i = 0; i < Sp; ++i) K[i * Sp + i] += (i < S) ? shift : 1.0;  // padding: identity
  if (!cholesky_upper(K, Sp)) return false;
  lower_inverse(K, Sp, V, s.Vs);  // V = L^-1 = U^-T
  double* Kinv = K;  // the upper triangle of V^T V = K^-1 (row stride Vs), over K's storage
  std::fill(Kinv, Kinv + Sp * s.Vs, 0.0);
  for (int64_t a0 = 0; a0 < Sp; a0 += RT) {  // rows a0.. of V^T V: rows k >= a0 of V (V[k][a] = 0 for k < a)
    int64_t c = a0 / DL * DL;
    for (; c + TV * DL <= s.Vs; c += TV * DL) syrk_tile<TV>(V, s.Vs, Sp, s.Vs, a0, c, Kinv, a0);
    for (; c < s.Vs; c += DL) syrk_tile<1>(V, s.Vs, Sp, s.Vs, a0, c, Kinv, a0);
  }
  for (int64_t a = 0; a < S; ++a) {  // P, both triangles
    const double* ka = Kinv + a * s.Vs;
    T* pa = P + a * S;
    for (int64_t b = 0; b < a; ++b) pa[b] = static_cast<T>(shift * Kinv[b * s.Vs + a]);
#pragma omp simd
    for (int64_t b = a; b < S; ++b) pa[b] = static_cast<T>(shift * ka[b]);
    diag[a] = static_cast<T>(static_cast<double>(m) * ka[a]);
  }
  return true;
}

// ------------------------------------------------------------------------------ accumulate_block

// The upper triangle (and a few entries below it, near the diagonal) of Sum (S x S, row-major,
// float64) += G^T G for G (k x S, row stride ldg): every product exact (float32 inputs), summed in
// float64, as a float64 GEMM of the converted rows would, without converting them first.
template <typename T>
inline void accumulate_block(const T* G, int64_t ldg, int64_t k, int64_t S, double* Sum) {
  int64_t i0 = 0;
  for (; i0 + RT <= S; i0 += RT) {
    int64_t c = i0 / DL * DL;
    for (; c + TV * DL <= S; c += TV * DL) syrk_tile<TV>(G, ldg, k, S, i0, c, Sum);
    for (; c + DL <= S; c += DL) syrk_tile<1>(G, ldg, k, S, i0, c, Sum);
    for (int64_t i = i0; i < i0 + RT; ++i)  // the columns past the last whole vector
      for (int64_t j = std::max(c, i); j < S; ++j) {
        double a = Sum[i * S + j];
        for (int64_t t = 0; t < k; ++t)
          a += static_cast<double>(G[t * ldg + i]) * static_cast<double>(G[t * ldg + j]);
        Sum[i * S + j] = a;
      }
  }
  for (int64_t i = i0; i < S; ++i)  // the rows past the last whole tile
    for (int64_t j = i; j < S; ++j) {
      double a = Sum[i * S + j];
      for (int64_t t = 0; t < k; ++t)
        a += static_cast<double>(G[t * ldg + i]) * static_cast<double>(G[t * ldg + j]);
      Sum[i * S + j] = a;
    }
}

// -------------------------------------------------------------------------------------- block_mul

// t = W x for W (m x S) row-major, x (S): RT rows at a time, vectors along the columns.
template <typename T>
inline void block_gemv(const T* W, int64_t m, int64_t S, const T* x, T* t) {
  typedef typename Vec<T>::type V;
  constexpr int L = sizeof(V) / sizeof(T);
  const int64_t sv = S / L * L;
  int64_t i = 0;
  for (; i + RT <= m; i += RT) {
    const T* w0 = W + (i + 0) * S;
    const T* w1 = W + (i + 1) * S;
    const T* w2 = W + (i + 2) * S;
    const T* w3 = W + (i + 3) * S;
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t c = 0; c < sv; c += L) {
      const V xv = loadu<V>(x + c);
      a0 += loadu<V>(w0 + c) * xv;
      a1 += loadu<V>(w1 + c) * xv;
      a2 += loadu<V>(w2 + c) * xv;
      a3 += loadu<V>(w3 + c) * xv;
    }
    T s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (int64_t c = sv; c < S; ++c) {
      s0 += w0[c] * x[c];
      s1 += w1[c] * x[c];
      s2 += w2[c] * x[c];
      s3 += w3[c] * x[c];
    }
    t[i] = s0;
    t[i + 1] = s1;
    t[i + 2] = s2;
    t[i + 3] = s3;
  }
  for (; i < m; ++i) {
    const T* wi = W + i * S;
    V a = {};
    for (int64_t c = 0; c < sv; c += L) a += loadu<V>(wi + c) * loadu<V>(x + c);
    T s = hsum(a);
    for (int64_t c = sv; c < S; ++c) s += wi[c] * x[c];
    t[i] = s;
  }
}

// y = x - W^T t on NV vectors of columns from c0.
template <typename T, int NV>
inline void block_update_tile(const T* W, int64_t m, int64_t S, const T* t, const T* x, T* y, int64_t c0) {
  typedef typename Vec<T>::type V;
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[NV];
  for (int q = 0; q < NV; ++q) acc[q] = loadu<V>(x + c0 + q * L);
  for (int64_t i = 0; i < m; ++i) {
    const T* wi = W + i * S + c0;
    const T ti = t[i];
    for (int q = 0; q < NV; ++q) acc[q] -= ti * loadu<V>(wi + q * L);
  }
  for (int q = 0; q < NV; ++q) storeu(y + c0 + q * L, acc[q]);
}

// y = x - W^T t for W (m x S) row-major; y may not alias x.
template <typename T>
inline void block_update(const T* W, int64_t m, int64_t S, const T* t, const T* x, T* y) {
  typedef typename Vec<T>::type V;
  constexpr int L = sizeof(V) / sizeof(T);
  int64_t c0 = 0;
  for (; c0 + 4 * L <= S; c0 += 4 * L) block_update_tile<T, 4>(W, m, S, t, x, y, c0);
  for (; c0 + L <= S; c0 += L) block_update_tile<T, 1>(W, m, S, t, x, y, c0);
  for (int64_t c = c0; c < S; ++c) {
    T s = x[c];
    for (int64_t i = 0; i < m; ++i) s -= t[i] * W[i * S + c];
    y[c] = s;
  }
}

// y = x - W^T (W x) for one block; t is scratch of m values.
template <typename T>
inline void block_mul(const T* W, int64_t m, int64_t S, const T* x, T* y, T* t) {
  block_gemv(W, m, S, x, t);
  block_update(W, m, S, t, x, y);
}

}  // namespace mfac_cpu
