// Test-only: a minimal CPU emulation of the CUDA features mfac_cuda_kernels.cu uses, so that the
// kernels' logic (indexing, barriers, warp shuffles, shared memory, chunked launches, the failure
// path) is checked on machines without a GPU (tests/test_kernels.py, with cuda_emu_check.cpp).
// Blocks run one at a time; each thread of a block is a std::thread; __syncthreads and the warp
// shuffles are barrier waits. It says nothing about speed, coalescing or the real toolchain,
// and a missing __syncthreads (a race) is not reliably caught.
// tests/test_kernels.py rewrites the kernel launches (<<<...>>>) into emu_launch calls.
#pragma once
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#include <cstring>
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
// A blocking barrier (mutex + condition variable): no spinning, so that dozens of emulated threads
// on a few busy cores do not burn them (std::barrier spins before it sleeps).
class EmuBarrier {
 public:
  explicit EmuBarrier(unsigned n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned long phase = phase_;
    if (++count_ == n_) {
      count_ = 0;
      ++phase_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned n_, count_ = 0;
  unsigned long phase_ = 0;
};
inline EmuBarrier* emu_block_barrier = nullptr;
inline std::vector<std::unique_ptr<EmuBarrier>> emu_warp_barriers;
inline std::vector<double> emu_shfl_buf;  // per thread slot
inline unsigned char emu_smem[1 << 16];
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __align__(n)
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0, cudaErrorInvalidValue = 1;
inline int cudaGetLastError() { return 0; }
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <typename T>
inline T __shfl_down_sync(unsigned, T v, int off) {
  const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  emu_shfl_buf[tid] = static_cast<double>(v);
  emu_warp_barriers[warp]->arrive_and_wait();
  T r = lane + off < 32 ? static_cast<T>(emu_shfl_buf[warp * 32 + lane + off]) : v;
  emu_warp_barriers[warp]->arrive_and_wait();
  return r;
}
using std::isfinite;
using std::sqrt;
// The kernels loop over blockDim, so fewer threads than the launch asks for check the same
// logic; 64 (two warps) keeps the thread count, and the load on a shared machine, low.
#ifndef EMU_MAX_THREADS
#define EMU_MAX_THREADS 64
#endif
inline void emu_launch(dim3 grid, unsigned threads, const std::function<void()>& body) {
  threads = threads < EMU_MAX_THREADS ? threads : EMU_MAX_THREADS;
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      EmuBarrier bar(threads);
      emu_block_barrier = &bar;
      emu_warp_barriers.clear();
      for (unsigned w = 0; w < threads / 32; ++w) emu_warp_barriers.emplace_back(new EmuBarrier(32));
      emu_shfl_buf.assign(threads, 0.0);
      std::memset(emu_smem, 0xFF, sizeof(emu_smem));  // poison shared memory
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; ++t)
        ts.emplace_back([&, t] { threadIdx = dim3(t); blockIdx = dim3(bx, by); body(); });
      for (auto& th : ts) th.join();
    }
}
