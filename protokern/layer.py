"""``ProtoLayer``: the prototype layer as a drop-in nn.Module over the fused op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from protokern.backends import check_name
from protokern.ops import (
    check_eps,
    check_precision,
    check_similarity,
    distance_to_similarity,
    nearest_patches,
    prototype_distances,
    prototype_similarity,
    prototype_windows,
    window_positions,
    window_size,
)
from protokern.utils import positive_int

# torch.fx.symbolic_trace (and torchvision's create_feature_extractor) of a model holding a ProtoLayer record the
# op as one call instead of tracing into its input checks, which refuse the tracer's proxies. (ProtoPNet's own
# forward checks its input's shape in Python, which symbolic tracing cannot follow.)
torch.fx.wrap("prototype_similarity")


class ProtoLayer(nn.Module):
    """ProtoPNet prototype layer: similarity and min distance of ``num_prototypes`` learned prototypes.

    The parameter ``prototypes`` has the original implementation's shape (M, D, kh, kw) (``prototype_size``
    (kh, kw), default (1, 1)) and is initialised uniform in [0, 1) (:meth:`reset_parameters`). ``forward(z)``
    takes features (B, D, H, W) with H >= kh, W >= kw and returns ``(similarity, min_distances)``, each (B, M)
    float32 (float64 when z and the layer are float64 on the torch backend), computed by the fused op with
    ``similarity`` "log", "linear" or "cosine" (see ``protokern.prototype_similarity``).

    Arguments are checked here, one clear error each: the counts must be integers >= 1 (NumPy integers
    accepted), ``prototype_size`` such an integer or a pair of them, ``similarity`` a known one, ``eps`` a
    real number as ``prototype_similarity`` requires it, ``backend`` one of "auto",
    "torch", "triton", "cuda" (whether it runs is decided at the first call, on the features' device) and
    ``precision`` one of "auto" (the backend's own choice, ``backends.AUTO_PRECISION``), "highest", "high", "medium".
    """

    def __init__(self, num_prototypes: int, prototype_dim: int, *, prototype_size=(1, 1), similarity: str = "log",
                 eps: float = 1e-4, backend: str = "auto", precision: str = "auto"):
        super().__init__()
        num_prototypes = positive_int("num_prototypes", num_prototypes)
        prototype_dim = positive_int("prototype_dim", prototype_dim)
        kh, kw = window_size(prototype_size)
        self.similarity = check_similarity(similarity)
        self.eps = check_eps(eps)
        self.backend = check_name(backend)
        self.precision = check_precision(precision)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, prototype_dim, kh, kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Prototypes uniform in [0, 1), the original's initialisation (the values ``torch.rand`` would draw).
        Called at construction, and by tools that build a model on the meta device and then materialise it
        (FSDP, ``module.to_empty()``)."""
        with torch.no_grad():
            self.prototypes.uniform_(0, 1)

    @property
    def num_prototypes(self) -> int:
        """M, the number of prototypes."""
        return self.prototypes.shape[0]

    @property
    def prototype_dim(self) -> int:
        """D, the channels of a prototype (and of the features it is compared with)."""
        return self.prototypes.shape[1]

    @property
    def prototype_size(self) -> tuple[int, int]:
        """(kh, kw), the window of feature-map cells a prototype spans."""
        return self.prototypes.shape[2], self.prototypes.shape[3]

    @property
    def max_distance(self) -> float:
        """An upper bound of the layer's distances for features in [0, 1] (the original's ``max_dist``,
        D * kh * kw, used by the cluster and separation costs); 4 for "cosine" (d = 2 - 2 cos <= 4)."""
        return 4.0 if self.similarity == "cosine" else float(self.prototypes[0].numel())

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(similarity, min_distances), each (B, M), of features z (B, D, H, W) (see the class docstring)."""
        return prototype_similarity(z, self.prototypes, similarity=self.similarity, eps=self.eps,
                                    backend=self.backend, precision=self.precision)

    # What push, pruning and the explanations need, with this layer's window, similarity and backend.
    def to_similarity(self, distances: Tensor) -> Tensor:
        """This layer's similarity of distances (min distances or maps), elementwise."""
        return distance_to_similarity(distances, self.similarity, self.eps)

    def nearest(self, z: Tensor, prototypes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(min_distances (B, M), window index (B, M))`` of ``z`` (no gradient): see ``nearest_patches``.

        ``prototypes`` (default: this layer's, detached: the search of :meth:`forward`, the same winners in
        every dtype) lets a caller search with a copy."""
        p = self.prototypes.detach() if prototypes is None else prototypes
        return nearest_patches(z, p, similarity=self.similarity, backend=self.backend, precision=self.precision)

    def distance_maps(self, z: Tensor, prototypes: Tensor | None = None, *, paired: bool = False) -> Tensor:
        """Distance maps over every window, (B, M, Hout, Wout) (``paired``: (M, Hout, Wout), prototype m on
        image m): see ``prototype_distances``. ``prototypes`` defaults to this layer's, detached."""
        p = self.prototypes.detach() if prototypes is None else prototypes
        return prototype_distances(z, p, similarity=self.similarity, paired=paired)

    def windows(self, z: Tensor, index: Tensor) -> Tensor:
        """The windows (N, D, kh, kw) of ``z`` (N, D, H, W) at top-left indices ``index`` (N,)."""
        return prototype_windows(z, index, self.prototype_size)

    def output_size(self, feature_size) -> tuple[int, int]:
        """(Hout, Wout): the number of window positions on a feature map of ``feature_size`` (H, W)."""
        return window_positions((int(feature_size[0]), int(feature_size[1])), self.prototype_size)

    def extra_repr(self) -> str:
        return (f"num_prototypes={self.num_prototypes}, prototype_dim={self.prototype_dim}, "
                f"prototype_size={self.prototype_size}, similarity={self.similarity!r}, eps={self.eps}, "
                f"backend={self.backend!r}, precision={self.precision!r}")
