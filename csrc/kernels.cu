// CUDA kernels of the fused prototype-distance op (see docs/design.md).
//
// forward_kernel   one block per (128 prototypes, batch item b): a tiled GEMM-like loop (p and z
//                  tiles of 32 channels double-buffered in shared memory with cp.async) finds, for
//                  each prototype, the patch minimising |z_k|^2 - 2 z_k.p (|p|^2 is constant per
//                  prototype), ties to the lowest patch, NaN sticky; then it recomputes the winner's
//                  distance exactly as sum_d (z - p)^2. The B*M*HW distance map never leaves
//                  registers. The search's products are exact fp32 FFMA (FfmaSearch, "highest") or
//                  tensor-core MMA (MmaSearch: 3xTF32 "high", TF32 "medium"; sm_80+).
// grad_p_kernel    one warp per (prototype, 32 channels), summing over b in order.
// grad_z_kernel    one block per (b, 32 channels), z tile in shared memory; each warp scans a fixed
//                  range of prototypes in increasing order into its own shared accumulators, which
//                  are summed in warp order.
// No float atomics anywhere: the backward is bitwise deterministic.
//
// CPU check without a GPU: python csrc/emu/check.py (runs this file's kernels on csrc/emu).

#include "kernels.h"

#include <c10/cuda/CUDAException.h>

#include <atomic>
#include <cmath>
#include <cstdint>

namespace protokern {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // forward block size (8 warps)
constexpr int kBM = 128;       // prototypes per block
constexpr int kBK = 64;        // patches per tile
constexpr int kDC = 32;        // channels per shared-memory stage
constexpr int kPLoads = kDC * kBM / kThreads;  // p elements staged per thread per stage
constexpr int kZLoads = kDC * kBK / kThreads;  // z elements staged per thread per stage
// The exact recompute stages 128-column tiles at this row stride (4 mod 32, 16-byte rows).
constexpr int kRecomputeStride = kBM + 4;
static_assert(kThreads == 256 && kBM == 128 && kBK == 64, "thread layouts below assume these");
static_assert(8 % (kDC / 8) == 0 && 8 % (kBK / 32) == 0 && 8 % (kBM / 32) == 0, "tile_map");

// Dynamic shared memory (floats) of a search with shared tiles of row strides Ps (p: channel rows of
// kBM prototypes) and Zs (z: channel rows of kBK patches): two pipeline stages of {p tile, z tile},
// then |z|^2 of the current patch tile, the winning patch and NaN flag of each prototype.
template <int Ps, int Zs>
struct Layout {
  static constexpr int kPs = Ps, kZs = Zs;
  static constexpr int kStage = kDC * (Ps + Zs);
  static constexpr int kZnOffset = 2 * kStage;
  static constexpr int kWinOffset = kZnOffset + kBK;
  static constexpr size_t kBytes = sizeof(float) * (kWinOffset + 2 * kBM);
  static_assert(Ps % 4 == 0 && Zs % 4 == 0, "rows must stay 16-byte aligned");
  static_assert(2 * 16 * kBM <= kStage, "per-thread minima must fit in one stage");
  static_assert(kDC * kRecomputeStride <= kStage, "recompute tiles must fit in one stage each");
};

// This thread's share of a cooperative kDC x C tile copy by kThreads threads: its i-th element
// (0 <= i < kDC * C / kThreads) is (channel dd0 + i * ddi, column cc0 + i * cci) of the tile.
// d_fast: each warp covers 8 consecutive channels x 4 columns (global reads in 32-byte runs when
// stride_d == 1; conflict-free stores at a row stride of 4 mod 32). Otherwise each warp covers 32
// consecutive columns of one channel (coalesced when the column stride is 1; conflict-free).
struct TileMap {
  int dd0, cc0, ddi, cci;
};

template <int C>
__device__ __forceinline__ TileMap tile_map(int tid, bool d_fast) {
  const int lane = tid & 31, w = tid >> 5;  // element tid + 256 i lies in warp-group w + 8 i
  if (d_fast) {
    constexpr int g = kDC / 8;
    return {(lane & 7) + 8 * (w % g), (lane >> 3) + 4 * (w / g), 0, 32 / g};
  }
  constexpr int g = C / 32;
  return {w / g, lane + 32 * (w % g), 8 / g, 0};
}

// 4-byte global -> shared copy, asynchronous on sm_80+ (zero-filled when !valid).
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
#else
  *dst = valid ? *src : 0.f;
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>  // wait until at most N committed groups are pending
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Candidate (v, k) beats the incumbent (bv, bk)? NaN beats everything (so NaN propagates), then
// smaller value, then lower patch index. A total order: any reduction order gives the same winner.
__device__ __forceinline__ bool better(float v, int k, float bv, int bk) {
  if (isnan(bv)) return isnan(v) && k < bk;
  if (isnan(v)) return true;
  return v < bv || (v == bv && k < bk);
}

// ---- Tensor-core helpers (sm_80+): TF32 m16n8k8 MMA ---------------------------------------------

// x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero), as the bits of a float.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  if (isnan(x)) return 0x7fffe000u;
  return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
#endif
}

// c += a b for one warp: a is 16x8 (row-major), b is 8x8 (column-major), TF32 in, fp32 accumulate.
// Fragments (g = lane / 4, t = lane % 4): a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]},
// b = {B[t][g], B[t+4][g]}, c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(PROTOKERN_EMU)
  emu::mma_tf32(c, a, b);
#endif  // other archs: never launched (the host picks the fp32 search below sm_80)
}

// ---- Searches ------------------------------------------------------------------------------------
// A search accumulates s[m, k] = sum_d p[m, d] z[d, k] over a block's 128 prototypes x 64 patches,
// one kDC-channel stage at a time (step), folds |z_k|^2 - 2 s[m, k] of a finished patch tile into its
// running (minimum, patch) per prototype (fold), and finally publishes those minima, kEntries per
// prototype, for the block-wide reduction (publish).

// Exact fp32 products (FFMA). Thread (tx, ty) holds prototypes 4tx..4tx+3, 64+4tx..64+4tx+3 and
// patches 4ty..4ty+3 of the tile. Row strides 4 (mod 32) make the 8x4 tile_map stores conflict-free.
struct FfmaSearch : Layout<kBM + 4, kBK + 4> {
  static constexpr int kEntries = kThreads / 16;
  static constexpr int kMinBlocks = 2;  // resident blocks per SM the registers must allow
  float acc[8][4];
  float best[8];
  int best_k[8];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      best[i] = INFINITY;
      best_k[i] = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
  }

  __device__ __forceinline__ void step(const float* ps, const float* zs, int tid, int k0, int HW) {
    const int tx = tid & 15, ty = tid >> 4;
    // Warp w holds patches 8w..8w+7 of the tile; a warp with only padding (e.g. 56..63 of HW = 49)
    // skips the math and leaves its issue slots to the others.
    if (k0 + 8 * (tid >> 5) >= HW) return;
#pragma unroll
    for (int dd = 0; dd < kDC; ++dd) {
      const float4 a0 = *reinterpret_cast<const float4*>(&ps[dd * kPs + 4 * tx]);
      const float4 a1 = *reinterpret_cast<const float4*>(&ps[dd * kPs + 64 + 4 * tx]);
      const float4 zz = *reinterpret_cast<const float4*>(&zs[dd * kZs + 4 * ty]);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float c[4] = {zz.x, zz.y, zz.z, zz.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
      }
    }
  }

  __device__ __forceinline__ void fold(const float* zn_s, int tid, int k0, int HW) {
    const int ty = tid >> 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k0 + 4 * ty + j;
      if (k < HW) {
        const float znk = zn_s[4 * ty + j];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float v = fmaf(-2.f, acc[i][j], znk);
          if (better(v, k, best[i], best_k[i])) {
            best[i] = v;
            best_k[i] = k;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
  }

  __device__ __forceinline__ void publish(float* red_v, int* red_k, int tid) const {
    const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int ml = (i < 4) ? 4 * tx + i : 64 + 4 * tx + (i - 4);
      red_v[ty * kBM + ml] = best[i];
      red_k[ty * kBM + ml] = best_k[i];
    }
  }
};

// Tensor cores: TF32 products (kSplit = false) or 3xTF32 (kSplit = true: x = hi + lo with both
// parts TF32, and a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi, close to fp32 accuracy). Warp w owns
// prototypes 32 (w % 4).. + 31 (two m16 tiles) and patches 32 (w / 4).. + 31 (four n8 tiles) of the
// block tile. Row strides 8 (mod 32) make the fragment loads conflict-free.
template <bool kSplit>
struct MmaSearch : Layout<kBM + 8, kBK + 8> {
  static constexpr int kEntries = 8;  // per prototype: 2 warps along patches x 4 lanes of a quad
  static constexpr int kMinBlocks = 3;  // resident blocks per SM the registers must allow
  float acc[2][4][4];                 // [m16 tile][n8 tile][fragment]
  float best[4];                      // rows g, g + 8 of m16 tile 0, then of tile 1
  int best_k[4];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      best[r] = INFINITY;
      best_k[r] = 0x7fffffff;
    }
    clear();
  }

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
      }
    }
  }

  __device__ __forceinline__ static void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = to_tf32(x);
    lo = kSplit ? to_tf32(x - __uint_as_float(hi)) : 0u;
  }

  __device__ __forceinline__ void step(const float* ps, const float* zs, int tid, int k0, int HW) {
    const int lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
    const int mb = 32 * (w & 3), nb = 32 * (w >> 2);
    const int n_tiles = min(4, max(0, (HW - k0 - nb + 7) / 8));  // n8 tiles holding real patches
    if (n_tiles == 0) return;                                     // warp-uniform
#pragma unroll
    for (int kk = 0; kk < kDC; kk += 8) {
      uint32_t a_hi[2][4], a_lo[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float* const col = ps + (kk + t) * kPs + mb + 16 * i + g;
        split(col[0], a_hi[i][0], a_lo[i][0]);
        split(col[8], a_hi[i][1], a_lo[i][1]);
        split(col[4 * kPs], a_hi[i][2], a_lo[i][2]);
        split(col[4 * kPs + 8], a_hi[i][3], a_lo[i][3]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j < n_tiles) {
          const float* const row = zs + (kk + t) * kZs + nb + 8 * j + g;
          uint32_t b_hi[2], b_lo[2];
          split(row[0], b_hi[0], b_lo[0]);
          split(row[4 * kZs], b_hi[1], b_lo[1]);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (kSplit) {  // small terms first
              mma_tf32(acc[i][j], a_lo[i], b_hi);
              mma_tf32(acc[i][j], a_hi[i], b_lo);
            }
            mma_tf32(acc[i][j], a_hi[i], b_hi);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void fold(const float* zn_s, int tid, int k0, int HW) {
    const int lane = tid & 31, w = tid >> 5, t = lane & 3;
    const int nb = 32 * (w >> 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int kl = nb + 8 * j + 2 * t + c;
        if (k0 + kl < HW) {
          const float znk = zn_s[kl];
#pragma unroll
          for (int r = 0; r < 4; ++r) {  // r = 2 i + h: m16 tile i, row g + 8 h
            const float v = fmaf(-2.f, acc[r >> 1][j][2 * (r & 1) + c], znk);
            if (better(v, k0 + kl, best[r], best_k[r])) {
              best[r] = v;
              best_k[r] = k0 + kl;
            }
          }
        }
      }
    }
    clear();
  }

  __device__ __forceinline__ void publish(float* red_v, int* red_k, int tid) const {
    const int lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
    const int e = 4 * (w >> 2) + t;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int ml = 32 * (w & 3) + 16 * (r >> 1) + 8 * (r & 1) + g;
      red_v[e * kBM + ml] = best[r];
      red_k[e * kBM + ml] = best_k[r];
    }
  }
};

// Grid (ceil(M / kBM), B), kThreads threads, Search::kBytes of dynamic shared memory. For each of
// the block's prototypes: the patch minimising |z_k|^2 - 2 z_k.p (|p|^2 is constant per prototype)
// by `Search`, ties to the lowest patch, NaN sticky; then the winner's distance recomputed exactly
// as sum_d (z - p)^2 in fp32, whatever the search precision.
template <bool z_dfast, class Search>  // z_dfast: is z's channel stride the smaller one?
__global__ void __launch_bounds__(kThreads, Search::kMinBlocks) forward_kernel(const ForwardParams prm) {
  extern __shared__ __align__(16) float smem[];
  constexpr int kPs = Search::kPs, kZs = Search::kZs, kStage = Search::kStage;
  float* const zn_s = smem + Search::kZnOffset;
  int* const win_k = reinterpret_cast<int*>(smem + Search::kWinOffset);
  int* const win_nan = win_k + kBM;

  const int tid = threadIdx.x;
  const int b = blockIdx.y;
  const int m0 = blockIdx.x * kBM;
  const int D = prm.D, HW = prm.HW, M = prm.M;
  const float* __restrict__ zb = prm.z + b * prm.z_sb;
  const float* __restrict__ p = prm.p;
  const int64_t sd = prm.z_sd, sk = prm.z_sk;

  const TileMap pmap = tile_map<kBM>(tid, true);
  const TileMap zmap = tile_map<kBK>(tid, z_dfast);
  const int n_d = (D + kDC - 1) / kDC;
  const int n_iter = n_d * ((HW + kBK - 1) / kBK);  // flat loop over (patch tile, channel stage)

  // Start the copy of stage `it` (patch tile it / n_d, channels (it % n_d) * kDC...) into `buf`.
  auto issue = [&](int it, int buf) {
    float* const ps = smem + buf * kStage;
    float* const zs = ps + kDC * kPs;
    const int k0 = (it / n_d) * kBK;
    const int d0 = (it % n_d) * kDC;
    {
      const int d = d0 + pmap.dd0;
      const float* src = p + (int64_t)(m0 + pmap.cc0) * D + d;
#pragma unroll
      for (int i = 0; i < kPLoads; ++i) {
        const int cc = pmap.cc0 + i * pmap.cci;
        const bool ok = d < D && m0 + cc < M;
        copy_async(&ps[pmap.dd0 * kPs + cc], ok ? src + (int64_t)i * pmap.cci * D : p, ok);
      }
    }
    {
      const float* src = zb + (d0 + zmap.dd0) * sd + (k0 + zmap.cc0) * sk;
      const int64_t step = zmap.ddi * sd + zmap.cci * sk;
#pragma unroll
      for (int i = 0; i < kZLoads; ++i) {
        const int dd = zmap.dd0 + i * zmap.ddi, cc = zmap.cc0 + i * zmap.cci;
        const bool ok = d0 + dd < D && k0 + cc < HW;
        copy_async(&zs[dd * kZs + cc], ok ? src + i * step : zb, ok);
      }
    }
    async_commit();
  };

  Search search;
  search.init();
  float zn = 0.f;  // |z_k|^2 of patch k0 + tid (threads tid < kBK), accumulated in channel order

  issue(0, 0);
  for (int it = 0; it < n_iter; ++it) {
    if (it + 1 < n_iter) {
      issue(it + 1, (it + 1) & 1);  // overlaps the math below
      async_wait<1>();
    } else {
      async_wait<0>();
    }
    __syncthreads();
    const float* const ps = smem + (it & 1) * kStage;
    const float* const zs = ps + kDC * kPs;
    const int k0 = (it / n_d) * kBK;
    search.step(ps, zs, tid, k0, HW);
    if (tid < kBK) {
#pragma unroll 8
      for (int dd = 0; dd < kDC; ++dd) {
        const float v = zs[dd * kZs + tid];
        zn = fmaf(v, v, zn);
      }
    }

    if (it % n_d == n_d - 1) {  // last stage of this patch tile: fold it into the running minima
      if (tid < kBK) {
        zn_s[tid] = zn;
        zn = 0.f;
      }
      __syncthreads();
      search.fold(zn_s, tid, k0, HW);
    }
    __syncthreads();  // this buffer is refilled by the next iteration's issue()
  }

  // Reduce the Search::kEntries partial minima of each prototype, in order, with the same tie-break.
  float* const red_v = smem;
  int* const red_k = reinterpret_cast<int*>(smem + Search::kEntries * kBM);
  search.publish(red_v, red_k, tid);
  __syncthreads();
  if (tid < kBM) {
    float bv = red_v[tid];
    int bk = red_k[tid];
    for (int e = 1; e < Search::kEntries; ++e) {
      const float v = red_v[e * kBM + tid];
      const int k = red_k[e * kBM + tid];
      if (better(v, k, bv, bk)) {
        bv = v;
        bk = k;
      }
    }
    win_k[tid] = (bk >= 0 && bk < HW) ? bk : 0;
    win_nan[tid] = isnan(bv);
  }
  __syncthreads();

  // Exact distance at the winning patch: sum_d (z - p)^2 in fp32, channels in order.
  constexpr int kRs = kRecomputeStride;
  float* const pw = smem;
  float* const zw = smem + kStage;
  const TileMap wmap = tile_map<kBM>(tid, z_dfast);
  float dist = 0.f;
  for (int d0 = 0; d0 < D; d0 += kDC) {
#pragma unroll
    for (int i = 0; i < kPLoads; ++i) {
      const int dd = pmap.dd0, cc = pmap.cc0 + i * pmap.cci;
      const int m = m0 + cc, d = d0 + dd;
      pw[dd * kRs + cc] = (m < M && d < D) ? p[(int64_t)m * D + d] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kPLoads; ++i) {
      const int dd = wmap.dd0 + i * wmap.ddi, cc = wmap.cc0 + i * wmap.cci;
      const int d = d0 + dd;
      zw[dd * kRs + cc] = (m0 + cc < M && d < D) ? zb[d * sd + win_k[cc] * sk] : 0.f;
    }
    __syncthreads();
    if (tid < kBM) {
#pragma unroll 8
      for (int dd = 0; dd < kDC; ++dd) {
        const float diff = zw[dd * kRs + tid] - pw[dd * kRs + tid];
        dist = fmaf(diff, diff, dist);
      }
    }
    __syncthreads();
  }

  const int m = m0 + tid;
  if (tid < kBM && m < M) {
    const float d = win_nan[tid] ? NAN : fmaxf(dist, 0.f);
    const int64_t o = (int64_t)b * M + m;
    prm.min_distances[o] = d;
    prm.similarity[o] = logf((d + 1.f) / (d + prm.eps));
    prm.patch_index[o] = win_k[tid];
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

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
constexpr int kGzMaxKT = 64;    // patches per pass (shared accumulators per warp: KT x 33)
constexpr int kAccStride = 33;  // padded row: conflict-free for both access patterns below

// grad_z[b, d, k] = sum_{m : k_bm == k} 2 g[b, m] (z[b, d, k] - p[m, d]), written for every (d, k)
// (zeros where no prototype wins). Block = (b, 32 channels); patches in passes of KT, whose z tile
// is staged in shared memory. Each warp scans a fixed range of prototypes in increasing order, 32 at
// a time: the next 32's patches and coefficients are loaded while this 32's p rows (all issued at
// once) are added into the warp's own shared accumulators; the warps' accumulators are then summed
// in warp order. The work is a chain of dependent loads, so the point is to keep many in flight.
__global__ void __launch_bounds__(kGzWarps * 32, 3) grad_z_kernel(const BackwardParams prm, int KT,
                                                                  int seg) {
  // [kGzWarps][KT][kAccStride] accumulators, then the z tile [KT][kAccStride]
  extern __shared__ __align__(16) float acc_s[];
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

// Launch shapes, shared by the launchers below and the CPU emulator (csrc/emu).
struct Launch {
  unsigned grid_x, grid_y, threads;
  size_t smem;  // dynamic shared memory, bytes
};

// Calls f(kernel, smem_bytes, variant) with the forward kernel for prm's z layout and search
// precision; variant (0..5) names the instantiation. Without tensor cores (below sm_80) every
// precision runs the fp32 search.
template <class F>
void with_forward_kernel(const ForwardParams& prm, bool tensor_cores, F&& f) {
  const bool dfast = prm.z_sd <= prm.z_sk;
  const int search = tensor_cores ? prm.precision : kSearchFp32;
  const int variant = 3 * dfast + search;
  if (search == kSearch3xTf32) {
    using S = MmaSearch<true>;
    dfast ? f(forward_kernel<true, S>, S::kBytes, variant) : f(forward_kernel<false, S>, S::kBytes, variant);
  } else if (search == kSearchTf32) {
    using S = MmaSearch<false>;
    dfast ? f(forward_kernel<true, S>, S::kBytes, variant) : f(forward_kernel<false, S>, S::kBytes, variant);
  } else {
    using S = FfmaSearch;
    dfast ? f(forward_kernel<true, S>, S::kBytes, variant) : f(forward_kernel<false, S>, S::kBytes, variant);
  }
}

inline Launch forward_launch(const ForwardParams& prm) {
  return {(unsigned)((prm.M + kBM - 1) / kBM), (unsigned)prm.B, kThreads, 0};
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
  l.smem = sizeof(float) * (kGzWarps + 1) * l.KT * kAccStride;  // <= 76 KB
  return l;
}

}  // namespace

// ==== Host launchers (the CPU emulator compiles everything above this line) ====

namespace {

// Raise `kernel`'s dynamic shared-memory limit to `bytes` once per device (`done` caches it).
template <class Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  done.fetch_or(bit, std::memory_order_relaxed);
}

std::atomic<uint64_t> forward_ready[6], grad_z_ready{0};

// Tensor cores (sm_80+) on the current device? Cached per device.
bool has_tensor_cores() {
  static std::atomic<int> cache[64];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && cache[device].load(std::memory_order_relaxed) != 0)
    return cache[device].load(std::memory_order_relaxed) == 2;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (device < 64) cache[device].store(major >= 8 ? 2 : 1, std::memory_order_relaxed);
  return major >= 8;
}

}  // namespace

void launch_forward(const ForwardParams& prm, cudaStream_t stream) {
  if (prm.B == 0 || prm.M == 0) return;
  const Launch l = forward_launch(prm);
  with_forward_kernel(prm, has_tensor_cores(), [&](auto kernel, size_t smem, int variant) {
    allow_dynamic_smem(kernel, smem, forward_ready[variant]);
    kernel<<<dim3(l.grid_x, l.grid_y), l.threads, smem, stream>>>(prm);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_backward(const BackwardParams& prm, cudaStream_t stream) {
  if (prm.B == 0 || prm.M == 0) return;  // the caller fills zeros
  const Launch lp = grad_p_launch(prm);
  grad_p_kernel<<<dim3(lp.grid_x, lp.grid_y), lp.threads, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const GradZLaunch lz = grad_z_launch(prm);
  allow_dynamic_smem(grad_z_kernel, sizeof(float) * (kGzWarps + 1) * kGzMaxKT * kAccStride, grad_z_ready);
  grad_z_kernel<<<dim3(lz.grid_x, lz.grid_y), lz.threads, lz.smem, stream>>>(prm, lz.KT, lz.seg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace protokern
