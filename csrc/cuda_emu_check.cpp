// Test-only driver: runs the CUDA kernels under cuda_emu.h and compares them with the CPU kernels
// (mfac_cpu_kernels.h) on random blocks. Built by tests/test_kernels.py from a rewritten copy of
// mfac_cuda_kernels.cu (KERNELS_EMU names it); exit status 0 when every check passes.
#include KERNELS_EMU

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "mfac_cpu_kernels.h"

static int failures = 0;

static void expect(bool ok, const char* what, long m, long nb, long S, int dsize) {
  if (!ok) {
    std::printf("FAIL f%d m=%ld nb=%ld S=%ld: %s\n", 8 * dsize, m, nb, S, what);
    ++failures;
  }
}

template <typename T>
static void check(int64_t m, int64_t before, int64_t nb, int64_t S, int64_t k, bool scratch_in_global) {
  const int64_t d = before + nb * S + 3;
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
  std::mt19937 rng(static_cast<unsigned>(m * 1000 + S));
  std::normal_distribution<double> n(0, 1e-3);
  std::vector<double> mean(d);
  for (auto& v : mean) v = n(rng);
  std::vector<T> G(m * d);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < d; ++c) G[i * d + c] = static_cast<T>(0.5 * mean[c] + n(rng));
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> W(nb * m * S, nan), diag(d, nan), Wr(nb * m * S), diagr(nb * S);
  std::vector<int> status(nb, 7);
  const int64_t chunk = 2;  // several launches
  std::vector<double> work(chunk * mfac_cuda_factor_workspace(m, S));
  auto factor = [&] {
    if constexpr (sizeof(T) == 4)
      return mfac_cuda_factor_blocks_f32(G.data() + before, d, m, nb, S, 1e-5, W.data(), diag.data() + before,
                                         status.data(), work.data(), chunk, nullptr);
    else
      return mfac_cuda_factor_blocks_f64(G.data() + before, d, m, nb, S, 1e-5, W.data(), diag.data() + before,
                                         status.data(), work.data(), chunk, nullptr);
  };
  expect(factor() == 0, "factor launch", m, nb, S, sizeof(T));
  std::vector<double> buf(mfac_cpu::scratch_doubles(m, S));
  const auto sc = mfac_cpu::make_scratch(m, S, buf.data());
  for (int64_t b = 0; b < nb; ++b)
    mfac_cpu::factor_block(G.data() + before + b * S, d, 1e-5, sc, Wr.data() + b * m * S, diagr.data() + b * S);
  double ew = 0, mw = 0, ed = 0, md = 0;
  bool finite = true, stray = false, ok_status = true;
  for (size_t i = 0; i < W.size(); ++i) {
    finite &= std::isfinite(static_cast<double>(W[i]));
    ew = std::max(ew, std::abs(static_cast<double>(W[i]) - Wr[i]));
    mw = std::max(mw, std::abs(static_cast<double>(Wr[i])));
  }
  for (int64_t c = 0; c < d; ++c) {
    const bool inside = c >= before && c < before + nb * S;
    if (!inside) {
      stray |= !std::isnan(diag[c]);
      continue;
    }
    finite &= std::isfinite(static_cast<double>(diag[c]));
    ed = std::max(ed, std::abs(static_cast<double>(diag[c]) - diagr[c - before]));
    md = std::max(md, std::abs(static_cast<double>(diagr[c - before])));
  }
  for (int s : status) ok_status &= s == 0;
  expect(ok_status, "status", m, nb, S, sizeof(T));
  expect(finite, "factor outputs finite (all written)", m, nb, S, sizeof(T));
  expect(!stray, "no diag writes outside the blocks", m, nb, S, sizeof(T));
  expect(ew <= tol * mw, "W matches the CPU kernel", m, nb, S, sizeof(T));
  expect(ed <= tol * md, "diag matches the CPU kernel", m, nb, S, sizeof(T));

  std::vector<T> X(k * d), Y(k * d, nan), Yr(k * d), t(m), scratch;
  for (auto& v : X) v = static_cast<T>(n(rng) * 1e3);
  T* sp = nullptr;
  if (scratch_in_global || mfac_cuda_mul_scratch(m, sizeof(T)) > 0) {
    scratch.assign(nb * k * m, nan);
    sp = scratch.data();
  }
  int err;
  if constexpr (sizeof(T) == 4)
    err = mfac_cuda_blocked_mul_f32(Wr.data(), nb, m, S, X.data() + before, d, Y.data() + before, d, k, sp, nullptr);
  else
    err = mfac_cuda_blocked_mul_f64(Wr.data(), nb, m, S, X.data() + before, d, Y.data() + before, d, k, sp, nullptr);
  expect(err == 0, "mul launch", m, nb, S, sizeof(T));
  for (int64_t r = 0; r < k; ++r)
    for (int64_t b = 0; b < nb; ++b)
      mfac_cpu::block_mul(Wr.data() + b * m * S, m, S, X.data() + r * d + before + b * S,
                          Yr.data() + r * d + before + b * S, t.data());
  double ey = 0, my = 0;
  finite = true;
  stray = false;
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = 0; c < d; ++c) {
      const int64_t i = r * d + c;
      if (c < before || c >= before + nb * S) {
        stray |= !std::isnan(Y[i]);
        continue;
      }
      finite &= std::isfinite(static_cast<double>(Y[i]));
      ey = std::max(ey, std::abs(static_cast<double>(Y[i]) - Yr[i]));
      my = std::max(my, std::abs(static_cast<double>(Yr[i])));
    }
  expect(finite, "mul output finite (all written)", m, nb, S, sizeof(T));
  expect(!stray, "no mul writes outside the blocks", m, nb, S, sizeof(T));
  expect(ey <= tol * my, "mul matches the CPU kernel", m, nb, S, sizeof(T));

  if (nb > 1) {  // a NaN in block 1: status 1 there, 0 elsewhere
    G[1 * d + before + S + 2] = nan;
    std::fill(status.begin(), status.end(), 7);
    factor();
    bool flagged = status[1] == 1;
    for (int64_t b = 0; b < nb; ++b) flagged &= b == 1 || status[b] == 0;
    expect(flagged, "NaN block flagged", m, nb, S, sizeof(T));
  }
  std::printf("f%d m=%ld nb=%ld S=%ld k=%ld: W %.1e diag %.1e mul %.1e\n", static_cast<int>(8 * sizeof(T)),
              static_cast<long>(m), static_cast<long>(nb), static_cast<long>(S), static_cast<long>(k), ew / mw,
              ed / md, ey / my);
}

int main() {
  check<float>(37, 5, 3, 128, 2, false);
  check<double>(37, 5, 3, 128, 2, false);
  check<float>(7, 0, 5, 33, 1, true);
  check<double>(45, 2, 1, 45, 3, false);
  check<float>(64, 1, 3, 100, 1, false);
  check<double>(70, 3, 2, 97, 1, true);
  std::printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? 1 : 0;
}
