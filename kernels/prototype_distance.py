"""Triton kernels of the fused prototype op: distance + global min/argmin + log-similarity.

Forward: a pre-pass writes every patch's norms (``_patch_norms_kernel``), then one program per (block of
images, tile of prototypes). The prototype tile's norms are computed once and the tile serves every image of
the block (when the channels fit one slice, the p tile itself is loaded once into registers; otherwise its
slices are re-read, L1-hot, for each image and patch tile). For each image the program walks the patches in
tiles (two a step for the tensor-core searches), computes approximate squared distances with the expansion
``|p|^2 + |z|^2 - 2 p.z`` (a ``tl.dot``) and rescores exactly, as ``sum_d (z - p)^2`` in fp32 in a fixed
order (``RESCORE_LANES``), every patch that the search's error bound cannot rule out (certified search,
``search_bound.py``); it keeps the exact min and argmin per prototype in registers and writes the
similarity. The (B, M, H*W) map never reaches memory.

Backward: gradients reach only the winning patch of each (b, m); no sort, no float atomics, grad_p launched
first (it also writes each pair's coefficient g for grad_z), every sum in a fixed order: gradients are
bitwise reproducible.

* ``grad_z``: one program per (block of images, tile of their patches, channel tile). It walks the prototypes in
  tiles; for each tile it builds in registers the selection ``sel[q, (b, m)] = 1`` if pair (b, m) won patch q of
  the block, forms each pair's contribution ``g (z_win - p)`` (g as grad_p wrote it) in the difference form (the
  winning z rows gathered), and adds ``sel @ contributions`` with tensor-core dots whose products are exact (the
  contributions are split into three TF32-exact parts, ``sel`` is 0/1). Only the pairs won in the tile are
  gathered; in tiles smaller than their image (COMPACT) a prefix sum lists them first, once per (image, tile)
  (``_won_pairs_kernel``), so that the dots run on full steps of won pairs. Non-finite contributions take a
  separate exact path, so a NaN or inf pair reaches its own winning patch only.
* ``grad_p``: one program per (prototype tile, channel tile, run of images), looping over its images in
  order with the winning z rows gathered; the partial sums of the runs are then reduced in a fixed order.
  Its first channel tile writes g[b, m] = grad_d + grad_sim * d(sim)/d(d) for grad_z.

Inputs may be fp16/bf16/fp32/fp64 with any strides over (B, D, H*W); all arithmetic is fp32. Every
configuration a launcher can pick is listed by ``launch_configs()`` (the sm_90 compile gate compiles them all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from protokern.kernels import search_bound

# "highest": exact fp32 products; "high": 3xTF32 (about fp32 accuracy); "medium": TF32 on operands the kernel
# truncates itself, bounded by their residuals (search_bound.truncated_tf32_bound) (also the names of their
# search_bound levels). The precision only changes the search's speed, never its result.
INPUT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
MAX_PROGRAMS = 2 ** 31 - 1  # CUDA grid axis 0 limit; larger problems launch in runs of images
MAX_GRID_YZ = 65535  # CUDA grid axes 1 and 2 limit
TARGET_PROGRAMS = 1024  # the forward packs images into programs while at least this many remain (~8 per SM)

# Tile sizes a launcher can pick (powers of two; each tile's size follows its problem dimension).
FORWARD_TILES = (16, 32, 64)  # BLOCK_M from M, BLOCK_K from HW
FORWARD_SLICE = 32  # channels per step of the forward search
NORMS_TILE = 64  # patches per program of _patch_norms_kernel
# The exact rescoring's summation order, the same in every configuration, compiled or interpreted: lane e of
# RESCORE_LANES sums (z_d - p_d)^2 over d = e, e + 32, ... in order, then a pairwise tree adds the lanes
# (``_lane_tree_sum``). Built from elementwise adds only, so it depends on no tile size, warp count or
# register layout; compiled kernels may fuse each square into its lane's addition (FMA).
RESCORE_LANES = tl.constexpr(32)
# Forward launch options per precision: (num_warps, num_stages), the ones that compile for sm_90 without
# spills (tests/kernels/sm90_gate.py). Why these, with the measured history: benchmarks/NOTES.md, "Triton
# launch configuration" and "Triton v7" ("medium" takes 1 stage since v7: with 2, 64 x 32 tiles spill under
# the 128-register cap).
_FORWARD_OPTIONS = {"highest": (8, 1), "high": (8, 1), "medium": (8, 1)}
# Tensor-core searches ("high", "medium") run 2 blocks of 256 threads per SM: ptxas is capped at 128 registers
# (.maxnreg) and their tiles hold at most 64 x 32 (prototypes x patches). At 64 x 64 no arrangement tried
# compiles under that cap without spilling on both Triton 3.6 and 3.8 (24-176 bytes; benchmarks/NOTES.md
# "Triton v7"); every smaller tile does.
TENSOR_CORE_MAX_REGISTERS = 128
TENSOR_CORE_MAX_TILE = 64 * 32
# ... and at most 32 patches, two such tiles a step (PAIRED) where the map has more: the rescoring rounds then
# follow the threshold of 64 patches and take each row's candidates from the bits of two int32 words (NOTES.md
# "Triton v11").
TENSOR_CORE_MAX_PATCHES = 32
# ptxas's register cap for the "highest" forward's tiles smaller than 64 x 64: left to choose, ptxas aims at
# 64-128 registers for some of them and spills 8-200 bytes (11 configurations on Triton 3.8 / ptxas 13, 2
# others on Triton 3.6); with 255 it keeps everything in registers. The 64 x 64 tile keeps ptxas's own choice
# for a resident p tile (a cap of 128 spills 1 KB); with p re-read per slice (D > 32, the CUB shape) it is
# capped at 128 on Triton >= 3.8 so that 2 blocks of 256 threads fit an SM (left to choose, ptxas takes 162
# since the rescoring runs over channel tiles); Triton 3.6's code spills under that cap (480 bytes) and keeps
# ptxas's choice (200). Checked by sm90_gate.py --all on both.
SMALL_TILE_MAX_REGISTERS = 255
STREAMED_P_MAX_REGISTERS = {"highest": 128} if TRITON_VERSION >= (3, 8) else {}
GRAD_Z_PATCH_TILES = (16, 32, 64)  # BLOCK_Q from HW
GRAD_Z_PAIRS = 64  # (image, prototype) pairs per step of grad_z: IMAGES * BLOCK_M
GRAD_Z_CHANNEL_TILES = (16, 32)  # BLOCK_D of grad_z, from D (64 channels spill or reach 255 registers)
# Tiles of part of an image (COMPACT: HW > BLOCK_Q) take 32 pairs per step: measured on an H200 with the
# in-kernel queue (benchmarks/results/triton-sweep-2026-11-30-h200.md: 104 registers, 2 blocks of 256 threads
# per SM, against 210 and 1 block at 64 pairs) the backward at (128, 256, 14x14, 2000) in 1502 us against
# 2226. Since the won pairs come listed (_won_pairs_kernel), 73 registers at 32 pairs and 148 at 64 on
# Triton 3.8 (NOTES.md "Triton v12"; not measured).
GRAD_Z_COMPACT_PAIRS = 32
WON_PAIRS_BLOCK = 1024  # prototypes per step of _won_pairs_kernel (which lists the won pairs of COMPACT tiles)
# The 64-patch grad_z tiles of whole images run 4 warps capped at 128 registers: 4 blocks per SM, all of the
# CUB shape's 320 programs in one wave (8 warps at 128 registers: 2 blocks per SM, 1.2 waves). Measured on an
# H200 (same file): the backward at (80, 128, 7x7, 2000) in 141 us against 214 with 8 warps, the same bits;
# 0 spills on Triton 3.6 and 3.8 (sm90_gate.py --all checks both). The 128-register cap holds since a step no
# longer reduces a non-finite test over the block (NOTES.md "Triton v9").
GRAD_Z_WIDE_TILE_OPTIONS = {"maxnreg": 128, "num_warps": 4}
# Triton 3.6 spills 40 bytes at 32 patches x 32 channels since g comes from grad_p (NOTES.md "Triton v8"):
# its 32-patch tiles take 16 channels there (230 registers).
GRAD_Z_NARROW_PATCH_TILES = (32,) if TRITON_VERSION < (3, 8) else ()
GRAD_P_CHANNEL_TILES = (16, 32, 64)  # BLOCK_D of grad_p, from D
_GRAD_Z_OPTIONS = dict(num_warps=8, num_stages=1)


@triton.jit
def _forward_kernel(
    z_ptr, p_ptr, norms_ptr, sim_ptr, dist_ptr, idx_ptr,
    B, D, HW, M, IMAGES, eps, one_minus_eps, coef, tiny, res_coef,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    P_RESIDENT: tl.constexpr, PRECISION: tl.constexpr, PAIRED: tl.constexpr, TRUNCATE: tl.constexpr,
):
    """One program per (block of IMAGES images, prototype tile), folded into grid axis 0 (no 65535 limit on B).

    P_RESIDENT (D <= BLOCK_D): the p tile is loaded once, before the image loop, and stays in registers.

    Certified search: a~ = |p|^2 + |z|^2 - 2 p.z from tl.dot at PRECISION (``_search_dot``), delta = coef ((|z| +
    |p|)^2 + tiny) >= |a~ - e| (coef and its derivation: ``search_bound.py``); "tf32" adds res_coef |p| (|z_lo| +
    rho_p |z|) from its operands' truncation residual norms, rho_p the tile's largest |p_lo| / |p|
    (``search_bound.converted_tf32_bound``: the MMA may truncate or round its fp32 operands), where the generic
    "tf32" bound would take a coef 64x the others'. The patches' |z|^2 and |z_lo|^2 come from norms_ptr (B, 2, HW)
    (``_patch_norms_kernel``), so that the search loop is loads and dots only. TRUNCATE ("tf32" under the
    interpreter, whose dot is exact fp32, and on non-NVIDIA devices): the kernel truncates the operands itself, so
    that the bound's worst case is what the CPU tests exercise. Each step (one patch tile, or two when PAIRED)
    lowers the running threshold thr = min (a~ + delta), then rescores exactly every patch of the step with a~ -
    delta <= thr or a~ not finite (a superset of the candidates of the final threshold, since thr only decreases),
    one candidate per row at a time in increasing patch order (a round, ``_rescore``), all rows at once over
    (BLOCK_M, RESCORE_LANES) channel tiles; a row's candidates are the bits of int32 words in tiles of up to 32
    patches (no reduction per round), a mask in wider ones. The exact distance is summed in the fixed order of
    RESCORE_LANES (lanes over channels, then a pairwise tree): its bits depend neither on the search's tile sizes
    nor on its warps, so every precision returns the same (distance, index). Winner: the first NaN patch if any
    (distance NaN), else the first patch of smallest exact distance (a patch holding +-inf is at +inf; if all are,
    patch 0).
    """
    STEP_K: tl.constexpr = 2 * BLOCK_K if PAIRED else BLOCK_K
    tl.static_assert(BLOCK_K <= 32 or not PAIRED)  # a row's candidates of a tile: the bits of one int32
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % m_tiles
    b0 = (pid // m_tiles) * IMAGES
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    p_row = p_ptr + offs_m * stride_pm
    p_rows = p_row[:, None]

    p_norm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_lo = tl.zeros((BLOCK_M,), dtype=tl.float32)  # "tf32": |p - tf32(p)|^2
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        p = tl.load(p_rows + offs_d[None, :] * stride_pd,
                    mask=m_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        p_norm += tl.sum(p * p, axis=1)
        if PRECISION == "tf32":
            r = p - _tf32_part(p)
            p_lo += tl.sum(r * r, axis=1)
    p_len = tl.sqrt(p_norm)
    inf = float("inf")
    rho_p = 0.0
    if PRECISION == "tf32":  # max |p_lo| / |p| over the tile's finite non-zero rows (a zero row has p_lo = 0; a
        # row that is not finite has a~ not finite, always rescored, whatever its delta)
        live_p = m_mask & (p_len > 0) & (p_len < inf)
        rho_p = tl.max(tl.where(live_p, tl.sqrt(p_lo) / tl.where(live_p, p_len, 1.0), 0.0), axis=0)
    p_tile = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # unused unless P_RESIDENT
    if P_RESIDENT:
        offs_d = tl.arange(0, BLOCK_D)
        p_tile = tl.load(p_rows + offs_d[None, :] * stride_pd,
                         mask=m_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)

    z_base = z_ptr + b0.to(tl.int64) * stride_zb  # then advanced by one image per iteration
    norms = norms_ptr + b0.to(tl.int64) * (2 * HW)
    out = b0.to(tl.int64) * M + offs_m
    for b in range(b0, tl.minimum(b0 + IMAGES, B)):
        thr = tl.full((BLOCK_M,), inf, dtype=tl.float32)
        best = tl.full((BLOCK_M,), inf, dtype=tl.float32)
        best_idx = tl.full((BLOCK_M,), HW, dtype=tl.int32)  # HW: none yet
        nan_idx = tl.full((BLOCK_M,), HW, dtype=tl.int32)
        for k0 in range(0, HW, STEP_K):
            lo, thr = _search_tile(z_base, norms, p_rows, p_tile, p_norm, p_len, rho_p, m_mask, thr, k0, D, HW,
                                   coef, tiny, res_coef, stride_zd, stride_zk, stride_pd, BLOCK_M, BLOCK_K, BLOCK_D,
                                   P_RESIDENT, PRECISION, TRUNCATE)
            lo_next = lo  # PAIRED: the next tile's bounds (NaN, never a candidate, past the last patch)
            if PAIRED:
                if k0 + BLOCK_K < HW:
                    lo_next, thr = _search_tile(z_base, norms, p_rows, p_tile, p_norm, p_len, rho_p, m_mask, thr,
                                                k0 + BLOCK_K, D, HW, coef, tiny, res_coef, stride_zd, stride_zk,
                                                stride_pd, BLOCK_M, BLOCK_K, BLOCK_D, P_RESIDENT, PRECISION,
                                                TRUNCATE)
                else:
                    lo_next = tl.full((BLOCK_M, BLOCK_K), float("nan"), dtype=tl.float32)
            # A round rescores each row's next candidate, in increasing patch order (ties keep the first).
            if BLOCK_K > 32:  # "highest"'s 64-patch tiles: the candidates as a mask
                offs_k = k0 + tl.arange(0, BLOCK_K)
                cand = lo <= thr[:, None]  # -inf (a~ not finite): always; NaN (outside the problem): never
                count = tl.sum(tl.sum(cand.to(tl.int32), axis=1), axis=0)
                while count > 0:
                    k = tl.min(tl.where(cand, offs_k[None, :], HW), axis=1)
                    best, best_idx, nan_idx = _rescore(z_base, p_rows, k, k < HW, best, best_idx, nan_idx, D, HW,
                                                       stride_zd, stride_zk, stride_pd, BLOCK_M)
                    cand = cand & (offs_k[None, :] != k[:, None])
                    count = tl.sum(tl.sum(cand.to(tl.int32), axis=1), axis=0)
            else:  # tiles of at most 32 patches (two when PAIRED): a row's candidates as the bits of int32 words,
                # patch k0 + j is bit j of low_bits (j < BLOCK_K) or bit j - BLOCK_K of high_bits
                cand = lo <= thr[:, None]
                count = tl.sum(cand.to(tl.int32), axis=1)
                low_bits = _bit_word(cand, BLOCK_K)
                high_bits = low_bits * 0
                if PAIRED:
                    cand = lo_next <= thr[:, None]
                    count += tl.sum(cand.to(tl.int32), axis=1)
                    high_bits = _bit_word(cand, BLOCK_K)
                for _ in range(tl.max(count, axis=0)):
                    in_low = low_bits != 0
                    word = tl.where(in_low, low_bits, high_bits)
                    low = word & -word  # the lowest set bit (0 when the row has no candidate left)
                    low_bits = tl.where(in_low, low_bits ^ low, low_bits)
                    high_bits = tl.where(in_low, high_bits, high_bits ^ low)
                    k = k0 + _bit_index(low) + tl.where(in_low, 0, BLOCK_K)
                    best, best_idx, nan_idx = _rescore(z_base, p_rows, k, low != 0, best, best_idx, nan_idx, D, HW,
                                                       stride_zd, stride_zk, stride_pd, BLOCK_M)

        has_nan = nan_idx < HW
        exact = tl.where(has_nan, float("nan"), best)
        win = tl.minimum(tl.where(has_nan, nan_idx, best_idx), HW - 1)
        # log((d + 1) / (d + eps)) = log1p((1 - eps) / (d + eps)), log1p by Goldberg's u = 1 + x trick (no
        # log1p in the interpreter): accurate for large d and exactly 0 at d = +inf.
        x = one_minus_eps / (exact + eps)
        u = 1.0 + x
        sim = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))

        tl.store(dist_ptr + out, exact, mask=m_mask)
        tl.store(sim_ptr + out, sim, mask=m_mask)
        tl.store(idx_ptr + out, win.to(tl.int64), mask=m_mask)
        z_base += stride_zb
        norms += 2 * HW
        out += M


@triton.jit
def _rescore(z_base, p_rows, k, active, best, best_idx, nan_idx, D, HW, stride_zd, stride_zk, stride_pd,
             BLOCK_M: tl.constexpr):
    """One candidate round: the exact distance sum_d (z[:, k] - p)^2 of each active row's candidate patch k, in the
    fixed order of RESCORE_LANES, and the rows' (best, best_idx, nan_idx) updated with it (candidates come in
    increasing patch order: the first NaN and the first of equal minima win)."""
    z_col = z_base + tl.where(active, k, 0).to(tl.int64) * stride_zk
    lanes = tl.zeros((BLOCK_M, RESCORE_LANES), dtype=tl.float32)
    for d0 in range(0, D, RESCORE_LANES):  # lane e sums d = e, e + 32, ... in order
        offs_e = d0 + tl.arange(0, RESCORE_LANES)
        mask = active[:, None] & (offs_e[None, :] < D)
        zd = tl.load(z_col[:, None] + offs_e[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        pd = tl.load(p_rows + offs_e[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
        diff = zd - pd
        lanes += diff * diff
    e = _lane_tree_sum(lanes, BLOCK_M)
    is_nan = e != e
    nan_idx = tl.where(active & is_nan & (nan_idx == HW), k, nan_idx)
    better = active & (is_nan == 0) & ((e < best) | (best_idx == HW))
    return tl.where(better, e, best), tl.where(better, k, best_idx), nan_idx


@triton.jit
def _bit_word(cand, BLOCK_K: tl.constexpr):
    """Per row of cand (BLOCK_M, BLOCK_K <= 32): the int32 whose bit j is cand[:, j] (the bits are disjoint, so
    their sum is their or, bit 31 included)."""
    return tl.sum(tl.where(cand, 1 << tl.arange(0, BLOCK_K)[None, :], 0), axis=1)


@triton.jit
def _bit_index(low):
    """i of int32 values low = 2^i (the float32 conversion of a power of two is exact and its exponent field
    holds 127 + i, also for 2^31, negative as int32); garbage for low = 0."""
    return ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 255) - 127


@triton.jit
def _search_tile(z_base, norms, p_rows, p_tile, p_norm, p_len, rho_p, m_mask, thr, k0, D, HW, coef, tiny,
                 res_coef, stride_zd, stride_zk, stride_pd, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr, P_RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                 TRUNCATE: tl.constexpr):
    """The search over the patch tile at k0 of one image: (lower bounds a~ - delta of the tile, -inf where a~ is
    not finite (always a candidate) and NaN outside the problem (never one); thr lowered by the tile's
    a~ + delta). The loop over channel slices only loads and dots; the patches' |z|^2 (and for "tf32"
    |z_lo|^2, z_lo = z - tf32(z)) come from the image's norms (``_patch_norms_kernel``)."""
    inf = float("inf")
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < HW
    dot = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if P_RESIDENT:
            p = p_tile
        else:
            p = tl.load(p_rows + offs_d[None, :] * stride_pd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        z = tl.load(z_base + offs_d[:, None] * stride_zd + offs_k[None, :] * stride_zk,
                    mask=d_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        dot = _search_dot(p, z, dot, PRECISION, TRUNCATE)
    z_norm = tl.load(norms + offs_k, mask=k_mask, other=0.0)
    approx = p_norm[:, None] + z_norm[None, :] - 2.0 * dot
    z_len = tl.sqrt(z_norm)
    radius = p_len[:, None] + z_len[None, :]
    delta = coef * (radius * radius + tiny)
    if PRECISION == "tf32":
        z_lo = tl.sqrt(tl.load(norms + HW + offs_k, mask=k_mask, other=0.0))
        delta += p_len[:, None] * (res_coef * (z_lo + rho_p * z_len))[None, :]
    live = m_mask[:, None] & k_mask[None, :]
    finite = tl.abs(approx) < inf  # False for NaN too
    thr = tl.minimum(thr, tl.min(tl.where(live & finite, approx + delta, inf), axis=1))
    return tl.where(live, tl.where(finite, approx - delta, -inf), float("nan")), thr


@triton.jit
def _patch_norms_kernel(z_ptr, norms_ptr, D, HW, stride_zb, stride_zd, stride_zk, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """norms (B, 2, HW): |z[b, :, k]|^2 and |z_lo|^2 (z_lo = z - tf32(z), the truncation residual) of every
    patch, in fp32 (any summation order: the search bound allows for it). Program (image, patch tile)."""
    tiles = tl.cdiv(HW, BLOCK_K)
    b = tl.program_id(0) // tiles
    offs_k = (tl.program_id(0) % tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < HW
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    norm = tl.zeros((BLOCK_K,), dtype=tl.float32)
    low = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_b + offs_d[:, None] * stride_zd + offs_k[None, :] * stride_zk,
                    mask=(offs_d[:, None] < D) & k_mask[None, :], other=0.0).to(tl.float32)
        r = z - _tf32_part(z)
        norm += tl.sum(z * z, axis=0)
        low += tl.sum(r * r, axis=0)
    out = norms_ptr + b.to(tl.int64) * (2 * HW) + offs_k
    tl.store(out, norm, mask=k_mask)
    tl.store(out + HW, low, mask=k_mask)


@triton.jit
def _search_dot(p, z, acc, PRECISION: tl.constexpr, TRUNCATE: tl.constexpr):
    """acc + p @ z at the search's PRECISION. "tf32x3" is written out as three TF32 dots whose operands are
    TF32-exact parts of p and z (``_tf32_part``: x = hi + lo + r, |x - hi| < 2^-10 |x|, |r| < 2^-20 |x|, the
    split ``search_bound`` assumes), p_lo z_hi + p_hi z_lo + p_hi z_hi, accumulated in acc in that order. They
    are one ``tl.dot`` in a 3-step loop, not three chained dots: Triton lays chained dots out over
    (num_warps, 1) warps, which at 64 prototypes per tile computes the tile twice and moves the accumulator
    between two layouts through shared memory at every step (Triton's own "tf32x3" does; 240 registers at the
    CUB shape against 199 for the loop, before the cap). "tf32" dots the fp32 operands as loaded, so that the
    loop is loads and MMAs only: the MMA truncates or rounds them to TF32, and ``search_bound.
    converted_tf32_bound`` bounds either by the truncation residuals; with TRUNCATE it dots the truncated parts
    (the interpreter's dot is exact fp32: so the CPU tests see the operand error the GPU's MMA makes)."""
    if PRECISION == "tf32x3":
        for part in range(3):
            a = _tf32_part(tl.where(part == 0, p - _tf32_part(p), p))  # p_lo, then p_hi twice
            b = _tf32_part(tl.where(part == 1, z - _tf32_part(z), z))  # z_hi, z_lo, z_hi
            acc = tl.dot(a, b, acc, input_precision="tf32")
    elif PRECISION == "tf32":
        if TRUNCATE:
            p, z = _tf32_part(p), _tf32_part(z)
        acc = tl.dot(p, z, acc, input_precision="tf32")
    else:
        acc = tl.dot(p, z, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _halve(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """(ROWS, WIDTH) -> (ROWS, WIDTH // 2): column i is x[:, 2i] + x[:, 2i + 1] (elementwise, fixed order)."""
    a, b = tl.split(tl.reshape(x, (ROWS, WIDTH // 2, 2)))
    return a + b


@triton.jit
def _lane_tree_sum(lanes, ROWS: tl.constexpr):
    """Row sums of lanes (ROWS, RESCORE_LANES = 32) as a pairwise tree, the same bits under any layout."""
    tl.static_assert(lanes.shape[1] == 32)
    x = _halve(_halve(_halve(_halve(lanes, ROWS, 32), ROWS, 16), ROWS, 8), ROWS, 4)
    a, b = tl.split(x)
    return a + b


@triton.jit
def _pair_coefficient(gsim_ptr, gdist_ptr, dist_ptr, pair, mask, eps):
    """g = grad_d + grad_sim * d(sim)/d(d) of the pairs ``pair`` (flat b * M + m); 0 where masked."""
    dist = tl.load(dist_ptr + pair, mask=mask, other=0.0)
    g_sim = tl.load(gsim_ptr + pair, mask=mask, other=0.0)
    return tl.load(gdist_ptr + pair, mask=mask, other=0.0) + g_sim * (1.0 / (dist + 1.0) - 1.0 / (dist + eps))


@triton.jit
def _tf32_part(x):
    """The leading TF32 part of x (sign, exponent, 10 mantissa bits; -8192 = 0xffffe000): exact as a TF32
    operand, and x - part is exact in fp32."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _grad_prototypes_kernel(
    gsim_ptr, gdist_ptr, dist_ptr, idx_ptr, z_ptr, p_ptr, gp_ptr, g_ptr,
    B, D, M, IMAGES_PER_PROGRAM, eps,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial grad_p over one run of images: 2 * sum_b g[b, m] * (p[m] - z[b, :, idx[b, m]]).

    Program (m tile, d tile, image run s) keeps its p tile in registers, gathers the winning z rows of each
    image in order and writes partial[s]; the runs are summed in a fixed order afterwards. Differences are
    taken before scaling by g (never p * sum(g) - sum(g * z)): g reaches -1/eps near d = 0. The programs of the
    first d tile also write g[b, m] to g_ptr (B, M), which grad_z reads instead of computing it again.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    mask = m_mask[:, None] & (offs_d[None, :] < D)
    p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    b0 = pid_s * IMAGES_PER_PROGRAM
    z_b = z_ptr + b0.to(tl.int64) * stride_zb  # then advanced by one image per iteration
    row = b0.to(tl.int64) * M + offs_m
    for b in range(b0, tl.minimum(b0 + IMAGES_PER_PROGRAM, B)):
        g = _pair_coefficient(gsim_ptr, gdist_ptr, dist_ptr, row, m_mask, eps)
        if pid_d == 0:
            tl.store(g_ptr + row, g, mask=m_mask)
        k = tl.load(idx_ptr + row, mask=m_mask, other=0)
        z = tl.load(z_b + k[:, None] * stride_zk + offs_d[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        z_b += stride_zb
        row += M
        acc += g[:, None] * (p - z)
    tl.store(gp_ptr + pid_s.to(tl.int64) * M * D + offs_m[:, None] * D + offs_d[None, :], 2.0 * acc, mask=mask)


@triton.jit
def _contributions(pair, won, z_b, z_row, m_j, offs_d, d_mask, g_ptr, p_ptr, stride_zd, stride_pm, stride_pd):
    """c[j] = g_j (z_j - p_j) of the won pairs j (0 for the others, which are not gathered): z_b + z_row is pair
    j's winning z row (z_row an int32 offset from the block's z), pair its int32 offset from the block's first
    pair in g_ptr (the coefficients written by ``_grad_prototypes_kernel``)."""
    g = tl.load(g_ptr + pair, mask=won, other=0.0)
    mask = won[:, None] & d_mask[None, :]
    z = tl.load(z_b + (z_row[:, None] + offs_d[None, :] * stride_zd), mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + m_j[:, None] * stride_pm + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
    return g[:, None] * (z - p)


@triton.jit
def _add_won_pairs(acc, bad, rows, q_j, won, pair, z_b, z_row, m_j, offs_d, d_mask, g_ptr, p_ptr, stride_zd,
                   stride_pm, stride_pd):
    """acc[q] += sum over the pairs j with won[j] and q_j = q of the finite g_j (z_j - p_j) (``_contributions``);
    bad |= which contributions are not finite (``_add_non_finite`` adds those after the last step). rows:
    0..BLOCK_Q - 1; q_j: the pair's patch relative to the tile's first (each row compares against a constant).
    Exact products, fixed-order fp32 accumulation (see ``_grad_features_kernel``).
    """
    w = (rows[:, None] == tl.where(won, q_j, -1)[None, :]).to(tl.float32)  # the won test once per pair
    c = _contributions(pair, won, z_b, z_row, m_j, offs_d, d_mask, g_ptr, p_ptr, stride_zd, stride_pm, stride_pd)
    finite = tl.abs(c) < float("inf")
    c_fin = tl.where(finite, c, 0.0)
    hi = _tf32_part(c_fin)
    rest = c_fin - hi  # exact: the low 13 bits of c
    mid = _tf32_part(rest)
    part = tl.dot(w, rest - mid, input_precision="tf32")  # rest - mid: at most 2 bits, exact
    part = tl.dot(w, mid, part, input_precision="tf32")
    acc += tl.dot(w, hi, part, input_precision="tf32")
    return acc, bad | (finite == 0)


@triton.jit
def _add_non_finite(acc, rows, q0, idx_b, g_b, z_b, p_ptr, pair_j, z_img, q_base, live_b, offs_j, offs_d, d_mask,
                    m_begin, m_end, stride_zd, stride_zk, stride_pm, stride_pd, BLOCK_Q: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """acc[q] += +inf, -inf or NaN where the pairs that won patch q have non-finite contributions: a second walk
    over the prototype steps, run only by programs whose first walk met one. Each step's kinds (+inf, -inf,
    NaN) are counted per patch by an exact dot and added in step order, so every patch gets what any summation
    order gives (NaN if a NaN or both infinities, else the infinity), as if they had been added in the first
    walk (the finite sums are finite there: adding an infinity earlier or later gives the same)."""
    inf = float("inf")
    for m0 in range(m_begin, m_end, BLOCK_M):
        m_j = m0 + offs_j % BLOCK_M
        pair = pair_j + m0
        live = (m_j < m_end) & live_b
        k_j = tl.load(idx_b + pair, mask=live, other=0).to(tl.int32)
        q_j = k_j + q_base - q0
        won = live & (q_j >= 0) & (q_j < BLOCK_Q)
        c = _contributions(pair, won, z_b, z_img + k_j * stride_zk, m_j, offs_d, d_mask, g_b, p_ptr, stride_zd,
                           stride_pm, stride_pd)
        if tl.max(tl.max(((tl.abs(c) < inf) == 0).to(tl.int32), axis=1), axis=0) > 0:
            w = (rows[:, None] == tl.where(won, q_j, -1)[None, :]).to(tl.float32)
            kind = tl.where(c == inf, 1.0, 0.0) + tl.where(c == -inf, 256.0, 0.0) + tl.where(c != c, 65536.0, 0.0)
            counts = tl.dot(w, kind, input_precision="tf32").to(tl.int32)  # < 256 of each: exact
            pos = (counts & 255) > 0
            neg = ((counts >> 8) & 255) > 0
            nan = (counts >> 16) > 0
            acc += tl.where(nan | (pos & neg), float("nan"), tl.where(pos, inf, tl.where(neg, -inf, 0.0)))
    return acc


@triton.jit
def _grad_features_kernel(
    g_ptr, idx_ptr, z_ptr, p_ptr, gz_ptr, won_ptr, won_start_ptr, won_count_ptr,
    B, D, HW, M,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    IMAGES: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPACT: tl.constexpr, PARTS: tl.constexpr,
):
    """grad_z[b, :, k] = 2 * sum over the m won at (b, k) of g[b, m] * (z[b, :, k] - p[m]), no sort.

    Program (image block, patch tile, d tile): the block's patches are numbered q = i * HW + k (image b0 + i),
    its pairs j = i * BLOCK_M + (m - m0) for each prototype tile m0. ``sel[q, j]`` (registers) is 1 where pair
    j won patch q, so ``sel @ c`` with c[j] = g_j (z[b_j, :, k_j] - p[m_j]) is each patch's sum over the pairs
    it won (g_j from g_ptr, written by ``_grad_prototypes_kernel``). Offsets are int32 from the block's first
    pair and first z element, loop-invariant parts hoisted (the launcher checks that they fit). The dots are
    exact in their products (sel is 0/1, c goes in as three TF32-exact parts), so only their fixed-order fp32
    accumulation rounds, at every tile size. A non-finite c never enters a dot
    (0 * inf would reach every patch): each thread notes where its contributions were not finite (no
    reduction per step), and a program that met one walks the steps again (``_add_non_finite``) adding
    +inf, -inf or NaN per patch, which is what any summation order gives. Only the pairs that won a patch of
    the tile are gathered.

    COMPACT (a tile smaller than its image, IMAGES = 1): the prototypes that won a patch of the tile, in
    increasing order, come from ``_won_pairs_kernel`` (in won_ptr's row of the image (B, M), from
    won_start_ptr's place on, won_count_ptr of them), and the dots run on full steps of BLOCK_M of them (and
    the last, partial one): the dot work is that of the tile's won pairs, and the image's pairs are scanned
    twice per tile (count, then write), not once per channel tile.

    PARTS (not COMPACT): grid axis 2 splits the prototype steps into PARTS runs, each program adding its run's
    pairs into its own copy of grad_z (gz_ptr holds PARTS of them; the launcher sums them in a fixed order).
    """
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(IMAGES * HW, BLOCK_Q)
    b0 = (pid // q_tiles) * IMAGES
    q0 = (pid % q_tiles) * BLOCK_Q
    rows = tl.arange(0, BLOCK_Q)
    offs_q = q0 + rows
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_j = tl.arange(0, IMAGES * BLOCK_M)
    b_j = b0 + offs_j // BLOCK_M
    q_base = (offs_j // BLOCK_M) * HW  # first patch of pair j's image in the block's numbering
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    bad = tl.zeros((IMAGES * BLOCK_M, BLOCK_D), dtype=tl.int1)  # where a contribution was not finite
    first = b0.to(tl.int64) * M
    idx_b, g_b = idx_ptr + first, g_ptr + first
    z_b = z_ptr + b0.to(tl.int64) * stride_zb
    i_j = offs_j // BLOCK_M
    pair_j = i_j * M + offs_j % BLOCK_M  # pair j's offset at m0 = 0
    z_img = i_j * stride_zb
    live_b = b_j < B
    m_begin, m_end = 0, M
    if PARTS > 1:
        per_part = tl.cdiv(tl.cdiv(M, BLOCK_M), PARTS) * BLOCK_M
        m_begin = tl.program_id(2) * per_part
        m_end = tl.minimum(M, m_begin + per_part)
        gz_ptr += tl.program_id(2).to(tl.int64) * B * D * HW  # the run's copy of grad_z
    if COMPACT:
        tl.static_assert(IMAGES == 1 and PARTS == 1)
        won_b = won_ptr + b0.to(tl.int64) * M + tl.load(won_start_ptr + pid)  # (image, tile) = (b0, pid % q_tiles)
        n_won = tl.load(won_count_ptr + pid)
        for s0 in range(0, n_won, BLOCK_M):
            used = s0 + offs_j < n_won
            m_j = tl.load(won_b + s0 + offs_j, mask=used, other=0)
            k_j = tl.load(idx_b + m_j, mask=used, other=0).to(tl.int32)
            acc, bad = _add_won_pairs(acc, bad, rows, k_j - q0, used, m_j, z_b, k_j * stride_zk, m_j, offs_d, d_mask,
                                      g_b, p_ptr, stride_zd, stride_pm, stride_pd)
    else:
        for m0 in range(m_begin, m_end, BLOCK_M):
            m_j = m0 + offs_j % BLOCK_M
            live = (m_j < m_end) & live_b  # the tile holds every patch of its images: each live pair won one
            pair = pair_j + m0
            k_j = tl.load(idx_b + pair, mask=live, other=0).to(tl.int32)
            acc, bad = _add_won_pairs(acc, bad, rows, k_j + q_base, live, pair, z_b, z_img + k_j * stride_zk, m_j,
                                      offs_d, d_mask, g_b, p_ptr, stride_zd, stride_pm, stride_pd)
    if tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) > 0:  # one reduction per program, not per step
        acc = _add_non_finite(acc, rows, q0, idx_b, g_b, z_b, p_ptr, pair_j, z_img, q_base, live_b, offs_j, offs_d,
                              d_mask, m_begin, m_end, stride_zd, stride_zk, stride_pm, stride_pd, BLOCK_Q, BLOCK_M)
    b_q = b0 + offs_q // HW
    k_q = offs_q % HW
    row_ok = (offs_q < IMAGES * HW) & (b_q < B)
    out = gz_ptr + (b_q.to(tl.int64) * D * HW + k_q)[:, None] + offs_d[None, :] * HW
    tl.store(out, 2.0 * acc, mask=row_ok[:, None] & d_mask[None, :])


@triton.jit
def _won_pairs_kernel(idx_ptr, won_ptr, start_ptr, count_ptr, M, HW, WRITE, BLOCK_Q: tl.constexpr,
                      BLOCK: tl.constexpr):
    """For COMPACT grad_z, program (image b, patch tile t): with WRITE = 0, counts the prototypes m whose winning
    patch idx[b, m] lies in tile t (count_ptr[b * tiles + t]); with WRITE = 1, writes them in increasing order to
    won_ptr's row b (B, M) from start_ptr[b * tiles + t] on (the tiles' counts summed in tile order: each
    image's prototypes, grouped by tile), a prefix sum placing them. Integer work only: the same lists on
    every run."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(HW, BLOCK_Q)
    q0 = (pid % tiles) * BLOCK_Q
    idx_b = idx_ptr + (pid // tiles).to(tl.int64) * M
    fill = pid * 0
    if WRITE != 0:
        fill = tl.load(start_ptr + pid)
    won_b = won_ptr + (pid // tiles).to(tl.int64) * M
    for m0 in range(0, M, BLOCK):
        m = m0 + tl.arange(0, BLOCK)
        k = tl.load(idx_b + m, mask=m < M, other=-1)
        won = (m < M) & (k >= q0) & (k < q0 + BLOCK_Q)
        if WRITE != 0:
            tl.store(won_b + fill + tl.cumsum(won.to(tl.int32), axis=0) - 1, m, mask=won)
        fill += tl.sum(won.to(tl.int32), axis=0)
    if WRITE == 0:
        tl.store(count_ptr + pid, fill)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def channels_innermost(z3: torch.Tensor) -> torch.Tensor:
    """z3 (B, D, HW) with unit channel stride (one copy unless already so, e.g. channels_last features).

    The winner gathers read whole channel vectors z[b, :, k]: with unit stride those are coalesced rows,
    with stride HW every element is a separate memory sector. The tile loads are coalesced either way.
    """
    if z3.stride(1) == 1 or z3.shape[1] == 1:
        return z3
    return z3.transpose(1, 2).contiguous().transpose(1, 2)


def forward_config(D: int, HW: int, M: int, precision: str) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of ``_forward_kernel`` for a problem: the launcher's only choice.

    Tiles follow the problem: BLOCK_M from M and BLOCK_K from HW (each the next power of two in 16..64),
    32-channel slices, the p tile held in registers when D fits one slice; warps, stages and register cap by
    precision. Where M and HW would pick 64 x 64, the tensor-core precisions take 64 x 32
    (TENSOR_CORE_MAX_TILE): 64-row tiles keep Hopper's warp-group MMA (32-row tiles compile to mma.sync) and
    z is read once per 64 prototypes; each 32-patch tile has its own candidate rounds (NOTES.md, "Triton v7"
    and "Triton v10"; not measured).
    """
    num_warps, num_stages = _FORWARD_OPTIONS[precision]
    block_m = _pow2(M, FORWARD_TILES[0], FORWARD_TILES[-1])
    block_k = _pow2(HW, FORWARD_TILES[0], FORWARD_TILES[-1])
    tensor_cores = precision != "highest"
    if tensor_cores:
        block_k = min(block_k, TENSOR_CORE_MAX_TILE // block_m, TENSOR_CORE_MAX_PATCHES)
    meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=FORWARD_SLICE,
                P_RESIDENT=D <= FORWARD_SLICE, PRECISION=INPUT_PRECISION[precision],
                PAIRED=tensor_cores and HW > block_k,
                TRUNCATE=False)  # what NVIDIA GPUs run; the launcher sets it elsewhere
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if tensor_cores:
        options["maxnreg"] = TENSOR_CORE_MAX_REGISTERS
    elif meta["BLOCK_M"] * meta["BLOCK_K"] < FORWARD_TILES[-1] ** 2:
        options["maxnreg"] = SMALL_TILE_MAX_REGISTERS
    elif precision in STREAMED_P_MAX_REGISTERS and not meta["P_RESIDENT"]:
        options["maxnreg"] = STREAMED_P_MAX_REGISTERS[precision]
    return meta, options


def forward_images_per_program(B: int, M: int, block_m: int) -> int:
    """Images per forward program: 1, 2, 4 or 8, the most that still leave TARGET_PROGRAMS programs (not
    measured: a grid of ~8 programs per SM on a 132-SM card; more images per program re-use the p tile)."""
    m_tiles = triton.cdiv(M, block_m)
    images = 1
    while images < 8 and triton.cdiv(B, 2 * images) * m_tiles >= TARGET_PROGRAMS:
        images *= 2
    return images


def backward_configs(D: int, HW: int) -> dict[str, tuple[dict, dict]]:
    """(constexpr arguments, launch options) of the backward kernels, by kernel name (``_won_pairs_kernel`` only
    for COMPACT grad_z tiles).

    grad_z: BLOCK_Q patches (the next power of two of HW in 16..64); when several whole images fit a tile,
    the tile holds IMAGES of them (a power of two) and the GRAD_Z_PAIRS pairs of a step are IMAGES x BLOCK_M
    (GRAD_Z_COMPACT_PAIRS for tiles of part of an image); 4 warps for 64-patch tiles of whole images.
    BLOCK_D: 16 or 32 channels from D (16 on Triton 3.6 with GRAD_Z_NARROW_PATCH_TILES).
    """
    block_q = _pow2(HW, GRAD_Z_PATCH_TILES[0], GRAD_Z_PATCH_TILES[-1])
    gz_channels = _pow2(D, GRAD_Z_CHANNEL_TILES[0], GRAD_Z_CHANNEL_TILES[-1])
    if block_q in GRAD_Z_NARROW_PATCH_TILES:
        gz_channels = GRAD_Z_CHANNEL_TILES[0]
    gz_options = dict(_GRAD_Z_OPTIONS)
    if block_q == GRAD_Z_PATCH_TILES[-1] and HW <= block_q:
        gz_options.update(GRAD_Z_WIDE_TILE_OPTIONS)
    images = 1
    while 2 * images * HW <= block_q:
        images *= 2
    pairs = GRAD_Z_COMPACT_PAIRS if HW > block_q else GRAD_Z_PAIRS
    configs = {
        "_grad_prototypes_kernel": (
            dict(BLOCK_M=16, BLOCK_D=_pow2(D, GRAD_P_CHANNEL_TILES[0], GRAD_P_CHANNEL_TILES[-1])), {}),
        "_grad_features_kernel": (
            dict(IMAGES=images, BLOCK_Q=block_q, BLOCK_M=pairs // images,
                 BLOCK_D=gz_channels, COMPACT=HW > block_q, PARTS=1), gz_options),
    }
    if HW > block_q:  # COMPACT: each (image, tile)'s won prototypes listed first
        configs["_won_pairs_kernel"] = (dict(BLOCK_Q=block_q, BLOCK=WON_PAIRS_BLOCK), {})
    return configs


def launch_configs(shapes=None) -> list[tuple[str, dict, dict]]:
    """Every distinct (kernel name, constexpr arguments, launch options) the compiled launchers can pick,
    over all precisions: for the (D, HW, M) ``shapes`` given, or by default for all shapes.

    Each choice is a step function of D, HW and M that is constant beyond these ranges (D > 64, HW > 64,
    M > 64 pick the same as 65), so the default shapes reach every value.
    """
    if shapes is None:
        shapes = [(D, HW, M) for D in (16, 32, 64, 65) for HW in range(1, 66) for M in (16, 32, 64, 65)]
    configs = []
    for D, HW, M in shapes:
        for precision in INPUT_PRECISION:
            meta, options = forward_config(D, HW, M, precision)
            configs.append(("_forward_kernel", meta, options))
        configs.append(("_patch_norms_kernel", dict(BLOCK_K=NORMS_TILE, BLOCK_D=FORWARD_SLICE), {}))
        for name, (meta, options) in backward_configs(D, HW).items():
            configs.append((name, meta, options))
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def forward(z3: torch.Tensor, p: torch.Tensor, eps: float, precision: str = "highest"):
    """Fused forward on z3 (B, D, HW) (any strides, any float dtype) and p (M, D).

    Returns (similarity, min_distances, patch_index), each (B, M); float32, float32, int64. Certified search:
    the result is the same at every precision (see ``_forward_kernel``).
    """
    B, D, HW = z3.shape
    M = p.shape[0]
    z3 = channels_innermost(z3)
    sim = torch.empty((B, M), device=z3.device, dtype=torch.float32)
    dist = torch.empty_like(sim)
    idx = torch.empty((B, M), device=z3.device, dtype=torch.int64)
    meta, options = forward_config(D, HW, M, precision)
    level = INPUT_PRECISION[precision]
    if level == "tf32":  # the operands' truncation residuals bound the search
        coef, res_coef, tiny = search_bound.converted_tf32_bound(D)
    else:
        coef, res_coef, tiny = search_bound.coefficient(level, D), 0.0, search_bound.TINY
    # The MMA converts fp32 operands to TF32 by truncation or to nearest on NVIDIA GPUs; elsewhere (the
    # interpreter's exact dot, other vendors' MMAs) the kernel truncates them itself.
    truncate = level == "tf32" and (z3.device.type != "cuda" or torch.version.hip is not None)
    norms = torch.empty((B, 2, HW), device=z3.device, dtype=torch.float32)
    _patch_norms_kernel[(B * triton.cdiv(HW, NORMS_TILE),)](
        z3, norms, D, HW, z3.stride(0), z3.stride(1), z3.stride(2), BLOCK_K=NORMS_TILE, BLOCK_D=FORWARD_SLICE)
    images = forward_images_per_program(B, M, meta["BLOCK_M"])
    m_tiles = triton.cdiv(M, meta["BLOCK_M"])
    per_launch = max(1, MAX_PROGRAMS // m_tiles) * images  # grid axis 0: image blocks x prototype tiles
    for b0 in range(0, B, per_launch):
        b1 = min(B, b0 + per_launch)
        _forward_kernel[(triton.cdiv(b1 - b0, images) * m_tiles,)](
            z3[b0:b1], p, norms[b0:b1], sim[b0:b1], dist[b0:b1], idx[b0:b1], b1 - b0, D, HW, M, images,
            eps, 1.0 - eps, coef, tiny, res_coef,
            z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
            **{**meta, "TRUNCATE": truncate}, **options,
        )
    return sim, dist, idx


def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Hand-written backward: (grad_z3 (B, D, HW) contiguous float32, grad_p (M, D) float32); no sort (maps of
    several grad_z tiles list each tile's won prototypes by a prefix sum, ``_won_pairs_kernel``)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    z3 = channels_innermost(z3)
    grad_sim = grad_sim.float().contiguous()
    grad_dist = grad_dist.float().contiguous()
    dist, idx = dist.contiguous(), idx.contiguous()
    configs = backward_configs(D, HW)
    strides = (z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1))
    images = configs["_grad_features_kernel"][0]["IMAGES"]  # grad_z's int32 offsets, checked before any launch
    span = (images - 1) * abs(z3.stride(0)) + (HW - 1) * abs(z3.stride(2)) + (D - 1) * abs(z3.stride(1))
    if images * M >= 2**31 or span >= 2**31:
        raise ValueError(f"triton grad_z: {images} images of {M} pairs or a z block of {span + 1} "
                         "elements do not fit its int32 offsets; use the torch or cuda backend")

    meta, options = configs["_grad_prototypes_kernel"]
    per_program = max(8, triton.cdiv(B, MAX_GRID_YZ))  # image runs go on grid axis 2
    runs = triton.cdiv(B, per_program)
    partial = torch.empty((runs, M, D), device=z3.device, dtype=torch.float32)
    g = torch.empty((B, M), device=z3.device, dtype=torch.float32)  # written by grad_p, read by grad_z
    _grad_prototypes_kernel[(triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]), runs)](
        grad_sim, grad_dist, dist, idx, z3, p, partial, g, B, D, M, per_program, eps, *strides, **meta, **options,
    )
    grad_p = partial[0] if runs == 1 else partial.sum(0)  # a fixed-order reduction: deterministic

    meta, options = configs["_grad_features_kernel"]
    grad_z = torch.empty((meta["PARTS"], B, D, HW), device=z3.device, dtype=torch.float32)
    blocks = triton.cdiv(B, meta["IMAGES"]) * triton.cdiv(meta["IMAGES"] * HW, meta["BLOCK_Q"])
    won, won_start, won_count = idx, idx, idx  # unused unless COMPACT
    if meta["COMPACT"]:  # each (image, patch tile)'s won prototypes, listed once for all its channel tiles
        won = torch.empty((B, M), device=z3.device, dtype=torch.int32)
        won_count = torch.empty((blocks,), device=z3.device, dtype=torch.int32)
        listing = configs["_won_pairs_kernel"][0]
        _won_pairs_kernel[(blocks,)](idx, won, won_count, won_count, M, HW, 0, **listing)
        counts = won_count.view(B, -1)
        won_start = (counts.cumsum(1, dtype=torch.int32) - counts).view(-1)  # each tile's first place in its row
        _won_pairs_kernel[(blocks,)](idx, won, won_start, won_count, M, HW, 1, **listing)
    _grad_features_kernel[(blocks, triton.cdiv(D, meta["BLOCK_D"]), meta["PARTS"])](
        g, idx, z3, p, grad_z, won, won_start, won_count, B, D, HW, M, *strides, **meta, **options,
    )
    return (grad_z[0] if meta["PARTS"] == 1 else grad_z.sum(0)), grad_p  # a fixed-order sum: deterministic
