"""Shared image loading, cropping, resizing and input normalisation (ImageNet's, or a model's own).

Every dataset in :mod:`protokern.data` goes through :func:`load_image`, so all of them agree on
colour handling (any PIL mode becomes RGB) and on the pixel-coordinate convention:
coordinates are continuous, pixel ``j`` covers ``[j, j + 1)`` and its centre is ``j + 0.5``.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from protokern.utils import positive_int, unwrap

__all__ = [
    "BadImageError",
    "MAX_IMAGE_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_rgb",
    "open_rgb",
    "pil_to_tensor",
    "crop_box_pixels",
    "output_mapping",
    "load_image",
    "load_image_uint8",
    "uint8_to_float",
    "map_boxes",
    "imagenet_normalize",
    "imagenet_denormalize",
    "input_stats",
    "model_input",
    "model_stats",
    "normalize",
    "to_luma",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Background that transparent pixels are composited onto.
_WHITE = (255, 255, 255)
_INV_255 = 1.0 / 255.0  # rounds to the float32 reciprocal of 255 in every float32 multiplication

# Images with more pixels are refused as possible decompression bombs: PIL's own warning threshold
# (about 89 megapixels, 256 MiB decoded as RGB); a CUB image has about 0.2.
MAX_IMAGE_PIXELS = 89_478_485
_OPEN_LOCK = threading.Lock()


def _new_open_lock() -> None:
    # a process forked while another thread holds the lock (a DataLoader worker started while push writes
    # its PNGs in background threads) would inherit it held, by a thread it does not have: a fresh one
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # Unix
    os.register_at_fork(after_in_child=_new_open_lock)


class BadImageError(ValueError):
    """An image file that cannot be decoded (garbage, truncated, a decompression bomb); ``path`` names it.

    Also built from one message: a DataLoader worker's error comes back to the main process as
    ``type(error)(message)`` (else as a RuntimeError, which the command line would show as a traceback)."""

    def __init__(self, path: str, reason: str | None = None):
        super().__init__(path if reason is None else f"{path}: {reason}")
        self.path, self.reason = path, reason


def _integer_peak(img: Image.Image) -> float:
    """Full-scale value of an "I" / "I;16*" image, from its mode and file format, never from its pixels."""
    if img.mode.startswith("I;16"):
        return 65535.0
    tags = getattr(img, "tag_v2", None)  # TIFF: the bit depth and signedness it declares
    bits = tags.get(258) if tags is not None else None
    if bits is None:
        return 65535.0  # 16-bit PGM/PNG, which Pillow scales to 0..65535 in mode "I"
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    signed = tags.get(339) in (2, (2,))  # SampleFormat 2: two's-complement integers
    return float(2 ** (bits - signed) - 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB PIL image, whatever its mode.

    Transparent modes (RGBA, LA, PA, palette or RGB with a transparency key) are composited onto
    white, so hidden pixels do not leak into the result; CMYK, YCbCr, grayscale ("L", "1") and
    palette images go through PIL's conversion. Deeper grayscale is scaled to 8 bits by a rule fixed per
    mode and format, never guessed from the pixels: "I;16*" spans 0..65535, "I" the range of a TIFF's
    BitsPerSample (and SampleFormat) tag or, without one (16-bit PGM or PNG), 0..65535, and "F" [0, 1];
    values outside the range are clipped and NaN becomes 0.
    """
    if img.mode == "I" or img.mode.startswith("I;16") or img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        top = 1.0 if img.mode == "F" else _integer_peak(img)
        arr8 = np.round(np.clip(arr / top, 0.0, 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def broken_link(path: str) -> str | None:
    """What ``path`` is when it is a symbolic link leading to no file (to a missing path, a loop or a chain of
    such links), else None."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)}, which leads to no file)"
    return None


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as RGB (see :func:`to_rgb`).

    Pixels are returned as stored: an EXIF orientation tag is ignored (as torchvision and the original
    ProtoPNet do; CUB and Cars boxes are drawn on the stored pixels).

    A missing file raises FileNotFoundError; a file PIL cannot decode (garbage, truncated), with more
    than :data:`MAX_IMAGE_PIXELS` pixels, or a broken symbolic link raises :class:`BadImageError`; both name
    the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        broken = broken_link(path)
        if broken:  # listed in its folder, but nothing to read
            raise BadImageError(path, broken)
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        # MAX_IMAGE_PIXELS decides (the check below), not PIL's own limit, which warns from Image.open above
        # it and raises above twice it: its warning is silenced, and a MAX_IMAGE_PIXELS raised above it is PIL's
        # limit for the open. Warning filters and PIL's limit are process-wide, so only the (cheap,
        # header-only) open runs under the lock; decoding runs in parallel.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil_limit = Image.MAX_IMAGE_PIXELS
            if pil_limit is not None and MAX_IMAGE_PIXELS > pil_limit:
                Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
        with img:
            pixels = img.width * img.height
            if pixels > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height} = {pixels} pixels")
            img.load()
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(path, f"refused as a possible decompression bomb ({err}; the limit is "
                                  f"protokern.data.transforms.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS})") from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(path, f"cannot decode image ({type(err).__name__}: {err})") from err


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1] (:func:`uint8_to_float`)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return uint8_to_float(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def crop_box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop ``(x0, y0, x1, y1)`` (x1, y1 exclusive) covering the continuous ``box``.

    The box is widened to whole pixels (floor / ceil, after a 1e-6 slack: float noise at a whole-pixel edge,
    as in a CUB box's x + width, adds no pixel) and clipped to the image; a box that does not overlap the
    image, or is empty, raises ``ValueError``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    ix0 = max(0, math.floor(x0 + 1e-6))
    iy0 = max(0, math.floor(y0 + 1e-6))
    ix1 = min(width, math.ceil(x1 - 1e-6))
    iy1 = min(height, math.ceil(y1 - 1e-6))
    if ix1 <= ix0 or iy1 <= iy0:
        raise ValueError(f"crop box {tuple(box)} is empty or outside the {width}x{height} image")
    return ix0, iy0, ix1, iy1


def output_mapping(width: int, height: int, image_size: int | None,
                   crop: Sequence[float] | None = None) -> tuple[float, float, float, float]:
    """``(ox, oy, sx, sy)`` taking source pixels of a width x height image to output pixels.

    A source point (x, y) lands at ``((x - ox) * sx, (y - oy) * sy)`` after the optional crop
    (see :func:`crop_box_pixels`) and the resize to ``image_size`` (None: no resize).
    """
    ox, oy, cw, ch = 0, 0, width, height
    if crop is not None:
        ix0, iy0, ix1, iy1 = crop_box_pixels(crop, width, height)
        ox, oy, cw, ch = ix0, iy0, ix1 - ix0, iy1 - iy0
    if image_size is None:
        return float(ox), float(oy), 1.0, 1.0
    return float(ox), float(oy), image_size / cw, image_size / ch


def load_image_uint8(
    path: str | os.PathLike,
    image_size: int | None = None,
    crop: Sequence[float] | None = None,
) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """:func:`load_image` before the conversion to float: a uint8 (3, S, S) tensor and the mapping."""
    if image_size is not None:
        image_size = positive_int("image_size", image_size)
    img = open_rgb(path)
    mapping = output_mapping(img.width, img.height, image_size, crop)
    if crop is not None:
        img = img.crop(crop_box_pixels(crop, img.width, img.height))
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((int(image_size), int(image_size)), Image.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous(), mapping


def load_image(
    path: str | os.PathLike,
    image_size: int | None = None,
    crop: Sequence[float] | None = None,
) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """Load an image as a float32 (3, S, S) tensor in [0, 1], optionally cropped then resized.

    Args:
        path: image file (any PIL mode; converted with :func:`to_rgb`).
        image_size: output side S (bilinear, antialiased when shrinking); None keeps the size.
        crop: optional continuous box (x0, y0, x1, y1) in source pixels; see :func:`crop_box_pixels`.

    Returns:
        ``(image, mapping)`` with ``mapping = (ox, oy, sx, sy)`` from :func:`output_mapping`
        (apply it to boxes with :func:`map_boxes`). Errors as :func:`open_rgb`.
    """
    image, mapping = load_image_uint8(path, image_size, crop)
    return uint8_to_float(image), mapping


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape, any device) -> float32 in [0, 1], the datasets' convention: ``x * (1 / 255)``
    with the float32 reciprocal, the same bits on every device. (``x / 255`` is not: CUDA divides a tensor by a
    scalar as this multiplication, the CPU divides exactly, and 126 of the 256 byte values then differ by an
    ulp, so a batch converted on the GPU from a cache differed from the same items decoded on the CPU.)"""
    return images.float().mul_(_INV_255)


def map_boxes(boxes: torch.Tensor, mapping: tuple[float, float, float, float]) -> torch.Tensor:
    """Map (..., 4) boxes (x0, y0, x1, y1), or (..., 2) points (x, y), from source to output pixels (see
    output_mapping)."""
    ox, oy, sx, sy = mapping
    out = torch.as_tensor(boxes, dtype=torch.float32).clone()
    out[..., 0::2] = (out[..., 0::2] - ox) * sx
    out[..., 1::2] = (out[..., 1::2] - oy) * sy
    return out


def input_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Checked per-channel input statistics: ``mean`` and ``std`` of one length, the image channels (1,
    grayscale, or 3, RGB), finite, ``std`` > 0. Returns them as tuples of floats."""
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise TypeError(f"input mean and std must be sequences of numbers, got {mean!r} and {std!r}") from None
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise ValueError(f"input mean and std need one value per image channel (1, grayscale, or 3, RGB), got "
                         f"{len(mean)} and {len(std)}")
    if not all(map(math.isfinite, mean + std)) or min(std) <= 0:
        raise ValueError(f"input mean and std must be finite and std > 0, got mean {mean}, std {std}")
    return mean, std


def _stats(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError("expected a floating-point tensor image batch")
    channels = len(mean)
    if x.dim() < 3 or x.shape[-3] != channels:
        raise ValueError(f"expected images shaped (..., {channels}, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(channels, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(channels, 1, 1)
    return mean, std


def normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel, for (B, C, H, W) or (C, H, W) tensors in [0, 1], C = ``len(mean)``
    (ImageNet's statistics by default).

    Works on any device and floating dtype; returns a new tensor of the same device and dtype.
    """
    mean, std = _stats(x, mean, std)
    return (x - mean) / std


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with ImageNet statistics, for (B, 3, H, W) or (3, H, W) tensors in [0, 1].

    Works on any device and floating dtype; returns a new tensor of the same device and dtype.
    """
    return normalize(x)


def imagenet_denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`imagenet_normalize`: ``x * std + mean`` (no clamping)."""
    mean, std = _stats(x, IMAGENET_MEAN, IMAGENET_STD)
    return x * std + mean


def model_stats(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the inputs ``model`` takes: its ``input_mean`` and ``input_std`` (a ``ProtoPNet``'s,
    ImageNet's unless it was built with others; read through ``DataParallel`` and ``DistributedDataParallel``
    wrappers); ImageNet's for a model without them."""
    model = unwrap(model)
    return getattr(model, "input_mean", IMAGENET_MEAN), getattr(model, "input_std", IMAGENET_STD)


def to_luma(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> (..., 1, H, W) luma, ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2, as PIL's "L")."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(-3, keepdim=True)


def model_input(model, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, C, H, W) as ``model`` takes them: normalised with :func:`model_stats`; RGB images
    given to a grayscale model (one mean and std) by their luma (:func:`to_luma`). The trainer, push, pruning,
    the explanations and the metrics all feed the model through this. Other channel counts than the model's are
    a one-line ``ValueError``."""
    mean, std = model_stats(model)
    if torch.is_tensor(images) and images.dim() >= 3 and images.shape[-3] != len(mean):
        if len(mean) == 1 and images.shape[-3] == 3:
            images = to_luma(images)
        else:
            raise ValueError(f"the model takes {len(mean)}-channel images (its input_mean and input_std: ImageNet's, "
                             f"RGB, unless built with others; one value each for a grayscale trunk), got images of "
                             f"shape {tuple(images.shape)}")
    return normalize(images, mean, std)
