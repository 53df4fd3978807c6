"""The original ProtoPNet prototype layer, in float64: the reference every backend is checked against."""

import torch
import torch.nn.functional as F

import protokern


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


def check_against_reference(z, p, backend, *, grad_tol=1e-4, grad_tol_z=None):
    """Forward values and both gradients of ``protokern.prototype_similarity(z, p, backend=backend)`` against
    the float64 original layer; ``grad_tol_z`` (default ``grad_tol``) bounds z's gradient.
    Returns the op's (similarity, min_distances), detached."""
    z = z.detach().requires_grad_()
    p = p.detach().requires_grad_()
    sim, dist = protokern.prototype_similarity(z, p, backend=backend)
    assert sim.dtype == dist.dtype == torch.float32 and sim.shape == dist.shape == (z.shape[0], p.shape[0])
    zr = z.detach().double().requires_grad_()
    pr = p.detach().double().requires_grad_()
    sim_ref, dist_ref = original_layer(zr, pr)
    assert rel_err(dist, dist_ref) < 1e-5
    assert (sim.double() - sim_ref).abs().max().item() < 1e-4
    w_sim, w_dist = torch.randn_like(sim_ref), torch.randn_like(sim_ref)
    ((sim * w_sim).sum() + (dist * w_dist).sum()).backward()
    ((sim_ref * w_sim).sum() + (dist_ref * w_dist).sum()).backward()
    assert z.grad.dtype == z.dtype and p.grad.dtype == p.dtype
    assert rel_err(z.grad, zr.grad) < (grad_tol_z or grad_tol)
    assert rel_err(p.grad, pr.grad) < grad_tol
    return sim.detach(), dist.detach()


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
