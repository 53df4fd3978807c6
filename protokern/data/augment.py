"""GpuAugment: the paper's augmentation, online and batched on the batch's own device.

The original ProtoPNet augmented CUB offline with Augmentor (rotate +-15 deg, perspective skew
magnitude 0.2, shear +-10 deg, each with a 50% left-right flip). Here every image of a batch gets
its own random rotation, skew, shear and flip, composed into one 3x3 projective matrix, and the
whole batch is warped by a single ``F.grid_sample`` call: no Python loop over images.

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

__all__ = ["GpuAugment", "square_to_quad"]

_PADDINGS = ("reflection", "border", "zeros")


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


class GpuAugment(nn.Module):
    """Random rotation, perspective skew, shear and left-right flip of a batch, one warp per image.

    Args:
        rotate: maximum rotation in degrees; angle ~ U(-rotate, rotate).
        skew: perspective skew magnitude in [0, 0.5); each image corner's source point moves by
            U(-skew, skew) times half the image side, independently in x and y.
        shear: maximum shear angle in degrees, ~ U(-shear, shear), along x or y (chosen at random).
        flip: probability of a left-right flip.
        padding: grid_sample padding, "reflection" (default), "border" or "zeros".
        generator: optional torch.Generator used for the random parameters (on its own device;
            the parameters are then moved to the batch's device). A generator passed to
            ``forward`` takes precedence.

    ``forward(x)`` takes (B, C, H, W) floating tensors (float32, float16, bfloat16, on any device)
    and returns the same shape, dtype and device. It is the identity in ``eval()`` mode. The warp
    is computed in float32. :meth:`sample_matrices` and :meth:`warp` expose the two steps.
    """

    def __init__(self, rotate: float = 15.0, skew: float = 0.2, shear: float = 10.0,
                 flip: float = 0.5, padding: str = "reflection",
                 generator: torch.Generator | None = None):
        super().__init__()
        if rotate < 0 or not 0 <= skew < 0.5 or not 0 <= shear < 90 or not 0 <= flip <= 1:
            raise ValueError("need rotate >= 0, 0 <= skew < 0.5, 0 <= shear < 90, 0 <= flip <= 1; got "
                             f"rotate={rotate}, skew={skew}, shear={shear}, flip={flip}")
        if padding not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
        self.rotate, self.skew, self.shear, self.flip = float(rotate), float(skew), float(shear), float(flip)
        self.padding = padding
        self.generator = generator

    @property
    def is_identity(self) -> bool:
        """True when every transform is disabled."""
        return self.rotate == 0 and self.skew == 0 and self.shear == 0 and self.flip == 0

    def sample_matrices(self, batch: int, height: int, width: int,
                        device: torch.device | str | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Random float32 (batch, 3, 3) matrices, output -> input normalised coordinates.

        All random numbers come from one ``torch.rand`` call on the generator's device (or on
        ``device`` with the default generator), so a seeded generator reproduces the matrices.
        """
        generator = generator if generator is not None else self.generator
        device = torch.device(device) if device is not None else torch.device("cpu")
        draw_device = generator.device if generator is not None else device
        u = torch.rand(batch, 12, generator=generator, device=draw_device).to(device)

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
        scale = torch.tensor([width / 2, height / 2, 1.0], device=device)
        affine = (shear @ rot) * scale.view(1, 1, 3) / scale.view(1, 3, 1)
        flip = eye.clone()
        flip[:, 0, 0] = torch.where(u[:, 3] < self.flip, -1.0, 1.0)
        corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], device=device)
        quad = corners + self.skew * (2 * u[:, 4:12].view(batch, 4, 2) - 1)
        return square_to_quad(quad) @ affine @ flip

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
        if not self.training or self.is_identity:
            return x
        m = self.sample_matrices(x.shape[0], x.shape[-2], x.shape[-1], device=x.device,
                                 generator=generator)
        return self.warp(x, m)

    def extra_repr(self) -> str:
        return (f"rotate={self.rotate}, skew={self.skew}, shear={self.shear}, flip={self.flip}, "
                f"padding={self.padding!r}")
