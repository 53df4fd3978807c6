"""Image primitives shared by push's PNGs and the explanations: upsampling of activation maps, the jet colour
map, float images to uint8, PNG writing (NumPy, torch and PIL only; below push and explain, importing neither).

Images are uint8 NumPy arrays (H, W, 3).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = ["jet", "normalised", "save_png", "to_uint8", "upsample"]


def upsample(maps: Tensor, size: tuple[int, int], window: tuple[int, int] = (1, 1)) -> Tensor:
    """Bicubic upsampling of (H, W) or (N, H, W) maps to ``size`` (as the original's cv2 INTER_CUBIC).

    A map over the positions of kh x kw windows (``window``; Hout = H - kh + 1 of a feature map of H rows) puts
    each position's value at its window's centre: it is upsampled over the Hout x Wout cells' worth of pixels
    that the centres span, and its edges are repeated over the (kh - 1) / 2 cells on either side. (Stretched
    over the whole image, a window's activation would lie up to half a window away from it.) 1 x 1 maps are
    stretched over the image, as the original's.
    """
    single = maps.dim() == 2
    x = (maps.float()[None] if single else maps.float())[:, None]
    (kh, kw), (hout, wout), (S_h, S_w) = window, x.shape[-2:], size
    if (kh, kw) == (1, 1):
        up = F.interpolate(x, size=(S_h, S_w), mode="bicubic", align_corners=False)
    else:  # pixels per feature cell: S / H
        h, w = hout + kh - 1, wout + kw - 1
        top, left = min(S_h - 1, round((kh - 1) / 2 * S_h / h)), min(S_w - 1, round((kw - 1) / 2 * S_w / w))
        inner = (max(1, min(S_h - top, round(hout * S_h / h))), max(1, min(S_w - left, round(wout * S_w / w))))
        up = F.interpolate(x, size=inner, mode="bicubic", align_corners=False)
        up = F.pad(up, (left, S_w - left - inner[1], top, S_h - top - inner[0]), mode="replicate")
    return up[0, 0] if single else up[:, 0]


def to_uint8(image) -> np.ndarray:
    """A (3, H, W) or (1, H, W) (grayscale, drawn as gray RGB) float tensor / array in [0, 1], a (H, W, 3) uint8
    array or a PIL image -> uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected a uint8 image (H, W, 3), got shape {array.shape}")
        return array.copy()
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected a float image (3, H, W) or (1, H, W) in [0, 1], got shape {array.shape}")
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    array = np.nan_to_num(array.transpose(1, 2, 0), nan=0.0)  # a NaN pixel is drawn black, without a cast warning
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """Jet colour map of values in [0, 1] -> uint8 RGB (..., 3)."""
    v = np.clip(values, 0, 1)[..., None] * 4
    rgb = np.clip(np.concatenate([1.5 - np.abs(v - 3), 1.5 - np.abs(v - 2), 1.5 - np.abs(v - 1)], -1), 0, 1)
    return (rgb * 255).round().astype(np.uint8)


def normalised(heat: np.ndarray) -> np.ndarray:
    """``heat`` min-max scaled to [0, 1] (all zeros for a constant map), as the original colours its heatmaps."""
    span = heat.max() - heat.min()
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


def save_png(image: np.ndarray, path: str) -> str:
    """Write a uint8 (H, W, 3) array as a PNG (creating the folder); return ``path``. zlib level 1: the same
    pixels, about 5% more bytes than PIL's default level 6 in less than half its time (push writes four PNGs a
    prototype, 8000 at 2000 prototypes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path, compress_level=1)
    return path
