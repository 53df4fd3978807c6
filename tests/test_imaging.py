"""Image primitives of push's PNGs and the explanations: jet colours, min-max scaling, float images to bytes."""

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.imaging import jet, normalised, to_uint8


def test_jet_runs_from_dark_blue_through_green_to_dark_red():
    colours = jet(np.array([0.0, 0.25, 0.5, 0.75, 1.0, -1.0, 2.0]))
    assert colours.dtype == np.uint8 and colours.shape == (7, 3)
    assert colours.tolist() == [[0, 0, 128], [0, 128, 255], [128, 255, 128], [255, 128, 0], [128, 0, 0],
                                [0, 0, 128], [128, 0, 0]]  # (values outside [0, 1] clipped)


def test_normalised_spans_zero_to_one_and_a_constant_map_is_zero():
    np.testing.assert_allclose(normalised(np.array([[2.0, 4.0], [3.0, 6.0]])), [[0.0, 0.5], [0.25, 1.0]])
    assert normalised(np.full((2, 3), 7.0)).tolist() == [[0.0] * 3] * 2  # no activation peak: nothing hot


def test_to_uint8_rounds_and_takes_every_form():
    image = torch.tensor([0.0, 0.999, 0.5 / 255, 1.7, float("nan"), -0.2]).view(1, 2, 3)
    grey = to_uint8(image)  # one channel: drawn as gray RGB; rounded, clipped, NaN black
    assert grey.shape == (2, 3, 3) and (grey == grey[..., :1]).all()
    assert grey[..., 0].tolist() == [[0, 255, 0], [255, 0, 0]]  # 0.5 / 255 * 255 = 0.5 rounds to even: 0
    rgb = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    assert (to_uint8(rgb) == np.round(rgb.transpose(1, 2, 0) * 255)).all()
    array = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert (to_uint8(array) == array).all() and to_uint8(array) is not array
    pil = Image.fromarray(array).convert("L")
    assert to_uint8(pil).shape == (2, 4, 3)
    for bad in (np.zeros((2, 3, 3), np.float32), np.zeros((2, 4), np.uint8), np.zeros((4, 2, 2))):
        with pytest.raises(ValueError, match="expected a"):
            to_uint8(bad)
