"""Stanford Cars (196 classes) from the devkit layout.

Expected under ``root``::

    devkit/cars_meta.mat                 class_names: 1 x 196 cell array of strings
    devkit/cars_train_annos.mat          annotations: 1 x N struct array with fields
                                         bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based), fname
    cars_test_annos_withlabels.mat       same layout, for the test split (also looked for in devkit/)
    cars_train/<fname>, cars_test/<fname>   (a nested cars_train/cars_train/ is accepted too)

Devkit boxes are 1-based inclusive pixel indices (MATLAB); they are converted to continuous
0-based coordinates ``(x1 - 1, y1 - 1, x2, y2)``. An fname leading outside the image folder (absolute, or
through ``..``) is an error.
"""
from __future__ import annotations

import math
import os

import numpy as np
import scipy.io
import torch

from ._boxed import BoxedImages, inside_folder, require_file

__all__ = ["StanfordCars"]

_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _scalar(value):
    """The single element of a loadmat value (arrays nest as (1, 1) / (1,) / object arrays)."""
    arr = np.asarray(value)
    while arr.dtype == object and arr.size == 1:
        arr = np.asarray(arr.ravel()[0])
    if arr.size == 0:
        return ""
    if arr.size != 1:
        raise ValueError(f"expected a single value, got an array shaped {arr.shape}")
    return arr.ravel()[0].item()


def _load_mat(path: str, variable: str) -> np.ndarray:
    require_file(path, "Stanford Cars devkit file")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises several types for corrupt files
        raise ValueError(f"{path}: cannot read .mat file ({err})") from err
    if variable not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable {variable!r} (found {found})")
    return mat[variable]


def read_class_names(path: str) -> list[str]:
    """Class names from ``cars_meta.mat`` (variable ``class_names``)."""
    return [str(_scalar(v)) for v in _load_mat(path, "class_names").ravel()]


def read_annotations(path: str) -> list[dict]:
    """Records of a devkit annotation file: dicts with the bbox fields, "class" and "fname"."""
    ann = _load_mat(path, "annotations").ravel()
    names = ann.dtype.names or ()
    missing = [f for f in _FIELDS if f not in names]
    if missing:
        raise ValueError(f"{path}: annotations lack field(s) {missing} (found {list(names)}); "
                         f"the test split needs cars_test_annos_withlabels.mat")
    out = []
    for i, rec in enumerate(ann):
        try:
            row = {f: _scalar(rec[f]) for f in _FIELDS}
            row["fname"] = str(row["fname"])
            for f in _FIELDS[:5]:
                row[f] = float(row[f])
                if not math.isfinite(row[f]):
                    raise ValueError(f"{f} is {row[f]}")
            if not row["class"].is_integer():
                raise ValueError(f"class {row['class']} is not an integer")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: bad annotation #{i + 1}: {err}") from None
        out.append(row)
    return out


def _image_dir(root: str, name: str) -> str:
    folder = os.path.join(root, name)
    nested = os.path.join(folder, name)
    if os.path.isdir(nested):
        return nested
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"missing Stanford Cars image folder: {folder}")
    return folder


class StanfordCars(BoxedImages):
    """Stanford Cars from the devkit layout, optionally cropped to the car box.

    Args:
        root: folder holding ``devkit/``, ``cars_train/``, ``cars_test/`` and the test labels.
        split: "train" or "test".
        image_size: side S of the returned (3, S, S) images.
        crop: "bbox" crops each image to its car box, "none" keeps it whole.

    Attributes: ``classes`` (196 names), ``targets`` (0-based labels), ``paths``,
    ``boxes`` ((N, 4) car boxes in output pixels).
    """

    def __init__(self, root: str, split: str = "train", image_size: int = 224, crop: str = "bbox"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = os.fspath(root)
        devkit = os.path.join(root, "devkit")
        classes = read_class_names(os.path.join(devkit, "cars_meta.mat"))
        if split == "train":
            annos_path = os.path.join(devkit, "cars_train_annos.mat")
        else:
            name = "cars_test_annos_withlabels.mat"
            annos_path = os.path.join(root, name)
            if not os.path.isfile(annos_path) and os.path.isfile(os.path.join(devkit, name)):
                annos_path = os.path.join(devkit, name)
        annos = read_annotations(annos_path)
        folder = _image_dir(root, "cars_train" if split == "train" else "cars_test")

        paths, targets, boxes = [], [], []
        for i, a in enumerate(annos):
            label = int(a["class"]) - 1
            if not 0 <= label < len(classes):
                raise ValueError(f"{annos_path}: annotation #{i + 1} has class {int(a['class'])}, "
                                 f"outside 1..{len(classes)}")
            paths.append(inside_folder(folder, a["fname"], f"{annos_path}: annotation #{i + 1}"))
            targets.append(label)
            boxes.append((a["bbox_x1"] - 1, a["bbox_y1"] - 1, a["bbox_x2"], a["bbox_y2"]))

        super().__init__(paths, targets, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                         classes, image_size, crop)
        self.root = root
        self.split = split

    def __repr__(self) -> str:
        return (f"StanfordCars(root={self.root!r}, split={self.split!r}, crop={self.crop!r}, "
                f"image_size={self.image_size}, n={len(self)})")
