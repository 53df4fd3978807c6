"""Datasets, image loading / normalisation and batched augmentation for protokern.

Every dataset returns ``(image, label)`` with ``image`` a float32 (3, S, S) tensor in [0, 1],
unnormalised; normalise batches on the training device with :func:`model_input` (the model's input
statistics, ImageNet's by default) or :func:`imagenet_normalize`.
"""
from ._boxed import CROPS
from .augment import GpuAugment
from .cache import CACHE_MODES, BadImageWarning, CachedBatches, ImageView, prepare_images, skipped_images
from .cars import StanfordCars
from .cub import CUB200
from .folder import ImageFolderDataset
from .loader import make_loader
from .synthetic import SyntheticParts
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_denormalize,
    imagenet_normalize,
    model_input,
    model_stats,
    normalize,
    to_luma,
    BadImageError,
    load_image,
    open_rgb,
    to_rgb,
    uint8_to_float,
)

__all__ = [
    "SyntheticParts",
    "CUB200",
    "StanfordCars",
    "ImageFolderDataset",
    "GpuAugment",
    "make_loader",
    "prepare_images",
    "skipped_images",
    "ImageView",
    "CachedBatches",
    "CACHE_MODES",
    "CROPS",
    "BadImageError",
    "BadImageWarning",
    "imagenet_normalize",
    "imagenet_denormalize",
    "model_input",
    "model_stats",
    "normalize",
    "to_luma",
    "load_image",
    "uint8_to_float",
    "open_rgb",
    "to_rgb",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
