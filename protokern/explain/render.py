"""Drawing helpers for explanation images: heatmaps, boxes, panels and grids, with NumPy and PIL only.

Images are handled as uint8 NumPy arrays (H, W, 3). Boxes are ``(y0, y1, x0, x1)`` half-open pixel rows /
columns, as in :func:`protokern.models.patch_box` and :class:`protokern.push.PushRecords`.
"""

from __future__ import annotations

import html
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from protokern.imaging import jet, normalised, save_png, to_uint8, upsample  # (re-exported: push's rules)

__all__ = [
    "BOX_COLOUR",
    "BOX_FORMAT",
    "DISTANCE_NAMES",
    "SIMILARITY_NAMES",
    "draw_box",
    "grid",
    "hstack",
    "jet",
    "label",
    "overlay",
    "placeholder",
    "save_png",
    "to_uint8",
    "upsample",
    "upscale",
    "write_html",
]

# how explanation.json and gallery.json name their boxes' and patches' format
BOX_FORMAT = "y0, y1, x0, x1: half-open pixel rows and columns; patch: h, w of the window's top-left cell"
BOX_COLOUR = (255, 230, 0)  # yellow: visible on the jet map and on most photos
# how pages name each similarity kind of the prototype layer, and the distance it is a function of
SIMILARITY_NAMES = {"log": "log-similarity log((d + 1) / (d + eps))", "linear": "linear similarity -d",
                    "cosine": "cosine similarity 1 - d / 2"}
DISTANCE_NAMES = {"log": "squared L2 distance", "linear": "squared L2 distance",
                  "cosine": "distance between unit vectors, 2 - 2 cos"}
BACKGROUND = (255, 255, 255)


def overlay(image: np.ndarray, heat, alpha: float = 0.45) -> np.ndarray:
    """``image`` with the min-max normalised ``heat`` map (same H, W) blended on top in jet colours."""
    heat = np.asarray(heat.detach().cpu() if isinstance(heat, torch.Tensor) else heat, dtype=np.float64)
    if heat.shape != image.shape[:2]:
        raise ValueError(f"heatmap {heat.shape} does not match the image {image.shape[:2]}")
    blended = (1 - alpha) * image.astype(np.float64) + alpha * jet(normalised(heat)).astype(np.float64)
    return blended.round().clip(0, 255).astype(np.uint8)


def draw_box(image: np.ndarray, box, colour=BOX_COLOUR, width: int | None = None) -> np.ndarray:
    """A copy of ``image`` with the outline of ``box`` ``(y0, y1, x0, x1)`` (half-open) drawn, clipped to it.

    An empty or missing box (``-1`` entries, as in unpushed records) leaves the image unchanged.
    """
    out = image.copy()
    y0, y1, x0, x1 = (int(v) for v in box)
    h, w = out.shape[:2]
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        return out
    t = width if width is not None else max(1, round(min(h, w) / 100))
    t = min(t, y1 - y0, x1 - x0)
    colour = np.asarray(colour, dtype=np.uint8)
    out[y0:y0 + t, x0:x1] = colour
    out[y1 - t:y1, x0:x1] = colour
    out[y0:y1, x0:x0 + t] = colour
    out[y0:y1, x1 - t:x1] = colour
    return out


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Enlarge ``image`` by an integer factor (nearest neighbour) until its short side is >= ``min_side``."""
    factor = max(1, -(-min_side // max(1, min(image.shape[:2]))))
    return image.repeat(factor, 0).repeat(factor, 1) if factor > 1 else image


def placeholder(height: int, width: int, text: str = "n/a") -> np.ndarray:
    """A light-grey tile with ``text`` in its centre (for missing source images)."""
    tile = Image.new("RGB", (width, height), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (x1 - x0)) / 2, (height - (y1 - y0)) / 2), text, fill=(80, 80, 80), font=font)
    return np.asarray(tile, dtype=np.uint8).copy()


def label(image: np.ndarray, text: str, height: int = 14) -> np.ndarray:
    """``image`` with a white caption strip of ``text`` above it."""
    strip = Image.new("RGB", (image.shape[1], height), BACKGROUND)
    ImageDraw.Draw(strip).text((2, 1), text, fill=(0, 0, 0), font=ImageFont.load_default())
    return np.concatenate([np.asarray(strip, dtype=np.uint8), image], 0)


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.empty((height, width, 3), np.uint8)
    out[...] = BACKGROUND
    out[:image.shape[0], :image.shape[1]] = image
    return out


def hstack(images: list[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images side by side (top-aligned, padded with white), ``gap`` pixels apart."""
    if not images:
        raise ValueError("hstack needs at least one image")
    height = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(_pad_to(np.zeros((0, 0, 3), np.uint8), height, gap))
        parts.append(_pad_to(im, height, im.shape[1]))
    return np.concatenate(parts, 1)


def grid(rows: list[list[np.ndarray]], gap: int = 6) -> np.ndarray:
    """Rows of images stacked vertically (each row an :func:`hstack`), left-aligned, ``gap`` apart."""
    if not rows:
        raise ValueError("grid needs at least one row")
    lines = [hstack(row, gap) for row in rows]
    width = max(line.shape[1] for line in lines)
    parts = []
    for i, line in enumerate(lines):
        if i:
            parts.append(_pad_to(np.zeros((0, 0, 3), np.uint8), gap, width))
        parts.append(_pad_to(line, line.shape[0], width))
    return np.concatenate(parts, 0)


_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}"
          "th{background:#f3f3f3}img{image-rendering:pixelated}.left{text-align:left}")


def write_html(path: str, title: str, body: str) -> str:
    """Write a small self-contained HTML page (``body`` is trusted HTML built by this package)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                 f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
    return path
