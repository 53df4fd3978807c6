// Backward kernels of the fused prototype-distance op: grad_p and grad_z at the winning patches, in
// the difference form 2 g (z - p) with g = dL/dd = grad_min + grad_sim (1/(d+1) - 1/(d+eps)).
//
// grad_p_kernel    one warp per (prototype, 32 channels), summing over b in order.
// grad_z_kernel    one block per (b, 32 channels), z tile in shared memory; each warp scans a fixed
//                  range of prototypes in increasing order into its own shared accumulators, which
//                  are summed in warp order.
// No float atomics anywhere: the backward is bitwise deterministic.

#pragma once

#include "common.cuh"

namespace protokern {
namespace {

// dL/dd for one (b, m): grad_min + grad_sim * d/dd log((d+1)/(d+eps)).
__device__ __forceinline__ float grad_coef(float g_sim, float g_min, float d, float eps) {
  return g_min + g_sim * ((eps - 1.f) / ((d + 1.f) * (d + eps)));
}

__device__ __forceinline__ int clamp_index(int64_t k, int HW) {
  // Indices come from our forward; clamping only guards memory safety against bad input.
  return k < 0 ? 0 : (k >= HW ? HW - 1 : (int)k);
}

constexpr int kGpM = 8;   // prototypes per grad_p block, one warp each
constexpr int kGpB = 32;  // batch items whose coefficients are staged at a time (kGpM * kGpB threads)

// grad_p[m, d] = sum_b 2 g[b, m] (p[m, d] - z[b, d, k_bm]). Block (x, y) covers prototypes 8x..8x+7
// (one warp each) and channels 32y..32y+31 (one lane each); b is summed in increasing order. The
// (b, m) coefficients of 32 batch items at a time are staged in shared memory (one coalesced load
// per thread), then the 32 gathered z values of each lane are loaded at once.
__global__ void __launch_bounds__(kGpM * 32) grad_p_kernel(const BackwardParams prm) {
  static_assert(kGpB == 32, "one staged coefficient per thread (kGpM * 32 threads)");
  __shared__ float g_s[kGpM][kGpB + 1];
  __shared__ int k_s[kGpM][kGpB + 1];
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int B = prm.B, D = prm.D, HW = prm.HW, M = prm.M;
  const int m0 = blockIdx.x * kGpM;
  const int m = m0 + w;
  const int d = blockIdx.y * 32 + lane;
  const bool ok = m < M && d < D;
  const float* __restrict__ z = prm.z;

  const float pv = ok ? prm.p[(int64_t)m * D + d] : 0.f;
  float acc = 0.f;
  for (int b0 = 0; b0 < B; b0 += kGpB) {
    {
      const int bl = tid / kGpM, ml = tid % kGpM;
      const int b = b0 + bl, mm = m0 + ml;
      float g = 0.f;
      int k = 0;
      if (b < B && mm < M) {
        const int64_t o = (int64_t)b * M + mm;
        k = clamp_index(prm.patch_index[o], HW);
        g = grad_coef(prm.grad_similarity[o], prm.grad_min_distances[o], prm.min_distances[o],
                      prm.eps);
      }
      g_s[ml][bl] = g;
      k_s[ml][bl] = k;
    }
    __syncthreads();
    const int nb = min(kGpB, B - b0);
    if (ok) {
      float zv[kGpB];
#pragma unroll
      for (int j = 0; j < kGpB; ++j) {
        zv[j] = j < nb ? z[(int64_t)(b0 + j) * prm.z_sb + (int64_t)k_s[w][j] * prm.z_sk + d] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kGpB; ++j) {
        if (j < nb) acc = fmaf(g_s[w][j], pv - zv[j], acc);
      }
    }
    __syncthreads();
  }
  if (ok) prm.grad_p[(int64_t)m * D + d] = 2.f * acc;
}

constexpr int kGzWarps = 8;     // warps per grad_z block, each owning a range of prototypes
constexpr int kGzMinBlocks = 3;  // resident grad_z blocks per SM the registers must allow
constexpr int kGzMaxKT = 64;    // patches per pass (shared accumulators per warp: KT x 33)
constexpr int kAccStride = 33;  // padded row: conflict-free for both access patterns below

// grad_z[b, d, k] = sum_{m : k_bm == k} 2 g[b, m] (z[b, d, k] - p[m, d]), written for every (d, k)
// (zeros where no prototype wins). Block = (b, 32 channels); patches in passes of KT, whose z tile
// is staged in shared memory. Each warp scans a fixed range of prototypes in increasing order, 32 at
// a time: the next 32's patches and coefficients are loaded while this 32's p rows (all issued at
// once) are added into the warp's own shared accumulators; the warps' accumulators are then summed
// in warp order. The work is a chain of dependent loads, so the point is to keep many in flight.
__global__ void __launch_bounds__(kGzWarps * 32, kGzMinBlocks) grad_z_kernel(const BackwardParams prm, int KT,
                                                                  int seg) {
  // [kGzWarps][KT][kAccStride] accumulators, then the z tile [KT][kAccStride]
  PK_DYNAMIC_SMEM(acc_s);
  const int lane = threadIdx.x & 31;
  const int w = threadIdx.x >> 5;
  const int b = blockIdx.x;
  const int d0 = blockIdx.y * 32;
  const int d = d0 + lane;
  const int M = prm.M, D = prm.D, HW = prm.HW;
  const bool d_ok = d < D;
  const float* __restrict__ zb = prm.z + b * prm.z_sb;
  const float* __restrict__ p = prm.p;
  float* const mine = acc_s + w * KT * kAccStride;
  float* const z_s = acc_s + kGzWarps * KT * kAccStride;
  const int m_begin = w * seg;
  const int m_end = min(M, m_begin + seg);

  // Raw inputs of the 32 prototypes c0.. of this warp (lane = one prototype); loads only, no use,
  // so that they are in flight while the previous chunk is processed.
  struct Chunk {
    int64_t k;
    float gs, gm, dist;
  };
  auto fetch = [&](int c0) {
    Chunk c{0, 0.f, 0.f, 0.f};
    const int m = c0 + lane;
    if (m < m_end) {
      const int64_t o = (int64_t)b * M + m;
      c = {prm.patch_index[o], prm.grad_similarity[o], prm.grad_min_distances[o],
           prm.min_distances[o]};
    }
    return c;
  };

  for (int k0 = 0; k0 < HW; k0 += KT) {
    const int kt = min(KT, HW - k0);
    for (int i = lane; i < KT * kAccStride; i += 32) mine[i] = 0.f;
    for (int e = threadIdx.x; e < 32 * KT; e += kGzWarps * 32) {  // rows z[b, d0.., k0 + kl]
      const int kl = e >> 5, dl = e & 31;
      z_s[kl * kAccStride + dl] =
          (kl < kt && d0 + dl < D) ? zb[(int64_t)(k0 + kl) * prm.z_sk + d0 + dl] : 0.f;
    }
    __syncthreads();

    Chunk next = fetch(m_begin);
    for (int c0 = m_begin; c0 < m_end; c0 += 32) {
      const Chunk cur = next;
      if (c0 + 32 < m_end) next = fetch(c0 + 32);
      // This lane's prototype's winning patch, local to the pass (-1: not in it), and dL/dd.
      const int k = c0 + lane < m_end ? clamp_index(cur.k, HW) : -1;
      const int kl = (k >= k0 && k < k0 + KT) ? k - k0 : -1;
      const float g = kl >= 0 ? grad_coef(cur.gs, cur.gm, cur.dist, prm.eps) : 0.f;
      const unsigned in_pass = __ballot_sync(kFullMask, kl >= 0);
      if (in_pass == 0) continue;
      float pv[32];
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        pv[j] = (d_ok && ((in_pass >> j) & 1u)) ? p[(int64_t)(c0 + j) * D + d] : 0.f;
      }
      // Prototypes c0 + j in increasing order.
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        if ((in_pass >> j) & 1u) {  // warp-uniform
          const int kj = __shfl_sync(kFullMask, kl, j);
          const float gj = __shfl_sync(kFullMask, g, j);
          float* const a = mine + kj * kAccStride + lane;
          *a = fmaf(gj, z_s[kj * kAccStride + lane] - pv[j], *a);
        }
      }
    }
    __syncthreads();
    // Sum the warps' accumulators in warp order; consecutive threads write consecutive patches.
    for (int e = threadIdx.x; e < 32 * KT; e += kGzWarps * 32) {
      const int dl = e / KT;
      const int kl = e - dl * KT;
      if (kl < kt && d0 + dl < D) {
        float s = 0.f;
#pragma unroll
        for (int ww = 0; ww < kGzWarps; ++ww) s += acc_s[(ww * KT + kl) * kAccStride + dl];
        prm.grad_z[((int64_t)b * D + d0 + dl) * HW + k0 + kl] = 2.f * s;
      }
    }
    __syncthreads();
  }
}

inline Launch grad_p_launch(const BackwardParams& prm) {
  return {(unsigned)((prm.M + kGpM - 1) / kGpM), (unsigned)((prm.D + 31) / 32), kGpM * 32, 0};
}

struct GradZLaunch : Launch {
  int KT;   // patches per pass
  int seg;  // prototypes per warp (a multiple of 32)
};

inline GradZLaunch grad_z_launch(const BackwardParams& prm) {
  GradZLaunch l;
  l.KT = prm.HW < kGzMaxKT ? prm.HW : kGzMaxKT;
  l.seg = ((prm.M + kGzWarps - 1) / kGzWarps + 31) / 32 * 32;
  l.grid_x = prm.B;
  l.grid_y = (prm.D + 31) / 32;
  l.threads = kGzWarps * 32;
  l.smem = sizeof(float) * (kGzWarps + 1) * l.KT * kAccStride;
  return l;
}

// grad_z's largest dynamic shared memory (KT = kGzMaxKT): 76 KB.
constexpr size_t kGzMaxSmem = sizeof(float) * (kGzWarps + 1) * kGzMaxKT * kAccStride;


}  // namespace
}  // namespace protokern
