"""ProtoPNet training loss (the original's ``train_and_test.py``, class-specific, with the L1 mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProtoPNetLoss", "protopnet_loss_terms"]

TERMS = ("ce", "cluster", "separation", "avg_separation", "l1", "total")  # what ProtoPNetLoss reports, in order


def protopnet_loss_terms(
    logits: Tensor,
    min_distances: Tensor,
    target: Tensor,
    class_identity: Tensor,
    last_layer_weight: Tensor,
    max_dist: float,
) -> dict[str, Tensor]:
    """The loss terms of the original ProtoPNet, as differentiable scalars.

    Args:
        logits: (B, C); min_distances: (B, P); target: (B,) class indices.
        class_identity: (P, C) one-hot class of each prototype; last_layer_weight: (C, P).
        max_dist: an upper bound of the distances: D * h * w of a prototype (the original's bound used in the
            cluster / separation max; ``ProtoLayer.max_distance``, 4 for cosine).

    Returns ``ce`` (cross entropy), ``cluster`` (mean over the batch of the min distance to a prototype of
    the image's class, computed as ``max_dist - max((max_dist - d) * own)``, so a sample whose own-class
    distances all exceed ``max_dist`` counts ``max_dist``), ``separation`` (the same over the other classes'
    prototypes), ``avg_separation`` (mean distance to other-class prototypes; logged only) and ``l1``
    (L1 norm of the last-layer weights from prototypes to classes other than their own).
    """
    if logits.dim() != 2 or min_distances.dim() != 2 or target.dim() != 1:
        raise ValueError(
            f"expected logits (B, C), min_distances (B, P), target (B,), got {tuple(logits.shape)}, "
            f"{tuple(min_distances.shape)}, {tuple(target.shape)}"
        )
    batch, num_classes = logits.shape
    num_prototypes = min_distances.shape[1]
    if min_distances.shape[0] != batch or target.shape[0] != batch:
        raise ValueError(f"batch sizes differ: {batch}, {min_distances.shape[0]}, {target.shape[0]}")
    if tuple(class_identity.shape) != (num_prototypes, num_classes):
        raise ValueError(f"class_identity {tuple(class_identity.shape)} should be ({num_prototypes}, {num_classes})")
    if tuple(last_layer_weight.shape) != (num_classes, num_prototypes):
        raise ValueError(
            f"last_layer_weight {tuple(last_layer_weight.shape)} should be ({num_classes}, {num_prototypes})"
        )

    own = class_identity[:, target].t().to(min_distances.dtype)  # (B, P)
    other = 1 - own
    inverted = max_dist - min_distances
    # max, not amax: on tied prototypes (duplicates pushed onto one patch) the gradient goes to one of them,
    # as the original's torch.max(..., dim=1); amax splits it evenly and keeps the duplicates moving together
    cluster = (max_dist - (inverted * own).max(dim=1).values).mean()
    separation = (max_dist - (inverted * other).max(dim=1).values).mean()
    avg_separation = ((min_distances * other).sum(dim=1) / other.sum(dim=1)).mean()
    l1_mask = 1 - class_identity.t().to(last_layer_weight.dtype)
    return {
        "ce": F.cross_entropy(logits, target),
        "cluster": cluster,
        "separation": separation,
        "avg_separation": avg_separation,
        "l1": (last_layer_weight * l1_mask).abs().sum(),
    }


class ProtoPNetLoss(nn.Module):
    """ProtoPNet loss: ``cross_entropy*CE + cluster*clst + separation*sep + l1*L1`` (the paper's weights).

    ``forward(logits, min_distances, target, model)`` takes the model's outputs and the model (for its
    ``prototype_class_identity``, ``last_layer.weight`` and ``prototype_layer.max_distance``) and returns
    ``(total, terms)``: the total loss tensor and a dict of floats ``ce``, ``cluster``, ``separation``,
    ``avg_separation``, ``l1``, ``total`` (one device sync for all of them).
    """

    def __init__(self, cross_entropy: float = 1.0, cluster: float = 0.8, separation: float = -0.08, l1: float = 1e-4):
        super().__init__()
        self.weights = {"ce": cross_entropy, "cluster": cluster, "separation": separation, "l1": l1}

    def forward(self, logits: Tensor, min_distances: Tensor, target: Tensor, model: nn.Module) -> tuple[Tensor, dict]:
        """(total loss, dict of float terms) of a batch (see the class docstring)."""
        terms = protopnet_loss_terms(
            logits,
            min_distances,
            target,
            model.prototype_class_identity,
            model.last_layer.weight,
            max_dist=model.prototype_layer.max_distance,
        )
        total = sum(weight * terms[name] for name, weight in self.weights.items())
        terms["total"] = total
        return total, dict(zip(TERMS, torch.stack([terms[name].detach().float() for name in TERMS]).tolist()))

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
