// A tiny CPU emulator for the kernels in ../kernels.cu, to check their indexing, tie-breaks, NaN
// handling and determinism without a GPU (csrc/emu/check.py drives it). Each CUDA thread of a block
// is an std::thread; __syncthreads / __syncwarp are barriers; shuffles and votes go through a per-warp
// exchange buffer. cp.async takes its plain-load fallback (no __CUDA_ARCH__). Dynamic shared memory
// is poisoned with NaN so reads of unwritten words show. Slow: for small shapes only.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // blocks run one at a time

typedef struct CUstream_st* cudaStream_t;
struct alignas(16) float4 {
  float x, y, z, w;
};

using std::isnan;
using std::max;
using std::min;

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  std::barrier<>* block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;  // 32 slots per warp
  float* smem;
};

inline thread_local Dim3 thread_idx, block_idx;
inline thread_local Block* block;

inline std::barrier<>& warp_barrier() { return *block->warps[thread_idx.x / 32]; }

// Runs kernel() for every thread of every block of grid (x, y), one block at a time.
template <class Kernel>
void launch(Dim3 grid, unsigned threads, size_t smem_bytes, Kernel kernel) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<float> smem(smem_bytes / sizeof(float) + 4, NAN);
      std::barrier<> bar(threads);
      Block blk{&bar, {}, std::vector<uint64_t>((threads + 31) / 32 * 32), smem.data()};
      for (unsigned w = 0; w < (threads + 31) / 32; ++w)
        blk.warps.push_back(std::make_unique<std::barrier<>>(32));
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          thread_idx = {t, 0, 0};
          block_idx = {bx, by, 0};
          block = &blk;
          kernel();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define EMU_DYNAMIC_SMEM emu::block->smem

inline void __syncthreads() { emu::block->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier().arrive_and_wait(); }

template <class T>
T __shfl_sync(unsigned, T value, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t* slots = emu::block->exchange.data() + threadIdx.x / 32 * 32;
  std::memcpy(&slots[threadIdx.x % 32], &value, sizeof(T));
  emu::warp_barrier().arrive_and_wait();
  T out;
  std::memcpy(&out, &slots[src_lane & 31], sizeof(T));
  emu::warp_barrier().arrive_and_wait();
  return out;
}

inline bool __any_sync(unsigned, bool pred) {
  uint64_t* slots = emu::block->exchange.data() + threadIdx.x / 32 * 32;
  slots[threadIdx.x % 32] = pred;
  emu::warp_barrier().arrive_and_wait();
  bool any = false;
  for (int i = 0; i < 32; ++i) any = any || slots[i] != 0;
  emu::warp_barrier().arrive_and_wait();
  return any;
}
