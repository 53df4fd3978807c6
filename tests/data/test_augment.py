"""GpuAugment: batched projective warps, flip semantics, eval identity, reproducibility."""
import math

import pytest
import torch

from protokern.data import GpuAugment
from protokern.data.augment import square_to_quad


def batch(b=16, h=24, w=24, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, h, w, generator=g).to(device=device, dtype=dtype)


def test_identity_in_eval_and_when_disabled():
    x = batch()
    aug = GpuAugment().eval()
    assert aug(x) is x
    off = GpuAugment(rotate=0, skew=0, shear=0, flip=0)
    assert off.training and off(x) is x
    m = off.sample_matrices(4, 10, 10)
    assert torch.allclose(m, torch.eye(3).expand(4, 3, 3), atol=1e-6)


def test_output_shape_device_dtype_range():
    aug = GpuAugment(generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = batch(6, 20, 28, dtype)
        y = aug(x)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert 0 <= y.float().min() and y.float().max() <= 1  # bilinear + reflection stays in range
        assert not torch.equal(y, x)


def test_flip_only_matches_torch_flip():
    aug = GpuAugment(rotate=0, skew=0, shear=0, flip=0.5)
    x = batch(32)
    m = aug.sample_matrices(32, 24, 24, generator=torch.Generator().manual_seed(5))
    flipped = m[:, 0, 0] < 0
    assert 0 < flipped.sum() < 32
    y = aug(x, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(y[flipped], torch.flip(x[flipped], dims=[-1]), atol=1e-5)
    assert torch.allclose(y[~flipped], x[~flipped], atol=1e-5)


def test_rotation_keeps_centre_pixel():
    aug = GpuAugment(rotate=15, skew=0, shear=0, flip=0, generator=torch.Generator().manual_seed(2))
    x = batch(8, 33, 33)
    y = aug(x)
    assert torch.allclose(y[..., 16, 16], x[..., 16, 16], atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-3)
    m = aug.sample_matrices(64, 33, 33)
    angles = torch.atan2(m[:, 1, 0], m[:, 0, 0]).abs()
    assert angles.max() <= math.radians(15) + 1e-6 and angles.max() > math.radians(10)
    assert torch.allclose(torch.linalg.det(m), torch.ones(64), atol=1e-5)


def test_warp_convention_matches_rot90():
    aug = GpuAugment()
    x = batch(2, 9, 9)
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    assert torch.allclose(aug.warp(x, quarter), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_square_to_quad():
    sq = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    assert torch.allclose(square_to_quad(sq[None]), torch.eye(3)[None], atol=1e-6)
    quad = sq + torch.tensor([[0.1, -0.2], [0.05, 0.1], [-0.15, 0.0], [0.2, 0.1]])
    h = square_to_quad(quad[None])[0]
    mapped = torch.cat([sq, torch.ones(4, 1)], 1) @ h.T
    assert torch.allclose(mapped[:, :2] / mapped[:, 2:], quad, atol=1e-5)


def test_reproducible_with_generator():
    x = batch()
    a = GpuAugment(generator=torch.Generator().manual_seed(7))(x)
    b = GpuAugment(generator=torch.Generator().manual_seed(7))(x)
    c = GpuAugment(generator=torch.Generator().manual_seed(8))(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    aug = GpuAugment()
    assert torch.equal(aug(x, generator=torch.Generator().manual_seed(7)), a)
    # one transform per image: images of the batch get different matrices
    m = aug.sample_matrices(8, 24, 24, generator=torch.Generator().manual_seed(0))
    assert (m[1:] - m[:1]).abs().flatten(1).amax(1).min() > 1e-3


def test_non_square_rotation_is_rigid():
    """In pixel units a rotation-only matrix is orthogonal, also for H != W."""
    h, w = 20, 50
    m = GpuAugment(rotate=15, skew=0, shear=0, flip=0).sample_matrices(16, h, w)
    d = torch.diag(torch.tensor([w / 2, h / 2, 1.0]))
    r = d @ m @ torch.linalg.inv(d)
    assert torch.allclose(r[:, :2, :2] @ r[:, :2, :2].transpose(1, 2), torch.eye(2).expand(16, 2, 2), atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError):
        GpuAugment(skew=0.7)
    with pytest.raises(ValueError):
        GpuAugment(padding="wrap")
    aug = GpuAugment()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        aug(torch.rand(3, 8, 8))
    with pytest.raises(TypeError):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda(dtype):
    x = batch(8, 32, 32, dtype, "cuda")
    aug = GpuAugment()
    y = aug(x, generator=torch.Generator("cuda").manual_seed(3))
    assert y.device == x.device and y.dtype == dtype and y.shape == x.shape
    y2 = aug(x, generator=torch.Generator("cuda").manual_seed(3))
    assert torch.equal(y, y2)
    # a CPU generator drives a CUDA batch identically to the CPU path
    y_cpu = aug(x.float().cpu(), generator=torch.Generator().manual_seed(4))
    y_gpu = aug(x.float(), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4)
