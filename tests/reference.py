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
