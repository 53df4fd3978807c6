"""Local explanation: contributions add up to the logits, the most activated box, files written, image modes."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protokern.data import imagenet_normalize
from protokern.explain import explain_image
from protokern.explain.render import BOX_COLOUR, SIMILARITY_NAMES, save_png
from protokern.models import ProtoPNet, patch_box
from protokern.push import push_prototypes
from tests.explain.helpers import (BLUE, GREEN, GREY, RED, ListDataset, canvas, colour_model, paint, paint_grid,
                                   reference_distance_maps, reference_similarity, reference_window_heatmaps)


def test_contributions_add_up_to_the_logits():
    model = ProtoPNet("tiny", num_classes=4, prototypes_per_class=3, prototype_dim=16).eval()
    with torch.no_grad():
        model.last_layer.weight.normal_()
    image = torch.rand(3, 64, 64)
    e = explain_image(model, image, top_k=5)
    with torch.no_grad():
        from protokern.data import imagenet_normalize

        logits, min_d = model(imagenet_normalize(image[None]))
    torch.testing.assert_close(e.logits, logits[0])
    torch.testing.assert_close(e.min_distances, min_d[0])
    for c in range(4):
        torch.testing.assert_close(e.contributions(c).sum(), logits[0, c], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e.contributions(c), e.similarity * model.last_layer.weight[c].detach())
    assert e.predicted_class == int(logits.argmax()) and e.class_idx == e.predicted_class
    contributions = e.contributions()
    assert [x.prototype for x in e.top] == contributions.argsort(descending=True)[:5].tolist()
    assert [x.rank for x in e.top] == [1, 2, 3, 4, 5]
    for x in e.top:
        assert x.contribution == pytest.approx(x.similarity * x.weight, rel=1e-5)
        assert x.heatmap.shape == (64, 64)
    table = e.table()
    assert [r["contribution"] for r in table] == sorted((r["contribution"] for r in table), reverse=True)
    assert table[0]["prototype"] == int(contributions.argmax())
    assert len(table) == 12 and sum(r["contribution"] for r in table) == pytest.approx(float(logits[0, e.class_idx]),
                                                                                       rel=1e-4, abs=1e-4)
    other = explain_image(model, image, top_k=3, class_idx=(e.predicted_class + 1) % 4)
    assert other.class_idx == (e.predicted_class + 1) % 4 and len(other.top) == 3


def _scene():
    """Class 0: a red square at cell (2, 5); class 1: a green one at cell (6, 1); blue distractor."""
    images, labels = [], []
    for i in range(4):
        img = canvas(64)
        paint(img, (2, 5) if i % 2 == 0 else (6, 1), RED if i % 2 == 0 else GREEN)
        paint(img, (7, 7), BLUE)
        images.append(img)
        labels.append(i % 2)
    return ListDataset(images, labels, classes=["red thing", "green thing"])


def test_most_activated_box_and_source_patch():
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    dataset = _scene()
    records = push_prototypes(model, DataLoader(dataset, batch_size=2), progress=False)
    test = paint(canvas(64), (4, 3), RED)  # a red square elsewhere
    e = explain_image(model, test, push_records=records, push_images=dataset, top_k=3)
    assert e.predicted_class == 0 and e.class_names == ["red thing", "green thing"]
    red = next(x for x in e.top if x.prototype == 0)
    assert red.rank == 1 and red.patch == (4, 3) and red.rf_box == (32, 40, 24, 32)
    y0, y1, x0, x1 = red.box  # the 95th-percentile box surrounds the red cell
    assert y0 <= 36 < y1 and x0 <= 28 < x1 and (y1 - y0) <= 24 and (x1 - x0) <= 24
    assert red.source_index == 0 and red.source_rf_box == (16, 24, 40, 48)
    assert torch.equal(red.source_image, dataset[0][0])


def test_save_writes_panels_and_html(tmp_path):
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    dataset = _scene()
    records = push_prototypes(model, DataLoader(dataset, batch_size=4), progress=False)
    e = explain_image(model, paint(canvas(64), (1, 1), RED), push_records=records, push_images=dataset, top_k=2)
    page = e.save(str(tmp_path / "out"), min_side=128)
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["explanation.json", "image.png", "index.html", "rank01_prototype0.png",
                     f"rank02_prototype{e.top[1].prototype}.png"]
    panel = np.asarray(Image.open(tmp_path / "out" / "rank01_prototype0.png"))
    assert panel.shape[0] >= 128 and panel.shape[1] >= 4 * 128  # image | this | that | source image
    assert (panel == BOX_COLOUR).all(-1).sum() > 100  # the boxes are drawn
    assert panel.std() > 20  # not a blank image
    assert Image.open(tmp_path / "out" / "image.png").size == (128, 128)
    text = open(page, encoding="utf-8").read()
    assert "This looks like that" in text and "rank01_prototype0.png" in text and "red thing" in text
    assert f"{e.top[0].similarity:.4f}" in text and f"{e.top[0].contribution:.4f}" in text
    data = json.load(open(tmp_path / "out" / "explanation.json"))
    assert data["logit"] == pytest.approx(data["sum_of_contributions"], rel=1e-5)
    assert len(data["all_prototypes"]) == 3 and data["top"][0]["file"] == "rank01_prototype0.png"


def test_source_from_push_pngs_and_missing(tmp_path):
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    dataset = _scene()
    records = push_prototypes(model, DataLoader(dataset, batch_size=4), save_dir=str(tmp_path / "push"),
                              progress=False)
    records.wait_images()
    e = explain_image(model, paint(canvas(64), (1, 1), RED), push_records=records, top_k=1)
    torch.testing.assert_close(e.top[0].source_image, dataset[0][0], atol=1 / 255, rtol=0)
    records.image_dir = None
    e = explain_image(model, paint(canvas(64), (1, 1), RED), push_records=records, top_k=1)
    assert e.top[0].source_image is None
    e.save(str(tmp_path / "no_source"))  # a placeholder instead of the source panels
    assert os.path.isfile(tmp_path / "no_source" / "rank01_prototype0.png")


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P"])
def test_image_modes_are_read_as_rgb(tmp_path, mode):
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    array = (canvas(48).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    array[8:16, 8:16] = (230, 25, 25)
    img = Image.fromarray(array).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path)
    e = explain_image(model, str(path), top_k=2, image_size=64)
    assert e.image.shape == (3, 64, 64) and e.image.dtype == torch.float32
    assert e.top[0].heatmap.shape == (64, 64)
    if mode != "L":
        assert e.predicted_class == 0


def test_bad_inputs():
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explain_image(model, torch.randn(3, 32, 32) * 3)
    with pytest.raises(ValueError, match="3, H, W"):
        explain_image(model, torch.rand(4, 32, 32))
    with pytest.raises(TypeError, match="path"):
        explain_image(model, [1, 2, 3])
    with pytest.raises(ValueError, match="class_idx"):
        explain_image(model, torch.rand(3, 32, 32), class_idx=5)
    with pytest.raises(ValueError, match="top_k"):
        explain_image(model, torch.rand(3, 32, 32), top_k=0)
    with pytest.raises(FileNotFoundError):
        explain_image(model, "/nonexistent/image.png")
    other = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    records = push_prototypes(other, DataLoader(_scene(), batch_size=4), progress=False)
    with pytest.raises(ValueError, match="before pruning"):
        explain_image(model, torch.rand(3, 64, 64), push_records=records)
    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    records = push_prototypes(model, DataLoader(_scene(), batch_size=4), progress=False)
    dicts = [{"image": image, "label": label} for image, label in _scene()]
    with pytest.raises(TypeError, match=r"push_images\[\d+\] must be an image .* got dict$"):  # not the image's fault
        explain_image(model, torch.rand(3, 64, 64), push_records=records, push_images=dicts)
    from protokern.explain.local import load_image_tensor

    with pytest.raises(ValueError, match=r"^channels must be 1 \(grayscale\), 3 \(RGB\) or None, got 2$"):
        load_image_tensor(torch.rand(3, 8, 8), channels=2)


def test_a_crop_fits_its_square_and_keeps_its_proportions():
    """The "this" / "looks like that" tiles: the box scaled to fit a side x side square (the longer side fills
    it), an empty or missing box a placeholder of that square."""
    from protokern.explain.local import _crop

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert _crop(image, (0, 10, 0, 20), 100).shape == (50, 100, 3)
    assert _crop(image, (4, 36, 8, 16), 64).shape == (64, 16, 3)
    crop = _crop(image, (2, 6, 3, 7), 8)  # nearest-neighbour: each pixel twice in each direction
    assert np.array_equal(crop, image[2:6, 3:7].repeat(2, 0).repeat(2, 1))
    for empty in ((5, 5, 0, 10), (0, 10, 7, 7), None):
        assert _crop(image, empty, 48).shape[:2] == (48, 48)


# ------------------------------------------------------------------------------------------- kh x kw prototypes
KINDS = ["log", "linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
def test_window_prototypes_explained_as_the_layer_computes_them(kind):
    """2 x 3 prototypes: similarities and the ranking are the layer's, the box is the receptive field of the whole
    nearest window, and the heatmap puts each window position at its window's centre (stretched over the image,
    the (Hout, Wout) map of window positions put the peak up to half a window off) (all from float64
    references)."""
    torch.manual_seed(0)
    model = colour_model(torch.rand(5, 2, 3, 3), [0, 0, 1, 1, 1], num_classes=2, similarity=kind)
    with torch.no_grad():
        model.last_layer.weight.normal_()
    image = torch.rand(3, 64, 64)  # feature map 8 x 8: Hout, Wout = 7, 6
    e = explain_image(model, image, top_k=4)
    with torch.no_grad():
        z = model.conv_features(imagenet_normalize(image[None]))
        similarity, min_distances = model.prototype_layer(z)
    torch.testing.assert_close(e.similarity, similarity[0])
    torch.testing.assert_close(e.min_distances, min_distances[0])
    weight = model.last_layer.weight[e.class_idx].detach()
    contributions = similarity[0] * weight
    # the prototypes weighing for the class first, each group by contribution (brute force)
    expected = sorted(range(5), key=lambda j: (-(weight[j] > 0).item(), -contributions[j].item()))[:4]
    assert [x.prototype for x in e.top] == expected
    assert e.similarity_kind == kind and e.prototype_size == (2, 3)
    d = reference_distance_maps(z, model.prototype_layer.prototypes.detach(), kind)[0]  # (5, 7, 6)
    sim = reference_similarity(d, kind)
    for x in e.top:
        h, w = divmod(int(d[x.prototype].argmin()), 6)
        assert x.patch == (h, w)
        assert x.rf_box == (8 * h, 8 * h + 16, 8 * w, 8 * w + 24)  # cells h..h+1, w..w+2 of 8 pixels each
        assert x.rf_box == patch_box(model.receptive_field, 64, h, w, window=(2, 3))
        assert x.similarity == pytest.approx(float(sim[x.prototype].max()), rel=1e-4, abs=1e-5)
        assert x.distance == pytest.approx(float(d[x.prototype].min()), rel=1e-4, abs=1e-5)
        assert x.heatmap.shape == (64, 64)
        want = reference_window_heatmaps(sim[x.prototype, None], (2, 3), (64, 64))[0]
        torch.testing.assert_close(x.heatmap, want, rtol=1e-4, atol=1e-4)
    data = e.to_dict()
    assert data["similarity_kind"] == kind and data["prototype_size"] == [2, 3]
    assert SIMILARITY_NAMES[kind] in e._html()


BLOCK = [[RED, BLUE, RED], [BLUE, RED, BLUE]]  # a 2 x 3 pattern of cells


def _block_scene():
    """Class 0: the 2 x 3 block at cells (1 + i, 2 + i); class 1: a green cell (1 x 1) and nothing else."""
    images, labels = [], []
    for i in range(4):
        img = canvas(64)
        if i % 2 == 0:
            paint_grid(img, (1 + i, 2 + i), BLOCK)
        else:
            paint(img, (3, 3), GREEN)
        images.append(img)
        labels.append(i % 2)
    return ListDataset(images, labels, classes=["block", "green"])


@pytest.mark.parametrize("kind", KINDS)
def test_window_prototype_box_on_the_image_and_its_source(kind):
    model = colour_model([BLOCK, [[GREEN, GREY, GREY], [GREY] * 3]], [0, 1], num_classes=2, similarity=kind)
    with torch.no_grad():  # prototypes near, not at, the patterns: push moves them
        noise = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(1))
        model.prototype_layer.prototypes.add_(0.05 * noise)
    dataset = _block_scene()
    records = push_prototypes(model, DataLoader(dataset, batch_size=2), progress=False)
    assert records.patch[0].tolist() == [1, 2]  # pushed onto image 0's block (distance 0 on images 0 and 2)
    test = paint_grid(canvas(64), (4, 2), BLOCK)
    e = explain_image(model, test, push_records=records, push_images=dataset, top_k=2)
    block = next(x for x in e.top if x.prototype == 0)
    assert block.patch == (4, 2) and block.rf_box == (32, 48, 16, 40)  # cells 4..5 x 2..4
    # the (7, 6) map of window positions is stretched over the image (as the original): its peak, position
    # (4, 2), lands on pixel (4.5 * 64 / 7, 2.5 * 64 / 6) = (41.1, 26.7)
    y0, y1, x0, x1 = block.box
    assert y0 <= 41 < y1 and x0 <= 26 < x1
    assert block.source_index == 0 and block.source_rf_box == (8, 24, 16, 40)
    assert torch.equal(block.source_image, dataset[0][0])


@pytest.mark.parametrize("window", [(1, 1), (2, 2)])
def test_an_image_too_small_for_the_trunk_is_a_one_line_error(window):
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=8, prototype_size=window)
    side = next(n for n in range(1, 64) if model.receptive_field.output_size(n) >= window[0])
    with pytest.raises(ValueError, match=rf"too small for this model.*at least {side} x {side} pixels"):
        explain_image(model, torch.rand(3, side - 1, 40), top_k=1)
    assert explain_image(model, torch.rand(3, side, side), top_k=1).top[0].prototype in (0, 1)


def test_an_image_holding_nan_is_refused():
    model = ProtoPNet("tiny", num_classes=2, prototypes_per_class=1, prototype_dim=8)
    image = torch.rand(3, 32, 32)
    image[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        explain_image(model, image, top_k=1)


def test_non_square_images_are_explained_at_the_push_images_size(tmp_path):
    """A model pushed on 32 x 48 images explains a 32 x 48 image as it is (its logits are the model's), and a
    path, a PIL image or a tensor of another size is resized to the push images' (height, width)."""
    torch.manual_seed(0)
    model = ProtoPNet(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                          torch.nn.MaxPool2d(4)),
                      num_classes=2, prototypes_per_class=2, prototype_dim=4, out_channels=8).eval()
    x, y = torch.rand(6, 3, 32, 48), torch.arange(6) % 2
    records = push_prototypes(model, [(x, y)], progress=False)
    assert tuple(records.image_size) == (32, 48)
    e = explain_image(model, x[1], push_records=records)
    with torch.no_grad():
        logits = model(imagenet_normalize(x[1:2]))[0][0]
    assert e.image.shape == (3, 32, 48)
    torch.testing.assert_close(e.logits, logits, rtol=0, atol=0)
    array = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    for image in (str(tmp_path / "x.png"), Image.fromarray(array), torch.rand(3, 40, 60)):
        assert explain_image(model, image, push_records=records).image.shape == (3, 32, 48)
        assert explain_image(model, image, image_size=(24, 36)).image.shape == (3, 24, 36)
    with pytest.raises(ValueError, match="height, width"):
        explain_image(model, x[1], image_size=(32, 48, 3))


def test_explanations_name_the_source_file_of_each_prototype(tmp_path):
    """What a user looks for next ("which training image is that?"): the push set's file, through a Subset too,
    in the evidence, explanation.json and index.html; None where the push set has no files."""
    from torch.utils.data import Subset

    model = colour_model([RED, GREEN, BLUE], [0, 1, 1], num_classes=2)
    dataset = _scene()
    dataset.paths = [f"/data/train/img_{i}.png" for i in range(len(dataset))]
    subset = Subset(dataset, [3, 2, 1, 0])
    records = push_prototypes(model, DataLoader(subset, batch_size=2), progress=False)
    e = explain_image(model, paint(canvas(64), (4, 3), RED), push_records=records, push_images=subset, top_k=3)
    red = next(x for x in e.top if x.prototype == 0)
    assert red.source_index == 0 and red.source_file == "/data/train/img_0.png"
    e.save(str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert {t["prototype"]: t["source_file"] for t in saved["top"]}[0] == "/data/train/img_0.png"
    assert "source: img_0.png" in (tmp_path / "out" / "index.html").read_text()
    del dataset.paths
    assert explain_image(model, canvas(64), push_records=records, push_images=subset).top[0].source_file is None


def test_edges_class_bounds_and_a_second_save(tmp_path):
    """A source patch at the image's top-left corner keeps its boxes (row and column 0 are boxes, -1 is none);
    class_idx is refused from num_classes on; saving again in a folder drops the earlier explanation's panels."""
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    images = [paint(canvas(64), (0, 0), RED), paint(canvas(64), (3, 0), GREEN)]
    dataset = ListDataset(images, [0, 1], classes=["red", "green"])
    records = push_prototypes(model, DataLoader(dataset, batch_size=2), progress=False)
    e = explain_image(model, paint(canvas(64), (4, 4), RED), push_records=records, push_images=dataset, top_k=2)
    red = next(x for x in e.top if x.prototype == 0)
    assert red.source_rf_box == (0, 8, 0, 8) and red.source_box is not None and red.source_box[0] == 0
    green = next(x for x in e.top if x.prototype == 1)
    assert green.source_rf_box == (24, 32, 0, 8) and green.source_box[2] == 0
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"class_idx must be in \[0, 2\)"):
            explain_image(model, images[0], class_idx=bad)
    out = tmp_path / "out"
    e.save(str(out))
    assert sorted(f for f in os.listdir(out) if f.startswith("rank")) == ["rank01_prototype0.png",
                                                                          "rank02_prototype1.png"]
    (out / "notes.txt").write_text("mine")
    explain_image(model, images[1], top_k=1).save(str(out))
    assert sorted(f for f in os.listdir(out) if f.startswith("rank")) == ["rank01_prototype1.png"]
    assert (out / "notes.txt").read_text() == "mine"  # only the panels' names are removed


def test_top_prototypes_of_a_class_other_than_the_predicted_one_rank_by_its_own_contributions():
    """With class_idx != the predicted class, each PrototypeEvidence's contribution is similarity x weight[c, j]
    of the explained class c (not of the predicted one), and the top-k are ranked as for c: the prototypes
    weighing for c first, each group by contribution to c."""
    torch.manual_seed(0)
    model = ProtoPNet("tiny", num_classes=4, prototypes_per_class=3, prototype_dim=16).eval()
    with torch.no_grad():
        model.last_layer.weight.normal_()
    image = torch.rand(3, 64, 64)
    predicted = explain_image(model, image, top_k=1).predicted_class
    c = (predicted + 1) % 4
    e = explain_image(model, image, top_k=12, class_idx=c)
    assert e.class_idx == c and e.predicted_class == predicted
    contributions = e.contributions(c)
    weights = model.last_layer.weight.detach()
    for x in e.top:
        assert x.weight == float(weights[c, x.prototype])
        torch.testing.assert_close(torch.tensor(x.contribution), contributions[x.prototype])
    expected = sorted(range(12), key=lambda j: (-(weights[c, j] > 0).item(), -contributions[j].item()))
    assert [x.prototype for x in e.top] == expected


def test_a_second_save_keeps_other_png_files_of_the_folder(tmp_path):
    """Saving into a folder drops only files named like its panels (rankNN_prototypeJ.png): a user's own PNG
    there (or one named like a panel with a suffix) stays."""
    model = colour_model([RED, GREEN], [0, 1], num_classes=2)
    out = tmp_path / "out"
    explain_image(model, paint(canvas(64), (4, 4), RED), top_k=2).save(str(out))
    mine = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    save_png(mine, str(out / "my_photo.png"))
    save_png(mine, str(out / "rank01_prototype0.png.png"))
    explain_image(model, paint(canvas(64), (4, 4), GREEN), top_k=1).save(str(out))
    assert os.path.isfile(out / "my_photo.png")
    assert sorted(f for f in os.listdir(out) if f.startswith("rank")) == ["rank01_prototype0.png.png",
                                                                          "rank01_prototype1.png"]
