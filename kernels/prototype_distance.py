"""Triton kernels of the fused prototype op: distance + global min/argmin + log-similarity.

Forward: a pre-pass writes every patch's norms (``_patch_norms_kernel``), then the search, one program per
(block of images, tile of prototypes) (``_forward_kernel``). The prototype tile's norms are computed once and
the tile serves every image of the block (when the channels fit one slice, the p tile itself is loaded once
into registers; otherwise its slices are re-read, L1-hot, for each image and patch tile). For each image the
program walks the patches in steps of up to 64 (two 32-patch tiles for the tensor-core searches), computes
approximate squared distances with the expansion ``|p|^2 + |z|^2 - 2 p.z`` (a ``tl.dot``) and writes, per
prototype and step, the patches that the search's error bound cannot rule out (certified search,
``search_bound.py``) as the bits of two int32 words. Then ``_rescore_kernel`` rescores those candidates exactly,
as ``sum_d (z - p)^2`` in fp32 in a fixed order (``RESCORE_LANES``), keeps the exact min and argmin per
prototype and writes the outputs. The (B, M, H*W) map never reaches memory (the words are 1/32 of its size at
most: one bit a pair).

Backward: gradients reach only the winning patch of each (b, m); no comparison sort, no float atomics, grad_p
launched first (it also writes each pair's coefficient g for grad_z), every sum in a fixed order: gradients are
bitwise reproducible.

* ``grad_z``: a counting sort lists each image's pairs by winning patch (``_won_histogram_kernel``,
  ``_won_starts_kernel``, ``_won_order_kernel``: integer work only), then one program per (image, channel tile)
  walks the list in SEGMENT_ROWS rows of equal length, each adding its pairs' contributions ``g (z_win - p)``
  (difference form; g as grad_p wrote it) in order, and a scan over the rows joins the segments that cross rows
  (``_grad_features_segments_kernel``). Every row does the same work however the winners are spread over the
  patches; plain fp32 additions, so NaN and inf contributions reach their own patch as any summation order
  would.
* ``grad_p``: one program per (prototype tile, channel tile), walking all images GRAD_P_IMAGES at a time with
  their winning z rows gathered at once, summed in a fixed order (no partial sums).
  Its first channel tile writes g[b, m] = grad_d + grad_sim * d(sim)/d(d) for grad_z.

Inputs may be fp16/bf16/fp32/fp64 with any strides over (B, D, H*W); all arithmetic is fp32. Every
configuration a launcher can pick is listed by ``launch_configs()`` (the sm_90 compile gate compiles them all).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from protokern.kernels import search_bound

# "highest": exact fp32 products; "high": 3xTF32 (about fp32 accuracy); "medium": TF32, bounded for operands the
# tensor cores convert (search_bound.converted_tf32_bound; the interpreter truncates them itself, TRUNCATE) (also
# the names of their search_bound levels). The precision only changes the search's speed, never its result.
INPUT_PRECISION = search_bound.PRECISION_LEVELS
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
# (.maxnreg) and their tiles hold at most 32 patches (64 x 32 prototypes x patches at most). At 64 x 64 no
# arrangement tried compiles under that cap without spilling on both Triton 3.6 and 3.8 (24-176 bytes;
# benchmarks/NOTES.md "Triton v7"); every smaller tile does (128 x 32: see NOTES.md "Triton v16"). Where the map
# has more patches, two such tiles a step (PAIRED): a step's candidates follow the threshold of 64 patches, the
# bits of two int32 words per row (NOTES.md "Triton v11", "Triton v16").
TENSOR_CORE_MAX_REGISTERS = 128
TENSOR_CORE_MAX_PATCHES = 32
# ptxas's register cap for the "highest" forward's tiles smaller than 64 x 64: left to choose, ptxas aims at
# 64-128 registers for some of them and spills 8-200 bytes (11 configurations on Triton 3.8 / ptxas 13, 2
# others on Triton 3.6); with 255 it keeps everything in registers. The 64 x 64 tile keeps ptxas's own choice
# for a resident p tile (a cap of 128 spills 1 KB); with p re-read per slice (D > 32, the CUB shape) it is
# capped at 128 on Triton >= 3.8 so that 2 blocks of 256 threads fit an SM (left to choose, ptxas takes 162
# since the rescoring runs over channel tiles); Triton 3.6's code spills under that cap (480 bytes) and keeps
# ptxas's choice (200). Checked by sm90_gate.py --all on both.
SMALL_TILE_MAX_REGISTERS = 255
# The certification's separable form (search_bound.separable) needs every norm of a tile finite and at most this.
# Only "medium" (the default) uses it: "high" and "highest"'s 64-row tiles, with both forms compiled, spill 24 and
# 72 bytes in the generic compile (each form alone does not; NOTES.md "Triton v15").
SEPARABLE_MAX_NORM2 = tl.constexpr(search_bound.SEPARABLE_MAX_NORM2)
SEPARABLE_LEVELS = ("tf32",)
STREAMED_P_MAX_REGISTERS = {"highest": 128} if TRITON_VERSION >= (3, 8) else {}
GRAD_P_CHANNEL_TILES = (16, 32)  # BLOCK_D of grad_p, from D
GRAD_P_IMAGES = 8  # images a step of grad_p (their z rows gathered at once)
# grad_z: each image's pairs listed by winning patch (a counting sort: _won_histogram_kernel, _won_starts_kernel,
# _won_order_kernel, ORDER_CHUNK prototypes a program, ORDER_BINS patches a step), then
# _grad_features_segments_kernel: SEGMENT_ROWS rows of the list a program, SEGMENT_CHANNELS channels, SEGMENT_WARPS
# warps (NOTES.md "Triton v14"; not measured).
SEGMENT_ROWS = 64
SEGMENT_CHANNELS = (16, 32)  # BLOCK_D from D
SEGMENT_WARPS = 8
ORDER_CHUNK = 32
# The exact rescoring of the search's candidates (_rescore_kernel): 32 prototypes a program on one warp (a round
# 15.9-17.4 warp-instructions a row at the CUB shape, against 16.9-18.5 for 64 rows on 2 warps and 23.6 for 16 rows
# on 1, which idle fewer rows a round; NOTES.md "Triton v16", not measured), its register cap: left to choose,
# ptxas takes 128 registers and spills 52 bytes on Triton 3.6 at the CUB shape; with 255 it takes 159-160.
RESCORE_ROWS = 32
RESCORE_WARPS = 1
RESCORE_MAX_REGISTERS = 255
ORDER_BINS = 1024  # patches per step of the ordering kernels' walks over the map
ORDER_HIST_BLOCK = 4096  # histogram entries (at most ORDER_HIST_ROWS chunks) a step of _won_starts_kernel
ORDER_HIST_ROWS = 64


@triton.jit
def _forward_kernel(
    z_ptr, p_ptr, norms_ptr, cand_ptr,
    B, D, HW, M, IMAGES, coef, tiny, res_coef, sep_coef,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd, log_ptr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    P_RESIDENT: tl.constexpr, PRECISION: tl.constexpr, PAIRED: tl.constexpr, TRUNCATE: tl.constexpr,
    SEPARABLE: tl.constexpr, NORMS_K: tl.constexpr, RECORD: tl.constexpr,
):
    """One program per (block of IMAGES images, prototype tile), folded into grid axis 0 (no 65535 limit on B).

    P_RESIDENT (D <= BLOCK_D): the p tile is loaded once, before the image loop, and stays in registers.

    Certified search: a~ = |p|^2 + |z|^2 - 2 p.z from tl.dot at PRECISION (``_search_dot``), delta = coef ((|z| +
    |p|)^2 + tiny) >= |a~ - e| (coef and its derivation: ``search_bound.py``), or with SEPARABLE ("medium"), where
    every norm of the step's tile is finite and <= 2^100, the separable sep_coef (|z|^2 + |p|^2) + coef tiny
    (``search_bound.separable``: two fmas and a min per pair, the row's part added per row; the kernel then works
    with v~ = a~ - |p|^2, the same for every patch of a row); "tf32" adds res_coef |p| (|z_lo| + rho_p |z|) from
    its operands' truncation residual norms, rho_p the tile's largest |p_lo| / |p|
    (``search_bound.converted_tf32_bound``: the MMA may truncate or round its fp32 operands), where the generic
    "tf32" bound would take a coef 64x the others'. The patches' |z|^2 and |z_lo|^2 come from norms_ptr (B, 2 HW
    + tiles) (``_patch_norms_kernel``), so that the search loop is loads and dots only. TRUNCATE ("tf32" under the
    interpreter, whose dot is exact fp32, and on non-NVIDIA devices): the kernel truncates the operands itself, so
    that the bound's worst case is what the CPU tests exercise. Each step (one patch tile, or two when PAIRED)
    lowers the running threshold thr = min (a~ + delta); the step's candidates are its patches with a~ - delta <=
    thr, or a~ or delta not finite (a superset of the candidates of the final threshold, since thr only
    decreases), written to cand_ptr (B, M, steps, 2) int32: patch k0 + j is bit j of the low word (j < 32) or
    bit j - 32 of the high one. ``_rescore_kernel`` rescores them.
    """
    STEP_K: tl.constexpr = 2 * BLOCK_K if PAIRED else BLOCK_K
    tl.static_assert(BLOCK_K == 32 or not PAIRED)  # the second tile of a pair: the high word, patches k0 + 32..
    b0, offs_m, m_mask = _program_tile(M, IMAGES, BLOCK_M)
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
        # row that is not finite has a~ or delta not finite: always rescored)
        live_p = m_mask & (p_len > 0) & (p_len < inf)
        rho_p = tl.max(tl.where(live_p, tl.sqrt(p_lo) / tl.where(live_p, p_len, 1.0), 0.0), axis=0)
    p_tile = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # unused unless P_RESIDENT
    if P_RESIDENT:
        offs_d = tl.arange(0, BLOCK_D)
        p_tile = tl.load(p_rows + offs_d[None, :] * stride_pd,
                         mask=m_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)

    # the separable form's row part B_m (NaN past M: its rows' lower ends, never candidates) and its condition;
    # without it (not SEPARABLE) |p|^2, what the per-pair form adds to v~ (_search_tile)
    p_sep = p_norm
    p_small = False
    if SEPARABLE:
        p_sep = tl.where(m_mask, sep_coef * p_norm + coef * tiny, float("nan"))
        p_small = _separable_norms(p_norm, m_mask)
    z_base = z_ptr + b0.to(tl.int64) * stride_zb  # then advanced by one image per iteration
    norms_row = 2 * HW + tl.cdiv(HW, NORMS_K)  # an image's norms (_patch_norms_kernel)
    norms = norms_ptr + b0.to(tl.int64) * norms_row
    out = b0.to(tl.int64) * M + offs_m
    log_img = log_ptr
    if RECORD:
        log_img += b0.to(tl.int64) * M * HW * 3
    steps = tl.cdiv(HW, STEP_K)
    for b in range(b0, tl.minimum(b0 + IMAGES, B)):
        thr = tl.full((BLOCK_M,), inf, dtype=tl.float32)
        words = cand_ptr + out * (2 * steps)  # the rows' candidate words of image b, by step
        for k0 in range(0, HW, STEP_K):
            lo, thr = _search_tile(z_base, norms, p_rows, p_tile, p_len, p_sep, p_small, rho_p, m_mask, thr, k0, D,
                                   HW, coef, tiny, res_coef, sep_coef, stride_zd, stride_zk, stride_pd,
                                   log_img, offs_m, BLOCK_M, BLOCK_K, BLOCK_D,
                                   P_RESIDENT, PRECISION, TRUNCATE, SEPARABLE, NORMS_K, RECORD)
            lo_next = lo  # PAIRED: the next tile's bounds (NaN, never a candidate, past the last patch)
            if PAIRED:
                if k0 + BLOCK_K < HW:
                    lo_next, thr = _search_tile(z_base, norms, p_rows, p_tile, p_len, p_sep, p_small, rho_p, m_mask,
                                                thr, k0 + BLOCK_K, D, HW, coef, tiny, res_coef, sep_coef, stride_zd,
                                                stride_zk, stride_pd, log_img,
                                                offs_m, BLOCK_M, BLOCK_K, BLOCK_D, P_RESIDENT, PRECISION, TRUNCATE,
                                                SEPARABLE, NORMS_K, RECORD)
                else:
                    lo_next = tl.full((BLOCK_M, BLOCK_K), float("nan"), dtype=tl.float32)
            # The step's candidates against its threshold (-inf, v~ not finite: always; NaN, outside the problem:
            # never): patch k0 + j is bit j of the low word (j < 32) or bit j - 32 of the high one.
            if BLOCK_K > 32:  # "highest"'s 64-patch tiles
                low_bits, high_bits = _bit_words64(lo <= thr[:, None])
            else:
                low_bits = _bit_word(lo <= thr[:, None], BLOCK_K)
                high_bits = low_bits * 0
                if PAIRED:
                    high_bits = _bit_word(lo_next <= thr[:, None], BLOCK_K)
            tl.store(words, low_bits, mask=m_mask)
            tl.store(words + 1, high_bits, mask=m_mask)
            words += 2
        z_base += stride_zb
        norms += norms_row
        out += M
        if RECORD:
            log_img += M * HW * 3


@triton.jit
def _rescore_kernel(
    z_ptr, p_ptr, cand_ptr, sim_ptr, dist_ptr, idx_ptr,
    B, D, HW, M, IMAGES, eps, one_minus_eps, stride_zb, stride_zk,
    BLOCK_M: tl.constexpr, STEP_K: tl.constexpr, EVEN_D: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    """The certified search's second half: one program per (block of IMAGES images, BLOCK_M prototypes), folded
    into grid axis 0 as the search's. For each image, each step's candidate words (``_forward_kernel``: bit j of
    the low word is patch k0 + j, of the high word k0 + 32 + j) are rescored exactly, one candidate per row at a
    time in increasing patch order (a round, ``_rescore``: the exact distance in the fixed order of
    RESCORE_LANES), rounds up to the step's largest row count; then the outputs. Winner: the first NaN patch if
    any (distance NaN), else the first patch of smallest exact distance (a patch holding +-inf is at +inf; if all
    are, patch 0). The candidates' bits do not depend on the search's precision beyond which patches they hold,
    and the rescoring not at all: every precision returns the same (distance, index)."""
    b0, offs_m, m_mask = _program_tile(M, IMAGES, BLOCK_M)
    p_rows = (p_ptr + tl.minimum(offs_m, M - 1) * D)[:, None]  # rows past M: never active
    z_base = z_ptr + b0.to(tl.int64) * stride_zb
    out = b0.to(tl.int64) * M + offs_m
    steps = tl.cdiv(HW, STEP_K)
    for b in range(b0, tl.minimum(b0 + IMAGES, B)):
        words = cand_ptr + out * (2 * steps)
        best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
        best_idx = tl.full((BLOCK_M,), HW, dtype=tl.int32)  # HW: none yet
        nan_idx = tl.full((BLOCK_M,), HW, dtype=tl.int32)
        for k0 in range(0, HW, STEP_K):
            low_bits = tl.load(words, mask=m_mask, other=0)
            high_bits = tl.load(words + 1, mask=m_mask, other=0)
            words += 2
            count = _popcount(low_bits) + _popcount(high_bits)
            for _ in range(tl.max(count, axis=0)):
                in_low = low_bits != 0
                word = tl.where(in_low, low_bits, high_bits)
                low = word & -word  # the lowest set bit (0 when the row has no candidate left)
                low_bits = tl.where(in_low, low_bits ^ low, low_bits)
                high_bits = tl.where(in_low, high_bits, high_bits ^ low)
                k = k0 + _bit_index(low) + tl.where(in_low, 0, 32)
                best, best_idx, nan_idx = _rescore(z_base, p_rows, k, low != 0, best, best_idx, nan_idx, D, HW,
                                                   stride_zk, BLOCK_M, EVEN_D, MASK_ROWS)
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
        out += M


@triton.jit
def _program_tile(M, IMAGES, BLOCK_M: tl.constexpr):
    """This program's (first image, prototype rows, their mask) in a grid that folds (block of IMAGES images,
    BLOCK_M-row prototype tile) into axis 0, prototype tiles fastest (``_image_runs`` launches it)."""
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    offs_m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (pid // m_tiles) * IMAGES, offs_m, offs_m < M


@triton.jit
def _rescore(z_base, p_rows, k, active, best, best_idx, nan_idx, D, HW, stride_zk, BLOCK_M: tl.constexpr,
             EVEN_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """One candidate round: the exact distance sum_d (z[:, k] - p)^2 of each active row's candidate patch k, in the
    fixed order of RESCORE_LANES, and the rows' (best, best_idx, nan_idx) updated with it (candidates come in
    increasing patch order: the first NaN and the first of equal minima win)."""
    z_col = z_base + tl.where(active, k, 0).to(tl.int64) * stride_zk
    lanes = tl.zeros((BLOCK_M, RESCORE_LANES), dtype=tl.float32)
    for d0 in range(0, D, RESCORE_LANES):  # lane e sums d = e, e + 32, ... in order
        offs_e = d0 + tl.arange(0, RESCORE_LANES)
        if EVEN_D and MASK_ROWS:  # only the active rows load (fewer bytes, ~38% more instructions a round)
            zd = tl.load(z_col[:, None] + offs_e[None, :], mask=active[:, None]).to(tl.float32)
            pd = tl.load(p_rows + offs_e[None, :], mask=active[:, None]).to(tl.float32)
        elif EVEN_D:  # every row's pointers valid (inactive rows read patch 0, rows past M the last row): no masks
            zd = tl.load(z_col[:, None] + offs_e[None, :]).to(tl.float32)
            pd = tl.load(p_rows + offs_e[None, :]).to(tl.float32)
        else:
            mask = active[:, None] & (offs_e[None, :] < D)
            zd = tl.load(z_col[:, None] + offs_e[None, :], mask=mask, other=0.0).to(tl.float32)
            pd = tl.load(p_rows + offs_e[None, :], mask=mask, other=0.0).to(tl.float32)
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
def _bit_words64(cand):
    """Per row of cand (BLOCK_M, 64): the int32 words of its columns 0..31 and 32..63 (bit j of each)."""
    j = tl.arange(0, 64)[None, :]
    bit = 1 << (j & 31)
    return (tl.sum(tl.where(cand & (j < 32), bit, 0), axis=1), tl.sum(tl.where(cand & (j >= 32), bit, 0), axis=1))


@triton.jit
def _popcount(x):
    """The set bits of each int32 of x (a SWAR count on the unsigned bits)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return (((u * 0x01010101) >> 24) & 63).to(tl.int32)  # (the top byte of the 32-bit product)


@triton.jit
def _search_tile(z_base, norms, p_rows, p_tile, p_len, p_sep, p_small, rho_p, m_mask, thr, k0, D, HW, coef, tiny,
                 res_coef, sep_coef, stride_zd, stride_zk, stride_pd, log_img, offs_m, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, P_RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
                 TRUNCATE: tl.constexpr, SEPARABLE: tl.constexpr, NORMS_K: tl.constexpr, RECORD: tl.constexpr):
    """The search over the patch tile at k0 of one image: (the tile's lower ends, compared with the running
    threshold for the candidates: -inf where v~ or its bound is not finite (always a candidate) and NaN outside the
    problem (never one); thr lowered by the tile's upper ends). Per-pair form: ends v~ -+ delta (v~ = a~ - |p|^2;
    without SEPARABLE a~ -+ delta, p_sep being |p|^2 there);
    separable form (SEPARABLE, on a tile whose norms are all finite and <= 2^100, as _patch_norms_kernel flags each
    of its tiles (NORMS_K patches, a multiple of BLOCK_K), with the program's prototypes, p_small): upper
    ends v~ + A_k (+ the "tf32" term) with B_m = p_sep added to their row minimum, lower ends v~ - A_k (- the term)
    - B_m (``search_bound.separable``). The loop over channel slices only loads and dots; the patches' |z|^2 (and
    for "tf32" |z_lo|^2, z_lo = z - tf32(z)) come from the image's norms (``_patch_norms_kernel``). RECORD (tests
    only): each pair's (v~, upper end as the threshold used it, lower end) to log_img (M, HW, 3)."""
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
    z_len = tl.sqrt(z_norm)
    res = tl.zeros((BLOCK_K,), dtype=tl.float32)  # "tf32": the column factor of its residual term
    if PRECISION == "tf32":
        z_lo = tl.sqrt(tl.load(norms + HW + offs_k, mask=k_mask, other=0.0))
        res = res_coef * (z_lo + rho_p * z_len)
    separable = False
    if SEPARABLE:
        separable = (tl.load(norms + 2 * HW + k0 // NORMS_K) != 0) & p_small
    if separable:
        # padding: an upper end of +inf (never the minimum), a lower end of NaN (never a candidate)
        hi = tl.where(k_mask, z_norm * (1.0 + sep_coef), inf)[None, :] - 2.0 * dot
        lo = tl.where(k_mask, z_norm * (1.0 - sep_coef), float("nan"))[None, :] - 2.0 * dot
        if PRECISION == "tf32":
            term = p_len[:, None] * res[None, :]
            hi += term
            lo -= term
        low = tl.min(hi, axis=1)
        tile_thr = low + p_sep
        lo = lo - p_sep[:, None]
        up_shift = tile_thr - low  # what the threshold adds to the row's minimum (B_m)
    else:  # v~, or without the separable form a~ = |p|^2 + v~ (one more add, and 24 bytes of spill fewer on
        # Triton 3.6 at "highest"; the same candidates: |p|^2 is the same for every patch of a row)
        v = z_norm[None, :] - 2.0 * dot if SEPARABLE else p_sep[:, None] + z_norm[None, :] - 2.0 * dot
        radius = p_len[:, None] + z_len[None, :]
        delta = coef * (radius * radius + tiny)
        if PRECISION == "tf32":
            delta += p_len[:, None] * res[None, :]
        live = m_mask[:, None] & k_mask[None, :]
        # False for NaN too. A bound that is not finite leaves the pair a candidate: |p|^2 = inf (|p| > 1.8e19)
        # with TF32-exact z (z_lo = 0: any bf16 / fp16 input) makes the residual term inf * 0 = NaN while v~,
        # without |p|^2, can stay finite
        finite = (tl.abs(v) < inf) & (delta < inf)
        hi = tl.where(live & finite, v + delta, inf)
        tile_thr = tl.min(hi, axis=1)
        lo = tl.where(live, tl.where(finite, v - delta, -inf), float("nan"))
        up_shift = tl.zeros((BLOCK_M,), dtype=tl.float32)
    thr = tl.minimum(thr, tile_thr)
    if RECORD:  # on the scale of v~
        at = log_img + (offs_m[:, None] * HW + offs_k[None, :]) * 3
        live = m_mask[:, None] & k_mask[None, :]
        scale = tl.zeros((BLOCK_M,), dtype=tl.float32) if SEPARABLE else p_sep
        tl.store(at, z_norm[None, :] - 2.0 * dot, mask=live)
        tl.store(at + 1, hi + up_shift[:, None] - scale[:, None], mask=live)
        tl.store(at + 2, lo - scale[:, None], mask=live)
    return lo, thr


@triton.jit
def _separable_norms(norm2, mask):
    """Whether every squared norm of norm2 under mask is at most SEPARABLE_MAX_NORM2 (NaN is not): where the
    certification may take its separable form."""
    return tl.sum(tl.where(mask, (norm2 <= SEPARABLE_MAX_NORM2) == 0, False).to(tl.int32), axis=0) == 0


@triton.jit
def _patch_norms_kernel(z_ptr, norms_ptr, D, HW, stride_zb, stride_zd, stride_zk, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """norms (B, 2 HW + ceil(HW / BLOCK_K)): |z[b, :, k]|^2 and |z_lo|^2 (z_lo = z - tf32(z), the truncation
    residual) of every patch, in fp32 (any summation order: the search bound allows for it), then per tile of
    BLOCK_K patches 1.0 if all its |z|^2 are <= 2^100 (not NaN), else 0.0: where the forward may certify in the
    separable form. Program (image, patch tile)."""
    tiles = tl.cdiv(HW, BLOCK_K)
    b = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    offs_k = tile * BLOCK_K + tl.arange(0, BLOCK_K)
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
    row = norms_ptr + b.to(tl.int64) * (2 * HW + tiles)
    tl.store(row + offs_k, norm, mask=k_mask)
    tl.store(row + HW + offs_k, low, mask=k_mask)
    tl.store(row + 2 * HW + tile, tl.where(_separable_norms(norm, k_mask), 1.0, 0.0))


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
    """g = grad_d + grad_sim * d(sim)/d(d) of the pairs ``pair`` (flat b * M + m); 0 where masked. The slope
    is (eps - 1) / ((d + 1)(d + eps)), not 1/(d + 1) - 1/(d + eps), which cancels at large d."""
    dist = tl.load(dist_ptr + pair, mask=mask, other=0.0)
    g_sim = tl.load(gsim_ptr + pair, mask=mask, other=0.0)
    return tl.load(gdist_ptr + pair, mask=mask, other=0.0) + g_sim * ((eps - 1.0) / ((dist + 1.0) * (dist + eps)))


@triton.jit
def _tf32_part(x):
    """The leading TF32 part of x (sign, exponent, 10 mantissa bits; -8192 = 0xffffe000): exact as a TF32
    operand, and x - part is exact in fp32."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _grad_prototypes_kernel(
    gsim_ptr, gdist_ptr, dist_ptr, idx_ptr, z_ptr, p_ptr, gp_ptr, g_ptr,
    B, D, HW, M, eps,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IMAGES: tl.constexpr,
):
    """grad_p = 2 * sum_b g[b, m] * (p[m] - z[b, :, idx[b, m]]), summed over every image in one program.

    Program (m tile, d tile) keeps its p tile in registers and walks the images IMAGES at a time: their winning z
    rows gathered at once (IMAGES x BLOCK_M rows in flight) and added into IMAGES accumulators (slot i sums
    images i, i + IMAGES, ... in order), which a fixed tree adds at the end: no partial sums in memory.
    Differences are taken before scaling by g (never p * sum(g) - sum(g * z)): g reaches -1/eps near d = 0. The
    programs of the first d tile also write g[b, m] to g_ptr (B, M), which grad_z reads instead of computing it
    again.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = offs_m < M
    d_mask = offs_d < D
    mask = m_mask[:, None] & d_mask[None, :]
    p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((IMAGES, BLOCK_M, BLOCK_D), dtype=tl.float32)  # slot i: images i, i + IMAGES, ...
    offs_i = tl.arange(0, IMAGES)
    for b0 in range(0, B, IMAGES):
        b = b0 + offs_i
        pairs = (b[:, None] < B) & m_mask[None, :]  # (IMAGES, BLOCK_M)
        row = b[:, None].to(tl.int64) * M + offs_m[None, :]
        g = _pair_coefficient(gsim_ptr, gdist_ptr, dist_ptr, row, pairs, eps)
        if pid_d == 0:
            tl.store(g_ptr + row, g, mask=pairs)
        k = tl.minimum(tl.maximum(tl.load(idx_ptr + row, mask=pairs, other=0), 0), HW - 1)  # as grad_z's gathers
        live = pairs[:, :, None] & d_mask[None, None, :]
        z_rows = z_ptr + b[:, None].to(tl.int64) * stride_zb + k * stride_zk  # (IMAGES, BLOCK_M)
        z = tl.load(z_rows[:, :, None] + offs_d[None, None, :] * stride_zd, mask=live, other=0.0).to(tl.float32)
        acc += tl.where(live, g[:, :, None] * (p[None, :, :] - z), 0.0)  # past B: no 0 * inf
    tl.store(gp_ptr + offs_m[:, None] * D + offs_d[None, :], 2.0 * tl.sum(acc, axis=0), mask=mask)


@triton.jit
def _won_patches(idx_ptr, b, c, M, HW, CHUNK: tl.constexpr):
    """(m, k, live) of the prototypes c * CHUNK.. of image b: k their winning patch (clamped to the map, as every
    gather of the backward; -1 past M)."""
    m = c * CHUNK + tl.arange(0, CHUNK)
    live = m < M
    k = tl.load(idx_ptr + b.to(tl.int64) * M + m, mask=live, other=0).to(tl.int32)
    return m, tl.where(live, tl.minimum(tl.maximum(k, 0), HW - 1), -1), live


@triton.jit
def _won_histogram_kernel(idx_ptr, hist_ptr, M, HW, CHUNKS, CHUNK: tl.constexpr, BINS: tl.constexpr):
    """Segmented grad_z, step 1 of the counting sort. Program (image b, chunk c): hist[b, c, k] = how many of the
    prototypes c * CHUNK.. won patch k of image b (BINS patches at a time)."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    _, k, live = _won_patches(idx_ptr, b, c, M, HW, CHUNK)
    bins = tl.arange(0, BINS)
    out = hist_ptr + (b.to(tl.int64) * CHUNKS + c) * HW
    for k0 in range(0, HW, BINS):
        inside = live & (k >= k0) & (k < k0 + BINS)
        count = tl.histogram(tl.where(inside, k - k0, 0), BINS, mask=inside)
        tl.store(out + k0 + bins, count, mask=k0 + bins < HW)


@triton.jit
def _won_starts_kernel(hist_ptr, count_ptr, HW, CHUNKS, BINS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Step 2. Program (image b) turns its histograms into places, in place: hist[b, c, k] becomes the first place
    of chunk c's pairs of patch k in the image's list ordered by (patch, m), i.e. (pairs won by patches < k) +
    (pairs of k in chunks < c); count[b, k] = the pairs patch k won."""
    b = tl.program_id(0)
    hist_b = hist_ptr + b.to(tl.int64) * CHUNKS * HW
    bins = tl.arange(0, BINS)
    done = 0  # pairs won by the patches before k0
    for k0 in range(0, HW, BINS):
        in_map = k0 + bins < HW
        total = tl.zeros((BINS,), dtype=tl.int32)
        for c0 in range(0, CHUNKS, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            total += tl.sum(tl.load(hist_b + cc[:, None] * HW + (k0 + bins)[None, :],
                                    mask=(cc < CHUNKS)[:, None] & in_map[None, :], other=0), axis=0)
        tl.store(count_ptr + b.to(tl.int64) * HW + k0 + bins, total, mask=in_map)
        start = done + tl.cumsum(total, axis=0) - total
        done += tl.sum(total, axis=0)
        tl.debug_barrier()  # every warp has read these histograms before any is overwritten
        for c0 in range(0, CHUNKS, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            ptrs = hist_b + cc[:, None] * HW + (k0 + bins)[None, :]
            mask = (cc < CHUNKS)[:, None] & in_map[None, :]
            h = tl.load(ptrs, mask=mask, other=0)
            place = start[None, :] + tl.cumsum(h, axis=0) - h
            tl.store(ptrs, place, mask=mask)
            start += tl.sum(h, axis=0)


@triton.jit
def _won_order_kernel(idx_ptr, start_ptr, order_ptr, B, M, HW, CHUNKS, CHUNK: tl.constexpr):
    """Step 3. Program (image b, chunk c) places its prototypes in image b's list of pairs ordered by (winning
    patch, m): order[0, b, j] = m and order[1, b, j] = its patch k, at j = (chunk c's first place for k, step 2)
    + (chunk c's prototypes before m that won k). Integer work only: the same list on every run."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    m, k, live = _won_patches(idx_ptr, b, c, M, HW, CHUNK)
    j = tl.arange(0, CHUNK)
    earlier = tl.sum(((k[:, None] == k[None, :]) & (j[None, :] < j[:, None])).to(tl.int32), axis=1)
    start = tl.load(start_ptr + (b.to(tl.int64) * CHUNKS + c) * HW + k, mask=live, other=0)
    out = order_ptr + b.to(tl.int64) * M + start + earlier
    tl.store(out, m, mask=live)
    tl.store(out + B.to(tl.int64) * M, k, mask=live)


@triton.jit
def _chain(linked_a, sum_a, linked_b, sum_b):
    """Combine of ``_chain_scan``'s steps as an associative scan (a before b): b continues a's chain where it is
    linked; a select, never a product (0 * inf)."""
    return linked_a * linked_b, tl.where(linked_b != 0, sum_a + sum_b, sum_b)


@triton.jit
def _chain_scan(linked, pieces, N: tl.constexpr, GATHER: tl.constexpr):
    """Inclusive scan of the segmented grad_z's N pieces in list order: piece i becomes the sum of its chain up to
    it, a chain running on while pieces are linked to their predecessor (linked[i] != 0); a fixed order, and
    selects, never products, so 0 * inf never appears. Compiled: ``tl.associative_scan`` with ``_chain`` (80
    registers at the CUB shape, 3 programs per SM). GATHER (the launcher's choice off GPUs): Hillis-Steele steps,
    piece i taking piece i - d's partial where every piece between is linked, each a gather of the pieces d rows
    up: plain vector operations under the interpreter, whose generic scan calls the combine function once per
    element (0.5 s a program); compiled, it takes 97 registers. Both orders are exact to fp32 rounding; tests
    check each against the float64 reference."""
    if not GATHER:
        _, out = tl.associative_scan((tl.broadcast_to(linked[:, None], pieces.shape), pieces), 0, _chain)
        return out
    i = tl.arange(0, N)
    for s in tl.static_range(0, 16):
        if (1 << s) < N:
            up = tl.maximum(i - (1 << s), 0)
            take = (i >= (1 << s)) & (linked != 0)
            above = tl.gather(pieces, tl.broadcast_to(up[:, None], pieces.shape), 0)
            linked = tl.where(i >= (1 << s), linked * tl.gather(linked, up, 0), linked)
            pieces = tl.where(take[:, None], above + pieces, pieces)
    return pieces


@triton.jit
def _grad_features_segments_kernel(
    g_ptr, order_ptr, count_ptr, z_ptr, p_ptr, sums_ptr, gz_ptr,
    B, D, HW, M, RUN, stride_zb, stride_zk, stride_pm,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, EVEN_D: tl.constexpr,
    GATHER_SCAN: tl.constexpr,
):
    """grad_z[b, :, k] = 2 * sum over the m won at (b, k) of g[b, m] * (z[b, :, k] - p[m]), from image b's pairs
    listed by (patch, m) (``_won_order_kernel``).

    Program (image b, channel tile): row r of the program walks pairs r * RUN .. r * RUN + RUN - 1 of the list in
    order (every row the same number of steps, however the winners are spread over the patches), adding each
    pair's contribution g (z - p) (difference form; g as grad_p wrote it) to a running sum in registers. Where
    the patch changes, the sum of a segment that began inside the row is complete and stored; the row's first
    segment (which may have begun in earlier rows) is kept as its head and its last one as its tail. A scan
    over the rows' pieces (head, tail) in list order then adds each segment's parts across rows
    (``_chain_scan``), and the row where a segment ends stores it. Sums go to sums_ptr (B, HW, D: channels
    innermost, so that every store of a row's channels is one contiguous run), and the program finally copies
    its channel tile of image b into grad_z (B, D, HW), zeros where no pair won. Plain fp32 additions in a fixed
    order, no dots: inf and NaN contributions reach their own patch as in any summation order. z and p have unit
    channel stride (the launcher's ``channels_innermost`` z, contiguous p): each row's channels are one run.
    """
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    rows = tl.arange(0, ROWS)
    first = rows * RUN  # row r's pairs: first .. first + n - 1
    n = tl.minimum(tl.maximum(M - first, 0), RUN)
    pairs = b.to(tl.int64) * M
    list_m = order_ptr + pairs
    list_k = list_m + B.to(tl.int64) * M
    g_b = g_ptr + pairs
    z_b = z_ptr + b.to(tl.int64) * stride_zb
    sums_b = sums_ptr + b.to(tl.int64) * HW * D + offs_d[None, :]
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    head = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    head_k = tl.full((ROWS,), -1, dtype=tl.int32)  # the first segment's patch, once it has ended (else -1)
    cur = tl.full((ROWS,), -1, dtype=tl.int32)  # the running segment's patch
    live = n > 0
    m_next = tl.load(list_m + first, mask=live, other=0)
    k_next = tl.load(list_k + first, mask=live, other=-1)
    for s in range(0, RUN):
        live = s < n
        m, k = m_next, k_next
        ahead = s + 1 < n  # the next step's pair, loaded before this step's gathers
        m_next = tl.load(list_m + first + s + 1, mask=ahead, other=0)
        k_next = tl.load(list_k + first + s + 1, mask=ahead, other=-1)
        new = live & (k != cur)
        ended = new & (cur >= 0)
        inner = ended & (head_k >= 0)  # a segment that began inside this row ended: complete
        if EVEN_D:
            tl.store(sums_b + cur[:, None] * D, acc, mask=inner[:, None])
        else:
            tl.store(sums_b + cur[:, None] * D, acc, mask=inner[:, None] & d_mask[None, :])
        to_head = ended & (head_k < 0)
        head = tl.where(to_head[:, None], acc, head)
        head_k = tl.where(to_head, cur, head_k)
        acc = tl.where(new[:, None], 0.0, acc)
        cur = tl.where(live, k, cur)
        if EVEN_D:
            mask = live[:, None]
        else:
            mask = live[:, None] & d_mask[None, :]
        g = tl.load(g_b + m, mask=live, other=0.0)
        z = tl.load(z_b + k[:, None] * stride_zk + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + m[:, None] * stride_pm + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += g[:, None] * (z - p)  # + 0 on rows past their pairs
    # Pieces in list order: row r's head (its first segment, or the whole row), then its tail (its last segment;
    # a row of one segment has an empty tail: -0.0, which adds nothing to any sum, linked through). A row has one
    # segment iff its first and last pairs won the same patch (the list is ordered by patch).
    used = n > 0
    first_k = tl.load(list_k + first, mask=used, other=-1)
    last_k = tl.load(list_k + first + n - 1, mask=used, other=-1)
    single = first_k == last_k
    previous = tl.load(list_k + first - 1, mask=(rows > 0) & used, other=-1)  # the last pair of row r - 1
    following = tl.load(list_k + first + RUN, mask=used & (first + RUN < M), other=-1)  # row r + 1's first
    head = tl.where(single[:, None], acc, head)
    tail = tl.where(single[:, None], -0.0, acc)
    pieces = tl.reshape(tl.permute(tl.join(head, tail), (0, 2, 1)), (2 * ROWS, BLOCK_D))
    links = tl.reshape(tl.join((used & (previous == first_k)).to(tl.int32), single.to(tl.int32)), (2 * ROWS,))
    totals = _chain_scan(links, pieces, 2 * ROWS, GATHER_SCAN)
    head, tail = tl.split(tl.permute(tl.reshape(totals, (ROWS, 2, BLOCK_D)), (0, 2, 1)))
    done_head = used & (single == 0)  # the first segment ended in this row
    done_tail = used & (following != last_k)  # the last one ends with the row
    tl.store(sums_b + first_k[:, None] * D, head, mask=done_head[:, None] & d_mask[None, :])
    tl.store(sums_b + last_k[:, None] * D, tail, mask=done_tail[:, None] & d_mask[None, :])
    tl.debug_barrier()  # the program's sums are in memory: copy them into grad_z (B, D, HW), times 2
    out_b = gz_ptr + b.to(tl.int64) * D * HW + offs_d[None, :] * HW
    for q0 in range(0, HW, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        won = tl.load(count_ptr + b.to(tl.int64) * HW + q, mask=q < HW, other=0) > 0
        total = tl.load(sums_b + q[:, None] * D, mask=won[:, None] & d_mask[None, :], other=0.0)
        tl.store(out_b + q[:, None], 2.0 * total, mask=(q < HW)[:, None] & d_mask[None, :])


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def channels_innermost(z: torch.Tensor) -> torch.Tensor:
    """z (B, D, ...) with unit channel stride (one copy unless already so, e.g. channels_last features; a 4-D
    copy is channels_last, so flatten(2) of it stays a view).

    The winner gathers read whole channel vectors z[b, :, k]: with unit stride those are coalesced rows,
    with stride HW every element is a separate memory sector. The tile loads are coalesced either way.
    """
    if z.stride(1) == 1 or z.shape[1] == 1:
        return z
    return z.movedim(1, -1).contiguous().movedim(-1, 1)


def forward_config(D: int, HW: int, M: int, precision: str) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of ``_forward_kernel`` for a problem: the launcher's only choice.

    Tiles follow the problem: BLOCK_M from M and BLOCK_K from HW (each the next power of two in 16..64),
    32-channel slices, the p tile held in registers when D fits one slice; warps, stages and register cap by
    precision. Where M and HW would pick 64 x 64, the tensor-core precisions take 64 x 32
    (TENSOR_CORE_MAX_PATCHES): 64-row tiles keep Hopper's warp-group MMA (32-row tiles compile to mma.sync) and
    z is read once per 64 prototypes (NOTES.md, "Triton v7" and "Triton v10"; not measured).
    """
    num_warps, num_stages = _FORWARD_OPTIONS[precision]
    block_m = _pow2(M, FORWARD_TILES[0], FORWARD_TILES[-1])
    block_k = _pow2(HW, FORWARD_TILES[0], FORWARD_TILES[-1])
    tensor_cores = precision != "highest"
    if tensor_cores:
        block_k = min(block_k, TENSOR_CORE_MAX_PATCHES)
    meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=FORWARD_SLICE,
                P_RESIDENT=D <= FORWARD_SLICE, PRECISION=INPUT_PRECISION[precision],
                PAIRED=tensor_cores and HW > block_k,
                TRUNCATE=False,  # what NVIDIA GPUs run; the launcher sets it elsewhere
                SEPARABLE=INPUT_PRECISION[precision] in SEPARABLE_LEVELS,
                NORMS_K=NORMS_TILE, RECORD=False)  # RECORD: tests only (forward's search_log)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if tensor_cores:
        options["maxnreg"] = TENSOR_CORE_MAX_REGISTERS
    elif meta["BLOCK_M"] * meta["BLOCK_K"] < FORWARD_TILES[-1] ** 2:
        options["maxnreg"] = SMALL_TILE_MAX_REGISTERS
    elif precision in STREAMED_P_MAX_REGISTERS and not meta["P_RESIDENT"]:
        options["maxnreg"] = STREAMED_P_MAX_REGISTERS[precision]
    return meta, options


def rescore_config(D: int, HW: int, M: int, precision: str) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of ``_rescore_kernel``: RESCORE_ROWS prototypes a program (fewer
    where M is smaller), the search's step of patches (what its candidate words cover)."""
    meta = forward_config(D, HW, M, precision)[0]
    step_k = 2 * meta["BLOCK_K"] if meta["PAIRED"] else meta["BLOCK_K"]
    meta = dict(BLOCK_M=_pow2(M, FORWARD_TILES[0], RESCORE_ROWS), STEP_K=step_k, EVEN_D=D % RESCORE_LANES.value == 0,
                MASK_ROWS=False)
    return meta, dict(num_warps=RESCORE_WARPS, num_stages=1, maxnreg=RESCORE_MAX_REGISTERS)


def forward_images_per_program(B: int, M: int, block_m: int) -> int:
    """Images per forward program: 1, 2, 4 or 8, the most that still leave TARGET_PROGRAMS programs (not
    measured: a grid of ~8 programs per SM on a 132-SM card; more images per program re-use the p tile)."""
    m_tiles = triton.cdiv(M, block_m)
    images = 1
    while images < 8 and triton.cdiv(B, 2 * images) * m_tiles >= TARGET_PROGRAMS:
        images *= 2
    return images


def backward_configs(D: int, HW: int) -> dict[str, tuple[dict, dict]]:
    """(constexpr arguments, launch options) of the backward kernels, by kernel name: grad_p, the three steps of
    the counting sort that lists each image's pairs by patch (BINS patches a step: HW's next power of two in
    16..ORDER_BINS), and grad_z by segments of that list (BLOCK_D: 16 or 32 channels from D)."""
    bins = _pow2(HW, 16, ORDER_BINS)
    channels = _pow2(D, SEGMENT_CHANNELS[0], SEGMENT_CHANNELS[-1])
    return {
        "_grad_prototypes_kernel": (
            dict(BLOCK_M=16, BLOCK_D=_pow2(D, GRAD_P_CHANNEL_TILES[0], GRAD_P_CHANNEL_TILES[-1]),
                 IMAGES=GRAD_P_IMAGES), {}),
        "_won_histogram_kernel": (dict(CHUNK=ORDER_CHUNK, BINS=bins), dict(num_warps=1)),
        "_won_starts_kernel": (dict(BINS=bins, BLOCK_C=min(ORDER_HIST_ROWS, ORDER_HIST_BLOCK // bins)),
                               dict(num_warps=8)),
        "_won_order_kernel": (dict(CHUNK=ORDER_CHUNK), dict(num_warps=1)),
        "_grad_features_segments_kernel": (
            dict(ROWS=SEGMENT_ROWS, BLOCK_D=channels, BLOCK_Q=bins, EVEN_D=D % channels == 0,
                 GATHER_SCAN=False),  # what GPUs run; the launcher sets it (gather_scan)
            dict(num_warps=SEGMENT_WARPS, num_stages=1)),
    }


def launch_configs(shapes=None) -> list[tuple[str, dict, dict]]:
    """Every distinct (kernel name, constexpr arguments, launch options) the compiled launchers can pick,
    over all precisions: for the (D, HW, M) ``shapes`` given, or by default for all shapes.

    Each choice is a step function of D, HW and M that is constant between and beyond these values (D > 64 and
    M > 64 pick the same as 65, D < 16 as 15 or 16 (as D % 16); HW > 64 the same as 65 but for grad_z's bins, the
    next power of two up to ORDER_BINS), so the default shapes reach every value.
    """
    if shapes is None:
        maps = list(range(1, 66)) + [2 * bins + 1 for bins in (64, 128, 256, 512)]  # 129 .. 1025
        shapes = [(D, HW, M) for D in (15, 16, 32, 64, 65) for HW in maps for M in (16, 32, 64, 65)]
    configs = []
    for D, HW, M in shapes:
        for precision in INPUT_PRECISION:
            meta, options = forward_config(D, HW, M, precision)
            configs.append(("_forward_kernel", meta, options))
            meta, options = rescore_config(D, HW, M, precision)
            configs.append(("_rescore_kernel", meta, options))
        configs.append(("_patch_norms_kernel", dict(BLOCK_K=NORMS_TILE, BLOCK_D=FORWARD_SLICE), {}))
        for name, (meta, options) in backward_configs(D, HW).items():
            configs.append((name, meta, options))
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def _on_inputs_device(launcher):
    """``launcher`` run with its first tensor argument's CUDA device current: Triton launches on the current
    device and stream, which need not be the inputs' (a model moved to cuda:1 without ``torch.cuda.set_device``
    would have its kernels run on cuda:0 against cuda:1 memory)."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return run


@_on_inputs_device
def forward(z3: torch.Tensor, p: torch.Tensor, eps: float, precision: str = "highest", search_log=None):
    """Fused forward on z3 (B, D, HW) (any strides, any float dtype) and p (M, D).

    Returns (similarity, min_distances, patch_index), each (B, M); float32, float32, int64. Certified search:
    the result is the same at every precision (see ``_forward_kernel``). search_log (tests): a float32 (B, M,
    HW, 3) tensor that receives each pair's (v~, upper end, lower end) of the certification as it ran.
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
    sep_coef = search_bound.separable(coef)
    # The MMA converts fp32 operands to TF32 by truncation or to nearest on NVIDIA GPUs; elsewhere (the
    # interpreter's exact dot, other vendors' MMAs) the kernel truncates them itself.
    truncate = level == "tf32" and (z3.device.type != "cuda" or torch.version.hip is not None)
    norms = torch.empty((B, 2 * HW + triton.cdiv(HW, NORMS_TILE)), device=z3.device, dtype=torch.float32)
    _patch_norms_kernel[(B * triton.cdiv(HW, NORMS_TILE),)](
        z3, norms, D, HW, z3.stride(0), z3.stride(1), z3.stride(2), BLOCK_K=NORMS_TILE, BLOCK_D=FORWARD_SLICE)
    rescore_meta, rescore_options = rescore_config(D, HW, M, precision)  # its STEP_K: the search's step of patches
    cand = torch.empty((B, M, triton.cdiv(HW, rescore_meta["STEP_K"]), 2), device=z3.device, dtype=torch.int32)
    images = forward_images_per_program(B, M, meta["BLOCK_M"])
    for b0, b1, programs in _image_runs(B, M, meta["BLOCK_M"], images):
        _forward_kernel[(programs,)](
            z3[b0:b1], p, norms[b0:b1], cand[b0:b1], b1 - b0, D, HW, M, images, coef, tiny, res_coef, sep_coef,
            z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
            norms if search_log is None else search_log[b0:b1],
            **{**meta, "TRUNCATE": truncate, "RECORD": search_log is not None}, **options,
        )
    p_rows = p.contiguous()  # the rescoring reads rows of p and z with unit channel stride (z3: channels_innermost)
    images = rescore_images_per_program(B, M, rescore_meta["BLOCK_M"])
    for b0, b1, programs in _image_runs(B, M, rescore_meta["BLOCK_M"], images):
        _rescore_kernel[(programs,)](
            z3[b0:b1], p_rows, cand[b0:b1], sim[b0:b1], dist[b0:b1], idx[b0:b1], b1 - b0, D, HW, M, images, eps,
            1.0 - eps, z3.stride(0), z3.stride(2), **rescore_meta, **rescore_options,
        )
    return sim, dist, idx


def rescore_images_per_program(B: int, M: int, block_m: int) -> int:
    """Images per ``_rescore_kernel`` program: the search's rule for now (not measured; its one-warp programs may
    want more programs, or more images to re-use their p rows: sweep candidates)."""
    return forward_images_per_program(B, M, block_m)


def _image_runs(B: int, M: int, block_m: int, images: int):
    """(b0, b1, programs) of each launch over images b0..b1 of a kernel that folds (block of ``images`` images,
    prototype tile) into grid axis 0: one launch unless that would pass MAX_PROGRAMS programs."""
    m_tiles = triton.cdiv(M, block_m)
    per_launch = max(1, MAX_PROGRAMS // m_tiles) * images
    for b0 in range(0, B, per_launch):
        b1 = min(B, b0 + per_launch)
        yield b0, b1, triton.cdiv(b1 - b0, images) * m_tiles


def gather_scan(device: torch.device) -> bool:
    """grad_z's cross-row scan by gathers (``_chain_scan``) off GPUs (the interpreter), else the associative scan."""
    return device.type != "cuda"


def _grad_z_segments(configs: dict, g: torch.Tensor, z3: torch.Tensor, p: torch.Tensor, idx: torch.Tensor
                     ) -> torch.Tensor:
    """grad_z (B, D, HW): each image's pairs listed by winning patch (a counting sort: ``_won_histogram_kernel``,
    ``_won_starts_kernel``, ``_won_order_kernel``), then summed by segments (``_grad_features_segments_kernel``)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    chunks = triton.cdiv(M, configs["_won_order_kernel"][0]["CHUNK"])  # within MAX_GRID_YZ: backward checks
    starts = torch.empty((B, chunks, HW), device=z3.device, dtype=torch.int32)  # histograms, then places
    order = torch.empty((2, B, M), device=z3.device, dtype=torch.int32)  # m, then its patch, by (patch, m)
    count = torch.empty((B, HW), device=z3.device, dtype=torch.int32)
    meta, options = configs["_won_histogram_kernel"]
    _won_histogram_kernel[(B, chunks)](idx, starts, M, HW, chunks, **meta, **options)
    meta, options = configs["_won_starts_kernel"]
    _won_starts_kernel[(B,)](starts, count, HW, chunks, **meta, **options)
    meta, options = configs["_won_order_kernel"]
    _won_order_kernel[(B, chunks)](idx, starts, order, B, M, HW, chunks, **meta, **options)
    meta, options = configs["_grad_features_segments_kernel"]
    sums = torch.empty((B, HW, D), device=z3.device, dtype=torch.float32)  # per patch, channels innermost
    grad_z = torch.empty((B, D, HW), device=z3.device, dtype=torch.float32)
    _grad_features_segments_kernel[(B, triton.cdiv(D, meta["BLOCK_D"]))](
        g, order, count, z3, p, sums, grad_z, B, D, HW, M, triton.cdiv(M, meta["ROWS"]), z3.stride(0), z3.stride(2),
        p.stride(0), **{**meta, "GATHER_SCAN": gather_scan(z3.device)}, **options)
    return grad_z


@_on_inputs_device
def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Hand-written backward: (grad_z3 (B, D, HW) contiguous float32, grad_p (M, D) float32); no comparison sort
    (grad_z lists each image's pairs by patch with a counting sort, ``_grad_z_segments``)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    z3 = channels_innermost(z3)
    grad_sim = grad_sim.float().contiguous()
    grad_dist = grad_dist.float().contiguous()
    dist, idx = dist.contiguous(), idx.contiguous()
    configs = backward_configs(D, HW)
    strides = (z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1))
    span = (HW - 1) * abs(z3.stride(2)) + (D - 1) * abs(z3.stride(1))  # grad_z's int32 offsets, checked first
    if span >= 2**31 or M * D >= 2**31 or HW * D >= 2**31:
        raise ValueError(f"triton grad_z: a z image of {span + 1} elements or {M} x {D} prototypes do not fit its "
                         "int32 offsets; use the torch or cuda backend")
    chunks = triton.cdiv(M, configs["_won_order_kernel"][0]["CHUNK"])  # grad_z's ordering programs, grid axis 1
    if chunks > MAX_GRID_YZ:
        raise ValueError(f"triton grad_z: {M} prototypes need {chunks} ordering programs per image, more than "
                         f"a grid axis allows ({MAX_GRID_YZ}); use the torch or cuda backend")
    meta, options = configs["_grad_prototypes_kernel"]
    grad_p = torch.empty((M, D), device=z3.device, dtype=torch.float32)
    g = torch.empty((B, M), device=z3.device, dtype=torch.float32)  # written by grad_p, read by grad_z
    _grad_prototypes_kernel[(triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))](
        grad_sim, grad_dist, dist, idx, z3, p, grad_p, g, B, D, HW, M, eps, *strides, **meta, **options,
    )
    return _grad_z_segments(configs, g, z3, p.contiguous(), idx), grad_p
