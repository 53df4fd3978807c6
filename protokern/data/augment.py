"""GpuAugment: the paper's augmentation, online and batched on the batch's own device.

The original ProtoPNet augmented CUB offline with Augmentor: three pipelines (rotate +-15 deg,
perspective skew magnitude 0.2, shear +-10 deg), each followed by a 50% left-right flip, each run
10 times over the training set, so every stored copy had ONE of the three transforms. Augmentor
crops after rotating and shearing and its skew pushes corners outward, so no padded border ever
appears: each transform is also a zoom.

Two modes, each drawing every image's own random transform, composed into one 3x3 projective
matrix, and warping the whole batch with a single ``F.grid_sample`` call (no Python loop):

- ``"original"``: Augmentor's semantics. Each image gets one of rotate / skew / shear (uniformly
  among the enabled ones) and the flip:

  * rotate: a whole-degree angle in [-rotate, rotate], then the largest centred rectangle of the
    image's aspect ratio inside the rotated image, resized back to the full image (a zoom by
    ``cos a + (h/w or w/h) sin a``);
  * skew: Augmentor's ``skew(magnitude)`` with ``skew_type="RANDOM"``: with probability 3/4 both
    corners of one side (of 4), else one corner along one of its edges (of 8), pushed outward by
    1 .. ceil(magnitude * max(H, W)) whole pixels; the image is warped so its corners land on the
    pushed quad, which contains the frame (a perspective zoom);
  * shear: a whole-degree angle in [-shear, shear] along x or y; the sheared band is cropped to
    the centred rectangle it fully covers (``W - |tan a| H`` wide for an x shear) and resized back.

- ``"compose"``: every image gets a uniform random rotation, skew (every corner moved in both
  directions by up to ``skew`` half-sides), shear (x or y) and flip, all composed; borders are
  filled by ``padding``.

Matrices act on normalised coordinates (``align_corners=False``: -1 and 1 are the outer edges of
the border pixels, 0 the image centre) and map each output location to the input location it
samples. Rotation and shear are applied in pixel-proportional units, so non-square images are
rotated without distortion.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GpuAugment", "MODES", "OPS", "square_to_quad"]

_PADDINGS = ("reflection", "border", "zeros")
MODES = ("original", "compose")
"""Augmentation modes of :class:`GpuAugment`."""
OPS = ("rotate", "skew", "shear")
"""The one-of transforms of the ``"original"`` mode, in the order of :meth:`GpuAugment.sample`'s op codes."""

_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))  # top-left, top-right, bottom-right, bottom-left
# Augmentor's skew choices as (corner, axis) moves (axis 0: x, 1: y), every move outward: the four tilts
# (left side up/down, right side up/down, top side left/right, bottom side left/right), then the 8 corners
_TILTS = (((0, 1), (3, 1)), ((1, 1), (2, 1)), ((0, 0), (1, 0)), ((2, 0), (3, 0)))
_SKEW_MOVES = _TILTS + tuple(((c, a),) for c in range(4) for a in range(2))


def square_to_quad(quad: torch.Tensor) -> torch.Tensor:
    """Homographies (B, 3, 3) taking the square [-1, 1]^2 to quads (B, 4, 2).

    Corners are matched in the order (-1, -1), (1, -1), (1, 1), (-1, 1). Closed form
    (Heckbert's unit square to quad, composed with [-1, 1] -> [0, 1]); no linear solve.
    """
    x0, y0 = quad[:, 0, 0], quad[:, 0, 1]
    x1, y1 = quad[:, 1, 0], quad[:, 1, 1]
    x2, y2 = quad[:, 2, 0], quad[:, 2, 1]
    x3, y3 = quad[:, 3, 0], quad[:, 3, 1]
    dx1, dx2, dy1, dy2 = x1 - x2, x3 - x2, y1 - y2, y3 - y2
    sx, sy = x0 - x1 + x2 - x3, y0 - y1 + y2 - y3
    den = dx1 * dy2 - dx2 * dy1
    g = (sx * dy2 - dx2 * sy) / den
    h = (dx1 * sy - sx * dy1) / den
    one = torch.ones_like(g)
    unit = torch.stack([
        torch.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0], -1),
        torch.stack([y1 - y0 + g * y1, y3 - y0 + h * y3, y0], -1),
        torch.stack([g, h, one], -1),
    ], -2)
    to_unit = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]],
                           dtype=quad.dtype, device=quad.device)
    return unit @ to_unit


def _skew_masks(device) -> torch.Tensor:
    """(12, 4, 2) float masks of the corner coordinates each skew choice moves (4 tilts, then 8 corners)."""
    masks = torch.zeros(len(_SKEW_MOVES), 4, 2)
    for i, moves in enumerate(_SKEW_MOVES):
        for corner, axis in moves:
            masks[i, corner, axis] = 1.0
    return masks.to(device)


class GpuAugment(nn.Module):
    """Random rotation, perspective skew, shear and left-right flip of a batch, one warp per image.

    Args:
        rotate: maximum rotation in degrees (``original``: whole degrees in [-rotate, rotate];
            ``compose``: ~ U(-rotate, rotate)).
        skew: perspective skew magnitude in [0, 0.5) (``original``: corners pushed outward by up to
            ``skew * max(H, W)`` pixels; ``compose``: each corner's source point moves by
            U(-skew, skew) times half the image side, independently in x and y).
        shear: maximum shear angle in degrees, along x or y (chosen at random); ``original``:
            whole degrees, below 45.
        flip: probability of a left-right flip.
        padding: grid_sample padding, "reflection" (default), "border" or "zeros" (``original`` samples
            inside the image: padding reaches at most half a pixel at the edges).
        generator: optional torch.Generator used for the random parameters (on its own device;
            the parameters are then moved to the batch's device). A generator passed to
            ``forward`` takes precedence.
        mode: ``"original"`` (default: one of rotate / skew / shear, zoomed, no border, as the
            original's Augmentor pipelines) or ``"compose"`` (all of them on every image); see the
            module docstring.

    ``forward(x)`` takes (B, C, H, W) floating tensors (float32, float16, bfloat16, on any device)
    and returns the same shape, dtype and device. It is the identity in ``eval()`` mode. The warp
    is computed in float32. :meth:`sample` (or :meth:`sample_matrices`) and :meth:`warp` expose the
    two steps.
    """

    def __init__(self, rotate: float = 15.0, skew: float = 0.2, shear: float = 10.0,
                 flip: float = 0.5, padding: str = "reflection",
                 generator: torch.Generator | None = None, mode: str = "original"):
        super().__init__()
        if rotate < 0 or not 0 <= skew < 0.5 or not 0 <= shear < 90 or not 0 <= flip <= 1:
            raise ValueError("need rotate >= 0, 0 <= skew < 0.5, 0 <= shear < 90, 0 <= flip <= 1; got "
                             f"rotate={rotate}, skew={skew}, shear={shear}, flip={flip}")
        if padding not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "original" and shear >= 45:
            raise ValueError(f"mode 'original' needs shear < 45 degrees (the crop would be empty), got {shear}")
        self.rotate, self.skew, self.shear, self.flip = float(rotate), float(skew), float(shear), float(flip)
        self.padding = padding
        self.generator = generator
        self.mode = mode

    @property
    def is_identity(self) -> bool:
        """True when every transform is disabled."""
        return self.rotate == 0 and self.skew == 0 and self.shear == 0 and self.flip == 0

    def sample_matrices(self, batch: int, height: int, width: int,
                        device: torch.device | str | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Random float32 (batch, 3, 3) matrices, output -> input normalised coordinates (see :meth:`sample`)."""
        return self.sample(batch, height, width, device=device, generator=generator)[0]

    def sample(self, batch: int, height: int, width: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ``(matrices, ops)``: float32 (batch, 3, 3) output -> input matrices in normalised
        coordinates, and int64 (batch,) codes of the transform each image got (index into :data:`OPS`;
        -1 for none, and always -1 in ``compose`` mode, where every image gets all of them).

        All random numbers come from one ``torch.rand`` call on the generator's device (or on
        ``device`` with the default generator), so a seeded generator reproduces the matrices.
        """
        generator = generator if generator is not None else self.generator
        device = torch.device(device) if device is not None else torch.device("cpu")
        draw_device = generator.device if generator is not None else device
        u = torch.rand(batch, 12, generator=generator, device=draw_device).to(device)
        flip = torch.eye(3, device=device).repeat(batch, 1, 1)
        flip[:, 0, 0] = torch.where(u[:, 3] < self.flip, -1.0, 1.0)
        if self.mode == "compose":
            ops = torch.full((batch,), -1, dtype=torch.int64, device=device)
            return self._compose(u, height, width, device) @ flip, ops
        matrices, ops = self._one_of(u, height, width, device)
        return matrices @ flip, ops

    def _compose(self, u: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
        batch = u.shape[0]
        eye = torch.eye(3, device=device).expand(batch, 3, 3)
        angle = math.radians(self.rotate) * (2 * u[:, 0] - 1)
        cos, sin = angle.cos(), angle.sin()
        rot = eye.clone()
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
        tan = torch.tan(math.radians(self.shear) * (2 * u[:, 1] - 1))
        along_x = u[:, 2] < 0.5
        shear = eye.clone()
        shear[:, 0, 1] = torch.where(along_x, tan, torch.zeros_like(tan))
        shear[:, 1, 0] = torch.where(along_x, torch.zeros_like(tan), tan)
        # rotation and shear in pixel-proportional units: D^-1 A D with D = diag(W/2, H/2, 1)
        affine = _to_normalised(shear @ rot, height, width)
        corners = torch.tensor(_CORNERS, device=device)
        quad = corners + self.skew * (2 * u[:, 4:12].view(batch, 4, 2) - 1)
        return square_to_quad(quad) @ affine

    def _one_of(self, u: torch.Tensor, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = u.shape[0]
        h, w = float(height), float(width)
        eye = torch.eye(3, device=device).repeat(batch, 1, 1)
        enabled = [i for i, amount in enumerate((self.rotate, self.skew, self.shear)) if amount > 0]
        if not enabled:
            return eye, torch.full((batch,), -1, dtype=torch.int64, device=device)
        choice = (u[:, 0] * len(enabled)).long().clamp_max(len(enabled) - 1)
        ops = torch.tensor(enabled, device=device)[choice]

        def whole_degrees(v, limit):  # uniform over the integers in [-limit, limit]
            n = math.floor(limit)
            return ((v * (2 * n + 1)).floor().clamp_max(2 * n) - n) * (math.pi / 180)

        # rotate, then zoom onto the largest centred rectangle of the image's aspect ratio inside it
        angle = whole_degrees(u[:, 1], self.rotate)
        cos, sin = angle.cos(), angle.sin()
        zoom = torch.minimum(w / (w * cos + h * sin.abs()), h / (w * sin.abs() + h * cos))
        rot = eye.clone()
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos * zoom, -sin * zoom, sin * zoom, cos * zoom

        # shear along x (or y), then crop the band's fully covered centred rectangle and resize it back
        tan = torch.tan(whole_degrees(u[:, 2], self.shear))
        along_x = u[:, 4] < 0.5
        shear = eye.clone()
        shear[:, 0, 1] = torch.where(along_x, tan, 0.0)
        shear[:, 0, 0] = torch.where(along_x, 1 - tan.abs() * h / w, 1.0)
        shear[:, 1, 0] = torch.where(along_x, 0.0, tan)
        shear[:, 1, 1] = torch.where(along_x, 1.0, 1 - tan.abs() * w / h)

        # skew: the image's corners go to a quad with one side's two corners (or one corner) pushed outward
        most = math.ceil(self.skew * max(h, w))
        pixels = 1 + (u[:, 5] * most).floor().clamp_max(most - 1)
        kind = torch.where(u[:, 6] < 0.75, (u[:, 7] * 4).long().clamp_max(3),
                           4 + (u[:, 7] * 8).long().clamp_max(7))
        corners = torch.tensor(_CORNERS, device=device)
        step = torch.stack([2 * pixels / w, 2 * pixels / h], -1)  # (B, 2) in normalised units
        quad = corners + corners * _skew_masks(device)[kind] * step[:, None, :]
        skew = torch.linalg.inv_ex(square_to_quad(quad))[0]  # the quad onto the image (no host sync)

        matrices = torch.stack([_to_normalised(rot, height, width), skew,
                                _to_normalised(shear, height, width)])  # (3, B, 3, 3)
        return matrices[ops, torch.arange(batch, device=device)], ops

    def warp(self, x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """Warp (B, C, H, W) ``x`` by (B, 3, 3) output->input matrices with one grid_sample."""
        if x.dim() != 4:
            raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point batch, got {x.dtype}")
        b, _, h, w = x.shape
        if matrices.shape != (b, 3, 3):
            raise ValueError(f"expected matrices of shape {(b, 3, 3)}, got {tuple(matrices.shape)}")
        m = matrices.to(device=x.device, dtype=torch.float32)
        xs = (2 * torch.arange(w, device=x.device, dtype=torch.float32) + 1) / w - 1
        ys = (2 * torch.arange(h, device=x.device, dtype=torch.float32) + 1) / h - 1
        ones = torch.ones(h, w, device=x.device)
        base = torch.stack([xs.expand(h, w), ys.view(h, 1).expand(h, w), ones], -1)
        src = torch.einsum("bij,hwj->bhwi", m, base)
        denom = src[..., 2:]
        denom = torch.where(denom.abs() < 1e-6, torch.full_like(denom, 1e-6), denom)
        grid = src[..., :2] / denom
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=self.padding,
                            align_corners=False)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch ``x`` (B, C, H, W) augmented, one draw per image from ``generator``; unchanged in eval
        mode or when no augmentation is on."""
        if not self.training or self.is_identity:
            return x
        m = self.sample_matrices(x.shape[0], x.shape[-2], x.shape[-1], device=x.device,
                                 generator=generator)
        return self.warp(x, m)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, rotate={self.rotate}, skew={self.skew}, shear={self.shear}, "
                f"flip={self.flip}, padding={self.padding!r}")


def _to_normalised(pixel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Matrices acting on centred pixel coordinates -> normalised ones: D^-1 A D, D = diag(W/2, H/2, 1)."""
    scale = torch.tensor([width / 2, height / 2, 1.0], device=pixel.device)
    return pixel * scale.view(1, 1, 3) / scale.view(1, 3, 1)
