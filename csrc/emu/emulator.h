// A tiny CPU emulator for the kernels in ../forward.cuh and ../backward.cuh, to check their indexing,
// tiling edges, certification, tie-breaks, NaN/inf handling and determinism without a GPU
// (csrc/emu/check.py drives it; it includes the very same headers). Each CUDA thread of a block is a
// fiber of one OS thread (default: deterministic, fast; under ThreadSanitizer the fibers are TSan fibers
// that only the barriers order, so races are still reported), or with PROTOKERN_EMU_THREADS an
// std::thread (real concurrency, slow);
// __syncthreads (and __syncthreads_and) / __syncwarp are barriers; shuffles and votes go through a per-warp exchange buffer.
// Honest about the two things a CPU fallback would hide:
// * cp.async (4- and 16-byte; a misaligned 16-byte copy is an error) is asynchronous: copy_async
//   poisons its destination with NaN at issue (the stage's old contents are gone: the refill's issue
//   is the point after the stage's last legitimate read) and the data lands only at the async_wait
//   that retires its group, in the issuing thread; a thread that ends with copies in flight is an
//   error (emu_errors()).
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
struct alignas(16) uint4 {
  unsigned x, y, z, w;
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

// The running CUDA thread (atomic: the fiber scheduler switches it under running fibers' feet without
// creating a happens-before edge for ThreadSanitizer).
inline thread_local std::atomic<ThreadState*> self_ptr{nullptr};
inline ThreadState* me() { return self_ptr.load(std::memory_order_relaxed); }
// protocol errors seen (cp.async left in flight, misaligned, unwritten reads, a grad_p part not counted once)
inline std::atomic<int> errors{0};

#ifdef PROTOKERN_EMU_THREADS
// Real OS threads: concurrent (optional; the sanitizer gates use the fibers below).
using Barrier = std::barrier<>;
#else
// Default: every CUDA thread of a block is a fiber of one OS thread, switched round-robin at
// barriers: deterministic and fast, with no scheduler contention. Under ThreadSanitizer each fiber is a
// TSan fiber switched without synchronisation, and only the barriers (and the scheduler's hand-over of
// its own state) create happens-before edges, so a missing __syncthreads / __syncwarp is still a race.
#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
inline void tsan_release(void* a) { __tsan_release(a); }
inline void tsan_acquire(void* a) { __tsan_acquire(a); }
inline void tsan_switch(void* fiber) { __tsan_switch_to_fiber(fiber, 1 /* no sync */); }
#else
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
inline void tsan_switch(void*) {}
#endif

// A fiber's saved context. glibc's swapcontext saves and restores the signal mask with a system call at
// every switch: under it the kernel took about 45% of the emulator check's time. On x86-64 (TSan builds
// included: TSan needs only its fiber calls around a switch, whatever the switch) a switch is instead
// protokern_emu_switch below: push the callee-saved registers and the SSE / x87 control words, swap stack
// pointers, pop, return: all that a call must preserve, no system call. Elsewhere, under ASan (whose runtime
// follows swapcontext's stack changes; a switch of our own would need its fiber annotations: the ASan + UBSan
// job runs this path), or with PROTOKERN_EMU_UCONTEXT, ucontext.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(PROTOKERN_EMU_UCONTEXT)
// protokern_emu_switch(save, load): saves this context on its own stack and its stack pointer in *save, then
// resumes the context whose stack pointer is load. Weak: every translation unit including this header emits it.
asm(R"(
  .pushsection .text.protokern_emu_switch,"ax",@progbits
  .weak protokern_emu_switch
  .hidden protokern_emu_switch
  .type protokern_emu_switch, @function
protokern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size protokern_emu_switch, .-protokern_emu_switch
  .popsection
)");
extern "C" void protokern_emu_switch(void** save, void* load);

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { protokern_emu_switch(&from.sp, to.sp); }
// A context that starts entry() on stack [base, base + size) as if called there; entry never returns.
inline void make_context(Context& c, char* base, size_t size, void (*entry)(), Context&) {
  const uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t{15};
  uint64_t* const frame = reinterpret_cast<uint64_t*>(top) - 9;  // what protokern_emu_switch pops, bottom up
  std::memset(frame, 0, 9 * sizeof(uint64_t));  // r15, r14, r13, r12, rbx, rbp start as 0 (frame[1..6])
  uint32_t mxcsr;
  uint16_t x87;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87));
  std::memcpy(frame, &mxcsr, 4);  // this thread's rounding and exception masks, as a new thread has
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &x87, 2);
  frame[7] = reinterpret_cast<uint64_t>(entry);  // ret's target; frame[8]: entry's (never used) return address,
  c.sp = frame;                                  // leaving rsp at 8 mod 16 at entry, as after a call
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* base, size_t size, void (*entry)(), Context& link) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = &link.uc;
  makecontext(&c.uc, entry, 0);
}
#endif

inline thread_local std::unique_ptr<char[]> stack_pool;  // the fibers' stacks (launch below)
inline thread_local size_t stack_pool_bytes = 0;
inline Context scheduler;
inline std::atomic<Context*> running_fiber;
inline std::atomic<void*> scheduler_tsan;  // TSan fiber of the scheduler (ThreadSanitizer builds)
inline std::atomic<bool> fiber_returned;  // set by a fiber as it ends (atomic: no happens-before edge)
inline char scheduler_handover;  // address of the scheduler -> fiber edges (ThreadSanitizer)
inline char block_end;  // address of the fibers -> scheduler edges at a block's end (ThreadSanitizer)

inline void yield() {
  tsan_switch(scheduler_tsan.load(std::memory_order_relaxed));
  switch_context(*running_fiber.load(std::memory_order_relaxed), scheduler);
  tsan_acquire(&scheduler_handover);
}

// The happens-before edges of a barrier go through one address per generation parity: a fiber resumed
// late from generation g (its acquire runs when the scheduler comes back to it) must not pick up what a
// faster fiber released at generation g + 1 (a single address would hide a missing barrier between the
// two). Generation g + 2 cannot release before every fiber has left g.
struct Barrier {
  explicit Barrier(std::ptrdiff_t n) : n(n) {}
  void arrive_and_wait() {
    const unsigned g = gen.load(std::memory_order_relaxed);
    tsan_release(&phase[g & 1]);
    if (count.fetch_add(1, std::memory_order_relaxed) + 1 == n) {
      count.store(0, std::memory_order_relaxed);
      gen.store(g + 1, std::memory_order_relaxed);
    } else {
      while (gen.load(std::memory_order_relaxed) == g) yield();
    }
    tsan_acquire(&phase[g & 1]);
  }
  const std::ptrdiff_t n;
  std::atomic<std::ptrdiff_t> count{0};
  std::atomic<unsigned> gen{0};
  char phase[2] = {0, 0};
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
inline bool reverse_blocks = false;  // run a grid's blocks in decreasing index order (order-independence checks)
inline Block* block;

// Recording of the forward's search values (check.py tests the certification bound on them): when
// search_log is set, pair (b, m, k) lands at search_log[4 ((b M + m) HW + k)]: v~, its upper end hi (what the
// tile's threshold is the minimum of), its lower end lo (what the flags compare), the per-pair form's delta;
// and row (b, m) of patch tile t at tile_log[2 ((b M + m) tiles + t)]: what the threshold adds to the tile's
// minimum of hi (B_m in the separable form, 0 in the per-pair form), and what the flags' threshold adds to T_m.
inline float* search_log = nullptr;
inline float* tile_log = nullptr;
inline int search_log_M = 0, search_log_HW = 0, search_log_tiles = 0;
inline void record_search(int b, int m, int k, float v, float hi, float lo, float delta) {
  if (search_log == nullptr) return;
  float* const at = search_log + 4 * (((int64_t)b * search_log_M + m) * search_log_HW + k);
  at[0] = v;
  at[1] = hi;
  at[2] = lo;
  at[3] = delta;
}
inline void record_tile(int b, int m, int tile, double tile_min, double threshold, double t_m, double flags_t) {
  if (tile_log == nullptr) return;
  float* const at = tile_log + 2 * (((int64_t)b * search_log_M + m) * search_log_tiles + tile);
  at[0] = (float)(threshold - tile_min);
  at[1] = (float)(flags_t - t_m);
}

inline void copy_async(float* dst, const float* src, bool valid) {
  *dst = NAN;  // in flight
  me()->open_group.push_back({dst, src, valid});
}

inline std::atomic<int64_t> vector_copies{0};  // 16-byte copies issued (check.py: which path ran)
inline std::atomic<int64_t> per_pair_tiles{0};  // forward tiles certified in the per-pair form (check.py)

inline void copy_async16(float* dst, const float* src, int n) {
  if ((reinterpret_cast<uintptr_t>(dst) & 15) != 0 || (reinterpret_cast<uintptr_t>(src) & 15) != 0 || n < 0 ||
      n > 4)
    errors.fetch_add(1);  // misaligned: the hardware would fault
  vector_copies.fetch_add(1, std::memory_order_relaxed);
  for (int i = 0; i < 4; ++i) {
    dst[i] = NAN;  // in flight
    me()->open_group.push_back({dst + i, i < n ? src + i : src, i < n});
  }
}

inline void async_commit() {
  me()->committed.push_back(std::move(me()->open_group));
  me()->open_group.clear();
}

inline void async_wait(int pending) {  // retire all but the `pending` most recent groups
  while ((int)me()->committed.size() > pending) {
    for (const PendingCopy& c : me()->committed.front()) *c.dst = c.valid ? *c.src : 0.f;
    me()->committed.pop_front();
  }
}

inline void end_thread() {
  if (!me()->open_group.empty() || !me()->committed.empty()) errors.fetch_add(1);
  me()->open_group.clear();
  me()->committed.clear();
}

inline Barrier& warp_barrier() { return *block->warps[me()->tid.x / 32]; }

// Runs kernel() for every thread of every block of grid (x, y), one block at a time.
template <class Kernel>
void launch(Dim3 grid, unsigned threads, size_t smem_bytes, Kernel kernel) {
  std::vector<ThreadState> states(threads);
  for (unsigned t = 0; t < threads; ++t) states[t].tid = {t, 0, 0};
#ifndef PROTOKERN_EMU_THREADS
  constexpr size_t kStack = 256 * 1024;
  // fiber stacks kept from launch to launch and never zeroed: a fiber touches only the pages its frames reach
  // (a zeroed vector each launch was most of the system time left once switches made no system call)
  if (stack_pool_bytes < kStack * threads) {
    stack_pool.reset(new char[kStack * threads]);
    stack_pool_bytes = kStack * threads;
  }
  char* const stacks = stack_pool.get();
  std::vector<Context> fibers(threads);
  std::vector<char> done(threads);
  static thread_local Kernel* current;
  current = &kernel;
  std::vector<void*> tsan_fibers(threads);
#if defined(__SANITIZE_THREAD__)
  scheduler_tsan.store(__tsan_get_current_fiber(), std::memory_order_relaxed);
#endif
#endif
  for (unsigned yi = 0; yi < grid.y; ++yi) {
    for (unsigned xi = 0; xi < grid.x; ++xi) {
      const unsigned by = reverse_blocks ? grid.y - 1 - yi : yi, bx = reverse_blocks ? grid.x - 1 - xi : xi;
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
          self_ptr.store(&states[t], std::memory_order_relaxed);
          kernel();
          end_thread();
        });
      }
      for (auto& th : pool) th.join();
#else
      for (unsigned t = 0; t < threads; ++t) {
        make_context(fibers[t], stacks + kStack * t, kStack, +[] {
          tsan_acquire(&scheduler_handover);
          (*current)();
          end_thread();
          tsan_release(&block_end);  // the block is over: what follows it (the next block) sees this
          fiber_returned.store(true, std::memory_order_relaxed);
          yield();  // never resumed: the fiber does not return (under TSan its exit would be recorded on
                    // the scheduler's fiber)
        }, scheduler);
        done[t] = 0;
#if defined(__SANITIZE_THREAD__)
        tsan_fibers[t] = __tsan_create_fiber(0);  // a fresh TSan fiber per CUDA thread and block
#endif
      }
      for (unsigned alive = threads; alive > 0;) {
        for (unsigned t = 0; t < threads; ++t) {
          if (done[t]) continue;
          self_ptr.store(&states[t], std::memory_order_relaxed);
          running_fiber.store(&fibers[t], std::memory_order_relaxed);
          fiber_returned.store(false, std::memory_order_relaxed);
          tsan_release(&scheduler_handover);
          tsan_switch(tsan_fibers[t]);
          switch_context(scheduler, fibers[t]);  // back when fiber t waits at a barrier or ends
          if (fiber_returned.load(std::memory_order_relaxed)) {
            done[t] = 1;
            --alive;
          }
        }
      }
      tsan_acquire(&block_end);
#if defined(__SANITIZE_THREAD__)
      for (void* f : tsan_fibers) __tsan_destroy_fiber(f);
#endif
#endif
    }
  }
}

}  // namespace emu

#define threadIdx (emu::me()->tid)
#define blockIdx emu::block_idx
#define EMU_DYNAMIC_SMEM emu::block->smem

inline void __syncthreads() { emu::block->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier().arrive_and_wait(); }

// __syncthreads_and: a barrier that also returns whether pred holds on every thread of the block (each thread's
// pred in its exchange slot, 2 or 1, between two block barriers; no warp operation can run between them; the
// slots past the block's threads are never written, 0).
inline int __syncthreads_and(int pred) {
  std::vector<uint64_t>& slots = emu::block->exchange;
  slots[threadIdx.x] = pred != 0 ? 2 : 1;
  __syncthreads();
  bool all = true;
  for (uint64_t v : slots) all = all && v != 1;
  __syncthreads();
  return all;
}

// __syncthreads_or: the same with "some thread".
inline int __syncthreads_or(int pred) { return !__syncthreads_and(!pred); }

// Global-memory atomics and fences (the backward's last-block pattern): blocks run one at a time, so a fence
// has nothing to order here (and TSan does not model std::atomic_thread_fence); the atomic is a real one.
inline unsigned atomicAdd(unsigned* address, unsigned val) {
  return std::atomic_ref<unsigned>(*address).fetch_add(val);
}
inline void __threadfence() {}
// Global memory a kernel must write before it reads it back through __ldcg (the backward's partial sums) starts
// as this NaN payload (harness.cpp): reading one is an error (a sum read before its block wrote it).
constexpr uint32_t kUnwrittenBits = 0x7fc0deadu;
inline float __ldcg(const float* address) {
  uint32_t bits;
  std::memcpy(&bits, address, sizeof bits);
  if (bits == kUnwrittenBits) emu::errors.fetch_add(1);
  return *address;
}

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

// __shfl_up_sync: a lane whose source lies outside the warp gets its own value.
template <class T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  const int lane = threadIdx.x % 32;
  return __shfl_sync(mask, value, lane >= (int)delta ? lane - (int)delta : lane);
}

inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz((unsigned)x) + 1; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// atomicMin on a 64-bit word (shared memory in the kernels): a real atomic, so that ThreadSanitizer sees
// concurrent updates as synchronised.
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long val) {
  std::atomic_ref<unsigned long long> a(*address);
  unsigned long long old = a.load();
  while (val < old && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}

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
// (their low 13 bits ignored), the exact products summed in double (exact unless the terms span more than
// ~29 binades), the result truncated toward zero into fp32 (within the accumulation model of forward.cuh's
// bound); PROTOKERN_EMU_HMMA_TRUNCATE builds truncate every term first (below), the pessimistic model that
// check.py also certifies against.
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
#if defined(PROTOKERN_EMU_HMMA_TRUNCATE)
    // The pessimistic accumulation model (PROTOKERN_EMU_HMMA_TRUNCATE builds): c and the 8 exact products
    // aligned to the largest one's exponent and each truncated there to 24 significant bits before the sum
    // (published measurements of tensor cores find alignment to the largest exponent and truncation; this
    // keeps no extra bits); then truncated into fp32 below.
    if (std::isfinite(sum)) {
      double terms[9] = {c[q]}, big = std::fabs(static_cast<double>(c[q]));
      for (int k = 0; k < 8; ++k) big = std::fmax(big, std::fabs(terms[k + 1] = A(row, k) * B(k, col)));
      int e = 0;
      std::frexp(big, &e);  // big = m 2^e, 0.5 <= m < 1 (big = 0: every term is 0)
      const double quantum = std::ldexp(1.0, e - 24);
      sum = 0.0;
      for (double term : terms) sum += std::trunc(term / quantum) * quantum;  // exact: < 2^28 quanta in all
    }
#endif
    float f = static_cast<float>(sum);
    if (std::isfinite(f) && std::fabs(static_cast<double>(f)) > std::fabs(sum)) f = std::nextafter(f, 0.f);
    c[q] = f;
  }
  warp_barrier().arrive_and_wait();
}

}  // namespace emu
