"""Shared machinery of the annotated file datasets (CUB-200-2011, Stanford Cars).

Also the tolerant text-table reader used for annotation files.
"""
from __future__ import annotations

import codecs
import io
import math
import os
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from protokern.utils import positive_int

from .transforms import BadImageError, load_image_uint8, map_boxes, output_mapping, uint8_to_float

CROPS = ("bbox", "none")


def require_file(path: str, what: str = "annotation file") -> str:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    return path


def read_table(path: str, fields: int) -> list[tuple[int, list[str]]]:
    """Rows of a whitespace-separated text file as ``(line_number, [field, ...])``.

    Blank lines are skipped; the last field takes the rest of the line (file names may hold
    spaces); a line with fewer than ``fields`` fields, or a byte that is not UTF-8, raises ValueError
    naming file and line.
    """
    require_file(path)
    with open(path, "rb") as fh:
        data = fh.read().removeprefix(codecs.BOM_UTF8)  # a byte-order mark (Windows editors) is not a field
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {data[err.start]:#04x}: {err.reason})") from None
    rows = []
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):  # universal newlines, as open() reads
        line = line.strip()
        if not line:
            continue
        parts = line.split(None, fields - 1)
        if len(parts) != fields:
            raise ValueError(f"{path}:{lineno}: expected {fields} fields, got {line!r}")
        rows.append((lineno, parts))
    return rows


def inside_folder(folder: str, rel: str, where: str) -> str:
    """``folder/rel``, or ValueError naming ``where`` when ``rel`` leads outside ``folder`` (judged on the
    path as written: symbolic links inside the folder may point anywhere)."""
    path = os.path.normpath(os.path.join(folder, rel))
    if os.path.isabs(rel) or os.path.commonpath([path, os.path.normpath(folder)]) != os.path.normpath(folder):
        raise ValueError(f"{where}: image path {rel!r} leads outside {folder}")
    return path


def parse_number(path: str, lineno: int, text: str, kind=float):
    """``text`` as a finite float (or an int when ``kind is int``), with an error naming file and line."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or (kind is int and not value.is_integer()):
        raise ValueError(f"{path}:{lineno}: expected {'an integer' if kind is int else 'a finite number'}, "
                         f"got {text!r}")
    return int(value) if kind is int else value


class BoxedImages(Dataset):
    """Labelled image files, each with one box in source pixels; optionally cropped to it.

    Items are ``(image, label)``, image float32 (3, S, S) in [0, 1]. ``boxes`` gives each box in
    output pixels (computed on first access; it reads the image headers for their sizes). They are object
    boxes (``box_kind = "object"``: the whole bird or car), not part boxes: no part localisation on them.
    """

    box_kind = "object"

    def __init__(self, paths: Sequence[str], targets: Sequence[int], source_boxes: torch.Tensor,
                 classes: Sequence[str], image_size: int, crop: str):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        image_size = positive_int("image_size", image_size)
        self.paths = list(paths)
        self.targets = [int(t) for t in targets]
        self.source_boxes = torch.as_tensor(source_boxes, dtype=torch.float32).reshape(-1, 4)
        self.classes = list(classes)
        self.image_size = image_size
        self.crop = crop
        self._sizes: dict[int, tuple[int, int]] = {}
        self._boxes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _crop_box(self, index: int):
        return self.source_boxes[index].tolist() if self.crop == "bbox" else None

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 (3, S, S) (``self[index][0]`` is ``uint8_to_float`` of it); errors name the
        file."""
        try:
            image, _ = load_image_uint8(self.paths[index], self.image_size, self._crop_box(index))
        except BadImageError:
            raise
        except ValueError as err:
            raise ValueError(f"{self.paths[index]}: {err}") from None
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return uint8_to_float(self.decode(index)), self.targets[index]

    def source_size(self, index: int) -> tuple[int, int]:
        """(width, height) of the source image file (header read, cached); errors name the file."""
        if index not in self._sizes:
            path = self.paths[index]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image file not found: {path}")
            try:
                with Image.open(path) as img:
                    self._sizes[index] = img.size
            except Exception as err:  # noqa: BLE001 - PIL raises many types
                raise BadImageError(path, f"cannot read the image header ({type(err).__name__}: {err})") from err
        return self._sizes[index]

    def mapping(self, index: int) -> tuple[float, float, float, float]:
        """``(ox, oy, sx, sy)``: source (x, y) -> ((x - ox) * sx, (y - oy) * sy) in the output; errors
        name the file."""
        w, h = self.source_size(index)
        try:
            return output_mapping(w, h, self.image_size, self._crop_box(index))
        except ValueError as err:  # a box outside the image, named like decode names it
            raise ValueError(f"{self.paths[index]}: {err}") from None

    def box(self, index: int) -> torch.Tensor:
        """(4,) float32 box (x0, y0, x1, y1) of image ``index`` in pixels of the returned image."""
        return map_boxes(self.source_boxes[index], self.mapping(index))

    @property
    def boxes(self) -> torch.Tensor:
        """(N, 4) float32 boxes (x0, y0, x1, y1) in pixels of the returned images."""
        if self._boxes is None:
            self._boxes = torch.stack([self.box(i) for i in range(len(self))]) if len(self) else torch.zeros(0, 4)
        return self._boxes
