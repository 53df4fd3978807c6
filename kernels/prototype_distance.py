"""Triton kernels of the fused prototype op: distance + global min/argmin + log-similarity.

Forward: one program per (batch image, tile of prototypes). It walks the image's patches in tiles,
computes approximate squared distances with the expansion ``|p|^2 + |z|^2 - 2 p.z`` (a ``tl.dot``) and
rescores exactly, as ``sum_d (z - p)^2`` in fp32, every patch that the search's error bound cannot rule out
(certified search, ``search_bound.py``); it keeps the exact min and argmin per prototype in registers and
writes the similarity. The (B, M, H*W) map never reaches memory.

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

from protokern.kernels import search_bound

# "highest": exact fp32 products; "high": 3xTF32 (about fp32 accuracy); "medium": TF32 (also the names of
# their search_bound levels). The precision only changes the search's speed, never its result.
INPUT_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
SEQUENTIAL_EXACT = False  # True: the interpreter too rescores with the compiled kernels' sequential sum (tests)
MAX_PROGRAMS = 2 ** 31 - 1  # CUDA grid axis 0 limit; larger problems launch in runs of images
MAX_GRID_YZ = 65535  # CUDA grid axes 1 and 2 limit


# Forward launch configuration per precision: (largest channel slice, or None for 64/128 by tile size;
# num_warps; num_stages): the configurations that compile for sm_90 without spills on triton 3.6 and 3.8
# (tests/kernels/sm90_gate.py). Why these, with the measured history: benchmarks/NOTES.md, "Triton launch
# configuration".
_FORWARD_CONFIG = {"highest": (32, 8, 1), "high": (32, 8, 1), "medium": (32, 8, 2)}


@triton.jit
def _forward_kernel(
    z_ptr, p_ptr, sim_ptr, dist_ptr, idx_ptr,
    D, HW, M, eps, one_minus_eps, coef, tiny,
    stride_zb, stride_zd, stride_zk, stride_pm, stride_pd,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr, SEQUENTIAL: tl.constexpr,
):
    """One program per (image, prototype tile), both folded into grid axis 0 (no 65535 limit on B).

    Certified search: a~ = |p|^2 + |z|^2 - 2 p.z from tl.dot at PRECISION, delta = coef ((|z| + |p|)^2 + tiny)
    >= |a~ - e| (coef and its derivation: ``search_bound.py``). Each patch tile updates the running threshold
    thr = min (a~ + delta) and rescores exactly every patch with a~ - delta <= thr or a~ not finite (a superset
    of the candidates of the final threshold, since thr only decreases), one candidate per row at a time in
    increasing patch order. The exact distance sums (z_d - p_d)^2 sequentially over d for each row on its own
    (SEQUENTIAL, compiled kernels) or in BLOCK_E tiles (the interpreter, where sums do not depend on the
    layout): the bits depend neither on the search's tile sizes nor on its warps, so every precision returns
    the same (distance, index). Winner: the first NaN patch if any (distance NaN), else the first patch of smallest
    exact distance (a patch holding +-inf is at +inf; if all are, patch 0).
    """
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = pid % m_tiles
    b = (pid // m_tiles).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    z_base = z_ptr + b * stride_zb
    p_row = p_ptr + offs_m * stride_pm
    p_rows = p_row[:, None]

    p_norm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        p = tl.load(p_rows + offs_d[None, :] * stride_pd,
                    mask=m_mask[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        p_norm += tl.sum(p * p, axis=1)
    p_len = tl.sqrt(p_norm)

    inf = float("inf")
    thr = tl.full((BLOCK_M,), inf, dtype=tl.float32)
    best = tl.full((BLOCK_M,), inf, dtype=tl.float32)
    best_idx = tl.full((BLOCK_M,), HW, dtype=tl.int32)  # HW: none yet
    nan_idx = tl.full((BLOCK_M,), HW, dtype=tl.int32)
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
        approx = p_norm[:, None] + z_norm[None, :] - 2.0 * dot
        radius = p_len[:, None] + tl.sqrt(z_norm)[None, :]
        delta = coef * (radius * radius + tiny)
        live = m_mask[:, None] & k_mask[None, :]
        finite = tl.abs(approx) < inf  # False for NaN too
        thr = tl.minimum(thr, tl.min(tl.where(live & finite, approx + delta, inf), axis=1))
        cand = live & ((approx - delta <= thr[:, None]) | (finite == 0))
        count = tl.sum(tl.sum(cand.to(tl.int32), axis=1), axis=0)
        while count > 0:
            k = tl.min(tl.where(cand, offs_k[None, :], HW), axis=1)  # each row's next candidate
            active = k < HW
            z_col = z_base + tl.where(active, k, 0).to(tl.int64) * stride_zk
            e = tl.zeros((BLOCK_M,), dtype=tl.float32)
            if SEQUENTIAL:  # compiled kernels: one row per lane, d in order, independent of the layout
                for d in range(0, D):
                    zd = tl.load(z_col + d * stride_zd, mask=active, other=0.0).to(tl.float32)
                    pd = tl.load(p_row + d * stride_pd, mask=active, other=0.0).to(tl.float32)
                    diff = zd - pd
                    e += diff * diff
            else:  # the interpreter's sums are numpy's, the same for every layout: (BLOCK_M, BLOCK_E) tiles
                for d0 in range(0, D, BLOCK_E):
                    offs_e = d0 + tl.arange(0, BLOCK_E)
                    mask = active[:, None] & (offs_e[None, :] < D)
                    zd = tl.load(z_col[:, None] + offs_e[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
                    pd = tl.load(p_rows + offs_e[None, :] * stride_pd, mask=mask, other=0.0).to(tl.float32)
                    diff = zd - pd
                    e += tl.sum(diff * diff, axis=1)
            is_nan = e != e
            nan_idx = tl.where(active & is_nan & (nan_idx == HW), k, nan_idx)
            better = active & (is_nan == 0) & ((e < best) | (best_idx == HW))
            best = tl.where(better, e, best)
            best_idx = tl.where(better, k, best_idx)
            cand = cand & (offs_k[None, :] != k[:, None])
            count = tl.sum(tl.sum(cand.to(tl.int32), axis=1), axis=0)

    has_nan = nan_idx < HW
    exact = tl.where(has_nan, float("nan"), best)
    win = tl.minimum(tl.where(has_nan, nan_idx, best_idx), HW - 1)
    # log((d + 1) / (d + eps)) = log1p((1 - eps) / (d + eps)), log1p by Goldberg's u = 1 + x trick (no log1p
    # in the interpreter): accurate for large d and exactly 0 at d = +inf.
    x = one_minus_eps / (exact + eps)
    u = 1.0 + x
    sim = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))

    out = b * M + offs_m
    tl.store(dist_ptr + out, exact, mask=m_mask)
    tl.store(sim_ptr + out, sim, mask=m_mask)
    tl.store(idx_ptr + out, win.to(tl.int64), mask=m_mask)


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


def channels_innermost(z3: torch.Tensor) -> torch.Tensor:
    """z3 (B, D, HW) with unit channel stride (one copy unless already so, e.g. channels_last features).

    The winner gathers read whole channel vectors z[b, :, k]: with unit stride those are coalesced rows,
    with stride HW every element is a separate memory sector. The tile loads are coalesced either way.
    The CUDA extension's host code (csrc/protokern.cpp) makes the same copy in C++; its emulator harness
    (csrc/emu/check.py) uses this function.
    """
    if z3.stride(1) == 1 or z3.shape[1] == 1:
        return z3
    return z3.transpose(1, 2).contiguous().transpose(1, 2)


def forward_config(D: int, HW: int, M: int, precision: str, sequential: bool = True) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of ``_forward_kernel`` for a problem: the launcher's only choice."""
    block_m = _pow2(M, 16, 64)
    block_k = _pow2(HW, 16, 64)
    max_d, num_warps, num_stages = _FORWARD_CONFIG[precision]
    block_d = _pow2(D, 16, max_d if max_d else (64 if block_m * block_k > 2048 else 128))
    meta = dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_E=_pow2(D, 16, 128),
                PRECISION=INPUT_PRECISION[precision], SEQUENTIAL=sequential)
    return meta, dict(num_warps=num_warps, num_stages=num_stages)


def backward_configs(D: int) -> dict[str, dict]:
    """Constexpr arguments of the two backward kernels (default launch options), by kernel name."""
    return {"_grad_prototypes_kernel": dict(BLOCK_M=16, BLOCK_D=_pow2(D, 16, 64), IMAGES_PER_PROGRAM=8),
            # BLOCK_J: benchmarks/NOTES.md, "Triton launch configuration"
            "_grad_features_kernel": dict(BLOCK_J=32, BLOCK_D=_pow2(D, 16, 128))}


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
    meta, options = forward_config(D, HW, M, precision, SEQUENTIAL_EXACT or z3.is_cuda)
    coef = search_bound.coefficient(INPUT_PRECISION[precision], D)
    m_tiles = triton.cdiv(M, meta["BLOCK_M"])
    images = max(1, MAX_PROGRAMS // m_tiles)  # images per launch: grid axis 0 holds images * m_tiles programs
    for b0 in range(0, B, images):
        b1 = min(B, b0 + images)
        _forward_kernel[((b1 - b0) * m_tiles,)](
            z3[b0:b1], p, sim[b0:b1], dist[b0:b1], idx[b0:b1], D, HW, M, eps, 1.0 - eps, coef, search_bound.TINY,
            z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
            **meta, **options,
        )
    return sim, dist, idx


def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Hand-written backward: (grad_z3 (B, D, HW) contiguous float32, grad_p (M, D) float32)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    z3 = channels_innermost(z3)
    grad_sim = grad_sim.float().contiguous()
    grad_dist = grad_dist.float().contiguous()
    g = torch.empty((B, M), device=z3.device, dtype=torch.float32)
    meta = backward_configs(D)
    block_m, block_d = meta["_grad_prototypes_kernel"]["BLOCK_M"], meta["_grad_prototypes_kernel"]["BLOCK_D"]
    per_program = max(8, triton.cdiv(B, MAX_GRID_YZ))  # image runs go on grid axis 2
    runs = triton.cdiv(B, per_program)
    partial = torch.empty((runs, M, D), device=z3.device, dtype=torch.float32)
    _grad_prototypes_kernel[(triton.cdiv(M, block_m), triton.cdiv(D, block_d), runs)](
        grad_sim, grad_dist, dist, idx, z3, p, g, partial, B, D, M, eps,
        z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1),
        **{**meta["_grad_prototypes_kernel"], "IMAGES_PER_PROGRAM": per_program},
    )
    grad_p = partial[0] if runs == 1 else partial.sum(0)  # a fixed-order reduction: deterministic
    # Group the (b, m) pairs by winning patch; stable sort keeps m increasing within a patch.
    patch = (idx.int() + torch.arange(B, device=idx.device, dtype=torch.int32)[:, None] * HW).flatten()
    patch_sorted, order = torch.sort(patch, stable=True)
    seg = torch.searchsorted(patch_sorted, torch.arange(B * HW + 1, device=idx.device, dtype=torch.int32))
    grad_z = torch.empty((B, D, HW), device=z3.device, dtype=torch.float32)
    features = meta["_grad_features_kernel"]
    _grad_features_kernel[(B * HW, triton.cdiv(D, features["BLOCK_D"]))](
        g, order, seg, z3, p, grad_z, D, HW, M,
        z3.stride(0), z3.stride(1), z3.stride(2), p.stride(0), p.stride(1), **features,
    )
    return grad_z, grad_p
