"""ImageFolderDataset: any class-per-folder image tree (``root/<class>/<image>``)."""
from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from .transforms import load_image

__all__ = ["ImageFolderDataset"]


class ImageFolderDataset(Dataset):
    """Images under ``root/<class name>/...``, classes sorted by name (torchvision's ImageFolder).

    Args:
        root: the tree's root folder.
        image_size: side S of the returned (3, S, S) float32 images in [0, 1] (whole image resized).

    Attributes: ``classes``, ``class_to_idx``, ``targets`` (0-based labels), ``samples``
    ((path, label) pairs), ``paths``.
    """

    def __init__(self, root: str, image_size: int = 224):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        if not (isinstance(image_size, int) and image_size > 0):
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        index = ImageFolder(root)  # only used to list files; images are loaded here
        self.root = root
        self.image_size = image_size
        self.classes = list(index.classes)
        self.class_to_idx = dict(index.class_to_idx)
        self.samples = list(index.samples)
        self.paths = [p for p, _ in self.samples]
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image, _ = load_image(path, self.image_size)
        return image, label

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, image_size={self.image_size}, n={len(self)})"
