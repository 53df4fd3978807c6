"""ImageFolderDataset: any class-per-folder image tree (``root/<class>/<image>``)."""
from __future__ import annotations

import os
import warnings

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from protokern.utils import listed, positive_int

from .transforms import load_image_uint8, uint8_to_float

__all__ = ["ImageFolderDataset"]


def _hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


def _hidden_below(root: str, path: str) -> bool:
    """Whether ``path`` or a folder between ``root`` and it is hidden."""
    return any(_hidden(part) for part in os.path.relpath(path, root).split(os.sep))


class _VisibleImageFolder(ImageFolder):
    """torchvision's ImageFolder without hidden entries: no class from a hidden folder (.ipynb_checkpoints),
    no image from a hidden file (macOS ._x.jpg) or from under a hidden folder."""

    def __init__(self, root: str):
        super().__init__(root, is_valid_file=lambda path: (
            has_file_allowed_extension(path, IMG_EXTENSIONS) and not _hidden_below(root, path)))

    def find_classes(self, directory):
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not _hidden(entry.name))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


class ImageFolderDataset(Dataset):
    """Images under ``root/<class name>/...``, classes sorted by name (torchvision's ImageFolder; hidden folders
    and files, such as .ipynb_checkpoints or macOS ._ files, are left out).

    Args:
        root: the tree's root folder.
        image_size: side S of the returned (3, S, S) float32 images in [0, 1] (whole image resized).

    Attributes: ``classes``, ``class_to_idx``, ``targets`` (0-based labels), ``samples``
    ((path, label) pairs), ``paths``, ``unsupported`` (files under the class folders that are not
    images by their extension; left out and listed in one warning).
    """

    def __init__(self, root: str, image_size: int = 224):
        root = os.path.expanduser(os.fspath(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        image_size = positive_int("image_size", image_size)
        index = _VisibleImageFolder(root)  # only used to list files; images are loaded here
        self.root = root
        self.image_size = image_size
        self.classes = list(index.classes)
        self.class_to_idx = dict(index.class_to_idx)
        self.samples = list(index.samples)
        self.paths = [p for p, _ in self.samples]
        self.targets = [t for _, t in self.samples]
        self.unsupported = _unsupported_files(root, self.classes, set(self.paths))
        if self.unsupported:
            warnings.warn(f"{root}: {len(self.unsupported)} file(s) without an image extension left out: "
                          f"{listed(self.unsupported, 10)}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 (3, S, S) (``self[index][0]`` is ``uint8_to_float`` of it); errors name the
        file."""
        return load_image_uint8(self.paths[index], self.image_size)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return uint8_to_float(self.decode(index)), self.targets[index]

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, image_size={self.image_size}, n={len(self)})"


def _unsupported_files(root: str, classes: list[str], images: set[str]) -> list[str]:
    """Visible files under ``root/<class>/`` (walked as torchvision does) that are not in ``images``, sorted."""
    out = []
    for name in classes:
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            if _hidden_below(root, folder):
                continue
            out.extend(path for path in (os.path.join(folder, f) for f in sorted(files) if not _hidden(f))
                       if path not in images)
    return out
