// A tiny CPU emulator for the kernels in ../forward.cuh and ../backward.cuh, to check their indexing,
// tiling edges, certification, tie-breaks, NaN/inf handling and determinism without a GPU
// (csrc/emu/check.py drives it; it includes the very same headers). Each CUDA thread of a block is a
// fiber of one OS thread (default: deterministic, fast), or with PROTOKERN_EMU_THREADS an std::thread,
// so that the threads really run concurrently and ThreadSanitizer sees their races (sanitize_main.cpp);
// __syncthreads / __syncwarp are barriers; shuffles and votes go through a per-warp exchange buffer.
// Honest about the two things a CPU fallback would hide:
// * cp.async is asynchronous: copy_async poisons its destination with NaN at issue (the stage's old
//   contents are gone: the refill's issue is the point after the stage's last legitimate read) and
//   the data lands only at the async_wait that retires its group, in the issuing thread; a thread
//   that ends with copies in flight is an error (emu_errors()).
// * mma.sync (m16n8k8 TF32) reads its operands as TF32 (the low 13 bits dropped, as the hardware
//   does), follows the PTX fragment layout, and truncates its fp32 result toward zero.
// Dynamic shared memory starts as NaN so reads of unwritten words show. Slow: small shapes only.
#pragma once

#define PROTOKERN_EMU 1

#include <algorithm>
#include <atomic>
#include <deque>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <ucontext.h>
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

using std::isfinite;
using std::isnan;
using std::max;
using std::min;

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// cp.async: per-thread groups of pending copies.
struct PendingCopy {
  float* dst;
  const float* src;
  bool valid;
};

// What each emulated CUDA thread owns.
struct ThreadState {
  Dim3 tid;
  std::vector<PendingCopy> open_group;
  std::deque<std::vector<PendingCopy>> committed;
};

inline thread_local ThreadState* self;  // the running CUDA thread
inline std::atomic<int> errors{0};      // protocol errors seen (cp.async groups left in flight)

#ifdef PROTOKERN_EMU_THREADS
// Real OS threads: concurrent, so ThreadSanitizer sees the kernels' races (sanitizer builds).
using Barrier = std::barrier<>;
#else
// Default: every CUDA thread of a block is a fiber (ucontext) of one OS thread, switched round-robin at
// barriers: deterministic and fast, with no scheduler contention.
inline ucontext_t scheduler;
inline ucontext_t* running_fiber;
inline bool fiber_returned;  // set by a fiber as it ends
inline void yield() { swapcontext(running_fiber, &scheduler); }

struct Barrier {
  explicit Barrier(std::ptrdiff_t n) : n(n) {}
  void arrive_and_wait() {
    const unsigned g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
    } else {
      while (gen == g) yield();
    }
  }
  std::ptrdiff_t n, count = 0;
  unsigned gen = 0;
};
#endif

struct Block {
  Barrier* block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> exchange;  // 32 slots per warp
  std::vector<uint32_t> fragments;  // 32 x 6 per warp (mma operands)
  float* smem;
};

inline Dim3 block_idx;  // blocks run one at a time: the same for every thread
inline Block* block;

inline void copy_async(float* dst, const float* src, bool valid) {
  *dst = NAN;  // in flight
  self->open_group.push_back({dst, src, valid});
}

inline void async_commit() {
  self->committed.push_back(std::move(self->open_group));
  self->open_group.clear();
}

inline void async_wait(int pending) {  // retire all but the `pending` most recent groups
  while ((int)self->committed.size() > pending) {
    for (const PendingCopy& c : self->committed.front()) *c.dst = c.valid ? *c.src : 0.f;
    self->committed.pop_front();
  }
}

inline void end_thread() {
  if (!self->open_group.empty() || !self->committed.empty()) errors.fetch_add(1);
  self->open_group.clear();
  self->committed.clear();
}

inline Barrier& warp_barrier() { return *block->warps[self->tid.x / 32]; }

// Runs kernel() for every thread of every block of grid (x, y), one block at a time.
template <class Kernel>
void launch(Dim3 grid, unsigned threads, size_t smem_bytes, Kernel kernel) {
  std::vector<ThreadState> states(threads);
  for (unsigned t = 0; t < threads; ++t) states[t].tid = {t, 0, 0};
#ifndef PROTOKERN_EMU_THREADS
  constexpr size_t kStack = 256 * 1024;
  std::vector<char> stacks(kStack * threads);
  std::vector<ucontext_t> fibers(threads);
  std::vector<char> done(threads);
  static thread_local Kernel* current;
  current = &kernel;
#endif
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<float> smem(smem_bytes / sizeof(float) + 4, NAN);
      Barrier bar(threads);
      Block blk{&bar, {}, std::vector<uint64_t>((threads + 31) / 32 * 32),
                std::vector<uint32_t>((threads + 31) / 32 * 32 * 6), smem.data()};
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) blk.warps.push_back(std::make_unique<Barrier>(32));
      block_idx = {bx, by, 0};
      block = &blk;
#ifdef PROTOKERN_EMU_THREADS
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          self = &states[t];
          kernel();
          end_thread();
        });
      }
      for (auto& th : pool) th.join();
#else
      for (unsigned t = 0; t < threads; ++t) {
        getcontext(&fibers[t]);
        fibers[t].uc_stack.ss_sp = stacks.data() + kStack * t;
        fibers[t].uc_stack.ss_size = kStack;
        fibers[t].uc_link = &scheduler;
        makecontext(&fibers[t], (void (*)()) + [] {
          (*current)();
          end_thread();
          fiber_returned = true;
        }, 0);
        done[t] = 0;
      }
      for (unsigned alive = threads; alive > 0;) {
        for (unsigned t = 0; t < threads; ++t) {
          if (done[t]) continue;
          self = &states[t];
          running_fiber = &fibers[t];
          fiber_returned = false;
          swapcontext(&scheduler, &fibers[t]);  // back when fiber t waits at a barrier or ends (uc_link)
          if (fiber_returned) {
            done[t] = 1;
            --alive;
          }
        }
      }
#endif
    }
  }
}

}  // namespace emu

#define threadIdx (emu::self->tid)
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

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return __shfl_sync(mask, value, (threadIdx.x % 32) ^ lane_mask);
}

inline int __ffsll(long long x) { return x == 0 ? 0 : __builtin_ctzll((unsigned long long)x) + 1; }

inline unsigned __ballot_sync(unsigned, bool pred) {
  uint64_t* slots = emu::block->exchange.data() + threadIdx.x / 32 * 32;
  slots[threadIdx.x % 32] = pred;
  emu::warp_barrier().arrive_and_wait();
  unsigned mask = 0;
  for (int i = 0; i < 32; ++i) mask |= (slots[i] != 0 ? 1u : 0u) << i;
  emu::warp_barrier().arrive_and_wait();
  return mask;
}

inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float __uint_as_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

namespace emu {

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for the calling warp: operands are read as TF32
// (their low 13 bits ignored), products summed exactly (double), the result truncated toward zero
// into fp32 (within the accumulation model of forward.cuh's bound).
inline void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned lane = threadIdx.x % 32;
  uint32_t* const frag = block->fragments.data() + threadIdx.x / 32 * 32 * 6;
  for (int r = 0; r < 4; ++r) frag[lane * 6 + r] = a[r];
  for (int r = 0; r < 2; ++r) frag[lane * 6 + 4 + r] = b[r];
  warp_barrier().arrive_and_wait();
  auto tf32 = [](uint32_t u) { return static_cast<double>(__uint_as_float(u & 0xffffe000u)); };
  auto A = [&](int row, int k) {  // owner lane (row % 8) * 4 + k % 4, register (row >= 8) + 2 (k >= 4)
    return tf32(frag[((row % 8) * 4 + k % 4) * 6 + (row >= 8) + 2 * (k >= 4)]);
  };
  auto B = [&](int k, int col) { return tf32(frag[(col * 4 + k % 4) * 6 + 4 + (k >= 4)]); };
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = g + 8 * (q / 2), col = 2 * t + q % 2;
    double sum = c[q];
    for (int k = 0; k < 8; ++k) sum += A(row, k) * B(k, col);
    float f = static_cast<float>(sum);
    if (std::isfinite(f) && std::fabs(static_cast<double>(f)) > std::fabs(sum)) f = std::nextafter(f, 0.f);
    c[q] = f;
  }
  warp_barrier().arrive_and_wait();
}

}  // namespace emu
