"""The original ProtoPNet prototype layer, in float64: the reference every backend is checked against."""

import torch
import torch.nn.functional as F


def original_layer(z: torch.Tensor, prototypes: torch.Tensor, eps: float = 1e-4):
    """conv2d expansion + ReLU, -max_pool2d(-d) over the whole map, log-similarity (as the original).

    Computes in float64 on z's device; differentiable. Returns (similarity, min_distances), each (B, M).
    """
    z = z.double()
    p = prototypes.double().reshape(prototypes.shape[0], -1, 1, 1)
    ones = torch.ones_like(p)
    d = F.conv2d(z * z, ones) - 2 * F.conv2d(z, p) + (p * p).sum((1, 2, 3)).view(1, -1, 1, 1)
    d = F.relu(d)
    min_d = -F.max_pool2d(-d, kernel_size=d.shape[2:]).flatten(1)
    return torch.log((min_d + 1) / (min_d + eps)), min_d


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref||."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_winners_and_gradients(z, p, sim, dist, idx, w_sim, w_dist, grad_z, grad_p, eps=1e-4, search_tol=1e-5):
    """Large-shape check robust to near-ties: with B*M pairs, some best and second-best patches differ by less
    than fp32 rounding, and an fp32 search may legitimately pick either. So: the picked patch must be a
    minimiser up to the search's rounding (`search_tol`, relative; larger for a TF32 search) in float64, the
    reported distance and similarity must be those of the picked patch, exact to fp32, and the gradients must
    equal the float64 gradients at the picked patches."""
    B, D = z.shape[:2]
    z64 = z.detach().double().flatten(2)
    p64 = p.detach().double().reshape(p.shape[0], -1)
    full = (z64 * z64).sum(1)[:, None, :] + (p64 * p64).sum(1)[None, :, None] - 2 * torch.einsum("md,bdk->bmk", p64, z64)
    true_min = full.amin(-1)
    picked = full.gather(2, idx[..., None]).squeeze(-1)
    assert ((picked - true_min) <= search_tol * (1 + true_min)).all(), "picked patch is not a minimiser"
    assert rel_err(dist, picked) < 1e-5
    assert rel_err(dist, true_min) < max(1e-5, search_tol)
    assert (sim.double() - torch.log((picked + 1) / (picked + eps))).abs().max().item() < 1e-4
    gather = idx[:, None, :].expand(-1, D, -1)
    diff = z64.gather(2, gather) - p64.T[None]  # (B, D, M)
    d = (diff * diff).sum(1)
    g = w_dist.double() + w_sim.double() * (1 / (d + 1) - 1 / (d + eps))
    contrib = 2 * g[:, None, :] * diff
    ref_gz = torch.zeros_like(z64).scatter_add_(2, gather, contrib)
    assert rel_err(grad_z.flatten(2), ref_gz) < 1e-5
    assert rel_err(grad_p.reshape(p64.shape), -contrib.sum(0).T) < 1e-5
