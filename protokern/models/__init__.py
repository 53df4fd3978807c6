"""ProtoPNet model parts: trunks, add-on layers, receptive fields and the model itself."""

from protokern.models.add_on import ADD_ONS, make_add_on
from protokern.models.backbones import BACKBONES, load_backbone_state, make_backbone
from protokern.models.protopnet import ProtoPNet
from protokern.models.receptive_field import (
    LayerGeometry,
    ReceptiveField,
    backbone_receptive_field,
    compute_receptive_field,
    patch_box,
    window_center,
)

__all__ = [
    "ADD_ONS",
    "BACKBONES",
    "LayerGeometry",
    "ProtoPNet",
    "ReceptiveField",
    "backbone_receptive_field",
    "compute_receptive_field",
    "load_backbone_state",
    "make_add_on",
    "make_backbone",
    "patch_box",
    "window_center",
]
