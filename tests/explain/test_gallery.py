"""Global explanation: each prototype's k nearest training patches as PNG pages and HTML."""

import importlib
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protokern.explain import gallery
from protokern.explain.render import BOX_COLOUR
from protokern.models import patch_box
from protokern.push import push_prototypes
from tests.explain.helpers import BLUE, GREEN, GREY, RED, ListDataset, canvas, colour_model, paint, paint_grid

gallery_module = importlib.import_module("protokern.explain.gallery")  # (the package's name is the function)


def _dataset():
    """Six images; image i has a red square at cell (i, i) (0..2) or a green one and a blue one (3..5); class i // 3."""
    images = []
    for i in range(6):
        img = canvas(64)
        paint(img, (i, i), RED if i < 3 else GREEN)
        if i >= 3:
            paint(img, (7, 0), BLUE)
        images.append(img)
    return ListDataset(images, [i // 3 for i in range(6)], classes=["red", "green"])


def test_gallery_rows_and_files(tmp_path):
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    dataset = _dataset()
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    records = push_prototypes(model, loader, progress=False)
    result = gallery(model, loader, k=3, out_dir=str(tmp_path / "g"), push_records=records, progress=False,
                     tile=64, per_page=2)
    nb = result["neighbours"]
    assert nb.distance.shape == (3, 3)
    assert set(nb.image_index[0].tolist()) == {0, 1, 2}  # red squares: the red images, at distance 0
    assert torch.allclose(nb.distance[0], torch.zeros(3), atol=1e-5)
    assert [tuple(p) for p in nb.patch[0].tolist()] == [(i, i) for i in nb.image_index[0].tolist()]
    assert set(nb.image_index[1].tolist()) == {3, 4, 5}
    assert len(result["pages"]) == 2  # 3 prototypes, 2 per page
    first = np.asarray(Image.open(result["pages"][0]))
    assert first.shape[0] >= 2 * 64 and first.shape[1] >= 4 * 64  # 2 rows of source + 3 neighbours
    assert (first == BOX_COLOUR).all(-1).sum() > 50 and first.std() > 20
    assert sorted(os.listdir(tmp_path / "g")) == ["gallery.json", "gallery_000.png", "gallery_001.png", "index.html"]
    data = json.load(open(tmp_path / "g" / "gallery.json"))
    assert data["k"] == 3 and len(data["prototypes"]) == 3
    assert data["prototypes"][0]["own_class"] == 3 and data["prototypes"][0]["source_index"] == 0
    assert data["prototypes"][2]["own_class"] == 3 and data["prototypes"][2]["source_index"] == 3
    text = open(result["html"], encoding="utf-8").read()
    assert "gallery_000.png" in text and "gallery_001.png" in text and "nearest" in text


def test_gallery_without_records_and_errors(tmp_path):
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    loader = DataLoader(_dataset(), batch_size=6)
    result = gallery(model, loader, k=2, out_dir=str(tmp_path), progress=False, tile=32)
    page = np.asarray(Image.open(result["pages"][0]))
    assert page.shape[1] < 3 * 40  # no source column: 2 tiles per row
    with pytest.raises(ValueError, match="only 6 images"):
        gallery(model, loader, k=7, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="DataLoader over a dataset"):
        gallery(model, [(torch.rand(2, 3, 64, 64), torch.tensor([0, 1]))], k=1, out_dir=str(tmp_path),
                progress=False)


BLOCK = [[RED, BLUE, RED], [BLUE, RED, BLUE]]  # a 2 x 3 pattern of cells


@pytest.mark.parametrize("kind", ["log", "linear", "cosine"])
@pytest.mark.parametrize("with_rf", [True, False])
def test_gallery_boxes_of_window_prototypes(tmp_path, kind, with_rf):
    """2 x 3 prototypes: each neighbour's box covers the whole nearest window (receptive field, or the window's
    share of the image without one), at the window's top-left cell on the (Hout, Wout) grid."""
    cells = [(0, 0), (3, 1), (6, 5), (2, 4)]  # top-left cells of the block in images 0..3 (Hout, Wout = 7, 6)
    images = [paint_grid(canvas(64), cell, BLOCK) for cell in cells]
    images.append(paint(canvas(64), (5, 5), GREEN))
    dataset = ListDataset(images, [0, 0, 0, 0, 1], classes=["block", "green"])
    model = colour_model([BLOCK, [[GREEN, GREY, GREY], [GREY] * 3]], [0, 1], num_classes=2, similarity=kind)
    if not with_rf:
        model.receptive_field = None
    result = gallery(model, DataLoader(dataset, batch_size=2), k=4, out_dir=str(tmp_path), progress=False, tile=32)
    nb = result["neighbours"]
    assert nb.window == (2, 3) and nb.feature_size == (8, 8)
    assert sorted(nb.image_index[0].tolist()) == [0, 1, 2, 3]  # the block prototype: every block, at distance 0
    data = json.load(open(tmp_path / "gallery.json"))
    assert data["window"] == [2, 3] and data["similarity"] == kind
    for n in data["prototypes"][0]["neighbours"]:
        h, w = cells[n["image_index"]]
        assert n["patch"] == [h, w] and n["distance"] == pytest.approx(0, abs=1e-5)
        assert n["box"] == [8 * h, 8 * h + 16, 8 * w, 8 * w + 24]  # cells h..h+1 x w..w+2 of 8 pixels
        if with_rf:
            assert tuple(n["box"]) == patch_box(colour_model([RED], [0], 1).receptive_field, 64, h, w, window=(2, 3))
    assert "2 &times; 3 window" in open(result["html"], encoding="utf-8").read()


def test_gallery_json_is_strict_with_an_image_of_nan(tmp_path):
    """NaN distances count as infinitely far (nearest_training_patches): written as null, not Infinity."""
    images = [paint(canvas(64), (1, 1), RED), paint(canvas(64), (2, 2), GREEN), canvas(64)]
    images[2][0, 0, 0] = float("nan")  # every window of this image is at NaN distance from every prototype
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    gallery(model, DataLoader(ListDataset(images, [0, 1, 0]), batch_size=2), k=3, out_dir=str(tmp_path),
            progress=False)
    text = open(tmp_path / "gallery.json").read()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in gallery.json"))
    assert None in [n["distance"] for p in data["prototypes"] for n in p["neighbours"]]


def test_tiles_boxes_captions_and_push_images_of_a_subset(tmp_path, monkeypatch):
    """Non-square tiles keep their aspect, a window's box without a receptive field scales rows by the height and
    columns by the width, other-class neighbours are marked "x", and push images given as a Subset are read at
    the base dataset's index the records hold."""
    from torch.utils.data import Subset

    from protokern.explain.gallery import _tile, _window_box

    assert _tile(np.zeros((20, 40, 3), np.uint8), None, 96, "x").shape == (14 + 48, 96, 3)  # caption strip + 2:1
    assert _window_box(None, (32, 48), (4, 4), 1, 2, (1, 1)) == (8, 16, 24, 36)  # 8 px a row, 12 a column

    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    dataset = _dataset()
    loader = DataLoader(dataset, batch_size=6)
    records = push_prototypes(model, loader, progress=False)
    captions, reads = [], []
    real_label, real_item = gallery_module.render.label, gallery_module.item_image
    monkeypatch.setattr(gallery_module.render, "label", lambda image, text, *a, **k: captions.append(text)
                        or real_label(image, text, *a, **k))
    monkeypatch.setattr(gallery_module, "item_image", lambda data, index: reads.append((data, index))
                        or real_item(data, index))
    gallery(model, loader, k=6, out_dir=str(tmp_path / "g"), push_records=records, progress=False, tile=32,
            push_images=Subset(dataset, [5, 4, 3, 2, 1, 0]))
    assert reads and all(data is dataset for data, _ in reads)  # the Subset unwrapped: records index the base
    assert sum(c.startswith("x") for c in captions) == 2 * 3  # each prototype: 3 of its 6 of another class


def test_a_tiles_box_lands_on_its_rows_and_columns_scaled(monkeypatch):
    """_tile scales the (y0, y1, x0, x1) box with the image: on a 20 x 40 image drawn 2x, box (2, 6, 20, 30)
    outlines rows 4..11 and columns 40..59 of the tile (the caption strip left out)."""
    monkeypatch.setattr(gallery_module.render, "label", lambda image, text, *a, **k: image)
    colour = (255, 0, 0)
    tile = gallery_module._tile(np.zeros((20, 40, 3), np.uint8), (2, 6, 20, 30), 80, "x", colour=colour)
    assert tile.shape == (40, 80, 3)
    ys, xs = np.nonzero((tile == colour).all(-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 11, 40, 59)


def test_an_unpushed_prototype_has_no_source_index(tmp_path):
    """A prototype of a class without training images is not pushed (image_index -1): gallery.json gives its
    source_index as null (not the -1 sentinel, which reads as the last image) and the HTML table leaves it empty."""
    images = [paint(canvas(64), (i, i), RED if i < 2 else GREEN) for i in range(4)]
    dataset = ListDataset(images, [0, 0, 1, 1], classes=["red", "green", "blue"])
    model = colour_model([RED, GREEN, BLUE], [0, 1, 2], num_classes=3)
    loader = DataLoader(dataset, batch_size=4)
    records = push_prototypes(model, loader, progress=False)
    assert int(records.image_index[2]) == -1
    result = gallery(model, loader, k=2, out_dir=str(tmp_path), push_records=records, progress=False, tile=32)
    data = json.load(open(tmp_path / "gallery.json"))
    assert [p["source_index"] for p in data["prototypes"]] == [int(records.image_index[0]),
                                                                int(records.image_index[1]), None]
    assert "<td>-1</td>" not in open(result["html"], encoding="utf-8").read()


def test_a_prototype_pushed_onto_the_first_image_shows_its_source(tmp_path, monkeypatch):
    """Image index 0 is a real source (only -1 means not pushed): the first column of prototype 0, pushed onto
    image 0, is that image captioned 'p0 <class>' and read from the push set, not the 'not pushed' placeholder."""
    images = [paint(canvas(64), (1, 1), RED), paint(canvas(64), (2, 2), GREEN)]
    dataset = ListDataset(images, [0, 1], classes=["red", "green"])
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    loader = DataLoader(dataset, batch_size=2)
    records = push_prototypes(model, loader, progress=False)
    assert records.image_index.tolist() == [0, 1]
    placeholders = []
    real = gallery_module.render.placeholder
    monkeypatch.setattr(gallery_module.render, "placeholder", lambda *a, **k: placeholders.append(a) or real(*a, **k))
    gallery(model, loader, k=1, out_dir=str(tmp_path), push_records=records, progress=False, tile=32)
    assert placeholders == []


def test_the_source_tile_outlines_the_high_activation_box(tmp_path, monkeypatch):
    """Column 1 of each row is the prototype's source image with its *activation* box (red), as the page header
    says; the receptive-field box of the source patch is a different box (set apart here) and must not be used."""
    images = [paint(canvas(64), (1, 1), RED), paint(canvas(64), (5, 2), GREEN)]
    loader = DataLoader(ListDataset(images, [0, 1], classes=["red", "green"]), batch_size=2)
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    records = push_prototypes(model, loader, progress=False)
    records.activation_box[:] = records.activation_box.new_tensor([[3, 30, 4, 40], [10, 50, 2, 20]])
    records.rf_box[:] = records.rf_box.new_tensor([[0, 8, 0, 8], [40, 48, 16, 24]])
    boxes = []
    real = gallery_module._tile
    monkeypatch.setattr(gallery_module, "_tile", lambda image, box, size, caption, colour=None, **k:
                        (colour == (255, 60, 60) and boxes.append(box)) or real(image, box, size, caption))
    gallery(model, loader, k=1, out_dir=str(tmp_path), push_records=records, progress=False, tile=32)
    assert boxes == [(3, 30, 4, 40), (10, 50, 2, 20)]


def test_the_html_tables_list_every_prototype(tmp_path):
    """3 prototypes at 2 per page: the two page tables together have one row per prototype (0, 1 | 2), and each
    page's heading names its first and last prototype."""
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    loader = DataLoader(_dataset(), batch_size=4, shuffle=False)
    records = push_prototypes(model, loader, progress=False)
    result = gallery(model, loader, k=2, out_dir=str(tmp_path), push_records=records, progress=False, tile=32,
                     per_page=2)
    text = open(result["html"], encoding="utf-8").read()
    assert [int(j) for j in re.findall(r"<tr><td>(\d+)</td>", text)] == [0, 1, 2]
    assert "Prototypes 0&ndash;1" in text and "Prototypes 2&ndash;2" in text


def test_records_of_another_number_of_prototypes_are_a_value_error(tmp_path):
    """Records of a 2-prototype model given with a 3-prototype one (e.g. before / after pruning) are a one-line
    ValueError naming both counts, before any search or file is written."""
    loader = DataLoader(_dataset(), batch_size=6)
    records = push_prototypes(colour_model([RED, GREEN], [0, 1], num_classes=2), loader, progress=False)
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"push_records describe 2 prototypes, the model 3"):
        gallery(model, loader, k=2, out_dir=str(tmp_path / "g"), push_records=records, progress=False)
    assert not (tmp_path / "g").exists()


def test_class_names_come_from_the_dataset_by_default(tmp_path):
    """Without class_names the loader's dataset's `classes` name the prototypes' classes (gallery.json and the
    HTML), as the docstring says; an explicit list wins."""
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    loader = DataLoader(_dataset(), batch_size=6)
    gallery(model, loader, k=1, out_dir=str(tmp_path / "a"), progress=False, tile=32)
    data = json.load(open(tmp_path / "a" / "gallery.json"))
    assert [p["class_name"] for p in data["prototypes"]] == ["red", "green"]
    assert "<td class=left>green</td>" in open(tmp_path / "a" / "index.html", encoding="utf-8").read()
    gallery(model, loader, k=1, out_dir=str(tmp_path / "b"), progress=False, tile=32, class_names=["R", "G"])
    assert [p["class_name"] for p in json.load(open(tmp_path / "b" / "gallery.json"))["prototypes"]] == ["R", "G"]
