"""SyntheticParts: an embedded, file-free dataset whose only class cue is one small part.

Every image has a label-independent textured background (smooth noise, stripes or blobs) and a
few label-independent distractor shapes. The class is carried by one "part": a shape drawn in a
colour, where the (shape, colour) pair is unique to the class. Classes are laid out on a small
shape x colour grid, so most classes share their shape with another class and their colour with
another, and distractors use the remaining (shape, colour) pairs (other classes' shapes in other
colours, other classes' colours on other shapes). Neither colour nor shape alone names the class:
a model has to find the part. Its ground-truth box is ``dataset.boxes``.

Objects are placed in distinct cells of a jittered grid, so they never overlap, and all objects
(part and distractors) share the same size distribution, so size is no cue either.

Generation is vectorised in torch, in fixed chunks of images, each chunk from its own generator
seeded by ``(seed, split stream, chunk index)``; image ``i`` therefore depends only on
``(seed, split, i)`` and the geometry/class settings, not on how many images the dataset holds.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .transforms import uint8_to_float

__all__ = ["SyntheticParts", "SHAPES", "COLOURS"]

SHAPES = ("square", "disc", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
}
_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES], dtype=torch.float32)

_CHUNK = 128  # images per generator; fixed so image i never depends on the dataset length
_SPLIT_STREAMS = {"train": 0, "push": 0, "test": 1}  # push = the train images, unaugmented
_MAX_CLASSES = len(SHAPES) * len(COLOURS) - 6  # keep >= 6 (shape, colour) pairs for distractors


def _shape_fn(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mask of shape ``SHAPES[k]`` in box coordinates u, v in [-1, 1] (pixel centres)."""
    au, av = u.abs(), v.abs()
    name = SHAPES[k]
    if name == "square":
        return (au <= 0.85) & (av <= 0.85)
    if name == "disc":
        return u * u + v * v <= 1.0
    if name == "triangle":  # apex up, base at the bottom
        return (v >= -0.9) & (v <= 0.9) & (au <= (v + 0.9) / 1.8)
    if name == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 >= 0.55**2) & (r2 <= 1.0)
    if name == "diamond":
        return au + av <= 1.0
    raise AssertionError(name)


def _masks_on(xs: torch.Tensor, ys: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor,
              size: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Masks (..., len(ys), len(xs)) of objects sampled at pixel columns xs / rows ys (..., n).

    A pixel belongs to an object when its centre does; shape -1 draws nothing.
    """
    half = (size / 2).unsqueeze(-1)
    u = ((xs.float() + 0.5 - (x0.unsqueeze(-1) + half)) / half).unsqueeze(-2)  # (..., 1, W)
    v = ((ys.float() + 0.5 - (y0.unsqueeze(-1) + half)) / half).unsqueeze(-1)  # (..., H, 1)
    out = torch.zeros(shape.shape + (ys.shape[-1], xs.shape[-1]), dtype=torch.bool)
    for k in range(len(SHAPES)):
        sel = shape == k
        if sel.any():
            out[sel] = _shape_fn(k, u[sel], v[sel])
    return out


def object_masks(x0: torch.Tensor, y0: torch.Tensor, size: torch.Tensor, shape: torch.Tensor,
                 image_size: int) -> torch.Tensor:
    """Boolean masks (..., S, S) of objects with top-left (x0, y0), side ``size`` and shape index.

    Every mask pixel lies in the box ``(x0, y0, x0 + size, y0 + size)`` (pixel centres).
    """
    pix = torch.arange(image_size).expand(shape.shape + (image_size,))
    return _masks_on(pix, pix, x0, y0, size, shape)


def _class_parts(num_classes: int) -> list[tuple[int, int]]:
    """(shape, colour) index pairs of the classes, filled diagonally on an n x n block.

    The diagonal order makes classes share shapes and colours with each other as early as possible.
    """
    n = max(2, math.ceil(math.sqrt(num_classes)))
    pairs = [(s, (s + d) % n) for d in range(n) for s in range(n)]
    return pairs[:num_classes]


class SyntheticParts(Dataset):
    """Synthetic classification dataset whose label is carried by one small, located part.

    Args:
        num_classes: number of classes (2 to 30).
        images_per_class: images of each class; the dataset holds ``num_classes * images_per_class``
            images, labels interleaved (``label = index % num_classes``), so classes are balanced.
        image_size: side S of the square images.
        split: "train", "test" or "push". "push" returns exactly the train images (the original's
            push set is the unaugmented train set; augmentation here is online, see GpuAugment).
        seed: non-negative int; same (seed, split, index) and settings -> same image.
        part_size: side of the part (and distractor) boxes in pixels; default ``image_size // 4``.
            Objects are drawn at 85-100% of it.
        distractors: (min, max) number of distractor shapes per image (capped by the free cells
            of the placement grid, ``(image_size // (1.2 * part_size))**2 - 1``).

    Items are ``(image, label)``: float32 (3, S, S) in [0, 1] and an int. Attributes: ``classes``
    (names like "red square"), ``class_parts`` ((shape, colour) names), ``targets`` (list of ints),
    ``boxes`` ((N, 4) float32 part boxes, (x0, y0, x1, y1) in pixels; ``box_kind = "part"``). :meth:`part_mask`
    gives the part's exact pixels and :meth:`objects` every object of an image.
    """

    box_kind = "part"

    def __init__(self, num_classes: int = 10, images_per_class: int = 60, image_size: int = 64,
                 split: str = "train", seed: int = 0, part_size: int | None = None,
                 distractors: tuple[int, int] = (2, 4)):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
        if not 2 <= num_classes <= _MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {_MAX_CLASSES}], got {num_classes}")
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if not (isinstance(seed, numbers.Integral) and seed >= 0):
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        part_size = image_size // 4 if part_size is None else int(part_size)
        grid = int(image_size // (part_size * 1.2)) if part_size >= 4 else 0
        if grid < 2:
            raise ValueError(f"part_size must be in [4, image_size / 2.4], got {part_size} "
                             f"for image_size {image_size}")
        dmin, dmax = (int(d) for d in distractors)
        if not 0 <= dmin <= dmax:
            raise ValueError(f"distractors must be (min, max) with 0 <= min <= max, got {distractors}")
        dmax = min(dmax, grid * grid - 1)
        dmin = min(dmin, dmax)

        self.num_classes = num_classes
        self.image_size = image_size
        self.part_size = part_size
        self.split = split
        self.seed = int(seed)
        self._grid = grid
        self._distractors = (dmin, dmax)

        parts = _class_parts(num_classes)
        self.class_parts = [(SHAPES[s], _COLOUR_NAMES[c]) for s, c in parts]
        self.classes = [f"{c} {s}" for s, c in self.class_parts]
        # Distractors: every (shape, colour) pair that is no class's part. Half of them (in
        # expectation) are the most confusing ones: a class shape in another class's colour.
        taken = set(parts)
        free = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if (s, c) not in taken]
        class_shapes, class_colours = {s for s, _ in parts}, {c for _, c in parts}
        hard = torch.tensor([s in class_shapes and c in class_colours for s, c in free])
        weights = torch.ones(len(free))
        if hard.any() and not hard.all():
            weights = torch.where(hard, 0.5 / hard.sum(), 0.5 / (~hard).sum())
        self._distractor_pairs = torch.tensor(free)
        self._distractor_weights = weights.unsqueeze(0)
        self._class_pairs = torch.tensor(parts)

        n = num_classes * images_per_class
        self.targets = [i % num_classes for i in range(n)]
        images, shapes, colours, boxes, active = [], [], [], [], []
        stream = _SPLIT_STREAMS[split]
        # Many small ops: one thread is as fast on an idle machine and far faster on a busy one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for chunk, start in enumerate(range(0, n, _CHUNK)):
                out = self._render_chunk(stream, chunk, min(_CHUNK, n - start))
                for lst, val in zip((images, shapes, colours, boxes, active), out):
                    lst.append(val)
        finally:
            torch.set_num_threads(threads)
        self._images = torch.cat(images)  # uint8 (N, 3, S, S)
        self._obj_shape = torch.cat(shapes)  # (N, K) int64, object 0 is the part
        self._obj_colour = torch.cat(colours)  # (N, K)
        self._obj_box = torch.cat(boxes)  # (N, K, 4)
        self._obj_active = torch.cat(active)  # (N, K) bool
        self.boxes = self._obj_box[:, 0].clone()

    # ------------------------------------------------------------------ generation
    def _generator(self, stream: int, chunk: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, stream, chunk]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def _background(self, g: torch.Generator, count: int) -> torch.Tensor:
        """Label-free textured backgrounds (count, 3, S, S); random draws cover a full chunk."""
        S, B = self.image_size, _CHUNK
        kind = torch.randint(0, 3, (B,), generator=g)[:count]
        grey = 0.3 + 0.4 * torch.rand(B, 1, generator=g)
        tint = (grey + 0.12 * (torch.rand(B, 3, generator=g) - 0.5))[:count]
        contrast = (0.10 + 0.15 * torch.rand(B, generator=g))[:count]
        coarse = torch.rand(B, 1, 5, 5, generator=g) * 2 - 1
        fine = torch.rand(B, 1, 13, 13, generator=g) * 2 - 1
        freq = 2 + 6 * torch.rand(B, generator=g)
        angle = math.pi * torch.rand(B, generator=g)
        phase = 2 * math.pi * torch.rand(B, generator=g)
        blob_c = S * torch.rand(B, 4, 2, generator=g)
        blob_s = S * (0.06 + 0.14 * torch.rand(B, 4, generator=g))
        blob_sign = torch.where(torch.rand(B, 4, generator=g) < 0.5, -1.0, 1.0)

        pos = torch.arange(S, dtype=torch.float32) + 0.5
        yy, xx = pos.view(1, S, 1), pos.view(1, 1, S)
        texture = torch.empty(count, S, S)
        k = (kind == 0).nonzero().flatten()  # smooth noise, two octaves
        up = dict(size=(S, S), mode="bicubic", align_corners=False)
        texture[k] = (0.6 * F.interpolate(coarse[k], **up) + 0.4 * F.interpolate(fine[k], **up))[:, 0]
        k = (kind == 1).nonzero().flatten()  # stripes
        proj = (xx * angle[k].cos().view(-1, 1, 1) + yy * angle[k].sin().view(-1, 1, 1)) / S
        texture[k] = torch.sin(2 * math.pi * freq[k].view(-1, 1, 1) * proj + phase[k].view(-1, 1, 1))
        k = (kind == 2).nonzero().flatten()  # signed gaussian blobs
        d2 = ((xx.unsqueeze(1) - blob_c[k, :, 0].view(-1, 4, 1, 1)) ** 2
              + (yy.unsqueeze(1) - blob_c[k, :, 1].view(-1, 4, 1, 1)) ** 2)
        blobs = blob_sign[k].view(-1, 4, 1, 1) * torch.exp(-d2 / (2 * blob_s[k].view(-1, 4, 1, 1) ** 2))
        texture[k] = blobs.sum(1)
        texture = texture.clamp_(-1, 1).unsqueeze(1)
        return tint.view(-1, 3, 1, 1) + contrast.view(-1, 1, 1, 1) * texture

    def _render_chunk(self, stream: int, chunk: int, count: int):
        g = self._generator(stream, chunk)
        S, B, grid = self.image_size, _CHUNK, self._grid
        dmin, dmax = self._distractors
        K = 1 + dmax
        cell = S / grid
        image = self._background(g, count)

        # Object layout: distinct grid cells, jittered inside the cell; object 0 is the part.
        cells = torch.rand(B, grid * grid, generator=g).argsort(dim=1)[:count, :K]
        size = self.part_size * (0.85 + 0.15 * torch.rand(B, K, generator=g))[:count]
        jitter = torch.rand(B, K, 2, generator=g)[:count]
        x0 = (cells % grid) * cell + jitter[..., 0] * (cell - size)
        y0 = torch.div(cells, grid, rounding_mode="floor") * cell + jitter[..., 1] * (cell - size)
        n_distractors = torch.randint(dmin, dmax + 1, (B,), generator=g)[:count]
        weights = self._distractor_weights.expand(B, -1)
        pick = torch.multinomial(weights, K, replacement=True, generator=g)[:count]
        brightness = (0.8 + 0.2 * torch.rand(B, K, generator=g))[:count]
        pixel_noise = (torch.rand(B, 3, S, S, generator=g)[:count] - 0.5) * 0.1

        labels = (torch.arange(count) + chunk * _CHUNK) % self.num_classes
        pairs = self._distractor_pairs[pick]  # (count, K, 2)
        pairs[:, 0] = self._class_pairs[labels]
        shape, colour = pairs[..., 0], pairs[..., 1]
        active = torch.arange(K) <= n_distractors.unsqueeze(1)

        # Draw each object on a small patch around its box, then paste the patch's pixels.
        P = math.ceil(self.part_size) + 2
        ox, oy = x0.floor().long(), y0.floor().long()
        xs = (ox.unsqueeze(-1) + torch.arange(P)).clamp_(max=S - 1)  # (count, K, P)
        ys = (oy.unsqueeze(-1) + torch.arange(P)).clamp_(max=S - 1)
        masks = _masks_on(xs, ys, x0, y0, size, torch.where(active, shape, -1))  # (count, K, P, P)
        flat = (ys.unsqueeze(-1) * S + xs.unsqueeze(-2)).flatten(2)  # (count, K, P*P)
        rgb = _PALETTE[colour] * brightness.unsqueeze(-1)  # (count, K, 3)
        image = image.flatten(2)
        for j in list(range(1, K)) + [0]:  # the part last (objects never overlap anyway)
            idx = flat[:, j].unsqueeze(1).expand(-1, 3, -1)
            old = image.gather(2, idx)
            new = torch.where(masks[:, j].flatten(1).unsqueeze(1), rgb[:, j].unsqueeze(-1), old)
            image.scatter_(2, idx, new)
        image = (image.view(count, 3, S, S) + pixel_noise).clamp_(0, 1)
        image = image.mul_(255).round_().to(torch.uint8)
        boxes = torch.stack([x0, y0, x0 + size, y0 + size], -1)
        return image, shape, colour, boxes, active

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self._images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return uint8_to_float(self._images[index]), self.targets[index]

    def part_mask(self, index: int) -> torch.Tensor:
        """Boolean (S, S) mask of the pixels drawn for the part of image ``index``."""
        box = self._obj_box[index, 0]
        return object_masks(box[0:1], box[1:2], box[2:3] - box[0:1],
                            self._obj_shape[index, 0:1], self.image_size)[0]

    def objects(self, index: int) -> list[dict]:
        """Every object drawn in image ``index``: dicts with "shape", "colour", "box", "is_part"."""
        out = []
        for j in range(self._obj_shape.shape[1]):
            if self._obj_active[index, j]:
                out.append({
                    "shape": SHAPES[int(self._obj_shape[index, j])],
                    "colour": _COLOUR_NAMES[int(self._obj_colour[index, j])],
                    "box": self._obj_box[index, j].tolist(),
                    "is_part": j == 0,
                })
        return out

    def __repr__(self) -> str:
        return (f"SyntheticParts(num_classes={self.num_classes}, n={len(self)}, "
                f"image_size={self.image_size}, part_size={self.part_size}, split={self.split!r}, "
                f"seed={self.seed})")
