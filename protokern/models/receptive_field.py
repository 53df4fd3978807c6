"""Receptive-field arithmetic: which input pixels an output cell of a trunk can see.

As in the original ProtoPNet (``receptive_field.py``), the trunk is treated as a chain of conv / pool layers,
each described by its kernel size, stride and padding, and three numbers are carried through the chain:

- ``jump``: distance in input pixels between the centres of two adjacent output cells,
- ``size``: side of the square of input pixels one output cell can see,
- ``start``: centre of output cell (0, 0), in pixel coordinates where pixel ``i`` spans ``[i, i + 1)``
  (so the input itself starts at jump 1, size 1, start 0.5).

Layers are found by walking the trunk's modules in registration order. Shortcut branches of residual blocks
(submodules named ``downsample``) run in parallel to the main path and are skipped; dense connections
(DenseNet) concatenate the input with the deepest path, whose chain is the one walked. 1x1 convolutions (the
add-on layers, 1x1 prototypes) leave the receptive field unchanged. Layers that resample otherwise
(transposed convolutions, upsampling, fractional or power-average pooling, pixel shuffles) are refused.
Operations done in ``forward`` without a module (``F.max_pool2d`` ...), and a module called twice, are
invisible to the walk: :func:`checked_receptive_field` compares the walk's feature-map size with the one
actually seen, and push, the explanations and the gallery draw no box from a geometry that fails that check.
The check sees only what changes the map's size: an unseen layer that keeps it (a stride-1 padded pool in
``forward``, a 3 x 3 convolution module called again) widens the true receptive field beyond the walked one
unnoticed, so a trunk of one's own should do such things with modules of their own.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from protokern.models.backbones import make_backbone

__all__ = [
    "LayerGeometry",
    "ReceptiveField",
    "backbone_receptive_field",
    "checked_receptive_field",
    "compute_receptive_field",
    "layer_geometry",
    "patch_box",
    "window_center",
    "receptive_field_from_layers",
]


@dataclass(frozen=True)
class LayerGeometry:
    """Spatial geometry of one square conv / pool layer (dilation 1 unless given)."""

    kernel: int
    stride: int
    padding: int
    dilation: int = 1
    ceil_mode: bool = False
    extra_padding: int = 0  # on the right / bottom only (padding="same" with an even span)

    @property
    def span(self) -> int:
        """Effective kernel extent in input cells: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1

    def output_size(self, n: int) -> int:
        """Output side for an input side ``n`` (PyTorch's formula)."""
        rounding = math.ceil if self.ceil_mode else math.floor
        out = rounding((n + 2 * self.padding + self.extra_padding - self.span) / self.stride) + 1
        if self.ceil_mode and (out - 1) * self.stride >= n + self.padding:
            out -= 1  # PyTorch drops a last window that would start in the right padding
        return out


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of the output cells of a chain of layers (see the module docstring)."""

    jump: float
    size: float
    start: float
    layers: tuple[LayerGeometry, ...] = ()

    def output_size(self, img_size: int) -> int:
        """Side of the output map for a square input of side ``img_size`` (0 if some layer gets no input)."""
        n = int(img_size)
        for layer in self.layers:
            n = layer.output_size(n) if n > 0 else 0
        return max(n, 0)

    def min_image_size(self, cells: int = 1) -> int | None:
        """The smallest square input side whose output map has at least ``cells`` cells a side (None if no
        side up to 16384 does)."""
        return next((n for n in range(1, 1 << 14) if self.output_size(n) >= cells), None)

    def window_shortfall(self, image_size, window) -> tuple[tuple[int, int], int | None] | None:
        """None if an image of ``image_size`` (a side or (height, width)) gives a feature map of at least one
        ``window`` (kh, kw); else that map's (h, w) and the smallest square side that would (None if none)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        (kh, kw), h, w = window, self.output_size(height), self.output_size(width)
        if h >= kh and w >= kw:
            return None
        return (h, w), self.min_image_size(max(kh, kw))

    def to_original(self, img_size: int) -> list[float]:
        """The original implementation's ``proto_layer_rf_info``: ``[n, jump, size, start]``."""
        return [self.output_size(img_size), self.jump, self.size, self.start]


def _square(value, what: str, module: nn.Module) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"receptive field: only square {what} are supported, got {value} in {module}")
        value = value[0]
    return int(value)


_RESAMPLING = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Upsample, nn.LPPool2d,
               nn.FractionalMaxPool2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.MaxUnpool2d)


def _geometry(module: nn.Module) -> LayerGeometry | None:
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        raise ValueError(f"receptive field: adaptive pooling ({module}) has no fixed geometry")
    if isinstance(module, _RESAMPLING):
        raise ValueError(f"receptive field: {type(module).__name__} ({module}) is not a conv / pool chain layer")
    if isinstance(module, nn.Conv2d):
        kernel = _square(module.kernel_size, "kernels", module)
        stride = _square(module.stride, "strides", module)
        dilation = _square(module.dilation, "dilations", module)
        padding, extra = module.padding, 0
        if padding == "valid":
            padding = 0
        elif padding == "same":
            padding = dilation * (kernel - 1) // 2  # PyTorch puts the odd pixel on the right/bottom
            extra = dilation * (kernel - 1) % 2
        return LayerGeometry(kernel, stride, _square(padding, "paddings", module), dilation, extra_padding=extra)
    if isinstance(module, nn.MaxPool2d):
        return LayerGeometry(
            _square(module.kernel_size, "kernels", module),
            _square(module.stride, "strides", module),
            _square(module.padding, "paddings", module),
            _square(module.dilation, "dilations", module),
            bool(module.ceil_mode),
        )
    if isinstance(module, nn.AvgPool2d):
        return LayerGeometry(
            _square(module.kernel_size, "kernels", module),
            _square(module.stride, "strides", module),
            _square(module.padding, "paddings", module),
            1,
            bool(module.ceil_mode),
        )
    return None


def layer_geometry(module: nn.Module) -> list[LayerGeometry]:
    """The conv / pool layers of ``module`` along its main path, in order (shortcut branches skipped)."""
    layers = []
    for name, sub in module.named_modules():
        if "downsample" in name.split("."):
            continue
        geometry = _geometry(sub)
        if geometry is not None:
            layers.append(geometry)
    return layers


def receptive_field_from_layers(layers) -> ReceptiveField:
    """Carry ``(jump, size, start)`` through a chain of :class:`LayerGeometry` (the original's arithmetic)."""
    jump, size, start = 1.0, 1.0, 0.5
    for layer in layers:
        span = layer.span
        start = start + ((span - 1) / 2 - layer.padding) * jump
        size = size + (span - 1) * jump
        jump = jump * layer.stride
    return ReceptiveField(jump=jump, size=size, start=start, layers=tuple(layers))


def compute_receptive_field(module: nn.Module) -> ReceptiveField:
    """Receptive field of the output cells of ``module`` (a trunk, or a trunk followed by add-on layers).

    Raises ``ValueError`` for a trunk whose geometry the walk cannot follow (adaptive pooling, resampling
    layers, non-square kernels or strides); ``ProtoPNet`` then warns and draws no boxes."""
    return receptive_field_from_layers(layer_geometry(module))


def backbone_receptive_field(name: str) -> ReceptiveField:
    """Receptive field of a supported backbone trunk by name (built on the meta device: no memory, no weights);
    ``ValueError`` for a name not in ``BACKBONES``."""
    with torch.device("meta"):
        trunk, _ = make_backbone(name)
    return compute_receptive_field(trunk)


def checked_receptive_field(model: nn.Module, image_size, feature_size) -> ReceptiveField | None:
    """``model.receptive_field`` if it predicts the feature map actually seen, ``feature_size`` (H, W) for
    images of ``image_size`` (height, width); else None with a warning, so that no box is drawn from a wrong
    geometry (a module called twice in ``forward``, a pooling done without a module: see the module docstring).
    """
    rf = getattr(model, "receptive_field", None)
    if rf is None:
        return None
    predicted = (rf.output_size(int(image_size[0])), rf.output_size(int(image_size[1])))
    seen = (int(feature_size[0]), int(feature_size[1]))
    if predicted != seen:
        warnings.warn(f"the receptive field walked from the trunk's modules predicts a {predicted[0]} x "
                      f"{predicted[1]} feature map for {int(image_size[0])} x {int(image_size[1])} images, the "
                      f"trunk gives {seen[0]} x {seen[1]} (a layer called twice, or one without a module?): "
                      f"no receptive-field boxes", stacklevel=2)
        return None
    return rf


def patch_box(rf: ReceptiveField, img_size, h: int, w: int, window=(1, 1)) -> tuple[int, int, int, int]:
    """Pixel box ``(y0, y1, x0, x1)`` (half-open) seen by the ``window`` (kh, kw) of output cells whose
    top-left cell is ``(h, w)``, clipped to the image.

    ``img_size`` is the image side, or ``(height, width)``. Same box as the original's
    ``compute_rf_protoL_at_spatial_location`` with its prototype layer's receptive field
    (``compute_proto_layer_rf_info_v2``: a VALID kh x kw convolution of stride 1 on the map): the union of
    the boxes of the window's first and last cells.
    """
    img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    kh, kw = window
    if h < 0 or w < 0:
        raise ValueError(f"cell indices must be >= 0, got ({h}, {w})")
    if kh < 1 or kw < 1:
        raise ValueError(f"window must be (kh, kw) with kh, kw >= 1, got {window!r}")
    half = rf.size / 2
    y0 = max(math.floor(rf.start + h * rf.jump - half), 0)
    y1 = min(math.floor(rf.start + (h + kh - 1) * rf.jump + half), img_h)
    x0 = max(math.floor(rf.start + w * rf.jump - half), 0)
    x1 = min(math.floor(rf.start + (w + kw - 1) * rf.jump + half), img_w)
    return y0, y1, x0, x1


def window_center(rf: ReceptiveField, h, w, window=(1, 1)):
    """Pixel centre ``(cy, cx)`` of the window (kh, kw) of cells with top-left cell ``(h, w)`` (numbers or
    tensors): the centre of its receptive field before clipping."""
    kh, kw = window
    return rf.start + (h + (kh - 1) / 2) * rf.jump, rf.start + (w + (kw - 1) / 2) * rf.jump
