// Device helpers shared by the forward (forward.cuh) and backward (backward.cuh) kernels: cp.async
// staging (4- and 16-byte), the TF32 tensor-core MMA, the tie-break order (rank_key), dynamic
// shared memory. Every helper has a CPU-emulator branch (PROTOKERN_EMU, csrc/emu/emulator.h), so
// the emulator compiles these very headers.
#pragma once

#include <cmath>
#include <cstdint>

#include "params.h"

#ifdef PROTOKERN_EMU
// The emulator hands each block its dynamic shared memory (poisoned with NaN) through a pointer.
#define PK_DYNAMIC_SMEM(name) float* const name = EMU_DYNAMIC_SMEM
#else
#define PK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) float name[]
#endif

namespace protokern {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Launch shape of a kernel, shared by the host launchers and the CPU emulator.
struct Launch {
  unsigned grid_x, grid_y, threads;
  size_t smem;  // dynamic shared memory, bytes
};

// 4-byte global -> shared copy, asynchronous on sm_80+ (zero-filled when !valid). The data is only
// guaranteed in place after async_wait (and visible to other threads after a __syncthreads); the
// emulator lands it exactly then, and poisons the destination at issue.
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool valid) {
#if defined(PROTOKERN_EMU)
  emu::copy_async(dst, src, valid);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
#else
  *dst = valid ? *src : 0.f;
#endif
}

// 16-byte global -> shared copy of 4 floats: the first n (0..4) from src, the rest zero-filled; dst and
// src must be 16-byte aligned (the emulator counts a misaligned one as an error). Asynchronous on sm_80+
// (cp.async.cg: L2 only, no L1 allocation), with the same protocol as copy_async.
__device__ __forceinline__ void copy_async16(float* dst, const float* src, int n) {
#if defined(PROTOKERN_EMU)
  emu::copy_async16(dst, src, n);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(4 * n) : "memory");
#else
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = i < n ? src[i] : 0.f;
#endif
}

// copy_async16 of a whole chunk or none (n = 4 or 0, known so at the call): the copy's size is then a select of
// 16 or 0 that ptxas turns into the instruction's zero-fill predicate (as in copy_async), where a run-time n
// costs about 5 instructions of address arithmetic per copy.
__device__ __forceinline__ void copy_async16_whole(float* dst, const float* src, bool valid) {
  copy_async16(dst, src, valid ? 4 : 0);
}

__device__ __forceinline__ void async_commit() {
#if defined(PROTOKERN_EMU)
  emu::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>  // wait until at most N committed groups of this thread are pending
__device__ __forceinline__ void async_wait() {
#if defined(PROTOKERN_EMU)
  emu::async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The winner's order as one unsigned 64-bit key, smaller = better: NaN first (so NaN propagates, lowest
// NaN index first), then smaller value, then lower index k. For v >= +0, +inf or NaN (sums of squares: the
// rescoring's values) the bits of v order like v, so key = (NaN ? 0 : bits(v) + 1) << 32 | k. A total
// order: any reduction order gives the same winner. key_value inverts it (any NaN comes back as NAN).
__device__ __forceinline__ uint64_t rank_key(float v, uint32_t k) {
  const uint32_t hi = isnan(v) ? 0u : __float_as_uint(v) + 1u;
  return (uint64_t)hi << 32 | k;
}

__device__ __forceinline__ float key_value(uint64_t key) {
  const uint32_t hi = (uint32_t)(key >> 32);
  return hi == 0 ? NAN : __uint_as_float(hi - 1u);
}

// ---- Tensor-core helpers (sm_80+): TF32 m16n8k8 MMA ---------------------------------------------

// c += a b for one warp: a is 16x8 (row-major), b is 8x8 (column-major), TF32 in, fp32 accumulate.
// Fragments (g = lane / 4, t = lane % 4): a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]},
// b = {B[t][g], B[t+4][g]}, c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
// Compiled for an arch below sm_80 it traps: the host never launches an MMA search from such a build
// (it asks the kernel's PTX version, not the device's capability).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(PROTOKERN_EMU)
  emu::mma_tf32(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace
}  // namespace protokern
