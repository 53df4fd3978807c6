import functools
import warnings

import pytest
import torch
from torch import nn

from protokern.models import BACKBONES, compute_receptive_field, make_add_on, make_backbone, patch_box
from protokern.models.receptive_field import LayerGeometry, backbone_receptive_field, layer_geometry

from .original import original_layer_lists, original_rf_box, original_rf_info


@functools.lru_cache(maxsize=None)
def _rf(name):
    return backbone_receptive_field(name)


def _influence_box(net, img, h, w):
    """Bounding box (y0, y1, x0, x1) of the input pixels whose gradient reaches output cell (h, w)."""
    x = torch.randn(1, 3, img, img, dtype=torch.float64, requires_grad=True)
    net(x)[0, :, h, w].sum().backward()
    ys, xs = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _inside(inner, outer):
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def test_box_is_tight_for_a_plain_conv_stack():
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 2, stride=2),
        nn.Conv2d(4, 4, 5, stride=1, padding=2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, dilation=2),
        nn.Conv2d(4, 4, 3, stride=1, padding=0),
        nn.Conv2d(4, 4, 1),
    ).double()
    rf = compute_receptive_field(net)
    img = 41
    n = rf.output_size(img)
    assert n == net(torch.zeros(1, 3, img, img, dtype=torch.float64)).shape[-1]
    for h, w in [(0, 0), (0, n - 1), (n // 2, n // 2), (n - 1, 1), (n - 1, n - 1)]:
        assert _influence_box(net, img, h, w) == patch_box(rf, img, h, w), (h, w)


def test_box_contains_influence_with_pools_and_residual_shortcuts():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
    ).double()
    rf = compute_receptive_field(net)
    n = rf.output_size(48)
    for h, w in [(0, 0), (5, 7), (n - 1, n - 1)]:
        assert _inside(_influence_box(net, 48, h, w), patch_box(rf, 48, h, w))

    # ResNet trunk up to layer2: its downsample shortcuts must not count as layers on the main path
    full, _ = make_backbone("resnet18")
    trunk = nn.Sequential(*list(full.children())[:6]).double().eval()
    rf = compute_receptive_field(trunk)
    assert (rf.jump, rf.size) == (8, 99)
    assert rf.output_size(128) == trunk(torch.zeros(1, 3, 128, 128, dtype=torch.float64)).shape[-1] == 16
    for h, w in [(0, 0), (7, 9), (15, 15)]:
        box = patch_box(rf, 128, h, w)
        assert _inside(_influence_box(trunk, 128, h, w), box)
        assert box != (0, 128, 0, 128)


@pytest.mark.parametrize("name", [n for n in BACKBONES if n != "tiny"])
def test_matches_the_original_layer_arithmetic(name):
    n, j, r, start = original_rf_info(224, *original_layer_lists(name))
    rf = _rf(name)
    assert (rf.jump, rf.size, rf.start) == (j, r, start)
    assert rf.to_original(224) == [n, j, r, start] == [7, 32, r, start]


def test_tiny_trunk_and_output_sizes():
    rf = _rf("tiny")
    assert (rf.jump, rf.size, rf.start) == (8, 22, 4.0)
    for name, img in [("tiny", 64), ("tiny", 70), ("vgg11", 64), ("resnet18", 80), ("densenet121", 64)]:
        trunk, _ = make_backbone(name)
        assert trunk.eval()(torch.zeros(1, 3, img, img)).shape[-1] == _rf(name).output_size(img)


def test_add_on_layers_do_not_change_the_receptive_field():
    trunk, channels = make_backbone("tiny")
    both = nn.Sequential(trunk, make_add_on("bottleneck", channels, 16))
    assert compute_receptive_field(both).size == compute_receptive_field(trunk).size
    assert (compute_receptive_field(both).jump, compute_receptive_field(both).start) == (8, 4.0)


def test_patch_box_values_and_clipping():
    rf = _rf("vgg16")  # jump 32, size 212, start 16
    assert patch_box(rf, 224, 0, 0) == (0, 122, 0, 122)
    assert patch_box(rf, 224, 3, 3) == (6, 218, 6, 218)
    assert patch_box(rf, 224, 6, 6) == (102, 224, 102, 224)
    assert patch_box(rf, (224, 300), 6, 8) == (102, 224, 166, 300)
    with pytest.raises(ValueError):
        patch_box(rf, 224, -1, 0)


def test_unsupported_layers_raise():
    with pytest.raises(ValueError, match="adaptive"):
        compute_receptive_field(nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1)))
    with pytest.raises(ValueError, match="square"):
        compute_receptive_field(nn.Conv2d(3, 3, (1, 3)))
    for resampling in (nn.Upsample(scale_factor=2), nn.ConvTranspose2d(3, 3, 2, stride=2), nn.LPPool2d(2, 2),
                       nn.PixelUnshuffle(2), nn.PixelShuffle(2)):  # were skipped: a silently wrong geometry
        with pytest.raises(ValueError, match="not a conv / pool chain layer"):
            compute_receptive_field(nn.Sequential(nn.Conv2d(3, 3, 3), resampling))


class _PoolTwice(nn.Module):
    """One registered MaxPool2d called twice: the walk of the modules sees it once (jump 2, not 4)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.c2(self.pool(torch.relu(self.c1(x))))))


def test_a_geometry_that_does_not_match_the_feature_map_draws_no_box():
    from torch.utils.data import DataLoader, TensorDataset

    from protokern.explain import explain_image
    from protokern.models import ProtoPNet
    from protokern.models.receptive_field import checked_receptive_field
    from protokern.push import push_prototypes

    model = ProtoPNet(_PoolTwice(), num_classes=2, prototypes_per_class=1, prototype_dim=4, out_channels=8).eval()
    assert model.receptive_field.output_size(32) == 16  # the walk's prediction; the trunk gives 8 x 8
    with pytest.warns(UserWarning, match="predicts a 16 x 16 feature map for 32 x 32 images, the trunk gives 8 x 8"):
        assert checked_receptive_field(model, (32, 32), (8, 8)) is None
    assert checked_receptive_field(model, (32, 32), (16, 16)) is model.receptive_field
    with warnings.catch_warnings():  # a non-square image: each side predicted from its own
        warnings.simplefilter("error")
        assert checked_receptive_field(model, (32, 48), (16, 24)) is model.receptive_field
    data = TensorDataset(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    with pytest.warns(UserWarning, match="no receptive-field boxes"):
        records = push_prototypes(model, DataLoader(data, batch_size=2), progress=False, save_images=False)
    assert records.feature_size == (8, 8) and records.rf_box.eq(-1).all()
    with pytest.warns(UserWarning, match="no receptive-field boxes"):
        explanation = explain_image(model, data.tensors[0][0])
    assert explanation.top and all(e.rf_box is None for e in explanation.top)


def test_layer_geometry_ceil_mode_output_size():
    pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    (geometry,) = layer_geometry(pool)
    assert geometry == LayerGeometry(3, 2, 0, 1, True)
    for n in range(3, 12):
        assert geometry.output_size(n) == pool(torch.zeros(1, 1, n, n)).shape[-1]
    # padded ceil-mode pools (a last window that would start in the right padding is dropped), max and average
    for kind in (nn.MaxPool2d, nn.AvgPool2d):
        for k, s, p in [(2, 2, 1), (3, 2, 1), (3, 3, 1), (4, 3, 2), (2, 3, 1)]:
            pool = kind(k, stride=s, padding=p, ceil_mode=True)
            (geometry,) = layer_geometry(pool)
            assert geometry.ceil_mode
            for n in range(k, 14):
                assert geometry.output_size(n) == pool(torch.zeros(1, 1, n, n)).shape[-1], (kind, k, s, p, n)


def test_only_modules_named_downsample_are_shortcuts():
    """ResNet's shortcut branch is named "downsample"; a main-path module whose name merely contains the word
    is walked."""
    from collections import OrderedDict

    trunk = nn.Sequential(OrderedDict(downsampler=nn.Conv2d(3, 8, 3, stride=2), downsample_conv=nn.Conv2d(8, 8, 1)))
    rf = compute_receptive_field(trunk)
    assert (rf.jump, rf.size) == (2, 3) and len(layer_geometry(trunk)) == 2


@pytest.mark.parametrize("kernel, dilation", [(4, 1), (2, 1), (3, 2), (2, 3)])
def test_same_padding_output_size_and_box(kernel, dilation):
    """padding="same" with an even span pads one more cell on the right / bottom (PyTorch's rule)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3)).double()
    rf = compute_receptive_field(net)
    for n in range(8, 15):
        assert rf.output_size(n) == net(torch.zeros(1, 3, n, n, dtype=torch.float64)).shape[-1]
    for h, w in ((0, 0), (2, 3), (4, 4)):
        assert _inside(_influence_box(net, 14, h, w), patch_box(rf, 14, h, w))


def test_output_size_of_an_image_too_small_is_zero():
    net = nn.Sequential(nn.Conv2d(3, 3, 5), nn.MaxPool2d(2), nn.Conv2d(3, 3, 3))  # needs 10 x 10 pixels
    rf = compute_receptive_field(net)
    assert [rf.output_size(n) for n in (1, 4, 5, 8, 9, 10, 12)] == [0, 0, 0, 0, 0, 1, 2]
    assert net(torch.zeros(1, 3, 12, 12)).shape[-1] == 2


@pytest.mark.parametrize("name", ["vgg16", "resnet34"])
@pytest.mark.parametrize("k", [2, 3])
def test_window_box_is_the_original_prototype_layer_box(name, k):
    """A k x k window's box equals the original's box with its prototype layer a k x k VALID convolution
    (compute_proto_layer_rf_info_v2 with prototype_kernel_size=k), at every position of the 7 x 7 map."""
    info = original_rf_info(224, *original_layer_lists(name), prototype_kernel_size=k)
    assert info[0] == 7 - k + 1
    for h in range(info[0]):
        for w in range(info[0]):
            assert patch_box(_rf(name), 224, h, w, window=(k, k)) == original_rf_box(224, h, w, info), (h, w)


def test_window_box_is_the_influence_of_a_window_conv():
    """On a plain conv stack followed by a (kh, kw) VALID convolution, the window box is exactly the set of
    pixels that reach the output cell; window_center is that box's centre before clipping."""
    from protokern.models import window_center

    torch.manual_seed(4)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 2, stride=2),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1)).double()
    rf = compute_receptive_field(trunk)
    net = nn.Sequential(trunk, nn.Conv2d(4, 4, (2, 3))).double()
    img = 40
    n = rf.output_size(img)
    for h, w in [(0, 0), (3, 2), (n - 2, n - 3)]:
        assert _influence_box(net, img, h, w) == patch_box(rf, img, h, w, window=(2, 3)), (h, w)
    y0, y1, x0, x1 = patch_box(rf, img, 3, 2, window=(2, 3))  # an interior window: no clipping
    assert window_center(rf, 3, 2, window=(2, 3)) == ((y0 + y1) / 2, (x0 + x1) / 2)
    with pytest.raises(ValueError):
        patch_box(rf, img, 0, 0, window=(0, 1))


def test_window_shortfall_of_a_non_square_image():
    """One owner of 'the image is too small for a window' (explain's check of an image, the trainer's of
    --image-size): each side against its own window side."""
    rf = backbone_receptive_field("tiny")  # 8 pixels a cell
    assert rf.window_shortfall(32, (4, 4)) is None and rf.window_shortfall((32, 24), (4, 3)) is None
    assert rf.window_shortfall((32, 16), (2, 3)) == ((4, 2), 24)
    assert rf.window_shortfall(16, (3, 1)) == ((2, 2), 24)
