"""Triton kernels of the fused prototype op: distance + global min/argmin + log-similarity.

Forward: one program per (batch image, tile of prototypes). It walks the image's patches in tiles,
computes squared distances with the expansion ``|p|^2 + |z|^2 - 2 p.z`` (a ``tl.dot``), keeps a running
min and argmin per prototype in registers, then recomputes the winner's distance exactly as
``sum_d (z - p)^2`` in fp32 and writes the similarity. The (B, M, H*W) map never reaches memory.

Backward: gradients reach only the winning patch of each (b, m).

* ``grad_p``: one program per (prototype tile, channel tile, run of images), looping over its images in order;
  the partial sums of the runs are then reduced in a fixed order.
* ``grad_z``: the (b, m) pairs are sorted by winning patch (stable sort: deterministic), then one program
  per patch sums the contributions of the prototypes it won, in increasing m.

No float atomics anywhere: gradients are bitwise reproducible. Inputs may be fp16/bf16/fp32/fp64 with
any strides over (B, D, H*W); all arithmetic is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# "highest": exact fp32 products; "high": 3xTF32 (about fp32 accuracy); "medium": TF32. In every mode the
# winning patch's distance is recomputed exactly in fp32.
INPUT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


# Forward launch configuration per precision: (largest channel slice, or None for 64/128 by tile size;
# num_warps; num_stages). Chosen from H200 measurements (benchmarks/results/distance-2026-11-27-h200-v*.md):
# the FMA ("ieee") and 3xTF32 paths ran fastest with 4 warps over 64/128-channel slices, the TF32 path with
# 8 warps over 32-channel slices (81 us against 182 us at the CUB shape).
_FORWARD_CONFIG = {"highest": (None, 4, 3), "high": (None, 4, 3), "medium": (32, 8, 2)}


@triton.jit
def _forward_kernel(
    z_ptr, p_ptr, sim_ptr, dist_ptr, idx_ptr,
    D, HW, M, eps,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    z_base = z_ptr + b * stride_zb
    p_rows = p_ptr + offs_m[:, None] * stride_pm

    p_norm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        p = tl.load(p_rows + offs_d[None, :] * stride_pd,
                    mask=m_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        p_norm += tl.sum(p * p, axis=1)

    best = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int32)
    has_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, HW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < HW
        dot = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        z_norm = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            p = tl.load(p_rows + offs_d[None, :] * stride_pd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            z = tl.load(z_base + offs_d[:, None] * stride_zd + offs_k[None, :] * stride_zk,
                        mask=d_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            dot = tl.dot(p, z, dot, input_precision=PRECISION)
            z_norm += tl.sum(z * z, axis=0)
        dist = p_norm[:, None] + z_norm[None, :] - 2.0 * dot
        is_nan = dist != dist
        has_nan |= tl.max(is_nan.to(tl.int32), axis=1)
        # Triton's min ignores nothing reliably: take NaN and padding out explicitly.
        dist = tl.where(is_nan | (offs_k[None, :] >= HW), float("inf"), dist)
        tile_min, tile_idx = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_min < best  # strict: an earlier tile keeps ties
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, k0 + tile_idx, best_idx)

    # Exact fp32 distance at the winning patch.
    exact = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_win = z_base + best_idx.to(tl.int64)[:, None] * stride_zk
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = m_mask[:, None] & (offs_d[None, :] < D)
        p = tl.load(p_rows + offs_d[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_win + offs_d[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        diff = z - p
        exact += tl.sum(diff * diff, axis=1)
    exact = tl.where(has_nan > 0, float("nan"), exact)
    sim = tl.log((exact + 1.0) / (exact + eps))

    out = b * M + offs_m
    tl.store(dist_ptr + out, exact, mask=m_mask)
    tl.store(sim_ptr + out, sim, mask=m_mask)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=m_mask)


@triton.jit
def _grad_prototypes_kernel(
    gsim_ptr, gdist_ptr, dist_ptr, idx_ptr, z_ptr, p_ptr, g_ptr, gp_ptr,
    B, D, M, eps,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, IMAGES_PER_PROGRAM: tl.constexpr,
):
    """Partial grad_p over one run of images: 2 * sum_b g[b, m] * (p[m] - z[b, :, idx[b, m]]).

    Program (m tile, d tile, image run s) writes partial[s]; the runs are summed in a fixed order afterwards.
    Also writes g for the grad_z kernel. Differences are taken before scaling by g (never
    p * sum(g) - sum(g * z)): g reaches -1/eps near d = 0.
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
    z_b = z_ptr + b0.to(tl.int64) * stride_zb  # then advanced by stride_zb per image
    for b in range(b0, tl.minimum(b0 + IMAGES_PER_PROGRAM, B)):
        row = b * M + offs_m
        dist = tl.load(dist_ptr + row, mask=m_mask, other=0.0)
        g = tl.load(gdist_ptr + row, mask=m_mask, other=0.0) + tl.load(
            gsim_ptr + row, mask=m_mask, other=0.0) * (1.0 / (dist + 1.0) - 1.0 / (dist + eps))
        if pid_d == 0:
            tl.store(g_ptr + row, g, mask=m_mask)
        k = tl.load(idx_ptr + row, mask=m_mask, other=0)
        z = tl.load(z_b + k[:, None] * stride_zk + offs_d[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        z_b += stride_zb
        acc += g[:, None] * (p - z)
    tl.store(gp_ptr + pid_s * M * D + offs_m[:, None] * D + offs_d[None, :], 2.0 * acc, mask=mask)


@triton.jit
def _grad_features_kernel(
    g_ptr, order_ptr, seg_ptr, z_ptr, p_ptr, gz_ptr,
    D, HW, M,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_z[b, :, k] = 2 * sum over m won at (b, k) of g[b, m] * (z[b, :, k] - p[m]).

    ``order`` lists the flat (b * M + m) pairs sorted by flat patch b * HW + k; ``seg[i]:seg[i+1]`` is patch i's run.
    """
    patch = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    b = (patch // HW).to(tl.int64)
    k = patch % HW
    z = tl.load(z_ptr + b * stride_zb + k * stride_zk + offs_d * stride_zd, mask=d_mask, other=0.0).to(tl.float32)
    start = tl.load(seg_ptr + patch)
    end = tl.load(seg_ptr + patch + 1)
    acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < end
        pair = tl.load(order_ptr + offs_j, mask=j_mask, other=0)
        g = tl.load(g_ptr + pair, mask=j_mask, other=0.0)
        p = tl.load(p_ptr + (pair % M)[:, None] * stride_pm + offs_d[None, :] * stride_pd,
                    mask=j_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += g[:, None] * (z[None, :] - p)
    grad = 2.0 * tl.sum(acc, axis=0)
    tl.store(gz_ptr + b * D * HW + offs_d * HW + k, grad, mask=d_mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _channels_innermost(z3: torch.Tensor) -> torch.Tensor:
    """z3 (B, D, HW) with unit channel stride (one copy unless already so, e.g. channels_last features).

    The winner gathers read whole channel vectors z[b, :, k]: with unit stride those are coalesced rows,
    with stride HW every element is a separate memory sector. The tile loads are coalesced either way.
    """
    if z3.stride(1) == 1 or z3.shape[1] == 1:
        return z3
    return z3.transpose(1, 2).contiguous().transpose(1, 2)


def forward(z3: torch.Tensor, p: torch.Tensor, eps: float, precision: str = "highest"):
    """Fused forward on z3 (B, D, HW) (any strides, any float dtype) and p (M, D).

    Returns (similarity, min_distances, patch_index), each (B, M); float32, float32, int64.
    """
    B, D, HW = z3.shape
    M = p.shape[0]
    z3 = _channels_innermost(z3)
    sim = torch.empty((B, M), device=z3.device, dtype=torch.float32)
    dist = torch.empty_like(sim)
    idx = torch.empty((B, M), device=z3.device, dtype=torch.int64)
    block_m = _pow2(M, 16, 64)
    block_k = _pow2(HW, 16, 64)
    max_d, num_warps, num_stages = _FORWARD_CONFIG[precision]
    block_d = _pow2(D, 16, max_d if max_d else (64 if block_m * block_k > 2048 else 128))
    grid = (triton.cdiv(M, block_m), B)
    _forward_kernel[grid](
        z3, p, sim, dist, idx, D, HW, M, eps,
        z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=INPUT_PRECISION[precision],
        num_warps=num_warps, num_stages=num_stages,
    )
    return sim, dist, idx


def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Hand-written backward: (grad_z3 (B, D, HW) contiguous float32, grad_p (M, D) float32)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    z3 = _channels_innermost(z3)
    grad_sim = grad_sim.float().contiguous()
    grad_dist = grad_dist.float().contiguous()
    g = torch.empty((B, M), device=z3.device, dtype=torch.float32)
    block_m, block_d, per_program = 16, _pow2(D, 16, 64), 8
    runs = triton.cdiv(B, per_program)
    partial = torch.empty((runs, M, D), device=z3.device, dtype=torch.float32)
    _grad_prototypes_kernel[(triton.cdiv(M, block_m), triton.cdiv(D, block_d), runs)](
        grad_sim, grad_dist, dist, idx, z3, p, g, partial, B, D, M, eps,
        z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d, IMAGES_PER_PROGRAM=per_program,
    )
    grad_p = partial[0] if runs == 1 else partial.sum(0)  # a fixed-order reduction: deterministic
    # Group the (b, m) pairs by winning patch; stable sort keeps m increasing within a patch.
    patch = (idx.int() + torch.arange(B, device=idx.device, dtype=torch.int32)[:, None] * HW).flatten()
    patch_sorted, order = torch.sort(patch, stable=True)
    seg = torch.searchsorted(patch_sorted, torch.arange(B * HW + 1, device=idx.device, dtype=torch.int32))
    grad_z = torch.empty((B, D, HW), device=z3.device, dtype=torch.float32)
    block_d = _pow2(D, 16, 128)
    _grad_features_kernel[(B * HW, triton.cdiv(D, block_d))](
        g, order, seg, z3, p, grad_z, D, HW, M,
        z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
        BLOCK_J=32, BLOCK_D=block_d,  # measured on H200: 48 us at the CUB shape, against 59 us for 16 pairs a step
    )
    return grad_z, grad_p
