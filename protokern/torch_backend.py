"""Pure-PyTorch backend of the fused prototype op: any device, bounded memory.

Same semantics and hand-written backward as the fused kernels. The (B, M, H*W) distance map is only ever
held one slab at a time (at most ``SLAB`` elements), so huge problems run in bounded memory.
Computes in float64 when both inputs are float64 (for ``gradcheck``), else in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SLAB = 1 << 24  # elements of the distance map held at once


def _slabs(B: int, M: int, HW: int) -> Iterator[tuple[slice, slice]]:
    bc = max(1, min(B, SLAB // HW))
    mc = max(1, min(M, SLAB // (bc * HW)))
    for b0 in range(0, B, bc):
        for m0 in range(0, M, mc):
            yield slice(b0, b0 + bc), slice(m0, m0 + mc)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _winners(zt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Feature vectors (b, m, D) at the winning patches idx (b, m) of zt (b, HW, D)."""
    return torch.gather(zt, 1, idx[..., None].expand(-1, -1, zt.shape[-1]))


def forward(z3: torch.Tensor, p: torch.Tensor, eps: float, precision: str = "highest"):
    """Returns (similarity, min_distances, patch_index) for z3 (B, D, HW) and p (M, D)."""
    dtype = _compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    B, D, HW = z3.shape
    M = p.shape[0]
    zt = z3.transpose(1, 2)
    z_norm = (z3 * z3).sum(1)
    p_norm = (p * p).sum(1)
    dist = torch.empty((B, M), device=z3.device, dtype=dtype)
    idx = torch.empty((B, M), device=z3.device, dtype=torch.int64)
    arange = torch.arange(HW, device=z3.device)
    for bs, ms in _slabs(B, M, HW):
        d = z_norm[bs, None, :] + p_norm[None, ms, None] - 2 * torch.matmul(p[ms], z3[bs])
        d_min = d.amin(-1)  # NaN propagates
        first = torch.where(d == d_min[..., None], arange, HW).amin(-1).clamp_(max=HW - 1)
        exact = (_winners(zt[bs], first) - p[None, ms]).square().sum(-1)
        dist[bs, ms] = torch.where(d_min.isnan(), d_min, exact)
        idx[bs, ms] = first
    sim = torch.log((dist + 1) / (dist + eps))
    return sim, dist, idx


def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Returns (grad_z3 (B, D, HW) contiguous, grad_p (M, D)) in the compute dtype; deterministic."""
    dtype = _compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    B, D, HW = z3.shape
    M = p.shape[0]
    g = grad_dist.to(dtype) + grad_sim.to(dtype) * (1 / (dist + 1) - 1 / (dist + eps))
    zt = z3.transpose(1, 2)
    grad_zt = torch.zeros((B, HW, D), device=z3.device, dtype=dtype)
    grad_p = torch.zeros((M, D), device=z3.device, dtype=dtype)
    for bs, ms in _slabs(B, M, HW):
        gs, ids = g[bs, ms], idx[bs, ms]
        # Direct differences g * (z - p), never |z|^2-style expansions: no cancellation when g is huge (d ~ 0).
        contrib = 2 * gs[..., None] * (_winners(zt[bs], ids) - p[None, ms])  # (b, m, D)
        grad_p[ms] -= contrib.sum(0)
        # 0/1 matrix (b, HW, m) with one 1 per column: each patch sums exactly the pairs it won.
        won = torch.zeros((gs.shape[0], HW, gs.shape[1]), device=z3.device, dtype=dtype)
        won.scatter_(1, ids[:, None, :], 1.0)
        grad_zt[bs] += won @ contrib
    return grad_zt.transpose(1, 2).contiguous(), grad_p


def distances(z3: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full squared-L2 map (B, M, HW), clamped at 0 (heatmaps only: it materialises B*M*HW values)."""
    dtype = _compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    d = (z3 * z3).sum(1)[:, None, :] + (p * p).sum(1)[None, :, None] - 2 * torch.matmul(p, z3)
    return d.clamp_min(0)
