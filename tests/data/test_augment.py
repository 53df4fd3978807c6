"""GpuAugment: batched projective warps, flip semantics, eval identity, reproducibility; the geometry of the
original's one-of rotate / skew / shear (zoomed, no border) and of the compose mode."""
import math

import pytest
import torch

from protokern.data import GpuAugment
from protokern.data.augment import OPS, square_to_quad


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
    aug = GpuAugment(rotate=15, skew=0, shear=0, flip=0, generator=torch.Generator().manual_seed(2), mode="compose")
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
    m = GpuAugment(rotate=15, skew=0, shear=0, flip=0, mode="compose").sample_matrices(16, h, w)
    d = torch.diag(torch.tensor([w / 2, h / 2, 1.0]))
    r = d @ m @ torch.linalg.inv(d)
    assert torch.allclose(r[:, :2, :2] @ r[:, :2, :2].transpose(1, 2), torch.eye(2).expand(16, 2, 2), atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="skew < 0.5"):
        GpuAugment(skew=0.5)
    with pytest.raises(ValueError):
        GpuAugment(padding="wrap")
    with pytest.raises(ValueError, match="mode must be one of"):
        GpuAugment(mode="augmentor")
    with pytest.raises(ValueError, match="shear < 45"):
        GpuAugment(shear=45)  # the edge: tan 45 = 1, the crop empty
    assert GpuAugment(shear=44.9).shear == 44.9
    assert GpuAugment(shear=50, mode="compose").shear == 50
    aug = GpuAugment()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        aug(torch.rand(3, 8, 8))
    with pytest.raises(TypeError):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------- original mode
FRAME = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])


def frame_image(m):
    """Where the output frame's corners sample the input: (B, 4, 2) normalised coordinates."""
    src = torch.einsum("bij,kj->bki", m.double(), FRAME.double())
    return src[..., :2] / src[..., 2:]


def pixel_units(m, h, w):
    d = torch.diag(torch.tensor([w / 2, h / 2, 1.0], dtype=torch.float64))
    return d @ m.double() @ torch.linalg.inv(d)


def assert_inside_and_tight(m):
    """The frame samples only inside the image ([-1, 1]^2: no padded border) and touches its edge (a zoom as
    small as the crop allows, not a needless one)."""
    corners = frame_image(m)
    reach = corners.abs().flatten(1).amax(1)
    assert reach.max() <= 1 + 1e-5
    assert reach.min() >= 1 - 1e-5


def whole_degrees(radians, limit):
    degrees = torch.rad2deg(radians)
    assert torch.allclose(degrees, degrees.round(), atol=1e-3)
    assert degrees.abs().max() <= limit + 1e-3
    return degrees.round().long()


def test_original_is_one_of_with_flip():
    aug = GpuAugment()
    assert aug.mode == "original"
    m, ops = aug.sample(6000, 32, 32, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ops, minlength=3)
    assert ops.min() >= 0 and len(counts) == 3 and ((counts / 6000 - 1 / 3).abs() < 0.03).all()
    assert abs((m[:, 0, 0] * m[:, 1, 1] < 0).float().mean() - 0.5) < 0.03  # the flip, independent of the op
    _, ops = GpuAugment(rotate=0).sample(500, 32, 32)
    assert set(ops.tolist()) == {OPS.index("skew"), OPS.index("shear")}  # disabled transforms are never picked


@pytest.mark.parametrize("h, w", [(32, 32), (20, 50)])
def test_original_rotate_whole_degrees_cropped_to_largest_rectangle(h, w):
    aug = GpuAugment(rotate=15, skew=0, shear=0, flip=0)
    m, ops = aug.sample(3000, h, w, generator=torch.Generator().manual_seed(1))
    assert (ops == OPS.index("rotate")).all()
    a = pixel_units(m, h, w)
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    degrees = whole_degrees(angle, 15)
    assert set(degrees.tolist()) == set(range(-15, 16))
    zoom = torch.linalg.det(a[:, :2, :2]).sqrt()  # rotation times a zoom onto the inner rectangle
    rotation = a[:, :2, :2] / zoom[:, None, None]
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(3000, 2, 2),
                          atol=1e-6)
    assert torch.allclose(a[:, :2, 2], torch.zeros(3000, 2, dtype=torch.float64), atol=1e-6)  # centred
    if h == w:  # a square's largest inner square after rotating by a has side 1 / (cos a + sin |a|)
        expected = 1 / (angle.cos() + angle.sin().abs())
        assert torch.allclose(zoom, expected, atol=1e-5)
    assert_inside_and_tight(m)


def test_original_rotate_limit_not_a_whole_number_is_floored():
    """A limit of 2.6 degrees draws whole degrees in [-2, 2], as Augmentor's randint(-floor, floor) does."""
    aug = GpuAugment(rotate=2.6, skew=0, shear=0, flip=0)
    m, _ = aug.sample(2000, 32, 32, generator=torch.Generator().manual_seed(0))
    a = pixel_units(m, 32, 32)
    assert set(whole_degrees(torch.atan2(a[:, 1, 0], a[:, 0, 0]), 2.6).tolist()) == {-2, -1, 0, 1, 2}


def test_original_flip_is_independent_of_the_shear_axis():
    """The flip and the shear's axis are separate draws: each (flipped, axis) pair about a quarter of the
    shears (0-degree ones, which have no axis, left out)."""
    aug = GpuAugment(rotate=0, skew=0, shear=10, flip=0.5)
    m, _ = aug.sample(4000, 32, 32, generator=torch.Generator().manual_seed(0))
    m = m[(m[:, 0, 1].abs() > 1e-9) | (m[:, 1, 0].abs() > 1e-9)]
    flipped = torch.linalg.det(m[:, :2, :2]) < 0
    along_x = m[:, 0, 1].abs() > 1e-9
    for f in (True, False):
        for x in (True, False):
            assert abs(((flipped == f) & (along_x == x)).float().mean().item() - 0.25) < 0.03, (f, x)


def test_original_shear_whole_degrees_cropped_and_resized():
    h, w = 30, 40
    aug = GpuAugment(rotate=0, skew=0, shear=10, flip=0)
    m, ops = aug.sample(2000, h, w, generator=torch.Generator().manual_seed(2))
    assert (ops == OPS.index("shear")).all()
    a = pixel_units(m, h, w)
    along_x = a[:, 0, 1].abs() > 1e-9
    along_y = a[:, 1, 0].abs() > 1e-9
    assert not (along_x & along_y).any() and 0.4 < along_x.float().mean() < 0.6
    tan = torch.where(along_x, a[:, 0, 1], a[:, 1, 0])
    assert set(whole_degrees(torch.atan(tan), 10).tolist()) == set(range(-10, 11))
    # x shear: rows stay, columns squeezed to the band's covered width W - |tan| H, stretched back to W
    x, y = along_x, along_y
    assert torch.allclose(a[x, 0, 0], 1 - tan[x].abs() * h / w) and torch.allclose(a[x, 1, 1], torch.ones(1).double())
    assert torch.allclose(a[y, 1, 1], 1 - tan[y].abs() * w / h) and torch.allclose(a[y, 0, 0], torch.ones(1).double())
    assert torch.allclose(a[:, :2, 2], torch.zeros(2000, 2, dtype=torch.float64), atol=1e-6)
    assert_inside_and_tight(m[tan.abs() > 1e-6])
    assert torch.allclose(m[tan.abs() <= 1e-6], torch.eye(3).expand(int((tan.abs() <= 1e-6).sum()), 3, 3))


def test_original_skew_pushes_one_or_two_corners_outward():
    side = 50
    aug = GpuAugment(rotate=0, skew=0.2, shear=0, flip=0)
    m, ops = aug.sample(4000, side, side, generator=torch.Generator().manual_seed(3))
    assert (ops == OPS.index("skew")).all()
    # the quad the image's corners land on: the preimage of the image corners under output -> input
    quad = frame_image(torch.linalg.inv(m.double()))
    move = quad - FRAME[:, :2].double()
    pixels = move.abs() * side / 2
    moved = pixels > 1e-4
    assert ((move * FRAME[:, :2].double()) >= -1e-6).all()  # outward only
    assert torch.allclose(pixels[moved], pixels[moved].round(), atol=1e-3)  # whole pixels
    assert pixels.max() <= math.ceil(0.2 * side) + 1e-3 and pixels[moved].min() >= 1 - 1e-3
    count = moved.flatten(1).sum(1)
    assert set(count.tolist()) == {1, 2} and abs((count == 2).float().mean() - 0.75) < 0.03
    two = moved[count == 2]
    axis = two.any(1).float().argmax(1)  # both moves along one axis, by the same amount, on one side
    corners = two.any(2)
    assert (two.sum(1).max(1).values == 2).all()
    sides = {0: [(0, 1), (2, 3)], 1: [(0, 3), (1, 2)]}  # moves along x: top or bottom side; along y: left or right
    for a, c in zip(axis.tolist(), corners.tolist()):
        assert tuple(i for i in range(4) if c[i]) in sides[a]
    amounts = pixels[count == 2].flatten(1)
    nonzero = amounts[amounts > 1e-4].view(-1, 2)
    assert torch.allclose(nonzero[:, 0], nonzero[:, 1], atol=1e-3)
    assert (frame_image(m).abs() <= 1 + 1e-5).all()  # the frame lies inside the quad: a zoom, no border


def test_original_never_shows_a_padded_border():
    ones = torch.ones(256, 3, 40, 40)
    g = torch.Generator().manual_seed(4)
    y = GpuAugment(padding="zeros")(ones, generator=g)
    assert y.min() > 0.2 and y.mean() > 0.995  # at most half a pixel of padding mixes in, at the very edge
    composed = GpuAugment(padding="zeros", mode="compose")(ones, generator=torch.Generator().manual_seed(4))
    assert composed.min() < 0.05  # the composition shows a border (filled by padding)


def test_compose_mode_matches_its_old_stream():
    """The compose mode draws its numbers as before (the demo preset's flips-only runs are unchanged)."""
    aug = GpuAugment(rotate=0, skew=0, shear=0, flip=0.5, mode="compose")
    u = torch.rand(16, 12, generator=torch.Generator().manual_seed(9))
    m = aug.sample_matrices(16, 8, 8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(m[:, 0, 0] < 0, u[:, 3] < 0.5)


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


def test_compose_mode_shear_and_skew_from_its_numbers():
    """Compose mode's shear angle is uniform in [-shear, shear] degrees (along x or y by a coin) and each corner
    moves uniformly in [-skew, skew]: rebuilt from the same random numbers."""
    from protokern.data.augment import _CORNERS

    u = torch.rand(64, 12, generator=torch.Generator().manual_seed(3))
    shear = GpuAugment(rotate=0, skew=0, shear=10, flip=0, mode="compose")
    m = shear.sample_matrices(64, 16, 16, generator=torch.Generator().manual_seed(3))
    tan = torch.tan(math.radians(10) * (2 * u[:, 1] - 1))
    along_x = u[:, 2] < 0.5
    torch.testing.assert_close(m[:, 0, 1], torch.where(along_x, tan, 0.0))
    torch.testing.assert_close(m[:, 1, 0], torch.where(along_x, 0.0, tan))
    assert (tan < 0).any() and (tan > 0).any()
    skew = GpuAugment(rotate=0, skew=0.2, shear=0, flip=0, mode="compose")
    m = skew.sample_matrices(64, 16, 16, generator=torch.Generator().manual_seed(3))
    quad = torch.tensor(_CORNERS) + 0.2 * (2 * u[:, 4:12].view(64, 4, 2) - 1)
    torch.testing.assert_close(m, square_to_quad(quad))
