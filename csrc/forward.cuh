// Forward kernel of the fused prototype-distance op (contract: docs/design.md, issue 9 "Contract").
//
// One block per (128 prototypes, a run of ipb images). For every image and patch tile of 64 patches:
//   1. search: a tiled GEMM-like loop (p and z tiles of 32 channels double-buffered in shared memory
//      with cp.async: 16-byte copies where the runtime alignment allows, else 4-byte ones) accumulates
//      s[m, k] = z_k . p_m, with exact fp32 FFMA products (FfmaSearch, "highest") or tensor-core MMA
//      (MmaSearch: 3xTF32 "high", TF32 "medium"; sm_80+), and gives the approximate v~[m, k] =
//      |z_k|^2 - 2 s[m, k] (|p_m|^2 is the same for every patch of m: dropped);
//   2. certify: with the rigorous bound delta[m, k] >= |a~ - e| of the search error (derivation at
//      cert_coef below), the running threshold T_m = min over finite v~ of (v~ + delta) so far, and
//      every patch with v~ - delta <= T_m, or v~ or delta not finite, is a candidate;
//   3. rescore: the candidates are compacted into a list per warp; each one's exact distance
//      e = sum_d (z - p)^2 (difference form, fp32, fixed order) is folded into the
//      prototype's winner by rank_key (NaN first, then smaller e, then lower k).
// The candidates are a superset of the patches whose e can be the minimum (T_m only shrinks), and e
// does not depend on the search, so (min_distances, patch_index) are identical at all three
// precisions: the lowest-index exact minimum, or the lowest NaN patch. The B*M*HW distance map never
// leaves registers.
//
// z copy paths (ZCopy, a template parameter: uniform per launch, chosen on the host by forward_z_copy): 4-byte
// copies in one of two thread layouts, 16-byte copies along patches, or the dense NCHW path of small maps.
// Two shared-memory plans (Plan): streaming (p tiles staged with the z tiles at every stage, one image per
// block) and p-resident (D <= kResidentMaxD: the block's whole p tile is loaded once and kept in shared
// memory while the z tiles of its ipb images stream through the double buffer; the rescoring reads p rows
// from shared memory; on the dense path an image's z stays staged until its rescoring, which reads it there:
// kRing). Both give the same output bits. Padding: a 64-patch tile of a 7x7 map does the math
// of 56 patches (the FFMA warps that hold only padding skip it; the MMA warps skip only when all their 32
// patches are padding); the padding's copies are zero-fills that read no memory.

#pragma once

#include <type_traits>

#include "common.cuh"

namespace protokern {
namespace {

constexpr int kThreads = 256;  // forward block size (8 warps)
constexpr int kBM = 128;       // prototypes per block
constexpr int kBK = 64;        // patches per tile
constexpr int kDC = 32;        // channels per shared-memory stage
constexpr int kPLoads = kDC * kBM / kThreads;  // p elements staged per thread per stage (4-byte copies)
constexpr int kZLoads = kDC * kBK / kThreads;  // z elements staged per thread per stage (4-byte copies)
constexpr int kPChunks = kPLoads / 4;          // the same in 16-byte copies
constexpr int kZChunks = kZLoads / 4;
static_assert(kThreads == 256 && kBM == 128 && kBK == 64, "thread layouts below assume these");
static_assert(8 % (kDC / 8) == 0 && 8 % (kBK / 32) == 0 && 8 % (kBM / 32) == 0, "tile_map");

// Row strides of a search's shared tiles, Ps (p: prototype rows of kDC channels, as p lies in global
// memory, so that 16-byte copies land whole) and Zs (z: channel rows of kBK patches), and Entries partial
// thresholds per prototype in the certification.
template <int Ps, int Zs, int Entries>
struct Layout {
  static constexpr int kPs = Ps, kZs = Zs, kEntries = Entries;
  static_assert(Ps % 4 == 0 && Zs % 4 == 0, "rows must stay 16-byte aligned");
};

// How a launch stages its z tiles (the kernel's first template parameter; forward_z_copy picks it):
//   kZCols4   4-byte copies, each warp 32 consecutive patches of one channel (stride_k the smaller stride);
//   kZChans4  4-byte copies, each warp 8 channels x 4 patches (stride_d <= stride_k: channels-last z);
//   kZCols16  16-byte copies along patches (stride_k == 1, stride_d and stride_b multiples of 4, z 16-byte
//             aligned: e.g. contiguous z with HW % 4 == 0);
//   kZDense   NCHW z of 7x7 maps (stride_k == 1, stride_d == HW == kDenseHW: rows that are not 16-byte
//             runs), z and stride_b 16-byte aligned: a stage's 32 channels of an image are one run of 32 HW
//             floats, copied whole in 16-byte chunks (8 HW = 392 of them, 2 per thread, the rest zero-fills)
//             and landing with z row stride HW (not kZs). The tile's patches HW..63 then read the next channel's
//             (or a stale) value instead of a zero: they are padding, masked in the certification as on the
//             other paths. MMA searches only (FfmaSearch reads z rows as float4). One map size only, so that
//             the row stride is a compile-time constant: the fragment and norm loads then take immediate
//             offsets (with HW at run time they cost about as much as the dense copies save).
enum : int { kZCols4 = 0, kZChans4 = 1, kZCols16 = 2, kZDense = 3 };
constexpr int kDenseHW = 49;

// Row stride (bytes) of the candidate flags: 20 words, so that the rows a warp's fragments store to fall in
// distinct banks (at kBK = 16 words, rows g and g + 2 share them) and 16-byte row reads stay aligned.
constexpr int kFlagStride = kBK + 16;
constexpr int kResidentMaxD = 128;              // largest D of the p-resident plan
constexpr int kResidentPs = kResidentMaxD + 4;  // its p row stride: 4 (mod 32), as the searches need
// The dense z path in the p-resident plan (kRing) keeps an image's whole z in shared memory until its
// rescoring: one buffer per 32-channel stage (at most kResidentMaxD / kDC), buffer ds for stage ds, so that the
// rescoring reads each candidate's channels there instead of gathering them from global memory (NCHW: one
// sector per channel; the v12 profile's long-scoreboard waits). A buffer holds what the MMA search reads:
// 31 rows of kDenseHW floats and a last row of kBK patches (padding past HW), 16-byte aligned.
constexpr int kRingStages = kResidentMaxD / kDC;
constexpr int kRingStage = ((kDC - 1) * kDenseHW + kBK + 3) / 4 * 4;

// Dynamic shared memory (floats) of a forward block. Streaming (kResident = false): two pipeline stages of
// {p tile (kBM rows, stride Search::kPs), z tile (kDC rows, stride Search::kZs)}; the stage just consumed
// is the certification scratch. p-resident: the whole p tile (kBM rows of up to kResidentMaxD channels,
// stride kResidentPs), two stages of z tiles only (kRing: kRingStages buffers of kRingStage floats), and a
// scratch of its own. The scratch holds Entries x kBM partial thresholds (then, per warp, kListCap entries of
// the rescoring list), then kBM rows of kBK flag bytes at a row stride of kFlagStride. Then per patch tile
// |z_k|^2 and |z_k|, per prototype |p_m| and the separable bound's B_m, per patch the TF32 search's residual
// term (lz_s in forward_kernel), the running threshold T_m and the exact winner's rank_key(e, k).
template <class Search, bool kResident, bool Ring>
struct Plan {
  static_assert(kResident || !Ring, "the z ring is a p-resident plan");
  static constexpr bool kRing = Ring;
  static constexpr int kPs = kResident ? kResidentPs : Search::kPs;
  static constexpr int kZs = Search::kZs;
  static constexpr int kPRes = kResident ? kBM * kResidentPs : 0;  // the resident p tile, at 0
  static constexpr int kZInStage = kResident ? 0 : kBM * Search::kPs;
  static constexpr int kStage = kRing ? kRingStage : kZInStage + kDC * kZs;
  static constexpr int kStages = kRing ? kRingStages : 2;  // pipeline buffers
  static constexpr int kScratchFloats = Search::kEntries * kBM + kBM * kFlagStride / 4;
  static constexpr int kListCap = Search::kEntries * kBM / (kThreads / 32);  // rescoring list entries per warp
  static constexpr int kScratch = kPRes + kStages * kStage;  // p-resident only
  static constexpr int kZnOffset = kScratch + (kResident ? kScratchFloats : 0);
  static constexpr int kRzOffset = kZnOffset + kBK;
  static constexpr int kRpOffset = kRzOffset + kBK;
  static constexpr int kBpOffset = kRpOffset + kBM;
  static constexpr int kLzOffset = kBpOffset + kBM;
  static constexpr int kThrOffset = kLzOffset + kBK;
  static constexpr int kBestOffset = kThrOffset + kBM;  // kBM 64-bit keys (rank_key)
  static constexpr int kCoefOffset = kBestOffset + 2 * kBM;  // the certification's 5 coefficients
  static constexpr size_t kBytes = sizeof(float) * (kCoefOffset + 8);
  static_assert(kPRes % 4 == 0 && kStage % 4 == 0 && kZInStage % 4 == 0, "tiles must stay 16-byte aligned");
  static_assert(kBestOffset % 2 == 0, "64-bit keys");
  static_assert(kResident || kScratchFloats <= kStage, "certification scratch must fit in a stage");
};
// The plan of forward_kernel<kZ, Search, kResident>.
template <int kZ, class Search, bool kResident>
using PlanOf = Plan<Search, kResident, kResident && kZ == kZDense>;

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

// ---- The certification bound ---------------------------------------------------------------------
// u = 2^-24 (fp32 unit roundoff), gamma_n = n u / (1 - n u). For a patch z and a prototype p (D
// channels), N = (|z| + |p|)^2 (L2 norms) bounds |z|^2, 2|z||p|, sum_d |z_d p_d| (<= |z||p|,
// Cauchy-Schwarz), the true distance t = |z - p|^2 and |v| for v = |z|^2 - 2 z.p.
// * The search: v~ = fma(-2, s~, zn~), zn~ an FFMA chain of z_d^2 (error <= gamma_D |z|^2) and s~
//   approximating s = z.p with |s~ - s| <= eps_dot |z||p|:
//     FFMA:    eps_dot = gamma_D (one fma chain over the channels).
//     TF32:    z's fragments are truncated to TF32 here (z_hi = z with its low 13 bits cleared, z_lo =
//              z - z_hi exact), p's by the MMA (truncation or rounding: |p_d - p_hi_d| <= 2^-10 |p_d|):
//              z.p - z_hi.p_hi = z_lo.p + z_hi.(p - p_hi), at most |z_lo| |p| + 2^-10 |z| |p|
//              (Cauchy-Schwarz; |z_hi| <= |z|), with |z_lo| summed per patch beside |z|^2. That
//              operand term goes into delta on its own (lz_s), so eps_dot keeps only the HMMA
//              accumulation over ceil(D/8) steps (below): on uniform features 1.7 instead of 3.9
//              candidates per (b, m) at D = 128, 5 instead of 39 at (512, 784).
//     3xTF32:  x = hi + lo exactly, hi = x with its low 13 bits cleared (|lo| <= 2^-10 |x|), and the MMA
//              truncates lo to lo' (|lo - lo'| <= 2^-10 |lo| <= 2^-20 |x|); a b - (a_hi b_hi +
//              a_hi b_lo' + a_lo' b_hi) = a_lo b_lo + a_hi (b_lo - b_lo') + (a_lo - a_lo') b_hi is
//              <= 3 * 2^-20 relative per product; 3 ceil(D/8) HMMA steps.
//   HMMA accumulation (assumed model, after Fasi et al. 2021, "Numerical behavior of NVIDIA tensor
//   cores"): a m16n8k8 step c + sum of 8 exact products, aligned to the largest term and truncated,
//   errs by <= 20u (|c| + sum |a b|); |c| <= the earlier |products|, so n steps err by
//   <= 20 u n sum_d |z_d p_d| (times (1 + 2^-10)^2 for the split parts: in the safety factor).
//   The epilogue fma rounds once more (u |v~|), so |v~ - v| <= (gamma_D + eps_dot + 2u) N.
// * The exact rescoring e (fp32 difference form: one rounding per difference, fma chains of at most
//   ceil(D/4) terms per lane, a 2-level butterfly: at most ceil(D/4) + 3 roundings on any term's path,
//   within the D + 7 that cert_coef allows) has |e - t| <= gamma_{D+7} t <= gamma_{D+7} N.
// * a~ = v~ + |p|^2 and the test a~_i - delta_i <= min_j (a~_j + delta_j) is the same test on v~
//   (|p|^2 cancels); its fp32 evaluation (v~ +- delta, the compare) costs <= 4u N more.
// So delta = c N + c_abs with c = 2 (gamma_D + eps_dot + gamma_{D+7} + 6u): the factor 2 absorbs the
// rounding of N itself (zn~ may be low by gamma_D, the square roots, the products), and
// c_abs = (D + 8) 2^-126 covers products and squares that underflow or are flushed to zero. The kernel
// evaluates it as q^2 + c_abs with q = sqrt(c) |z| + sqrt(c) |p| (the two terms stored per patch and per
// prototype): about 7 roundings of relative u each instead of 5, also within the factor 2.
// TF32 adds 4 |p| (|z_lo| + 2^-10 |z|) (2 for the 2 z.p of v~, 2 for its fp32 evaluation), evaluated as
// (sqrt(c) |p|) * (4 (|z_lo| + 2^-10 |z|) / sqrt(c)), the second factor stored per patch; a square of z_lo
// flushed to zero loses at most sqrt(D) 2^-63 of |z_lo|, and c N + c_abs covers the missing 4 sqrt(D) 2^-63
// |p| for every |p| once c_abs >= 4 D 2^-126 / c (tf32_abs).
// Separable form (a tile whose |z_k|^2 and |p_m|^2 are all finite and <= 2^100: the usual case). N <= 2 (|z|^2 +
// |p|^2), so delta_s = A_k + B_m (+ the TF32 term as above) with A_k = c_s |z_k|^2, B_m = c_s |p_m|^2 + c_abs and
// c_s = 2 c + 32 u: the same as c N where |z| = |p|, at most twice it where the norms differ. The extra
// 32 u (|z|^2 + |p|^2) >= 16 u N covers the fp32 evaluation, about 8 roundings of relative u on quantities
// below ~N: |z|^2 (1 +- c_s) (kept per patch), the two fmas v~ +- A_k, the tile's minimum + B_m, T_m + B_m.
// Then T_m = min_k (v~ + A_k [+ TF32 term]) + B_m and the test v~ - A_k [- TF32 term] <= T_m + B_m cost two
// fmas and a min per pair (TF32: two more), against a square, sums and the finite tests of the per-pair form;
// with every norm <= 2^100 all those values are finite, so tiles with larger or non-finite norms take the
// per-pair form. Either form gives a valid bound for each pair, so a running T_m may mix them.
__device__ __forceinline__ float gamma_n(float n) {
  const float nu = n * 0x1p-24f;
  return nu < 0.25f ? nu / (1.f - nu) : INFINITY;  // a huge D: every patch becomes a candidate
}

// Search error of s = z.p relative to |z||p| (eps_dot above) for kSearch*.
__device__ __forceinline__ float dot_error(int search, int D) {
  const float steps = (float)((D + 7) / 8);
  if (search == kSearchTf32) return 20.f * 0x1p-24f * steps;  // the operand error: lz_s below
  if (search == kSearch3xTf32) return 3.f * 0x1p-20f + 60.f * 0x1p-24f * steps;
  return gamma_n((float)D);
}

// PROTOKERN_EMU_CERT_SCALE (emulator builds only) scales the bound, so that csrc/emu/check.py can
// show that its adversarial cases fail without the certification (scale 0).
#if defined(PROTOKERN_EMU) && defined(PROTOKERN_EMU_CERT_SCALE)
constexpr float kCertScale = PROTOKERN_EMU_CERT_SCALE;
#else
constexpr float kCertScale = 1.f;
#endif

// PROTOKERN_EMU_LZ_SCALE (emulator builds only) scales the TF32 search's residual term alone, so that
// check.py can show that the bound check needs all of it.
#if defined(PROTOKERN_EMU) && defined(PROTOKERN_EMU_LZ_SCALE)
constexpr float kLzScale = PROTOKERN_EMU_LZ_SCALE;
#else
constexpr float kLzScale = 1.f;
#endif

__device__ __forceinline__ float cert_coef(int search, int D) {
  return kCertScale * 2.f * (gamma_n((float)D) + dot_error(search, D) + gamma_n((float)D + 7.f) + 6.f * 0x1p-24f);
}

// The separable form's c_s for the coefficient c (above), and its largest norm (squared) of a tile.
__device__ __forceinline__ float cert_separable(float c) { return 2.f * c + kCertScale * 32.f * 0x1p-24f; }
constexpr float kSeparableMaxNorm2 = 0x1p100f;

// x truncated to TF32 (its low 13 mantissa bits cleared): the MMA searches' operands, and z_hi of the TF32 bound.
__device__ __forceinline__ float tf32_hi(float x) { return __uint_as_float(__float_as_uint(x) & 0xffffe000u); }

// The TF32 search's c_abs beyond (D + 8) 2^-126 (see the bound above), for the coefficient c.
__device__ __forceinline__ float tf32_abs(float c, int D) { return c > 0.f ? 4.f * (float)D * 0x1p-126f / c : 0.f; }

// Candidates rescored per warp and round of the exact rescoring: one per group of 4 lanes.
constexpr int kRescoreBatch = 8;
// Chunks of 8 channels whose z loads a rescoring lane has in flight at once: 4 (32 registers) with the p tile
// in shared memory, 2 where its rows come from global p too (4 spill there).
constexpr int kRescoreInFlight[2] = {2, 4};  // [kResident]

// v[0..7] = q[0..7] by two 16-byte loads (q 16-byte aligned).
__device__ __forceinline__ void load8(const float* q, float (&v)[8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float4 x = *reinterpret_cast<const float4*>(q + 4 * h);
    v[4 * h] = x.x, v[4 * h + 1] = x.y, v[4 * h + 2] = x.z, v[4 * h + 3] = x.w;
  }
}

// ---- Searches ------------------------------------------------------------------------------------
// The patch (of 32) whose candidate flag a search stores in flag slot s: the same, or with MmaSearch's
// interleaved n8 tiles (kInterleave, the dense z path) slot s = 8 j + 2 t + c holds patch 8 t + 4 c + j.
template <bool kInterleave>
__device__ __forceinline__ int patch_of_slot(int s) {
  return kInterleave ? (s & 7) << 2 | s >> 3 : s;
}

// A search accumulates s[m, k] = sum_d p[m, d] z[d, k] over a block's 128 prototypes x 64 patches,
// one kDC-channel stage at a time (step; zrow: the z tile's row stride, kZs or kDenseHW: a constant).
// visit(tid, f) calls f(slot, ml, kl, s) for each of this
// thread's (prototype ml, patch kl) pairs of the tile, s a reference to the accumulator (slot: the
// thread's index of prototype ml, in 0..kSlots-1); every (ml, kl) of the tile belongs to exactly one
// thread. entry(tid) names the thread
// among the kEntries threads that share a prototype; clear() zeroes the accumulators for the next tile.

// Exact fp32 products (FFMA). Thread (tx, ty) holds prototypes tx + 16 i (i < 8) and patches 4ty..4ty+3
// of the tile, and reads 4 channels at a time (float4 along a prototype row, then 4 z rows). A p row
// stride of 4 (mod 32) makes the float4 reads of 8 consecutive tx conflict-free; a z row stride of 4
// (mod 32) the 8x4 tile_map stores.
struct FfmaSearch : Layout<kDC + 4, kBK + 4, kThreads / 16> {
  static constexpr int kSearch = kSearchFp32;
  static constexpr int kSlots = 8;
  static constexpr int kMinBlocks = 2;  // resident blocks per SM the registers must allow
  float acc[8][4];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
  }

  template <int PS, bool, bool>  // p row stride, (MmaSearch's tile tests, patch order); zrow: kZs (float4 reads)
  __device__ __forceinline__ void step(const float* ps, const float* zs, int zrow, int tid, int k0, int HW) {
    const int tx = tid & 15, ty = tid >> 4;
    // Warp w holds patches 8w..8w+7 of the tile; a warp with only padding (e.g. 56..63 of HW = 49)
    // skips the math and leaves its issue slots to the others.
    if (k0 + 8 * (tid >> 5) >= HW) return;
#pragma unroll
    for (int dd = 0; dd < kDC; dd += 4) {
      float4 a4[8], z4[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a4[i] = *reinterpret_cast<const float4*>(&ps[(tx + 16 * i) * PS + dd]);
#pragma unroll
      for (int q = 0; q < 4; ++q) z4[q] = *reinterpret_cast<const float4*>(&zs[(dd + q) * zrow + 4 * ty]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // channel dd + q: every accumulator's fma chain runs in channel order
        const float c[4] = {z4[q].x, z4[q].y, z4[q].z, z4[q].w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float a = q == 0 ? a4[i].x : q == 1 ? a4[i].y : q == 2 ? a4[i].z : a4[i].w;
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a, c[j], acc[i][j]);
        }
      }
    }
  }

  __device__ __forceinline__ static int slot_ml(int tid, int i) { return (tid & 15) + 16 * i; }

  __device__ __forceinline__ static int entry(int tid) { return tid >> 4; }

  template <bool, class F>  // (MmaSearch's patch order)
  __device__ __forceinline__ void visit(int tid, F&& f) {
    const int ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) f(i, slot_ml(tid, i), 4 * ty + j, acc[i][j]);
    }
  }

  // flags[ml * kFlagStride + kl] = (acc <= thr[ml]) as bytes 0 / 1, for accumulators that hold lower ends: a
  // thread's 4 patches of a prototype are one 32-bit store (2-way bank conflicts at kFlagStride; 8-way as
  // byte stores at a stride of kBK).
  __device__ __forceinline__ void store_flags(int tid, const float* thr, unsigned char* flags) const {
    const int ty = tid >> 4;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int ml = slot_ml(tid, i);
      const float t = thr[ml];
      uint32_t v = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) v |= (uint32_t)(acc[i][j] <= t) << (8 * j);
      *reinterpret_cast<uint32_t*>(flags + ml * kFlagStride + 4 * ty) = v;
    }
  }
};

// Tensor cores: TF32 products (kSplit = false) or 3xTF32 (kSplit = true: x = hi + lo, each read by
// the MMA as TF32, and a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi, close to fp32 accuracy). Warp w owns
// prototypes 32 (w % 4).. + 31 (two m16 tiles) and patches 32 (w / 4).. + 31 (four n8 tiles) of the
// block tile. Fragments are plain 32-bit shared loads (see the note at step); a p row stride of 4 (mod 32)
// and a z row stride of 8 (mod 32) make them conflict-free. The dense z path's row stride 49 (kDenseHW)
// puts B[t][g] in bank 17 t + g (mod 32): lanes t and t + 2 share 6 of their 8 banks, a 2-way conflict on
// the B loads (not on A); see benchmarks/NOTES.md v9.
template <bool kSplit>
struct MmaSearch : Layout<kDC + 4, kBK + 8, 8> {  // 8 entries: 2 warps along patches x 4 quad lanes
  static constexpr int kSearch = kSplit ? kSearch3xTf32 : kSearchTf32;
  static constexpr int kSlots = 4;      // rows g, g + 8 of m16 tile 0, then of tile 1
  // Resident blocks per SM the registers must allow: 2 (128 registers). At 3 (80 registers) ptxas
  // spilled 20-108 bytes in every MMA variant once the certification state was added
  // (tests/test_cuda_gates.py::test_ptxas_gate).
  static constexpr int kMinBlocks = 2;
  float acc[2][4][4];                   // [m16 tile][n8 tile][fragment]

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

  // MMA operands without a conversion instruction: hi = x with its low 13 bits cleared (TF32 truncation,
  // what the MMA would do itself, done here so that the TF32 bound knows z_hi), lo = x - hi (exact in fp32;
  // 3xTF32 only). Non-finite x stays non-finite in hi (a NaN may become inf, or lo NaN): the pair's v~ is
  // then not finite, hence a candidate, rescored exactly.
  __device__ __forceinline__ static void split(float x, uint32_t& hi, uint32_t& lo) {
    const float h = tf32_hi(x);
    hi = __float_as_uint(h);
    lo = kSplit ? __float_as_uint(x - h) : 0u;
  }

  // No ldmatrix: A (p, prototype rows with contiguous channels) would fit ldmatrix.x4 (a b16 8x8 matrix
  // is an fp32 8x4 one, and the fragment a[0..3] is four of them), but B (z, channel rows with contiguous
  // patches) needs the transposed load, and ldmatrix.trans transposes b16 elements, which splits each fp32
  // value in halves; so both operands use the same plain loads, 4 + 2 per m16n8k8 pair of tiles.
  // kInterleave: n8 tile j holds the warp's patches j, j + 4, .., j + 28 (column n of the tile: patch 4 n + j)
  // instead of 8 j .. 8 j + 7. For the dense path's z row stride of 49 (kDenseHW: 17 mod 32 words), B[t][n]
  // then lies in bank 17 t + 4 n + j (mod 32): the 32 lanes of a B load hit 32 banks (t = 0..3 give 0, 17,
  // 2, 19 (mod 32) plus the multiples of 4: each residue once), where contiguous columns (8 j + n) put
  // lanes t and t + 2 in 6 common banks, a 2-way conflict on every B load (1.31M excess shared wavefronts
  // per forward at the CUB shape on an H200: NOTES.md "v12 measured", "v14"). visit reports the patches in
  // that order; store_flags keeps fragment order (flag slot 8 j + 2 t + c of the warp's 32 holds patch
  // 8 t + 4 c + j: patch_of_slot).
  template <int PS, bool kTileTests, bool kInterleave>  // p row stride; zrow: z row stride (any: 32-bit loads)
  __device__ __forceinline__ void step(const float* ps, const float* zs, int zrow, int tid, int k0, int HW) {
    static_assert(!(kTileTests && kInterleave), "interleaved n8 tiles all hold real patches");
    const int lane = tid & 31, w = tid >> 5, g = lane >> 2, t = lane & 3;
    const int mb = 32 * (w & 3), nb = 32 * (w >> 2);
    // A warp whose 32 patches are all padding (e.g. 32..63 of a map of 4) skips the math. The others run all
    // four n8 tiles, padding included (zero-filled, or the dense path's next-channel values; masked in the
    // certification): a test per tile made ptxas put a WARPSYNC before each tile's MMAs (16 per stage, and
    // 3xTF32's NOPs and branches), more than the padding tile's math costs a 7x7 map's second warp row.
    // kTileTests keeps the tests (skipping the n8 tiles that hold only padding) where running all four
    // spills (the ptxas gate: the caller's choice).
    const int n_tiles = kTileTests ? min(4, (HW - k0 - nb + 7) / 8) : 4;  // n8 tiles to run
    if (k0 + nb >= HW) return;  // warp-uniform
#pragma unroll
    for (int kk = 0; kk < kDC; kk += 8) {
      uint32_t a_hi[2][4], a_lo[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float* const row = ps + (mb + 16 * i + g) * PS + kk + t;  // A[g][t]: bank 4 g + t
        split(row[0], a_hi[i][0], a_lo[i][0]);
        split(row[8 * PS], a_hi[i][1], a_lo[i][1]);
        split(row[4], a_hi[i][2], a_lo[i][2]);
        split(row[8 * PS + 4], a_hi[i][3], a_lo[i][3]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (kTileTests && j >= n_tiles) continue;
        const float* const row = zs + (kk + t) * zrow + nb + (kInterleave ? 4 * g + j : 8 * j + g);
        uint32_t b_hi[2], b_lo[2];
        split(row[0], b_hi[0], b_lo[0]);
        split(row[4 * zrow], b_hi[1], b_lo[1]);
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

  __device__ __forceinline__ static int slot_ml(int tid, int r) {  // r = 2 i + h: tile i, row g + 8 h
    const int lane = tid & 31, w = tid >> 5;
    return 32 * (w & 3) + 16 * (r >> 1) + 8 * (r & 1) + (lane >> 2);
  }

  __device__ __forceinline__ static int entry(int tid) { return 4 * ((tid >> 5) >> 2) + (tid & 3); }

  template <bool kInterleave, class F>
  __device__ __forceinline__ void visit(int tid, F&& f) {
    const int t = tid & 3, nb = 32 * ((tid >> 5) >> 2);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // interleaved: patches 8 t + 4 c + j, four in a row (vector loads)
        const int kl = nb + (kInterleave ? 8 * t + 4 * c + j : 8 * j + 2 * t + c);
#pragma unroll
        for (int r = 0; r < 4; ++r) f(r, slot_ml(tid, r), kl, acc[r >> 1][j][2 * (r & 1) + c]);  // a patch's 4 rows
      }
    }
  }

  // flags[ml * kFlagStride + kl] = (acc <= thr[ml]) as bytes 0 / 1, for accumulators that hold lower ends: a
  // fragment's two adjacent patches are one 16-bit store, conflict-free at kFlagStride (4-way as byte stores
  // at a stride of kBK: 1.0M excess wavefronts per forward at the CUB shape on an H200, NOTES.md "v12 measured").
  __device__ __forceinline__ void store_flags(int tid, const float* thr, unsigned char* flags) const {
    const int t = tid & 3, nb = 32 * ((tid >> 5) >> 2);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int ml = slot_ml(tid, r);
      const float th = thr[ml];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float* const a = &acc[r >> 1][j][2 * (r & 1)];
        const uint16_t v = (uint16_t)((a[0] <= th) | (a[1] <= th) << 8);
        *reinterpret_cast<uint16_t*>(flags + ml * kFlagStride + nb + 8 * j + 2 * t) = v;
      }
    }
  }
};

// Whether prm's rescoring rows zr are usable (params.h): present, 16-byte aligned, image and patch strides
// multiples of 4. The launcher checks them where it reads them; the emulator in the kernel itself.
inline bool forward_rows_ok(const ForwardParams& prm) {
  return prm.zr != nullptr && prm.zr_sb % 4 == 0 && prm.zr_sk % 4 == 0 &&
         (reinterpret_cast<uintptr_t>(prm.zr) & 15) == 0;
}

// Grid (ceil(M / kBM), ceil(B / ipb)), kThreads threads, PlanOf<kZ, Search, kResident>::kBytes of dynamic shared
// memory; block (x, y) covers prototypes kBM x.. and images ipb y..; see the top of this file. Outputs:
// min_distances = the winner's exact e (NaN rule: NaN), similarity = log1p((1 - eps) / (d + eps)) =
// log((d + 1) / (d + eps)) with d = +inf giving 0, patch_index.
template <int kZ, class Search, bool kResident>  // kZ: the z copy path (kZCols4 .. kZDense)
__global__ void __launch_bounds__(kThreads, Search::kMinBlocks) forward_kernel(const ForwardParams prm, int ipb) {
  using P = PlanOf<kZ, Search, kResident>;
  constexpr bool kRing = P::kRing;  // the image's z stays staged until its rescoring
  static_assert(kZ != kZDense || Search::kSearch != kSearchFp32, "dense z staging: MMA searches only");
  PK_DYNAMIC_SMEM(smem);
  constexpr int kPs = P::kPs, kZs = P::kZs, kStage = P::kStage;
  float* const p_res = smem;              // the resident p tile (kResident)
  float* const stages = smem + P::kPRes;  // P::kStages pipeline buffers
  float* const zn_s = smem + P::kZnOffset;  // |z_k|^2 of the current patch tile
  float* const rz_s = smem + P::kRzOffset;  // sqrt(cert_coef) |z_k|
  float* const rp_s = smem + P::kRpOffset;  // sqrt(cert_coef) |p_m|
  float* const bp_s = smem + P::kBpOffset;  // the separable bound's B_m
  float* const lz_s = smem + P::kLzOffset;  // TF32: 4 (|z_lo,k| + 2^-10 |z_k|) / sqrt(cert_coef)
  float* const thr_s = smem + P::kThrOffset;
  float* const coef_s = smem + P::kCoefOffset;  // sqrt(c), c_abs, the TF32 residual's scale, 1 + c_s, 1 - c_s, c_s
  // The exact winner's rank_key(e, k) of each prototype (unsigned long long: atomicMin's type)
  unsigned long long* const best = reinterpret_cast<unsigned long long*>(smem + P::kBestOffset);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b0 = blockIdx.y * ipb;
  const int m0 = blockIdx.x * kBM;
  const int D = prm.D, HW = kZ == kZDense ? kDenseHW : prm.HW, M = prm.M;  // kZDense: HW a constant
  const float* __restrict__ p = prm.p;
  const int64_t sd = prm.z_sd, sk = prm.z_sk;

  const TileMap zmap = tile_map<kBK>(tid, kZ == kZChans4);
  // p rows by 16-byte copies when D % 4 == 0 and p is 16-byte aligned (uniform over the launch), else 4-byte
  // ones; z by the path kZ.
  const bool p_vec = D % 4 == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
  // The 16-byte p copies (a stage's in the streaming plan, the first patch tile's in the p-resident one): this
  // thread's chunks are prototypes pml + 32 i (the first p_rows of them exist), channels pdd.. of each stage;
  // their addresses are p_chunk + d0 + i * p_chunk_step, so a stage pays no row products (they had been a third
  // of its pipeline's instructions, NOTES v12).
  static_assert(kThreads / 8 == 32, "the p copies' thread map");
  const int pml = tid >> 3, pdd = 4 * (tid & 7);
  const int p_rows = max(0, min(kPChunks, (M - m0 - pml + 31) / 32));
  const float* const p_chunk = p + (int64_t)(p_rows > 0 ? m0 + pml : 0) * D + pdd;
  const int64_t p_chunk_step = 32 * (int64_t)D;
  const int n_d = (D + kDC - 1) / kDC;
  const int n_iter = n_d * ((HW + kBK - 1) / kBK) * min(ipb, prm.B - b0);  // (image, patch tile, stage) steps
  // This thread's z copies of a stage: the i-th from the stage's origin + zoff + i * zstep (elements), to
  // channel zdd + i * ddi, patch zkk + i * cci of the tile. kZCols16: chunks c = tid + 256 i, channel c / 16,
  // patches 4 (c % 16).. (stride_k == 1: ddi = 16, cci = 0); 4-byte paths: tile_map's (ddi, cci: compile-time
  // constants). kZDense: chunks c = tid + 256 i < 8 HW, floats 4 c.. of the stage's run (zoff = 4 tid).
  constexpr int kVecDdi = kThreads / 16;
  const int zdd = kZ == kZCols16 ? tid >> 4 : kZ == kZDense ? 0 : zmap.dd0;
  const int zkk = kZ == kZCols16 ? 4 * (tid & 15) : kZ == kZDense ? 4 * tid : zmap.cc0;
  const int64_t zoff = zdd * sd + zkk * sk;
  const int64_t zstep = kZ == kZCols16 ? kVecDdi * sd : zmap.ddi * sd + zmap.cci * sk;
  constexpr int kZRow = kZ == kZDense ? kDenseHW : kZs;  // z row stride of the shared z tiles

  // A step of the flat loop: image b (z at zimg), patch tile k0, channel stage ds, its z origin zst = zimg +
  // k0 sk + 32 ds sd; advanced by carries and pointer increments (no divisions, no 64-bit products per stage).
  struct Step {
    const float* zimg;
    const float* zst;
    int b, k0, ds;
  };
  const int64_t zdstep = kDC * sd;
  auto advance = [&](Step& s) {
    s.zst += zdstep;
    if (++s.ds == n_d) {
      s.ds = 0;
      s.k0 += kBK;
      if (kZ == kZDense || s.k0 >= HW) {  // kZDense: one patch tile per image (HW == kDenseHW)
        s.k0 = 0;
        ++s.b;
        s.zimg += prm.z_sb;
      }
      s.zst = s.zimg + s.k0 * sk;
    }
  };

  // The p tile's channels d0.. (a kDC-channel stage) into ps (rows of kPs floats), zero-filled past D and M.
  auto copy_p = [&](float* ps, int d0) {
    if (p_vec) {  // chunk c = tid + 256 i: prototype c / 8 = pml + 32 i, channels pdd.. of the stage
      const int rows = d0 + pdd < D ? p_rows : 0;  // whole chunks or none: D % 4 == 0
      const float* const src = p_chunk + d0;
#pragma unroll
      for (int i = 0; i < kPChunks; ++i)
        copy_async16_whole(&ps[(pml + 32 * i) * kPs + pdd], i < rows ? src + i * p_chunk_step : p, i < rows);
    } else {  // warp w copies prototypes w + 8 i, one channel per lane (D % 4 != 0 or unaligned p: a loop)
      const bool in_d = d0 + lane < D;
      const float* src = p + (int64_t)(m0 + warp) * D + d0 + lane;
#pragma unroll 1
      for (int i = 0; i < kPLoads; ++i, src += 8 * D) {
        const bool ok = in_d && m0 + warp + 8 * i < M;
        copy_async(&ps[(warp + 8 * i) * kPs + lane], ok ? src : p, ok);
      }
    }
  };

  // Start the copy of step s's z tile into stage `buf` and commit the stage's group (issue: with its p tile).
  auto issue_z = [&](const Step& s, int buf) {
    float* const st = stages + buf * kStage;
    float* const zs = st + P::kZInStage;
    const int k0 = s.k0, d0 = s.ds * kDC;
    const float* const zb = s.zimg;
    const float* src = s.zst + zoff;
    float* dst = zs + zdd * kZs + zkk;
    const int dlim = D - d0 - zdd, klim = HW - k0 - zkk;  // this thread's copy i is in range iff
    if constexpr (kZ == kZDense) {                        // i * ddi < dlim and i * cci < klim
      // floats of the run (min(D - d0, 32) channels of HW) from this thread's first chunk on, zero-filled past
      // it: past D, and in the second chunk of threads 2 HW.. (8 HW = 392 chunks; a branch would cost more)
      // kRing: the second chunk only within the buffer (threads < (kRingStage - kNext) / 4).
      const int left = min(D - d0, kDC) * kDenseHW - zkk;
      constexpr int kNext = 4 * kThreads;
      static_assert(kRingStage > kNext && kRingStage <= 2 * kNext, "a ring buffer takes 1-2 chunks per thread");
      const bool second = !kRing || zkk + kNext < kRingStage;
      if (D % 4 == 0) {  // left is a multiple of 4: whole chunks or none (zero-fill by predicate)
        copy_async16_whole(dst, left > 0 ? src : zb, left > 0);
        if (second) copy_async16_whole(dst + kNext, left > kNext ? src + kNext : zb, left > kNext);
      } else {  // z partial chunks (D % 4 != 0)
        copy_async16(dst, left > 0 ? src : zb, max(0, min(4, left)));
        if (second) copy_async16(dst + kNext, left > kNext ? src + kNext : zb, max(0, min(4, left - kNext)));
      }
    } else if constexpr (kZ == kZCols16) {
      if (HW % 4 == 0) {  // klim is a multiple of 4: whole chunks or none (zero-fill by predicate)
        const bool in_k = klim > 0;
#pragma unroll
        for (int i = 0; i < kZChunks; ++i, src += zstep, dst += kVecDdi * kZs) {
          const bool ok = in_k && i * kVecDdi < dlim;
          copy_async16_whole(dst, ok ? src : zb, ok);
        }
      } else {  // z partial chunks (HW % 4 != 0: rows padded to a multiple of 4)
        const int n4 = max(0, min(4, klim));
#pragma unroll
        for (int i = 0; i < kZChunks; ++i, src += zstep, dst += kVecDdi * kZs) {
          const int n = i * kVecDdi < dlim ? n4 : 0;
          copy_async16(dst, n > 0 ? src : zb, n);
        }
      }
    } else {  // 4-byte copies
#pragma unroll
      for (int i = 0; i < kZLoads; ++i, src += zstep, dst += zmap.ddi * kZs + zmap.cci) {
        const bool ok = i * zmap.ddi < dlim && i * zmap.cci < klim;
        copy_async(dst, ok ? src : zb, ok);
      }
    }
    async_commit();
  };
  // Start the copy of step s into stage `buf`: its p tile, in the streaming plan into the stage, in the p-resident
  // plan into the resident tile during the block's first patch tile only (a stage's quarter of p with each stage:
  // the first search waits for that, not for the whole tile); then its z tile.
  auto issue = [&](const Step& s, int buf) {
    if constexpr (!kResident) {
      copy_p(stages + buf * kStage, s.ds * kDC);
    } else if (s.b == b0 && s.k0 == 0) {  // p-resident: the block's first patch tile
      copy_p(p_res + s.ds * kDC, s.ds * kDC);
    }
    issue_z(s, buf);
  };

  if (tid < kBM) {
    thr_s[tid] = INFINITY;
    best[tid] = rank_key(INFINITY, 0x7fffffff);
  }
  Search search;
  float norm2 = 0.f;  // threads < kBK: |z_k|^2 of patch k0 + tid; threads >= kBM: |p_m|^2 of m0 + tid - kBM
  float lo2 = 0.f;    // TF32, threads < kBK: |z_k - tf32(z_k)|^2
  constexpr bool kTf32 = Search::kSearch == kSearchTf32;
  // MmaSearch: test each n8 tile for real patches only in the variant that spills without the tests (16-byte z
  // copies, p-resident, TF32: 16 bytes at 128 registers)
  constexpr bool kTileTests = kZ == kZCols16 && kResident && kTf32;
  constexpr bool kInterleave = kZ == kZDense;  // MmaSearch's n8 tiles interleaved: conflict-free B loads at row 49

  // The certification's coefficients, kept in shared memory (read once per tile): held in registers across the
  // loop (nvcc computes them before it wherever they are written) they made the MMA variants spill.
  if (tid == 0) {
    const float c_sqrt = sqrtf(cert_coef(Search::kSearch, D));
    coef_s[0] = c_sqrt;  // delta = (c_sqrt (|z| + |p|))^2 + coef_s[1]
    coef_s[1] = kCertScale * (float)(D + 8) * 0x1p-126f + (kTf32 ? tf32_abs(c_sqrt * c_sqrt, D) : 0.f);
    coef_s[2] = c_sqrt > 0.f ? kLzScale * kCertScale * 4.f / c_sqrt : 0.f;  // TF32: lz_s = coef_s[2] (...)
    const float cs = cert_separable(cert_coef(Search::kSearch, D));
    coef_s[3] = 1.f + cs;  // the separable form: |z_k|^2 (1 + c_s) = |z_k|^2 + A_k
    coef_s[4] = 1.f - cs;  // and |z_k|^2 - A_k
    coef_s[5] = cs;
  }
  Step cur{prm.z + (int64_t)b0 * prm.z_sb, nullptr, b0, 0, 0};  // the step the loop body consumes
  cur.zst = cur.zimg;
  Step nxt = cur;  // the last step issued
  issue(nxt, 0);
  for (int it = 0; it < n_iter; ++it) {
    // The next step's copy overlaps this one's math, except in the ring at an image's last stage: the next
    // image's first stage goes to buffer 0, which this image's rescoring reads; it is issued after that.
    const bool ahead = it + 1 < n_iter && !(kRing && cur.ds == n_d - 1);
    if (ahead) {
      advance(nxt);
      issue(nxt, kRing ? nxt.ds : (it + 1) & 1);
      async_wait<1>();
    } else {
      async_wait<0>();
    }
    __syncthreads();
    const int b = cur.b, k0 = cur.k0, ds = cur.ds;
    float* const st = stages + (kRing ? ds : it & 1) * kStage;
    const float* const zs = st + P::kZInStage;
    const float* const ps = kResident ? p_res + ds * kDC : st;
    if (ds == 0) search.clear();  // a new patch tile (here: zeros are not held across the rescoring)
    search.template step<kPs, kTileTests, kInterleave>(ps, zs, kZRow, tid, k0, HW);
    if (tid < kBK) {  // channels in order, one fma chain (TF32: and one of the truncation residuals)
#pragma unroll 8
      for (int dd = 0; dd < kDC; ++dd) {
        const float x = zs[dd * kZRow + tid];
        norm2 = fmaf(x, x, norm2);
        if constexpr (kTf32) {
          const float r = x - tf32_hi(x);
          lo2 = fmaf(r, r, lo2);
        }
      }
    } else if (tid >= kThreads - kBM && it < n_d) {  // |p|^2 during the first patch tile only
      const int ml = tid - (kThreads - kBM);
#pragma unroll
      for (int dd = 0; dd < kDC; dd += 4) {  // channels in order; float4 reads, conflict-free
        const float4 v = *reinterpret_cast<const float4*>(&ps[ml * kPs + dd]);
        norm2 = fmaf(v.x, v.x, norm2);
        norm2 = fmaf(v.y, v.y, norm2);
        norm2 = fmaf(v.z, v.z, norm2);
        norm2 = fmaf(v.w, v.w, norm2);
      }
    }

    if (ds == n_d - 1) {  // last stage of this patch tile: certify and rescore it
      // The separable form when every norm of the tile (real patches, the block's prototypes) is <= 2^100
      bool small = true;
      if (tid < kBK) {
        small = k0 + tid >= HW || norm2 <= kSeparableMaxNorm2;  // NaN: false
        zn_s[tid] = k0 + tid < HW ? norm2 : NAN;  // NaN: padding (the separable form's mask)
        rz_s[tid] = coef_s[0] * sqrtf(norm2);  // sqrt(c) |z_k|
        if constexpr (kTf32) lz_s[tid] = coef_s[2] * (sqrtf(lo2) + 0x1p-10f * sqrtf(norm2));
        norm2 = 0.f;
        lo2 = 0.f;
      } else if (tid >= kThreads - kBM) {  // norm2 = |p_m|^2 from the first patch tile on
        small = norm2 <= kSeparableMaxNorm2;
        if (it == n_d - 1) {
          rp_s[tid - (kThreads - kBM)] = coef_s[0] * sqrtf(norm2);          // sqrt(c) |p_m|
          bp_s[tid - (kThreads - kBM)] = fmaf(coef_s[5], norm2, coef_s[1]);  // B_m = c_s |p_m|^2 + c_abs
        }
      }
      // also: every thread is done reading stage `st`, the streaming plan's scratch
      const bool separable = __syncthreads_and(small);
      float* const red = kResident ? smem + P::kScratch : st;
      unsigned char* const flags = reinterpret_cast<unsigned char*>(red + Search::kEntries * kBM);
      // (1) running threshold T_m = min(T_m, min over this tile's finite v~ of v~ + delta); each
      // accumulator becomes its pair's lower end v~ - delta (-inf: v~ or delta not finite, NaN: padding), in the
      // separable form (bound above) v~ - delta + B_m, and the flags compare it with T_m + B_m.
      float tmin[Search::kSlots];
#pragma unroll
      for (int s = 0; s < Search::kSlots; ++s) tmin[s] = INFINITY;
      const float cert_abs = coef_s[1];
      auto pair_delta = [&](int ml, int kl) {  // the per-pair form's delta
        const float q = rz_s[kl] + rp_s[ml];     // sqrt(c) (|z| + |p|)
        return kTf32 ? fmaf(rp_s[ml], lz_s[kl], fmaf(q, q, cert_abs)) : fmaf(q, q, cert_abs);
      };
      if (separable) {  // per pair v~ + A_k (the minimum; B_m added per prototype below) and v~ - A_k
        const float zp = coef_s[3], zm = coef_s[4];
        search.template visit<kInterleave>(tid, [&](int s, int ml, int kl, float& acc) {
          const float zn = zn_s[kl];  // NaN for padding: never the minimum nor a candidate
          float hi = fmaf(-2.f, acc, zn * zp);
          float lo = fmaf(-2.f, acc, zn * zm);
          if constexpr (kTf32) {
            hi = fmaf(rp_s[ml], lz_s[kl], hi);
            lo = fmaf(-rp_s[ml], lz_s[kl], lo);
          }
          tmin[s] = fminf(tmin[s], hi);
#ifdef PROTOKERN_EMU
          if (k0 + kl < HW && m0 + ml < M)  // the bound's test (check.py), against the per-pair form's too
            emu::record_search(b, m0 + ml, k0 + kl, fmaf(-2.f, acc, zn), hi, lo, pair_delta(ml, kl));
#endif
          acc = lo;
        });
      } else {
#ifdef PROTOKERN_EMU
        if (tid == 0) emu::per_pair_tiles.fetch_add(1);
#endif
        search.template visit<kInterleave>(tid, [&](int s, int ml, int kl, float& acc) {
          const float v = fmaf(-2.f, acc, zn_s[kl]);
          const float delta = pair_delta(ml, kl);
          // a bound that is not finite leaves the pair a candidate: |p|^2 = inf (|p| > 1.8e19) makes it
          // inf * 0 = NaN for a zero patch at "medium" while v~ (without |p|^2) stays finite
          const bool real = k0 + kl < HW, finite = isfinite(v) && isfinite(delta);
          if (real && finite) tmin[s] = fminf(tmin[s], v + delta);
          acc = !real ? NAN : finite ? v - delta : -INFINITY;
#ifdef PROTOKERN_EMU
          if (real && m0 + ml < M) emu::record_search(b, m0 + ml, k0 + kl, v, v + delta, acc, delta);
#endif
        });
      }
#pragma unroll
      for (int s = 0; s < Search::kSlots; ++s)
        red[Search::entry(tid) * kBM + Search::slot_ml(tid, s)] = tmin[s];
      __syncthreads();
      if (tid < kBM) {  // T_m; the flags' threshold (T_m + B_m in the separable form) into red[tid], read by tid only
        float t = INFINITY;
        for (int e = 0; e < Search::kEntries; ++e) t = fminf(t, red[e * kBM + tid]);
        const float bp = separable ? bp_s[tid] : 0.f;
        const float tile_t = t + bp;
        const float running = fminf(thr_s[tid], tile_t);
        thr_s[tid] = running;
        red[tid] = running + bp;
#ifdef PROTOKERN_EMU
        if (m0 + tid < M && isfinite(t)) emu::record_tile(b, m0 + tid, k0 / kBK, t, tile_t, running, red[tid]);
#endif
      }
      __syncthreads();
      // (2) candidates: v~ - delta <= T_m, or v~ or delta not finite (-inf); never padding (NaN)
      search.store_flags(tid, red, flags);
      __syncthreads();
      // (3) exact rescoring. Warp w owns prototypes ml = w + 8 i (i < 16): it compacts their flags into a list of
      // entries (ml, kl) in its kListCap-entry slice of `red` (dead since (1)), then rescores kRescoreBatch
      // entries per round, entry c0 + j on lane group j = lane / 4, and folds them into best. More than
      // kListCap candidates (e.g. NaN features: every patch is one) take several windows of the list.
      {
        constexpr int kKlBits = 6;  // entry = ml << kKlBits | kl
        static_assert(kBK == 1 << kKlBits, "rescoring entries");
        int* const list = reinterpret_cast<int*>(red) + warp * P::kListCap;
        const int ml_l = warp + 8 * (lane >> 1), h = lane & 1;  // this lane's flags: prototype ml_l, patches 32 h..
        uint32_t mask = 0;  // bit 8 i + w: flag slot 32 h + 4 w + i (flags are bytes 0 / 1; patch_of_slot)
        if (m0 + ml_l < M) {
          const uint4* const f = reinterpret_cast<const uint4*>(flags + ml_l * kFlagStride + 32 * h);
          const uint4 a = f[0], c = f[1];
          mask = a.x | a.y << 1 | a.z << 2 | a.w << 3 | c.x << 4 | c.y << 5 | c.z << 6 | c.w << 7;
        }
        const int cnt = __popc(mask);
        int end = cnt;  // inclusive prefix sum over the lanes: the end of this lane's entries in the list
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int v = __shfl_up_sync(kFullMask, end, o);
          if (lane >= o) end += v;
        }
        const int total = __shfl_sync(kFullMask, end, 31);
        const int grp = lane >> 2, s = lane & 3;
        // Outside the ring the candidates' z comes from the rows zr (params.h: channels innermost, 16-byte
        // aligned): lane s's 8 channels of a chunk are two 16-byte loads, one sector (from NCHW z, 8 sectors).
        const float* const zr_img = kRing ? nullptr : prm.zr + (int64_t)b * prm.zr_sb;
#ifdef PROTOKERN_EMU
        if (!kRing && !forward_rows_ok(prm)) emu::errors.fetch_add(1);  // forward_needs_rows: the host passes them
#endif
        for (int w0 = 0; w0 < total; w0 += P::kListCap) {  // warp-uniform
          int q = end - cnt - w0;  // this lane's next entry's place in the window
          for (uint32_t m = mask; m != 0; m &= m - 1, ++q) {
            const int bit = __ffs((int)m) - 1;
            const int slot = 4 * (bit & 7) + (bit >> 3);
            if (q >= 0 && q < P::kListCap) list[q] = ml_l << kKlBits | (32 * h + patch_of_slot<kInterleave>(slot));
          }
          __syncwarp();
          const int n = min(total - w0, P::kListCap);
          for (int c0 = 0; c0 < n; c0 += kRescoreBatch) {  // a round: entries c0..
            const bool valid = c0 + grp < n;  // an idle group recomputes entry c0
            const int ent = list[valid ? c0 + grp : c0];
            const int ml = ent >> kKlBits, kl = ent & (kBK - 1);
            // Exact e = sum_d (z[d] - p[d])^2 in fp32: lane s of the group sums channels 8 s + 32 t + i (t = 0, 1, ...,
            // i < 8) in that order (one fma chain of about D / 4 terms), then a 2-level xor butterfly inside the
            // group, so its 4 lanes get the same bits, which depend only on the pair (not on the round, the plan or
            // the search precision). p rows: the resident tile (16-byte aligned: float4 reads) or global p.
            const float* const pm = kResident ? p_res + ml * kPs : p + (int64_t)(m0 + ml) * D;
            // Channel 8 s + 32 t of the patch: in the rows zr, or (kRing) in buffer t's row 8 s (k0 = 0 there).
            const float* zq = kRing ? stages + 8 * s * kDenseHW + kl : zr_img + (k0 + kl) * prm.zr_sk + 8 * s;
            const int chunks = D >= 8 * s + 8 ? (D - 8 * s - 8) / 32 + 1 : 0;  // whole chunks of 8 channels
            // The z loads of kInFlight chunks are issued before their first use (from global memory they wait
            // on L2: benchmarks/NOTES.md "v12 measured"). The sum's order is unchanged.
            constexpr int kInFlight = kRescoreInFlight[kResident];
            float e = 0.f;
            auto add_chunk = [&](int t, const float (&zv)[8]) {  // e += (z[8 s + 32 t + i] - p[m, ...])^2, i < 8
              float pv[8];
              if (kResident || p_vec) {  // 16-byte aligned rows: the resident tile's, or p's where D % 4 == 0
                load8(pm + 8 * s + 32 * t, pv);
              } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) pv[i] = pm[8 * s + 32 * t + i];
              }
#pragma unroll
              for (int i = 0; i < 8; ++i) {
                const float diff = zv[i] - pv[i];
                e = fmaf(diff, diff, e);
              }
            };
            auto load_chunk = [&](float (&zv)[8]) {  // z's 8 channels of the chunk at zq; zq to the next chunk
              if constexpr (kRing) {
#pragma unroll
                for (int i = 0; i < 8; ++i) zv[i] = zq[i * kDenseHW];
                zq += kStage;
              } else {
                load8(zq, zv);
                zq += 32;
              }
            };
            int t = 0;
#pragma unroll 1
            for (; t + kInFlight <= chunks; t += kInFlight) {  // kInFlight chunks' z loads, then their sums
              float zv[kInFlight][8];
#pragma unroll
              for (int j = 0; j < kInFlight; ++j) load_chunk(zv[j]);
#pragma unroll
              for (int j = 0; j < kInFlight; ++j) add_chunk(t + j, zv[j]);
            }
#pragma unroll 1
            for (; t < chunks; ++t) {  // the whole chunks left (D not a multiple of 32 kInFlight)
              float zv[8];
              load_chunk(zv);
              add_chunk(t, zv);
            }
            const int d = 8 * s + 32 * chunks;
            if (d < D) {  // a last, partial chunk (D % 8 != 0): d + 8 > D
#pragma unroll
              for (int i = 0; i < 7; ++i) {
                if (d + i < D) {
                  const float diff = zq[kRing ? i * kDenseHW : i] - pm[d + i];
                  e = fmaf(diff, diff, e);
                }
              }
            }
#pragma unroll
            for (int o = 2; o > 0; o >>= 1) e += __shfl_xor_sync(kFullMask, e, o);
            // Fold: the group's first lane takes best[ml] = min(best[ml], rank_key(e, k)); two groups of a round may
            // hold the same prototype, hence an atomic min (the result does not depend on their order).
            if (s == 0 && valid) atomicMin(&best[ml], (unsigned long long)rank_key(e, k0 + kl));
          }
          __syncwarp();  // every lane is done reading the list before the next window rewrites it
        }
      }
    }
    __syncthreads();  // this buffer is refilled by a later issue()
    if (kRing && !ahead && it + 1 < n_iter) {  // the next image's first stage, after this image's rescoring
      advance(nxt);
      issue_z(nxt, 0);  // (not the block's first patch tile: no p)
    }
    const bool img_done = ds == n_d - 1 && k0 + kBK >= HW;
    advance(cur);
    if (img_done && tid < kBM) {  // image b done: its outputs, and a fresh state for the next image
      const int m = m0 + tid;
      if (m < M) {
        const float d = key_value(best[tid]);  // >= 0 or NaN (a sum of squares): no clamp
        const int k = (int)(uint32_t)best[tid];
        const int64_t o = (int64_t)b * M + m;
        prm.min_distances[o] = d;
        prm.similarity[o] = log1pf((1.f - prm.eps) / (d + prm.eps));
        prm.patch_index[o] = (k >= 0 && k < HW) ? k : 0;
      }
      thr_s[tid] = INFINITY;  // read again only after the next iteration's first barrier
      best[tid] = rank_key(INFINITY, 0x7fffffff);
    }
  }
}

// Launch shape of the forward: grid (ceil(M / kBM), ceil(B / ipb)), the plan, images per block.
struct ForwardLaunch : Launch {
  bool resident;  // p-resident plan
  int ipb;        // images per block
};

// The p-resident plan when D <= kResidentMaxD and a block gets more than one image: the images are spread
// so that the grid about fills `slots` resident blocks (2 per SM: the launcher passes 2 x the SM count);
// otherwise the streaming plan, one image per block, or as few more as keep grid_y within CUDA's 65535
// (B > 65535: the kernel takes any ipb in either plan).
constexpr int kMaxGridY = 65535;
inline ForwardLaunch forward_launch(const ForwardParams& prm, int slots) {
  ForwardLaunch l{};
  l.grid_x = (unsigned)((prm.M + kBM - 1) / kBM);
  const int rows = slots / (int)l.grid_x > 1 ? slots / (int)l.grid_x : 1;  // image groups that fill the slots
  const int64_t B = prm.B;  // 64-bit: B + rows - 1 may pass INT_MAX
  l.ipb = (int)((B + rows - 1) / rows);
  l.resident = prm.D <= kResidentMaxD && l.ipb > 1;
  if (!l.resident) l.ipb = (int)((B + kMaxGridY - 1) / kMaxGridY);  // 1 unless B > 65535
  l.grid_y = (unsigned)((B + l.ipb - 1) / l.ipb);
  l.threads = kThreads;
  return l;
}

// The z copy path (kZ*) of a forward launch with `search` (kSearch*): 16-byte copies where z's strides and
// alignment allow (kZCols16, else kZDense for the MMA searches), else 4-byte ones in the layout that suits
// the smaller stride.
inline int forward_z_copy(const ForwardParams& prm, int search) {
  const bool aligned = (reinterpret_cast<uintptr_t>(prm.z) & 15) == 0 && prm.z_sb % 4 == 0;
  if (aligned && prm.z_sk == 1 && prm.z_sd % 4 == 0) return kZCols16;
  if (aligned && prm.z_sk == 1 && prm.z_sd == prm.HW && prm.HW == kDenseHW && search != kSearchFp32) return kZDense;
  return prm.z_sd <= prm.z_sk ? kZChans4 : kZCols4;
}

// Whether the launch l with `search` rescores from the dense path's z ring (forward_kernel's kRing), the
// only launches that do not read ForwardParams::zr.
inline bool forward_ring(const ForwardParams& prm, const ForwardLaunch& l, int search) {
  return l.resident && forward_z_copy(prm, search) == kZDense;
}

constexpr int kForwardVariants = 24;  // index 12 plan + 4 search + z path (22 kernels: no FFMA kZDense)

// Calls f(kernel, smem_bytes, variant) with the forward kernel for prm's z copy path, `search` (kSearch*)
// and plan; variant (< kForwardVariants) names the instantiation.
template <class F>
void with_forward_kernel(const ForwardParams& prm, int search, bool resident, F&& f) {
  const int zc = forward_z_copy(prm, search);
  const int variant = 12 * resident + 4 * search + zc;
  auto pick = [&](auto s) {
    using S = std::decay_t<decltype(s)>;
    auto plan = [&](auto z) {
      constexpr int kZ = decltype(z)::value;
      if constexpr (kZ != kZDense || S::kSearch != kSearchFp32) {  // forward_z_copy never picks FFMA kZDense
        resident ? f(forward_kernel<kZ, S, true>, PlanOf<kZ, S, true>::kBytes, variant)
                 : f(forward_kernel<kZ, S, false>, PlanOf<kZ, S, false>::kBytes, variant);
      }
    };
    switch (zc) {
      case kZCols4: plan(std::integral_constant<int, kZCols4>{}); break;
      case kZChans4: plan(std::integral_constant<int, kZChans4>{}); break;
      case kZCols16: plan(std::integral_constant<int, kZCols16>{}); break;
      default: plan(std::integral_constant<int, kZDense>{}); break;
    }
  };
  if (search == kSearch3xTf32) {
    pick(MmaSearch<true>{});
  } else if (search == kSearchTf32) {
    pick(MmaSearch<false>{});
  } else {
    pick(FfmaSearch{});
  }
}

}  // namespace
}  // namespace protokern
