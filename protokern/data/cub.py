"""CUB-200-2011 from its official release layout.

Expected files, under ``root/CUB_200_2011/`` or ``root`` itself::

    images.txt               <image_id> <relative path>
    image_class_labels.txt   <image_id> <class_id>          (1-based)
    train_test_split.txt     <image_id> <is_training_image>  (1 train, 0 test)
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>
    classes.txt              <class_id> <class name>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>   (only for part_locations)
    parts/parts.txt          <part_id> <part name>                    (optional)
    images/<relative path>

Box and part coordinates are read as continuous pixel coordinates of the source image. An images.txt
path that leads outside ``images/`` (absolute, or through ``..``) is an error; image ids that other
files list (or that leave a gap in 1..max id) but images.txt lacks are left out with one warning.
"""
from __future__ import annotations

import os
import re
import warnings

import torch

from protokern.utils import listed

from ._boxed import BoxedImages, inside_folder, parse_number, read_table, require_file
from .transforms import map_boxes

__all__ = ["CUB200"]

_REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt",
             "bounding_boxes.txt", "classes.txt")


def _find_base(root: str) -> str:
    root = os.fspath(root)
    for base in (os.path.join(root, "CUB_200_2011"), root):
        if os.path.isfile(os.path.join(base, "images.txt")):
            return base
    raise FileNotFoundError(
        f"CUB-200-2011 not found: no images.txt in {os.path.join(root, 'CUB_200_2011')} or {root}")


def _by_id(path: str, fields: int) -> dict[int, tuple[int, list[str]]]:
    """``{image_id: (line_number, other fields)}`` of a table keyed by an integer first column."""
    out = {}
    for lineno, parts in read_table(path, fields):
        key = parse_number(path, lineno, parts[0], int)
        if key in out:
            raise ValueError(f"{path}:{lineno}: duplicate id {key}")
        out[key] = (lineno, parts[1:])
    return out


def _warn_missing_ids(images_txt: str, images: dict, names: dict[str, str], tables) -> None:
    """One warning listing the ids absent from images.txt that another table lists or that leave a gap."""
    known = set().union(*tables)
    expected = known | set(range(1, max(images, default=0) + 1))
    missing = sorted(expected - set(images))
    if missing:
        warnings.warn(f"{images_txt}: no line for image id(s) {listed(missing, 10)} (listed in {', '.join(names)} or "
                      f"a gap in the ids); those images are left out", stacklevel=3)


class CUB200(BoxedImages):
    """CUB-200-2011 birds, split by ``train_test_split.txt``, optionally cropped to the bird box.

    Args:
        root: folder holding ``CUB_200_2011/`` or the release's files themselves.
        split: "train" or "test".
        crop: "bbox" crops each image to its bird box (the paper's setting), "none" keeps it whole.
        image_size: side S of the returned (3, S, S) images.

    Attributes: ``classes`` (names without the "001." prefix), ``targets`` (0-based labels),
    ``image_ids`` (CUB ids), ``paths``, ``boxes`` ((N, 4) bird boxes in output pixels).
    """

    def __init__(self, root: str, split: str = "train", crop: str = "bbox", image_size: int = 224):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        base = _find_base(root)
        for name in _REQUIRED:
            require_file(os.path.join(base, name), "CUB-200-2011 file")
        f = {name: os.path.join(base, name) for name in _REQUIRED}

        class_rows = _by_id(f["classes.txt"], 2)
        class_ids = sorted(class_rows)
        class_index = {cid: i for i, cid in enumerate(class_ids)}
        classes = [re.sub(r"^\d+\.", "", class_rows[cid][1][0]) for cid in class_ids]

        images = _by_id(f["images.txt"], 2)
        labels = _by_id(f["image_class_labels.txt"], 2)
        is_train = _by_id(f["train_test_split.txt"], 2)
        bboxes = _by_id(f["bounding_boxes.txt"], 5)

        _warn_missing_ids(f["images.txt"], images, {name: f[name] for name in _REQUIRED[1:4]},
                          (labels, is_train, bboxes))
        image_dir = os.path.join(base, "images")
        want = 1 if split == "train" else 0
        ids, paths, targets, boxes = [], [], [], []
        for image_id, (image_line, (rel,)) in sorted(images.items()):
            for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train),
                                ("bounding_boxes.txt", bboxes)):
                if image_id not in table:
                    raise ValueError(f"{f[name]}: no entry for image id {image_id}")
            lineno, (flag,) = is_train[image_id]
            flag = parse_number(f["train_test_split.txt"], lineno, flag, int)
            if flag not in (0, 1):
                raise ValueError(f"{f['train_test_split.txt']}:{lineno}: expected 1 (train) or 0 (test), got {flag}")
            if flag != want:
                continue
            lineno, (cid,) = labels[image_id]
            cid = parse_number(f["image_class_labels.txt"], lineno, cid, int)
            if cid not in class_index:
                raise ValueError(f"{f['image_class_labels.txt']}:{lineno}: class id {cid} "
                                 f"is not in classes.txt")
            lineno, xywh = bboxes[image_id]
            x, y, w, h = (parse_number(f["bounding_boxes.txt"], lineno, v) for v in xywh)
            ids.append(image_id)
            paths.append(inside_folder(image_dir, rel, f"{f['images.txt']}:{image_line}"))
            targets.append(class_index[cid])
            boxes.append((x, y, x + w, y + h))

        super().__init__(paths, targets, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                         classes, image_size, crop)
        self.root = base
        self.split = split
        self.image_ids = ids
        self._parts: torch.Tensor | None = None
        self.part_names: list[str] | None = None

    def _load_parts(self) -> torch.Tensor:
        """(N, P, 3) source-pixel (x, y, visible) of this split's images, from part_locs.txt."""
        if self._parts is None:
            path = require_file(os.path.join(self.root, "parts", "part_locs.txt"), "CUB-200-2011 file")
            rows = {}
            num_parts = 0
            for lineno, parts in read_table(path, 5):
                image_id, part_id = (parse_number(path, lineno, v, int) for v in parts[:2])
                x, y, vis = (parse_number(path, lineno, v) for v in parts[2:])
                if part_id < 1:
                    raise ValueError(f"{path}:{lineno}: part ids are 1-based, got {part_id}")
                rows[image_id, part_id] = (x, y, vis)
                num_parts = max(num_parts, part_id)
            missing = (0.0, 0.0, 0.0)
            table = torch.tensor([[rows.get((image_id, p), missing) for p in range(1, num_parts + 1)]
                                  for image_id in self.image_ids], dtype=torch.float32)
            table = table.reshape(len(self), num_parts, 3)
            names_path = os.path.join(self.root, "parts", "parts.txt")
            if os.path.isfile(names_path):
                self.part_names = [parts[1] for _, parts in read_table(names_path, 2)]
            self._parts = table
        return self._parts

    def part_locations(self, index: int) -> torch.Tensor:
        """(P, 3) float tensor ``(x, y, visible)`` of image ``index``'s parts (P = 15 in CUB).

        x, y are in pixels of the returned (cropped, resized) image. ``visible`` is 1 when the
        annotation marks the part visible and it falls inside the returned image, else 0 (the
        coordinates of invisible parts are meaningless). Parts missing from the file are invisible.
        """
        loc = self._load_parts()[index].clone()
        loc[:, :2] = map_boxes(loc[:, :2], self.mapping(index))
        s = self.image_size
        inside = (loc[:, 0] >= 0) & (loc[:, 0] <= s) & (loc[:, 1] >= 0) & (loc[:, 1] <= s)
        loc[:, 2] = ((loc[:, 2] > 0) & inside).float()
        return loc

    def __repr__(self) -> str:
        return (f"CUB200(root={self.root!r}, split={self.split!r}, crop={self.crop!r}, "
                f"image_size={self.image_size}, n={len(self)})")
