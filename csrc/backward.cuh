// Backward of the fused prototype-distance op, ONE launch: grad_z and grad_p at the winning patches, in
// the difference form 2 g (z - p) with g = dL/dd = grad_min + grad_sim (1/(d+1) - 1/(d+eps)) (the
// expanded form z g - g p cancels at d ~ 0, where g ~ 1/eps).
//
// backward_kernel  a 1-D grid of BackwardLaunch::blocks blocks of kBwThreads threads; the block index
//                  decides the role: the role with the longer blocks comes first (gp_first: the grad_p
//                  blocks [0, blocks - gz_blocks), then grad_z; else grad_z blocks [0, gz_blocks) first), so
//                  that the blocks of the last wave are the short ones.
// grad_z role      one block per (group of G images, 32 channels); each warp scans a fixed range of
//                  prototypes in increasing order and, for every image of the group, adds 2 g (z - p)
//                  into its own shared accumulators: one p-row read serves the G images (G = 2 only where
//                  both fit one pass of patches). The warps' accumulators are summed in warp order.
//                  Where that would take several passes of patches (maps above 60 patches: each pass re-reads
//                  every prototype's (k, g)), the sorted plan instead: one block per (image, 32 channels)
//                  sorts the image's winners by patch once (stable in m) and each warp sums its patches'
//                  winners in increasing m (grad_z_sorted_block).
// grad_p role      one block per (64 prototypes, 32 channels, part of the images), 8 prototypes per warp,
//                  one channel per lane; z[b]'s 32-channel slice of several images at a time is staged in
//                  shared memory (cp.async, double-buffered, z's own strides: 16-byte copies where z lies in
//                  aligned runs) with their (g, k), and b is summed in increasing order in registers. Above
//                  kGpStageRows patches z is gathered from global (channels innermost: the op passes such a
//                  copy). Where a grad_p block would add several times a grad_z block's pairs (many images,
//                  few prototypes: the CUB shape), the images are cut into gp_parts runs, one block each: each
//                  writes its sums to the workspace, and the tile's last block to finish (a counter) adds
//                  the parts in increasing order, whichever block that is.
// z is read with its own strides (no copy up to kGpStageRows patches). Fixed-order sums, no float atomics: the
// backward is bitwise deterministic.

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

constexpr int kBwWarps = 8;                // warps per block, both roles
constexpr int kBwThreads = kBwWarps * 32;
constexpr int kBwMinBlocks = 3;            // resident blocks per SM the registers must allow
constexpr int kAccStride = 33;             // padded 32-channel row: conflict-free both ways

constexpr int kGzGroup = 2;   // images per grad_z block (at most)
constexpr int kGzRows = 60;   // accumulator rows per warp: G x KT <= kGzRows (3 blocks/SM with the pair table)
constexpr int kGzBatch = 4;   // pair updates whose table entries and z values are loaded before their stores

constexpr int kGpM = 64;                     // prototypes per grad_p block
constexpr int kGpPerWarp = kGpM / kBwWarps;  // 8, one register accumulator each
constexpr int kGpMaxImages = 8;              // images per grad_p stage (at most)
constexpr int kGpStageRows = kBackwardStagedPatches;  // staged patch rows per stage: images x HW <= this
constexpr int kGpMaxParts = 4;               // image parts of a grad_p tile (at most)
constexpr int64_t kGpMaxPartialFloats = int64_t{1} << 22;  // the parts' workspace: at most 16 MiB

struct BackwardLaunch {
  unsigned blocks;     // grid size (1-D)
  unsigned gz_blocks;  // the first gz_blocks blocks are grad_z blocks
  int d_slices;        // 32-channel slices
  int G, KT, seg;      // grad_z: images per block, patches per pass, prototypes per warp (multiple of 32)
  int gz_sorted;       // grad_z: 1 for the sorted plan (grad_z_sorted_block), 0 for the scanning one
  int gp_images;       // grad_p: images per stage
  int gp_stage;        // grad_p: 1 if z slices are staged in shared memory (HW x gp_images <= kGpStageRows)
  int gp_first;        // 1: the grad_p blocks take the first block indices (backward_launch)
  int gp_parts;        // grad_p: blocks per (prototype tile, channel slice), each over a run of the images
  int gp_part_images;  // grad_p: images per part (a multiple of gp_images)
  int gp_part_stages;  // grad_p: gp_part_images / gp_images
  size_t smem;         // dynamic shared memory, bytes
};

// Floats of dynamic shared memory of each role.
// grad_z: the warps' accumulators and the z tile (rows of kAccStride), then each warp's pair table.
__host__ __device__ constexpr int gz_table_offset(int G, int KT) { return ((kBwWarps + 1) * G * KT * kAccStride + 1) / 2 * 2; }
__host__ __device__ constexpr int gz_smem_floats(int G, int KT) { return gz_table_offset(G, KT) + kBwWarps * kGzGroup * 64; }
// grad_p stage buffer: z slices (rounded up to 16 bytes), then g[images][kGpM], k[images][kGpM] (16-byte
// loads of a warp's 8); a multiple of 4 floats (16-byte copies into either buffer).
__host__ __device__ constexpr int gp_z_floats(int images, int staged_hw) {
  return (images * staged_hw * kAccStride + 3) / 4 * 4;
}
__host__ __device__ constexpr int gp_stage_floats(int images, int staged_hw) {
  return gp_z_floats(images, staged_hw) + 2 * images * kGpM;
}

// Largest dynamic shared memory of the kernel (either role): 75.8 KB.
constexpr int kGzMaxFloats = gz_smem_floats(1, kGzRows);  // G x KT <= kGzRows
constexpr int kGpMaxFloats = 2 * gp_stage_floats(kGpMaxImages, kGpStageRows / kGpMaxImages);  // images x HW <= 256
constexpr size_t kBwMaxSmem = sizeof(float) * (kGzMaxFloats > kGpMaxFloats ? kGzMaxFloats : kGpMaxFloats);

// grad_z, sorted plan: the image's winners {k << 16 | m, g} sorted by patch (2 M floats), start[0..HW] (HW + 1
// ints) and the scan's 8 per-warp totals, then a region that holds first the sort's scratch (k and g per
// prototype, counts per warp and patch) and then the z tile (KT rows of kAccStride). At most kGsMaxKT patches
// per pass.
constexpr int kGsMaxKT = 256;
constexpr int kGsLoads = 4;   // prototypes per thread whose (k, g) inputs are in flight at once
constexpr int kGsBatch = 8;   // winners whose p rows are in flight at once
__host__ __device__ constexpr int64_t gs_scratch_offset(int64_t M, int HW) {
  return (2 * M + HW + 1 + kBwWarps + 3) / 4 * 4;
}
__host__ __device__ constexpr int64_t gs_smem_floats(int64_t M, int HW, int KT) {
  return gs_scratch_offset(M, HW) + (2 * M + kBwWarps * HW > KT * kAccStride ? 2 * M + kBwWarps * HW : KT * kAccStride);
}

// grad_z[b, d, k] = sum_{m : k_bm == k} 2 g[b, m] (z[b, d, k] - p[m, d]) for the G images b0.. of the
// group and channels d0..d0+31, written for every (d, k) (zeros where no prototype wins). Patches in
// passes of KT; per pass the group's z tiles are staged (rows z[b, d0.., k]) and every warp clears its
// G x KT accumulator rows. Warp w scans prototypes [w seg, (w+1) seg) 32 at a time: the next chunk's
// (k, g) of every image are loaded while this chunk's p rows (only of prototypes that win in the pass
// for some image; all issued at once) are added into the accumulators of each image in increasing m.
template <int G>  // l.G: one instance per group size, so that one-image blocks carry no second image's code
__device__ __forceinline__ void grad_z_block(const BackwardParams& prm, const BackwardLaunch& l, float* smem,
                                             int group, int slice) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int M = prm.M, D = prm.D, HW = prm.HW;
  const int KT = l.KT, rows = G * KT;
  const int b0 = group * G;
  const int ng = min(G, prm.B - b0);  // images of this group
  const int d0 = slice * 32, d = d0 + lane;
  const int dc = min(d, D - 1);  // the lane's channel for p-row reads
  const float* __restrict__ p = prm.p;
  const float* __restrict__ z = prm.z;
  float* const mine = smem + w * rows * kAccStride;
  float* const z_s = smem + kBwWarps * rows * kAccStride;
  // This warp's pair table: per image and lane (prototype) of the chunk, the byte offset of the winner's
  // accumulator row (kl kAccStride floats) and g; the pair updates read it back one prototype at a time (one broadcast LDS.64
  // instead of two shuffles).
  struct PairCoef {
    int off;
    float g;
  };
  PairCoef* const table = reinterpret_cast<PairCoef*>(smem + gz_table_offset(G, KT)) + w * kGzGroup * 32;
  const int m_begin = w * l.seg;
  const int m_end = min(M, m_begin + l.seg);
  const bool dfast = prm.z_sd <= prm.z_sk;  // stage along channels (else along patches): coalesced reads

  // Raw inputs of the 32 prototypes c0.. (lane = one prototype) for image b0 + gi; loads only, no use, so
  // that they are in flight while the previous chunk is processed.
  struct Chunk {
    int64_t k;
    float gs, gm, dist;
  };
  auto fetch = [&](int gi, int c0) {
    Chunk c{0, 0.f, 0.f, 0.f};
    const int m = c0 + lane;
    if (gi < ng && m < m_end) {
      const int64_t o = (int64_t)(b0 + gi) * M + m;
      c = {prm.patch_index[o], prm.grad_similarity[o], prm.grad_min_distances[o], prm.min_distances[o]};
    }
    return c;
  };

  for (int k0 = 0; k0 < HW; k0 += KT) {
    const int kt = min(KT, HW - k0);
    for (int i = lane; i < rows * kAccStride; i += 32) mine[i] = 0.f;
    for (int e = threadIdx.x; e < rows * 32; e += kBwThreads) {  // z[b0 + gi, d0 + dl, k0 + kl]
      const int gi = e / (32 * KT), r = e - gi * 32 * KT;
      const int kl = dfast ? r >> 5 : r % KT, dl = dfast ? r & 31 : r / KT;
      z_s[(gi * KT + kl) * kAccStride + dl] =
          (gi < ng && kl < kt && d0 + dl < D)
              ? z[(int64_t)(b0 + gi) * prm.z_sb + (int64_t)(d0 + dl) * prm.z_sd + (int64_t)(k0 + kl) * prm.z_sk]
              : 0.f;
    }
    __syncthreads();

    Chunk next[G];
#pragma unroll
    for (int gi = 0; gi < G; ++gi) next[gi] = fetch(gi, m_begin);
    for (int c0 = m_begin; c0 < m_end; c0 += 32) {
      Chunk cur[G];
#pragma unroll
      for (int gi = 0; gi < G; ++gi) {
        cur[gi] = next[gi];
        if (c0 + 32 < m_end) next[gi] = fetch(gi, c0 + 32);
      }
      // This lane's prototype's winning patch in image gi, local to the pass (-1: not in it), and dL/dd.
      int kl[G];
      float g[G];
      unsigned in_pass[G], any = 0;
#pragma unroll
      for (int gi = 0; gi < G; ++gi) {
        const int k = (gi < ng && c0 + lane < m_end) ? clamp_index(cur[gi].k, HW) : -1;
        kl[gi] = (k >= k0 && k < k0 + kt) ? k - k0 : -1;
        g[gi] = kl[gi] >= 0 ? grad_coef(cur[gi].gs, cur[gi].gm, cur[gi].dist, prm.eps) : 0.f;
        in_pass[gi] = __ballot_sync(kFullMask, kl[gi] >= 0);
        any |= in_pass[gi];
      }
      if (any == 0) continue;  // warp-uniform
      __syncwarp();  // the previous chunk's table reads are done
#pragma unroll
      for (int gi = 0; gi < G; ++gi) table[gi * 32 + lane] = {kl[gi] * (kAccStride * 4), g[gi]};
      __syncwarp();
      // p rows of the chunk, read once for the G images; 16 at a time (registers: 0 spills at 3 blocks/SM).
      // Halves whose 16 prototypes all win in the pass (every one at one pass per image) skip the per-row and
      // per-pair tests.
#pragma unroll
      for (int h = 0; h < 32; h += 16) {
        const unsigned ah = (any >> h) & 0xffffu;
        if (ah == 0) continue;  // warp-uniform
        // Row c0 + h + j by a pointer advanced by D; lanes past D read channel D - 1 (never written out).
        const float* prow = p + (int64_t)(c0 + h) * D + dc;
        float pv[16];
        if (ah == 0xffffu) {
#pragma unroll
          for (int j = 0; j < 16; ++j, prow += D) pv[j] = *prow;
        } else {  // some of the 16 rows are not needed
#pragma unroll
          for (int j = 0; j < 16; ++j, prow += D) pv[j] = ((ah >> j) & 1u) ? *prow : 0.f;
        }
#pragma unroll
        for (int gi = 0; gi < G; ++gi) {
          const unsigned bits = (in_pass[gi] >> h) & 0xffffu;
          if (bits == 0) continue;  // warp-uniform
          char* const acc = reinterpret_cast<char*>(mine + gi * KT * kAccStride + lane);
          const char* const zt = reinterpret_cast<const char*>(z_s + gi * KT * kAccStride + lane);
          const PairCoef* const tab = table + gi * 32 + h;
          // Prototypes c0 + h + j in increasing order (per image: the order of m), those of `use` (the ones that
          // win in the pass), kGzBatch at a time: first their table entries and z values (neither changes during
          // the updates; loaded between the accumulator stores, each would wait for the one before), then the
          // accumulators' read-modify-writes in order.
          auto updates = [&](unsigned use) {
#pragma unroll
            for (int j0 = 0; j0 < 16; j0 += kGzBatch) {
              PairCoef c[kGzBatch];
              float zv[kGzBatch];
#pragma unroll
              for (int j = 0; j < kGzBatch; ++j) {
                c[j] = tab[j0 + j];
                zv[j] = ((use >> (j0 + j)) & 1u) ? *reinterpret_cast<const float*>(zt + c[j].off) : 0.f;
              }
#pragma unroll
              for (int j = 0; j < kGzBatch; ++j) {
                if ((use >> (j0 + j)) & 1u) {  // warp-uniform
                  float* const a = reinterpret_cast<float*>(acc + c[j].off);
                  *a = fmaf(c[j].g, zv[j] - pv[j0 + j], *a);
                }
              }
            }
          };
          if (bits == 0xffffu) {
            updates(0xffffu);
          } else {  // some of the 16 prototypes win outside the pass
            updates(bits);
          }
        }
      }
    }
    __syncthreads();
    // Sum the warps' accumulators in warp order; consecutive threads write consecutive patches.
    for (int e = threadIdx.x; e < rows * 32; e += kBwThreads) {
      const int gi = e / (32 * KT), r = e - gi * 32 * KT;
      const int dl = r / KT, kl = r - dl * KT;
      if (gi < ng && kl < kt && d0 + dl < D) {
        float s = 0.f;
#pragma unroll
        for (int ww = 0; ww < kBwWarps; ++ww) s += smem[(ww * rows + gi * KT + kl) * kAccStride + dl];
        prm.grad_z[((int64_t)(b0 + gi) * D + d0 + dl) * HW + k0 + kl] = 2.f * s;
      }
    }
    __syncthreads();
  }
}

// The lanes of the warp whose v equals this lane's (match.any.sync on sm_70+; elsewhere, and in the
// emulator, by 32 shuffles).
__device__ __forceinline__ unsigned match_any(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700 && !defined(PROTOKERN_EMU)
  return __match_any_sync(kFullMask, v);
#else
  unsigned peers = 0;
  for (int i = 0; i < 32; ++i) peers |= (__shfl_sync(kFullMask, v, i) == v ? 1u : 0u) << i;
  return peers;
#endif
}

// grad_z, sorted plan (backward_launch: where the scanning plan needs several passes of patches and this
// plan's shared memory fits): one block per (image b, channels d0..d0+31). The scanning plan above reads every
// prototype's (k, g) once per pass of patches; here the image's winners are sorted by patch once, stably in
// m, and each patch walks only its own:
//  (1) k and g of every prototype into shared memory (all threads, 4 loads in flight each);
//  (2) warp w counts its prototypes [w seg, (w + 1) seg) per patch, 32 at a time (the last lane of each group
//      of equal k adds the group's size);
//  (3) start[k] = winners of the patches before k (a scan over the patches, each warp a run of them), and
//      warp w's first slot in patch k = start[k] + counts of the warps before w;
//  (4) each warp writes its {k << 16 | m, g} there in increasing m (rank in a chunk: the lanes below with the
//      same k).
// Then passes of KT patches: the z tile is staged (rows of kAccStride, z's own strides), warp w walks the
// winners of its KT / 8 patches in order with 8 p rows in flight, each patch's 2 sum_m g (z - p_m) one fma
// chain in increasing m (deterministic), written over the patch's z row; the tile is written out (zeros
// where no prototype wins).
__device__ __forceinline__ void grad_z_sorted_block(const BackwardParams& prm, const BackwardLaunch& l, float* smem,
                                                    int b, int slice) {
  struct alignas(8) Winner {
    int km;  // k << 16 | m (the plan runs only where M < 2^16, HW < 2^15 and M D < 2^32: backward_launch)
    float g;
  };
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int M = prm.M, D = prm.D, HW = prm.HW, KT = l.KT;
  const int d0 = slice * 32, dc = min(d0 + lane, D - 1);  // lanes past D read channel D - 1 (never written)
  Winner* const ent = reinterpret_cast<Winner*>(smem);
  int* const start = reinterpret_cast<int*>(smem + 2 * M);
  int* const runs = start + HW + 1;  // the scan's per-warp totals
  float* const scratch = smem + gs_scratch_offset(M, HW);
  int* const kk = reinterpret_cast<int*>(scratch);
  float* const gg = scratch + M;
  int* const cnt = reinterpret_cast<int*>(scratch + 2 * M);  // cnt[w HW + k]
  float* const z_s = scratch;                                 // after the sort
  const int64_t o0 = (int64_t)b * M;

  for (int i = tid; i < kBwWarps * HW; i += kBwThreads) cnt[i] = 0;
  // (1) the prototypes' (k, g)
  for (int m0 = tid; m0 < M; m0 += kGsLoads * kBwThreads) {
    int64_t kr[kGsLoads];
    float gs[kGsLoads], gm[kGsLoads], dd[kGsLoads];
#pragma unroll
    for (int j = 0; j < kGsLoads; ++j) {
      kr[j] = 0;
      gs[j] = gm[j] = dd[j] = 0.f;
      const int m = m0 + j * kBwThreads;
      if (m < M) {
        kr[j] = prm.patch_index[o0 + m];
        gs[j] = prm.grad_similarity[o0 + m];
        gm[j] = prm.grad_min_distances[o0 + m];
        dd[j] = prm.min_distances[o0 + m];
      }
    }
#pragma unroll
    for (int j = 0; j < kGsLoads; ++j) {
      const int m = m0 + j * kBwThreads;
      if (m < M) {
        kk[m] = clamp_index(kr[j], HW);
        gg[m] = grad_coef(gs[j], gm[j], dd[j], prm.eps);
      }
    }
  }
  __syncthreads();
  // (2) counts per warp and patch
  const int m_begin = w * l.seg, m_end = min(M, m_begin + l.seg);
  int* const mine = cnt + w * HW;
  for (int c0 = m_begin; c0 < m_end; c0 += 32) {
    const int m = c0 + lane;
    const int k = m < m_end ? kk[m] : -1;
    const unsigned peers = match_any(k);
    if (k >= 0 && (peers >> lane) == 1u) mine[k] += __popc(peers);  // the group's last lane
    __syncwarp();
  }
  __syncthreads();
  // (3) the scan
  for (int k = tid; k < HW; k += kBwThreads) {
    int s = 0;
    for (int ww = 0; ww < kBwWarps; ++ww) {
      const int c = cnt[ww * HW + k];
      cnt[ww * HW + k] = s;
      s += c;
    }
    start[k] = s;
  }
  __syncthreads();
  {  // exclusive scan of start[0..HW): warp w scans its run of patches, then each run adds the runs before it
    const int run = (HW + kBwWarps * 32 - 1) / (kBwWarps * 32) * 32;
    const int k_end = min(HW, (w + 1) * run);
    int carry = 0;
    for (int k0 = w * run; k0 < k_end; k0 += 32) {
      const int k = k0 + lane;
      const int v = k < k_end ? start[k] : 0;
      int x = v;  // inclusive scan over the lanes
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x += y;
      }
      if (k < k_end) start[k] = carry + x - v;
      carry += __shfl_sync(kFullMask, x, 31);
    }
    if (lane == 0) runs[w] = carry;
    __syncthreads();
    for (int k = tid; k <= HW; k += kBwThreads) {
      const int r = k < HW ? k / run : kBwWarps;  // start[HW] = all of them (M)
      int before = 0;
      for (int ww = 0; ww < r; ++ww) before += runs[ww];
      start[k] = (k < HW ? start[k] : 0) + before;
    }
  }
  __syncthreads();
  // (4) the scatter
  for (int c0 = m_begin; c0 < m_end; c0 += 32) {
    const int m = c0 + lane;
    const int k = m < m_end ? kk[m] : -1;
    const unsigned peers = match_any(k);
    if (k >= 0) ent[start[k] + mine[k] + __popc(peers & ((1u << lane) - 1u))] = {k << 16 | m, gg[m]};
    __syncwarp();
    if (k >= 0 && (peers >> lane) == 1u) mine[k] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();

  const bool dfast = prm.z_sd <= prm.z_sk;  // stage along channels (else along patches): coalesced reads
  const int64_t sd = prm.z_sd, sk = prm.z_sk;
  const float* const zb = prm.z + (int64_t)b * prm.z_sb;
  float* const gzb = prm.grad_z + (int64_t)b * D * HW;
  const float* const pl = prm.p + dc;  // pl[m D]: this lane's channel of p row m
  const int per_warp = KT / kBwWarps;
  for (int k0 = 0; k0 < HW; k0 += KT) {
    const int kt = min(KT, HW - k0);
    float* const zl = z_s + lane;  // zl[(k - k0) kAccStride]: patch k's row, this lane's channel
    if (dfast) {  // lanes along channels
      const bool ok = d0 + lane < D;
      const float* const src = zb + (int64_t)(ok ? d0 + lane : 0) * sd + k0 * sk;
#pragma unroll 4
      for (int kl = w; kl < kt; kl += kBwWarps) copy_async(z_s + kl * kAccStride + lane, src + kl * sk, ok);
    } else {  // lanes along patches
      for (int dl = w; dl < 32; dl += kBwWarps) {
        const bool ok = d0 + dl < D;
        const float* const src = zb + (int64_t)(ok ? d0 + dl : 0) * sd + k0 * sk;
#pragma unroll 4
        for (int kl = lane; kl < kt; kl += 32) copy_async(z_s + kl * kAccStride + dl, src + kl * sk, ok);
      }
    }
    async_commit();
    async_wait<0>();
    __syncthreads();
    const int ka = min(k0 + w * per_warp, k0 + kt), kb = min(ka + per_warp, k0 + kt);
    const int e_end = start[kb];
    // Patch kc's sum so far; a patch change writes it over kc's z row (the first write may put 0 on a patch
    // without winners, which the write-out ignores).
    int kc = ka;
    float zc = ka < kb ? zl[(ka - k0) * kAccStride] : 0.f, acc = 0.f;
    auto visit = [&](const Winner& en, float pe) {
      const int k = en.km >> 16;
      if (k != kc) {  // warp-uniform
        zl[(kc - k0) * kAccStride] = 2.f * acc;
        kc = k;
        zc = zl[(k - k0) * kAccStride];
        acc = 0.f;
      }
      acc = fmaf(en.g, zc - pe, acc);
    };
    int e = start[ka];
    for (; e + kGsBatch <= e_end; e += kGsBatch) {  // full batches: 8 p rows in flight
      Winner en[kGsBatch];
      float pe[kGsBatch];
#pragma unroll
      for (int j = 0; j < kGsBatch; ++j) en[j] = ent[e + j];
#pragma unroll
      for (int j = 0; j < kGsBatch; ++j) pe[j] = pl[(uint32_t)(en[j].km & 0xffff) * (uint32_t)D];
#pragma unroll
      for (int j = 0; j < kGsBatch; ++j) visit(en[j], pe[j]);
    }
    for (; e < e_end; ++e) {
      const Winner en = ent[e];
      visit(en, pl[(uint32_t)(en.km & 0xffff) * (uint32_t)D]);
    }
    if (ka < kb) zl[(kc - k0) * kAccStride] = 2.f * acc;
    __syncthreads();
    // Write the tile out: consecutive lanes write consecutive patches.
    for (int dl = w; dl < 32 && d0 + dl < D; dl += kBwWarps) {
      float* const dst = gzb + (int64_t)(d0 + dl) * HW + k0;
      for (int kl = lane; kl < kt; kl += 32)  // a patch without winners still holds z: its gradient is 0
        dst[kl] = start[k0 + kl + 1] > start[k0 + kl] ? z_s[kl * kAccStride + dl] : 0.f;
    }
    __syncthreads();
  }
}

// x, hidden from the optimiser: what a walker derives from it is computed where the walker runs (once per
// stage) instead of being hoisted out of the stage loop into registers held across it (spills at 80).
__device__ __forceinline__ int opaque(int x) {
#if defined(__CUDA_ARCH__) && !defined(PROTOKERN_EMU)
  asm volatile("" : "+r"(x));
#endif
  return x;
}

// The z copies of one grad_p stage, 4-byte path: an image slice is rin x rout copies, digits (o, in) with in
// innermost; element (image bl, o, in) comes from z + bl sb + o so + in si (elements) and goes to
// st + bl img + o to + in ti (floats); copies with o >= o_lim or in >= in_lim are zero-filled.
struct StageWalk {
  int rin, rout;
  int64_t si, so;
  int ti, to;
  int in_lim, o_lim;
};

// Issues this thread's copies e = tid, tid + kBwThreads, ... of nbv image slices. The digits (o, in) of e
// advance by kBwThreads = so_ rin + si_ per step with carries, the source pointer and the staged offset by
// precomputed deltas: no division and no 64-bit multiply per copy.
__device__ __forceinline__ void walk_copies4(const StageWalk& wk, float* st, const float* zs, int64_t sb, int img,
                                             int nbv) {
  const int tid = opaque(threadIdx.x), per_img = wk.rin * wk.rout;
  const int so_ = kBwThreads / wk.rin, si_ = kBwThreads - so_ * wk.rin;
  const int bl0 = tid / per_img;
  int o = (tid - bl0 * per_img) / wk.rin, in = tid - bl0 * per_img - o * wk.rin;
  const float* src = zs + bl0 * sb + o * wk.so + in * wk.si;
  int dst = bl0 * img + o * wk.to + in * wk.ti;
  const int64_t src_step = so_ * wk.so + si_ * wk.si, src_in = wk.so - wk.rin * wk.si,
                src_o = sb - wk.rout * wk.so;
  const int dst_step = so_ * wk.to + si_ * wk.ti, dst_in = wk.to - wk.rin * wk.ti, dst_o = img - wk.rout * wk.to;
  for (int e = tid; e < nbv * per_img; e += kBwThreads) {
    const bool ok = o < wk.o_lim && in < wk.in_lim;
    copy_async(st + dst, ok ? src : zs, ok);
    in += si_;
    o += so_;
    src += src_step;
    dst += dst_step;
    if (in >= wk.rin) {
      in -= wk.rin;
      ++o;
      src += src_in;
      dst += dst_in;
    }
    while (o >= wk.rout) {  // at most kBwThreads / per_img + 1 times
      o -= wk.rout;
      src += src_o;
      dst += dst_o;
    }
  }
}

// 16-byte path, z staged as it lies (dense, 16-byte aligned): an image slice is rows x cpr 16-byte copies
// (cpr = 1 or 8 divides kBwThreads), row r starting at zs + r rs (elements), copy c = r cpr + j landing at
// st + 4 (bl n16 + c), n16 = rows cpr. This thread's copies are c = tid + kBwThreads i: chunk j = tid % cpr of
// rows tid / cpr + (kBwThreads / cpr) i, at the same offsets in every image and stage, so its source pointer
// advances by constant steps (no division, no carry). Copies with c >= c_lim, or with 4 j >= j_lim, are
// zero-filled.
__device__ __forceinline__ void walk_copies16(float* st, const float* zs, int64_t sb, int rows, int cpr, int64_t rs,
                                              int c_lim, int j_lim, int nbv) {
  const int tid = opaque(threadIdx.x), j = tid % cpr, n16 = rows * cpr;
  const int lim = 4 * j < j_lim ? c_lim : 0;
  const int64_t off = (tid / cpr) * rs + 4 * j, step = (kBwThreads / cpr) * rs;
  for (int bl = 0; bl < nbv; ++bl, zs += sb, st += 4 * n16) {
    const float* src = zs + off;
#pragma unroll 1
    for (int c = tid; c < n16; c += kBwThreads, src += step) {
      const bool ok = c < lim;
      copy_async16(st + 4 * c, ok ? src : zs, ok ? 4 : 0);
    }
  }
}

// 8 values loaded from shared memory as two 16-byte words.
template <class T>
struct alignas(16) Vec8 {
  T v[8];
};

// A grad_p block's image part and tile (prototype tile x d_slices + channel slice) from its block index: the
// grad_p blocks are [0, blocks - gz_blocks) where gp_first, else [gz_blocks, blocks); a tile's parts adjacent.
struct GpBlock {
  int part, tile;
};
__device__ __forceinline__ GpBlock gp_block(const BackwardLaunch& l, unsigned block) {
  const unsigned j = l.gp_first ? block : block - l.gz_blocks;
  return {(int)(j % l.gp_parts), (int)(j / l.gp_parts)};
}

// How a grad_p block stages z (grad_p_block's template parameter; gp_layout chooses per block):
//  - kGpNchw / kGpNhwc: z 16-byte aligned (base, image stride) with runs of whole 16-byte chunks: NCHW (sk == 1,
//    sd == HW: the slice is one run of 32 HW floats, HW Dv % 4 == 0) or NHWC (sd == 1, sk % 4 == 0: a run of
//    32 channels per patch, Dv % 4 == 0), staged densely as they lie in z by 16-byte copies. NCHW reads: lane
//    stride HW, gcd(HW, 32)-way bank conflicts: conflict-free for odd HW (7x7), at most 4-way for HW % 8 != 0;
//    NCHW maps with HW % 8 == 0 (4x4, 8x8, 16x16: 8- to 32-way) take kGpOther instead.
//  - kGpOther: 4-byte copies into rows of kAccStride floats per patch (conflict-free both ways), or, without
//    gp_stage, z gathered from global memory.
// One instance per layout: each holds only its own staging code and registers (at 80 registers, one body
// holding every path spilled).
enum GpLayout : int { kGpNchw = 0, kGpNhwc = 1, kGpOther = 2 };

__device__ __forceinline__ GpLayout gp_layout(const BackwardParams& prm, const BackwardLaunch& l, int slice) {
  const int Dv = min(32, prm.D - slice * 32);  // valid channels of the slice
  const bool aligned = l.gp_stage && (reinterpret_cast<uintptr_t>(prm.z) & 15) == 0 && (prm.B == 1 || prm.z_sb % 4 == 0);
  if (aligned && prm.z_sk == 1 && prm.z_sd == prm.HW && Dv * prm.HW % 4 == 0 && prm.HW % 8 != 0) return kGpNchw;
  if (aligned && prm.z_sd == 1 && (prm.HW == 1 || prm.z_sk % 4 == 0) && Dv % 4 == 0) return kGpNhwc;
  return kGpOther;
}

// grad_p[m, d] = sum_b 2 g[b, m] (p[m, d] - z[b, d, k_bm]) for prototypes m0..m0+63 (warp w: m0 + 8w..
// m0 + 8w + 7) and channels d0..d0+31 (one lane each), b summed in increasing order in registers over this
// block's part of the images (all of them where gp_parts = 1). Stages of gp_images images: their (g, k) (one
// coalesced load per element), and with gp_stage their z slices z[b, d0.., :] (cp.async, z's own strides),
// double-buffered: stage i + 1 is in flight while stage i is used.
template <GpLayout L>
__device__ __forceinline__ void grad_p_block(const BackwardParams& prm, const BackwardLaunch& l, float* smem,
                                             int mtile, int slice, int part) {
  constexpr bool kNchw = L == kGpNchw, kNhwc = L == kGpNhwc, kDense = kNchw || kNhwc;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int B = prm.B, M = prm.M, D = prm.D, HW = prm.HW;
  // This part's images: gp_part_stages stages from b_begin, the last part's cut at B. Only the loop's end tests
  // the part's end: the stages before it are whole, so their tests against B are the part's.
  const int b_begin = part * l.gp_part_images;
  const int m0 = mtile * kGpM, d0 = slice * 32, d = d0 + lane;
  const bool d_ok = d < D;
  const int NB = l.gp_images;
  const bool staged = kDense || l.gp_stage != 0;
  const int shw = staged ? HW : 0;  // staged patch rows per image
  const int stage_floats = gp_stage_floats(NB, shw);
  const float* __restrict__ z = prm.z;
  const int64_t sb = prm.z_sb, sd = prm.z_sd, sk = prm.z_sk;

  float pv[kGpPerWarp], acc[kGpPerWarp];
#pragma unroll
  for (int j = 0; j < kGpPerWarp; ++j) {
    const int m = m0 + kGpPerWarp * w + j;
    pv[j] = (m < M && d_ok) ? prm.p[(int64_t)m * D + d] : 0.f;
    acc[j] = 0.f;
  }

  // The staged read of (image bl, patch k, channel d0 + lane) is st[bl img + k ks + lane ls] in every layout.
  const int Dv = min(32, D - d0);  // valid channels of the slice
  const int img = kDense ? 32 * HW : HW * kAccStride, ks = kNchw ? 1 : (kNhwc ? 32 : kAccStride), ls = kNchw ? HW : 1;
  const int kmul = staged ? 4 * ks : 1;  // k_s holds k kmul: the staged row's byte offset, or k

  // Stage s: images bs = s NB.. into buffer s & 1: z slices by cp.async, committed as one group (issue); the
  // pairs' (g, k) by plain loads into registers (load_gk) when the stage is issued, stored (store_gk) after the
  // current stage's sums, so that those loads' latency overlaps them (the buffer's last reads were before the
  // previous iteration's last barrier; the stage's first reads come after the next one).
  auto issue = [&](int bs, int buf) {
    float* const st = smem + buf * stage_floats;
    const int nbv = min(NB, B - bs);  // images of the stage (the rest is never read)
    // (kGpOther: z + d0 sd held across the stage loop spilled at 80)
    const float* const zs = z + bs * sb + (kDense ? d0 : opaque(d0)) * sd;
    if constexpr (kNchw) {  // rows: the run's 8 HW chunks, the first Dv HW / 4 valid
      walk_copies16(st, zs, sb, 8 * HW, 1, 4, Dv * HW / 4, 4, nbv);
    } else if constexpr (kNhwc) {  // rows: the HW patches, 8 chunks of 4 channels each
      walk_copies16(st, zs, sb, HW, 8, sk, 8 * HW, Dv, nbv);
    } else if (staged) {  // in: the channel and o the patch (dfast), or the reverse
      const StageWalk wk = sd <= sk ? StageWalk{32, HW, sd, sk, 1, kAccStride, Dv, HW}
                                    : StageWalk{HW, 32, sk, sd, kAccStride, 1, HW, Dv};
      walk_copies4(wk, st, zs, sb, img, nbv);
    }
    async_commit();
  };
  // (g, k): thread tid takes prototype m0 + tid % kGpM of images tid / kGpM + (kBwThreads / kGpM) r (at most
  // two), read at the stage's offset bs M plus 32-bit offsets (NB M < 2^31: backward_launch).
  constexpr int kGkPerThread = kGpMaxImages * kGpM / kBwThreads;
  struct PairInputs {
    float gs[kGkPerThread], gm[kGkPerThread], md[kGkPerThread];
    int64_t k[kGkPerThread];
    bool ok[kGkPerThread];  // a pair of the problem (else g = 0, k = 0)
  };
  const int ml = tid % kGpM, m_gk = m0 + ml;
  auto load_gk = [&](int bs) {
    PairInputs in;
    const int64_t base = (int64_t)bs * M;
#pragma unroll
    for (int r = 0; r < kGkPerThread; ++r) {
      const int bl = tid / kGpM + r * (kBwThreads / kGpM), o = bl * M + m_gk;
      const bool ok = bl < NB && bs + bl < B && m_gk < M;
      in.ok[r] = ok;
      in.gs[r] = ok ? prm.grad_similarity[base + o] : 0.f;
      in.gm[r] = ok ? prm.grad_min_distances[base + o] : 0.f;
      in.md[r] = ok ? prm.min_distances[base + o] : 0.f;
      in.k[r] = ok ? prm.patch_index[base + o] : 0;
    }
    return in;
  };
  auto store_gk = [&](const PairInputs& in, int buf) {
    float* const g_s = smem + buf * stage_floats + gp_z_floats(NB, shw);
    int* const k_s = reinterpret_cast<int*>(g_s + NB * kGpM);
#pragma unroll
    for (int r = 0; r < kGkPerThread; ++r) {
      const int bl = tid / kGpM + r * (kBwThreads / kGpM);
      if (bl < NB) {
        g_s[bl * kGpM + ml] = in.ok[r] ? grad_coef(in.gs[r], in.gm[r], in.md[r], prm.eps) : 0.f;
        k_s[bl * kGpM + ml] = clamp_index(in.k[r], HW) * kmul;
      }
    }
  };

  issue(b_begin, 0);
  store_gk(load_gk(b_begin), 0);
  for (int si = 0, bs = b_begin; si < l.gp_part_stages && bs < B; ++si, bs += NB) {
    const int buf = si & 1;
    const bool more = si + 1 < l.gp_part_stages && bs + NB < B;
    PairInputs next;
    if (more) {
      issue(bs + NB, buf ^ 1);
      next = load_gk(bs + NB);  // stored after this stage's sums
      async_wait<1>();
    } else {
      async_wait<0>();
    }
    __syncthreads();
    const float* const st = smem + buf * stage_floats;
    const float* const g_s = st + gp_z_floats(NB, shw);
    const int* const k_s = reinterpret_cast<const int*>(g_s + NB * kGpM);
    const int nb = min(NB, B - bs);
    if (d_ok && staged) {
      for (int bl = 0; bl < nb; ++bl) {  // b in increasing order
        // This warp's 8 k kmul of image bl (two 16-byte loads), then its 8 g.
        const Vec8<int> kv = *reinterpret_cast<const Vec8<int>*>(k_s + bl * kGpM + kGpPerWarp * w);
        const float* const gb = g_s + bl * kGpM + kGpPerWarp * w;
        const char* const zb = reinterpret_cast<const char*>(st + bl * img + lane * ls);
#pragma unroll
        for (int j = 0; j < kGpPerWarp; ++j)
          acc[j] = fmaf(gb[j], pv[j] - *reinterpret_cast<const float*>(zb + kv.v[j]), acc[j]);
      }
    } else if (d_ok) {  // z gathered from global memory (kGpOther only)
      for (int bl = 0; bl < nb; ++bl) {
        const int b = bs + bl;
#pragma unroll
        for (int j = 0; j < kGpPerWarp; ++j) {
          const int i = bl * kGpM + kGpPerWarp * w + j;
          acc[j] = fmaf(g_s[i], pv[j] - z[b * sb + (int64_t)d * sd + (int64_t)k_s[i] * sk], acc[j]);
        }
      }
    }
    if (more) store_gk(next, buf ^ 1);
    __syncthreads();  // buffer buf is refilled by the next iteration's issue
  }
  const int mw = opaque(m0 + kGpPerWarp * w);  // recomputed here, not held from the p loads (spills at 80)
  if (l.gp_parts > 1) {  // this part's sums to the workspace; the tile's last block adds the parts
    const int64_t md = (int64_t)M * D;
#pragma unroll
    for (int j = 0; j < kGpPerWarp; ++j) {
      const int m = mw + j;
      if (m < M && d_ok) prm.gp_partial[part * md + (int64_t)m * D + d] = acc[j];
    }
    // Every thread's stores are visible device-wide before the block counts itself done (the CUDA
    // programming guide's last-block pattern): the block that sees the others all done reads their sums.
    __threadfence();
    unsigned* const count = prm.gp_count + mtile * l.d_slices + slice;
    if (!__syncthreads_or(tid == 0 && atomicAdd(count, 1u) == (unsigned)l.gp_parts - 1)) return;
    __threadfence();
    // The parts in increasing order (this block's too, as it stored it), every load issued at once.
#pragma unroll
    for (int j = 0; j < kGpPerWarp; ++j) {
      const int m = mw + j;
      if (m < M && d_ok) {
        const float* const at = prm.gp_partial + (int64_t)m * D + d;
        float s = __ldcg(at);
#pragma unroll
        for (int q = 1; q < kGpMaxParts; ++q) {
          if (q < l.gp_parts) s += __ldcg(at + q * md);
        }
        prm.grad_p[(int64_t)m * D + d] = 2.f * s;
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kGpPerWarp; ++j) {
    const int m = mw + j;
    if (m < M && d_ok) prm.grad_p[(int64_t)m * D + d] = 2.f * acc[j];
  }
}

// The one backward launch: grid (l.blocks), kBwThreads threads, l.smem bytes of dynamic shared memory.
__global__ void __launch_bounds__(kBwThreads, kBwMinBlocks) backward_kernel(const BackwardParams prm,
                                                                           const BackwardLaunch l) {
  PK_DYNAMIC_SMEM(smem);
  const unsigned gp_blocks = l.blocks - l.gz_blocks;
  const bool gz_role = l.gp_first ? blockIdx.x >= gp_blocks : blockIdx.x < l.gz_blocks;
  if (gz_role) {
    const unsigned i = l.gp_first ? blockIdx.x - gp_blocks : blockIdx.x;
    if (l.gz_sorted) {
      grad_z_sorted_block(prm, l, smem, (int)(i / l.d_slices), (int)(i % l.d_slices));
    } else if (l.G == 1) {
      grad_z_block<1>(prm, l, smem, (int)(i / l.d_slices), (int)(i % l.d_slices));
    } else {
      grad_z_block<kGzGroup>(prm, l, smem, (int)(i / l.d_slices), (int)(i % l.d_slices));
    }
    return;
  }
  const GpBlock gb = gp_block(l, blockIdx.x);
  const int mtile = gb.tile / l.d_slices, slice = gb.tile % l.d_slices;
  const GpLayout layout = gp_layout(prm, l, slice);
  if (layout == kGpNchw) {
    grad_p_block<kGpNchw>(prm, l, smem, mtile, slice, gb.part);
  } else if (layout == kGpNhwc) {
    grad_p_block<kGpNhwc>(prm, l, smem, mtile, slice, gb.part);
  } else {
    grad_p_block<kGpOther>(prm, l, smem, mtile, slice, gb.part);
  }
}

inline BackwardLaunch backward_launch(const BackwardParams& prm) {
  BackwardLaunch l{};
  l.d_slices = (prm.D + 31) / 32;
  // Two images per block only where they fit one pass: at larger maps a second image per block saves no p-row
  // read (twice the passes) and halves the blocks (7x7: 320 blocks of 1 image balance the SMs better than 160).
  l.G = prm.B >= kGzGroup && prm.HW * kGzGroup <= kGzRows ? kGzGroup : 1;
  const int per_pass = kGzRows / l.G;                        // patches per pass at most
  const int passes = (prm.HW + per_pass - 1) / per_pass;
  l.KT = (prm.HW + passes - 1) / passes;                     // balanced passes (49 -> 25 + 24 at G = 2)
  l.seg = ((prm.M + kBwWarps - 1) / kBwWarps + 31) / 32 * 32;
  // grad_z's sorted plan where the scanning plan would need several passes (it reads every prototype's (k, g)
  // and pays its 32-prototype chunk overhead once per pass: at 14x14 and 28x28 most of grad_z's instructions)
  // and the sorted plan's shared memory fits; in one pass the scanning plan issues fewer instructions per pair.
  const int gs_passes = (prm.HW + kGsMaxKT - 1) / kGsMaxKT;
  const int gs_kt = ((prm.HW + gs_passes - 1) / gs_passes + kBwWarps - 1) / kBwWarps * kBwWarps;
  const int64_t gs = gs_smem_floats(prm.M, prm.HW, gs_kt);
  l.gz_sorted = passes > 1 && prm.M <= 0xffff && prm.HW <= 0x7fff && (int64_t)prm.M * prm.D <= 0xffffffffLL &&
                 sizeof(float) * gs <= kBwMaxSmem;
  if (l.gz_sorted) {
    l.G = 1;
    l.KT = gs_kt;
  }
  l.gz_blocks = (unsigned)((prm.B + l.G - 1) / l.G * l.d_slices);
  l.gp_stage = prm.HW <= kGpStageRows;
  int images = l.gp_stage ? kGpStageRows / prm.HW : kGpMaxImages;
  images = images < kGpMaxImages ? images : kGpMaxImages;
  const int fit = 0x7fffffff / prm.M;  // grad_p reads (g, k) at 32-bit offsets within a stage: images M < 2^31
  l.gp_images = images < fit ? images : (fit > 1 ? fit : 1);
  // A grad_z block adds G x M (image, prototype) pairs, a grad_p block kGpM x (its images), both over 8 warps;
  // measured on an H200 at (80, 128, 7x7, 2000) (ncu warp samples per role,
  // benchmarks/results/stalls-2026-11-30-h200-v12.md): a grad_p block over all 80 images (5120 pairs) ran 2.3x
  // as long as a grad_z block (2000), and the grad_p blocks set the end. So grad_p's images are cut into parts
  // of whole stages, as many as a grad_p block has times a grad_z block's pairs, rounded (at most kGpMaxParts,
  // and within the workspace's kGpMaxPartialFloats): at the CUB shape 3 parts of 1920 pairs.
  const int stages = (prm.B + l.gp_images - 1) / l.gp_images;
  const int64_t gz_pairs = (int64_t)l.G * prm.M;
  int64_t parts = (2 * kGpM * (int64_t)prm.B + gz_pairs) / (2 * gz_pairs);
  // at most prm.gp_max_parts (where set; 1: one block over all images, as before v20)
  const int max_parts = prm.gp_max_parts > 0 && prm.gp_max_parts < kGpMaxParts ? prm.gp_max_parts : kGpMaxParts;
  parts = parts < max_parts ? parts : max_parts;
  parts = parts < stages ? parts : stages;
  while (parts > 1 && parts * prm.M * prm.D > kGpMaxPartialFloats) --parts;
  parts = parts > 1 ? parts : 1;
  l.gp_part_stages = (int)((stages + parts - 1) / parts);
  l.gp_part_images = l.gp_part_stages * l.gp_images;
  l.gp_parts = (prm.B + l.gp_part_images - 1) / l.gp_part_images;
  l.blocks = l.gz_blocks + (unsigned)((prm.M + kGpM - 1) / kGpM * l.d_slices * l.gp_parts);
  // Longer blocks first, so that the blocks of the last wave are the short ones.
  l.gp_first = (int64_t)kGpM * l.gp_part_images > (int64_t)l.G * prm.M;
  const int gz = l.gz_sorted ? (int)gs : gz_smem_floats(l.G, l.KT);
  const int gp = 2 * gp_stage_floats(l.gp_images, l.gp_stage ? prm.HW : 0);
  l.smem = sizeof(float) * (size_t)(gz > gp ? gz : gp);
  return l;
}

// The workspace launch l needs (params.h: BackwardWorkspace): partial sums per part, a counter per grad_p tile.
inline BackwardWorkspace backward_workspace(const BackwardLaunch& l, const BackwardParams& prm) {
  if (l.gp_parts <= 1) return {0, 0};
  return {(int64_t)l.gp_parts * prm.M * prm.D, (int64_t)(l.blocks - l.gz_blocks) / l.gp_parts};
}

}  // namespace
}  // namespace protokern
