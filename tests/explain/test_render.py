"""Drawing of the explanations: boxes clipped to non-square images, missing boxes, scale-free heat overlays."""

import numpy as np

from protokern.explain import render


def test_boxes_are_clipped_to_each_side_and_a_missing_box_draws_nothing():
    image = np.zeros((10, 30, 3), np.uint8)
    out = render.draw_box(image, (0, 10, 0, 30), width=1)  # the whole (wide) image: its right column is the edge
    assert out[5, 29].tolist() == list(render.BOX_COLOUR) and out[9, 15].tolist() == list(render.BOX_COLOUR)
    assert not out[5, 15].any() and not image.any()  # inside untouched; a copy
    for missing in ((-1, -1, -1, -1), (4, 4, 2, 9), (3, 8, 5, 5)):  # unpushed records' -1, empty spans
        assert np.array_equal(render.draw_box(image, missing), image)


def test_overlays_do_not_depend_on_the_heat_scale():
    image = np.full((2, 2, 3), 100, np.uint8)
    scaled = render.overlay(image, np.array([[10.0, 20.0], [10.0, 20.0]]))
    unit = render.overlay(image, np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert np.array_equal(scaled, unit) and not np.array_equal(unit[:, 0], unit[:, 1])
