"""``ProtoLayer``: the prototype layer as a drop-in nn.Module over the fused op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protokern.ops import prototype_similarity


class ProtoLayer(nn.Module):
    """ProtoPNet prototype layer: similarity and min distance of ``num_prototypes`` learned prototypes.

    The parameter ``prototypes`` has the original implementation's shape (M, D, 1, 1) and is initialised
    uniform in [0, 1). ``forward(z)`` takes features (B, D, H, W) and returns ``(similarity, min_distances)``,
    each (B, M) float32, computed by the fused op (see ``protokern.prototype_similarity``).
    """

    def __init__(self, num_prototypes: int, prototype_dim: int, *, eps: float = 1e-4, backend: str = "auto"):
        super().__init__()
        if num_prototypes < 1 or prototype_dim < 1:
            raise ValueError(f"num_prototypes and prototype_dim must be >= 1, got {num_prototypes}, {prototype_dim}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.backend = backend
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, prototype_dim, 1, 1))

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def prototype_dim(self) -> int:
        return self.prototypes.shape[1]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return prototype_similarity(z, self.prototypes, eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_prototypes={self.num_prototypes}, prototype_dim={self.prototype_dim}, eps={self.eps}, backend={self.backend!r}"
