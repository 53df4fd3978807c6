"""ImageFolderDataset: any class-per-folder image tree (``root/<class>/<image>``)."""
from __future__ import annotations

import os
import warnings

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from protokern.utils import listed, positive_int

from .transforms import load_image_uint8, uint8_to_float

__all__ = ["ImageFolderDataset"]


def _hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


def _own_folders(top: str) -> set[str]:
    """The paths of the visible folders of the tree under ``top`` itself (folder links not entered)."""
    own = set()
    for folder, dirs, _ in os.walk(top):
        dirs[:] = [name for name in dirs if not _hidden(name)]
        own.add(folder)
    return own


def _walk(top: str, repeated: list[str]):
    """(folder, visible file names) under ``top`` as ``os.walk(followlinks=True)``, hidden folders not entered and
    every real folder entered once: the tree's own folders at their own paths, any other path (through a folder
    link) only to a folder not reached before; the others, a loop's link back or a second way in, are appended to
    ``repeated`` (a loop listed its images ~40 times, two of them never ended)."""
    own = _own_folders(top)
    seen = {os.path.realpath(folder) for folder in own}
    for folder, dirs, files in os.walk(top, followlinks=True):
        keep = []
        for name in sorted(dirs):
            path = os.path.join(folder, name)
            if _hidden(name):
                continue
            if path not in own:
                real = os.path.realpath(path)
                if real in seen:
                    repeated.append(path)
                    continue
                seen.add(real)
            keep.append(name)
        dirs[:] = keep
        yield folder, sorted(f for f in files if not _hidden(f))


def _list_tree(root: str) -> tuple[list[str], list[tuple[str, int]], list[str], list[str]]:
    """The class folders of ``root`` (visible, sorted), its images as (path, label) in torchvision ImageFolder's
    order (class, then folder path, then file name; images by IMG_EXTENSIONS), the visible files that are not
    images, and the folder links not entered (:func:`_walk`)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _hidden(entry.name))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}")
    samples, other, repeated = [], [], []
    for label, name in enumerate(classes):
        for folder, files in sorted(_walk(os.path.join(root, name), repeated)):
            for path in (os.path.join(folder, f) for f in files):
                if has_file_allowed_extension(path, IMG_EXTENSIONS):
                    samples.append((path, label))
                else:
                    other.append(path)
    found = {label for _, label in samples}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise FileNotFoundError(f"{root}: no images in the class folders {listed(empty, 5)} (image extensions: "
                                f"{', '.join(IMG_EXTENSIONS)})")
    return classes, samples, other, repeated


class ImageFolderDataset(Dataset):
    """Images under ``root/<class name>/...``, classes sorted by name, in torchvision ImageFolder's order and by
    its image extensions; hidden folders and files (.ipynb_checkpoints, macOS ._ files) are left out, folder
    links followed to folders not listed otherwise (a loop or a second way in: named in one warning).

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
        self.classes, self.samples, self.unsupported, repeated = _list_tree(root)
        self.root = root
        self.image_size = image_size
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.paths = [p for p, _ in self.samples]
        self.targets = [t for _, t in self.samples]
        if self.unsupported:
            warnings.warn(f"{root}: {len(self.unsupported)} file(s) left out, of types torchvision's ImageFolder does "
                          f"not read either (it reads {' '.join(IMG_EXTENSIONS)}): {listed(self.unsupported, 10)}",
                          stacklevel=2)
        if repeated:
            warnings.warn(f"{root}: {len(repeated)} folder link(s) to a folder already listed (a loop or a second "
                          f"way in) not followed: {listed(repeated, 5)}", stacklevel=2)

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
