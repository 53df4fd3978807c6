import pytest
import torch
from torch import nn

from protokern.models import make_add_on

from .original import original_add_on


def _structure(seq):
    return [(type(m).__name__, getattr(m, "in_channels", None), getattr(m, "out_channels", None)) for m in seq]


def test_regular():
    add_on = make_add_on("regular", 512, 128)
    assert _structure(add_on) == [
        ("Conv2d", 512, 128), ("ReLU", None, None), ("Conv2d", 128, 128), ("Sigmoid", None, None)
    ]


@pytest.mark.parametrize(
    "channels, dim", [(512, 128), (2048, 128), (2208, 128), (1024, 256), (64, 128), (128, 128), (300, 128)]
)
def test_bottleneck_matches_the_original(channels, dim):
    ours = make_add_on("bottleneck", channels, dim)
    assert _structure(ours) == _structure(original_add_on("bottleneck", channels, dim))
    assert isinstance(ours[-1], nn.Sigmoid) and ours[-2].out_channels == dim
    out = ours(torch.randn(2, channels, 3, 3))
    assert out.shape == (2, dim, 3, 3) and out.min() >= 0 and out.max() <= 1


def test_init_kaiming_fan_out_and_zero_bias():
    add_on = make_add_on("regular", 1024, 256)
    for conv in (add_on[0], add_on[2]):
        assert torch.count_nonzero(conv.bias) == 0
        expected = (2 / conv.out_channels) ** 0.5  # fan_out of a 1x1 conv = out_channels
        assert abs(conv.weight.std().item() / expected - 1) < 0.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown add-on"):
        make_add_on("deep", 512, 128)
    with pytest.raises(ValueError, match="prototype_dim"):
        make_add_on("regular", 512, 0)
