"""protokern: fast, practical prototype networks ("this looks like that", ProtoPNet).

The heart is one fused op, :func:`prototype_similarity`: squared-L2 distance of every prototype to every
patch, the global min over patches and the log-similarity, with a hand-written backward.
"""

from protokern.backends import available_backends
from protokern.layer import ProtoLayer
from protokern.ops import (
    distance_to_similarity,
    log_similarity,
    nearest_patches,
    prototype_distances,
    prototype_similarity,
    prototype_windows,
)

__all__ = ["ProtoLayer", "available_backends", "distance_to_similarity", "log_similarity", "nearest_patches",
           "prototype_distances", "prototype_similarity", "prototype_windows"]
__version__ = "0.1.0"
