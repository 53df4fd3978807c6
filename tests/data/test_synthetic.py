"""SyntheticParts: determinism, shapes, balance, boxes vs. drawn pixels, no label leak."""
import time

import pytest
import torch

from protokern.data import SyntheticParts
from protokern.data.synthetic import COLOURS


@pytest.fixture(scope="module")
def ds():
    return SyntheticParts(num_classes=10, images_per_class=20, image_size=64, seed=3)


def test_items_shapes_and_range(ds):
    assert len(ds) == 200
    x, y = ds[7]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int) and y == ds.targets[7]
    assert ds.boxes.shape == (200, 4) and ds.boxes.dtype == torch.float32
    assert len(ds.classes) == 10 and len(set(ds.classes)) == 10
    x[:] = 0  # items are copies
    assert ds[7][0].abs().sum() > 0


def test_class_balance(ds):
    counts = torch.bincount(torch.tensor(ds.targets), minlength=10)
    assert (counts == 20).all()


def test_deterministic_per_seed_split_index(ds):
    again = SyntheticParts(num_classes=10, images_per_class=20, image_size=64, seed=3)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in (0, 57, 199))
    assert torch.equal(ds.boxes, again.boxes)
    # image i does not depend on the dataset's length (chunks of 128 images, both sides of one)
    longer = SyntheticParts(num_classes=10, images_per_class=30, image_size=64, seed=3)
    assert all(torch.equal(ds[i][0], longer[i][0]) for i in (0, 127, 128, 199))
    push = SyntheticParts(num_classes=10, images_per_class=20, image_size=64, seed=3, split="push")
    assert torch.equal(push[5][0], ds[5][0])  # push = the train images
    test = SyntheticParts(num_classes=10, images_per_class=20, image_size=64, seed=3, split="test")
    other = SyntheticParts(num_classes=10, images_per_class=20, image_size=64, seed=4)
    for d in (test, other):
        assert not torch.equal(d[0][0], ds[0][0])
        assert not torch.equal(d.boxes, ds.boxes)


def test_boxes_inside_image_and_hold_the_part(ds):
    b = ds.boxes
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 64).all()
    side = b[:, 2:] - b[:, :2]
    assert torch.allclose(side[:, 0], side[:, 1])
    assert ((side >= 0.85 * 16 - 1e-4) & (side <= 16 + 1e-4)).all()
    centres = torch.arange(64) + 0.5
    for i in range(0, len(ds), 7):
        mask = ds.part_mask(i)
        ys, xs = mask.nonzero(as_tuple=True)
        assert len(ys) >= 0.2 * side[i, 0] ** 2  # the part fills a good share of its box
        x0, y0, x1, y1 = b[i].tolist()
        assert (centres[xs] >= x0).all() and (centres[xs] <= x1).all()
        assert (centres[ys] >= y0).all() and (centres[ys] <= y1).all()
        # the pixels under the mask have the class colour (x brightness in [0.8, 1], +-0.05 noise)
        colour = torch.tensor(COLOURS[ds.class_parts[ds.targets[i]][1]])
        px = ds[i][0][:, ys, xs].T  # (n, 3)
        scale = (px @ colour) / (colour @ colour)
        assert ((scale > 0.7) & (scale < 1.1)).all()
        assert (px - scale[:, None] * colour).abs().max() < 0.08


def test_objects_layout(ds):
    class_pairs = set(ds.class_parts)
    for i in range(0, len(ds), 5):
        objs = ds.objects(i)
        assert objs[0]["is_part"] and (objs[0]["shape"], objs[0]["colour"]) == ds.class_parts[ds.targets[i]]
        assert objs[0]["box"] == ds.boxes[i].tolist()
        assert 2 <= len(objs) - 1 <= 4
        for o in objs[1:]:
            assert (o["shape"], o["colour"]) not in class_pairs  # distractors never form a class part
        boxes = torch.tensor([o["box"] for o in objs])
        for a in range(len(boxes)):  # objects never overlap
            for c in range(a + 1, len(boxes)):
                ov_x = min(boxes[a, 2], boxes[c, 2]) - max(boxes[a, 0], boxes[c, 0])
                ov_y = min(boxes[a, 3], boxes[c, 3]) - max(boxes[a, 1], boxes[c, 1])
                assert ov_x <= 0 or ov_y <= 0


def test_no_single_attribute_names_the_class(ds):
    shapes = [s for s, _ in ds.class_parts]
    colours = [c for _, c in ds.class_parts]
    shared_shape = sum(shapes.count(s) > 1 for s in shapes)
    shared_colour = sum(colours.count(c) > 1 for c in colours)
    assert shared_shape >= 8 and shared_colour >= 8
    # distractors reuse the classes' shapes and colours
    drawn = [o for i in range(len(ds)) for o in ds.objects(i)[1:]]
    seen = {(o["shape"], o["colour"]) for o in drawn}
    assert set(shapes) <= {s for s, _ in seen} and set(colours) <= {c for _, c in seen}

    # half the distractors (in expectation) are the most confusing: a class's shape in another class's colour
    class_shapes, class_colours = set(shapes), set(colours)
    hard = sum(o["shape"] in class_shapes and o["colour"] in class_colours for o in drawn) / len(drawn)
    assert 0.4 < hard < 0.6, hard  # 0.50 of 600 here


def test_every_chunk_of_images_draws_its_own_scenes(ds):
    """Images are drawn 128 at a time, each chunk from its own generator: image i and image i + 128 share no
    background (the same generator would repeat every background and layout, only the part changing)."""
    for i in range(0, len(ds) - 128, 9):
        same = (ds[i][0] == ds[i + 128][0]).float().mean().item()
        assert same < 0.1, (i, same)  # about 0.006 of the values agree by chance


def test_rest_of_image_carries_no_label():
    """Nearest-class-mean on images with the part box blanked is at chance level."""
    def blanked(d):
        x = torch.stack([d[i][0] for i in range(len(d))])
        for i, (x0, y0, x1, y1) in enumerate(d.boxes.tolist()):
            x[i, :, int(y0):int(y1) + 1, int(x0):int(x1) + 1] = 0.5
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1), torch.tensor(d.targets)

    kw = dict(num_classes=5, images_per_class=80, image_size=32, part_size=8)
    xtr, ytr = blanked(SyntheticParts(**kw))
    xte, yte = blanked(SyntheticParts(split="test", **kw))
    means = torch.stack([xtr[ytr == c].mean(0) for c in range(5)])
    acc = (torch.cdist(xte, means).argmin(1) == yte).float().mean().item()
    assert acc < 0.32  # chance is 0.2


def test_configurable_and_fast():
    small = SyntheticParts(num_classes=3, images_per_class=4, image_size=32, part_size=10)
    assert len(small) == 12 and small[0][0].shape == (3, 32, 32) and len(small.classes) == 3
    start = time.process_time()  # CPU time: robust to a busy machine (generation is single-threaded)
    big = SyntheticParts(num_classes=10, images_per_class=200, image_size=64)
    assert len(big) == 2000
    assert time.process_time() - start < 5.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split"),
    (dict(num_classes=1), "num_classes"),
    (dict(num_classes=31), "num_classes"),
    (dict(image_size=64, part_size=40), "part_size"),
    (dict(images_per_class=0), "images_per_class"),
    (dict(seed=-1), "seed"),
    (dict(image_size=15, part_size=4), "image_size must be >= 16"),
    (dict(image_size=64, part_size=3), r"part_size must be in \[4, image_size / 2.4\], got 3"),
    (dict(distractors=(3, 1)), r"distractors must be \(min, max\) with 0 <= min <= max"),
    (dict(distractors=(-1, 2)), "distractors"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticParts(**kwargs)
