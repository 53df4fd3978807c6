"""Data errors that name the file (issue 13, section 5): bad images, escaping CUB paths, missing CUB lines,
unsupported files in an ImageFolder tree, and --skip-bad-images."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.data import BadImageError, BadImageWarning, CUB200, ImageFolderDataset, open_rgb, prepare_images
from protokern.data import transforms
from tests.data.test_cub import make_cub
from tests.fake_trees import write_bad_images

KINDS = ("truncated", "garbage", "text", "bomb", "big")


def good_image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), colour, np.uint8)).save(path)


def folder_with_bad(root, kinds=KINDS):
    """root/a: two good PNGs; root/b: one good PNG and one bad file of each kind in ``kinds``."""
    good_image(root / "a" / "1.png", (200, 0, 0))
    good_image(root / "a" / "2.png", (0, 200, 0))
    good_image(root / "b" / "3.png", (0, 0, 200))
    names = write_bad_images(root / "tmp_bad")
    for kind in kinds:
        os.rename(root / "tmp_bad" / names[kind], root / "b" / names[kind])
    for leftover in (root / "tmp_bad").iterdir():
        leftover.unlink()
    (root / "tmp_bad").rmdir()
    return [str(root / "b" / names[k]) for k in kinds]


@pytest.mark.parametrize("kind", KINDS)
def test_every_decode_error_names_the_file(tmp_path, kind):
    name = write_bad_images(tmp_path)[kind]
    with pytest.raises(BadImageError, match=name) as info:
        open_rgb(tmp_path / name)
    assert info.value.path == str(tmp_path / name)
    if kind in ("bomb", "big"):
        assert "decompression bomb" in str(info.value)


def test_pixel_limit_holds_without_pils(tmp_path, monkeypatch):
    good_image(tmp_path / "x.png", (1, 2, 3))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user switched PIL's check off
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError, match=r"x\.png.*24x20 = 480 pixels"):
        open_rgb(tmp_path / "x.png")
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 480)
    assert open_rgb(tmp_path / "x.png").size == (24, 20)


def test_a_raised_pixel_limit_is_the_limit(tmp_path, monkeypatch):
    """MAX_IMAGE_PIXELS decides also above PIL's own limit (which raises past twice itself), and PIL's stays."""
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "x.png")  # 3000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_rgb(tmp_path / "x.png").size == (60, 50)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(BadImageError, match=r"60x50 = 3000 pixels.*MAX_IMAGE_PIXELS = 2000"):
        open_rgb(tmp_path / "x.png")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_dataset_items_name_the_file(tmp_path):
    bad = folder_with_bad(tmp_path / "tree", kinds=("truncated",))
    ds = ImageFolderDataset(tmp_path / "tree", image_size=8)
    with pytest.raises(BadImageError, match="cut.jpg"):
        ds[ds.paths.index(bad[0])]
    base = make_cub(tmp_path / "cub")
    ds = CUB200(tmp_path / "cub", "train", image_size=8)
    (base / "images" / ds.paths[1].split("images" + os.sep, 1)[1]).write_bytes(b"\xff\xd8\xff\xe0junk")
    with pytest.raises(BadImageError, match=os.path.basename(ds.paths[1])):
        ds[1]


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_skip_bad_images(tmp_path, cache):
    bad = folder_with_bad(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        view = prepare_images(ds, cache, skip_bad_images=True, progress=False, workers=2)
        for _ in range(2):  # two epochs: no further warnings
            items = [view[i] for i in range(len(view))]
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert sorted(view.skipped) == sorted(bad) and len(messages) == len(bad)
    assert all(any(path in m for m in messages) for path in bad)
    good = [i for i, p in enumerate(ds.paths) if p not in bad]
    assert len(view) == 3 and view.paths == [ds.paths[i] for i in good]
    assert view.targets == [0, 0, 1]
    for (x, y), i in zip(items, good):
        ref, label = ds[i]
        assert torch.equal(x, ref) and y == label


def test_without_skip_the_cache_pass_names_the_file(tmp_path):
    folder_with_bad(tmp_path, kinds=("garbage",))
    ds = ImageFolderDataset(tmp_path, image_size=8)
    with pytest.raises(BadImageError, match=r"garbage\.jpg.*--skip-bad-images"):
        prepare_images(ds, "memory", progress=False)
    assert prepare_images(ds, "off") is ds  # streaming without skipping: errors come at access


def test_cub_path_escaping_the_root_is_an_error(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / "images.txt").read_text().splitlines()
    for rel in ("../../etc/hostname", "/etc/hostname", "001.Black_footed_Albatross/../../../x.jpg"):
        (base / "images.txt").write_text("\n".join(lines[:2] + [f"3 {rel}"] + lines[3:]) + "\n")
        with pytest.raises(ValueError, match=r"images\.txt:3: image path .* leads outside"):
            CUB200(tmp_path, "train")
    (base / "images.txt").write_text("\n".join(lines[:2] + ["3 sub/./../" + lines[2].split()[1]] + lines[3:]) + "\n")
    assert len(CUB200(tmp_path, "train")) == 3  # ".." that stays inside images/ is fine


def test_cub_missing_images_txt_line_warns(tmp_path):
    base = make_cub(tmp_path)
    lines = (base / "images.txt").read_text().splitlines()
    (base / "images.txt").write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # id 3 (train) gone
    with pytest.warns(UserWarning, match=r"images\.txt: no line for image id\(s\) 3 ") as record:
        ds = CUB200(tmp_path, "train")
    assert len([w for w in record if "no line for image id" in str(w.message)]) == 1
    assert ds.image_ids == [1, 4]
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CUB200(tmp_path, "train")  # complete files: no warning


def test_unsupported_folder_files_listed_once(tmp_path):
    good_image(tmp_path / "a" / "1.png", (9, 9, 9))
    good_image(tmp_path / "b" / "2.jpeg", (9, 9, 9))
    (tmp_path / "a" / "notes.txt").write_text("x")
    good_image(tmp_path / "a" / "anim.gif", (9, 9, 9))  # an image, of a type ImageFolder does not list
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "b" / "deep" / "scan.pdf").write_bytes(b"%PDF")
    with pytest.warns(UserWarning, match=r"3 file\(s\) left out, of types torchvision's ImageFolder does not read "
                                         r"either \(it reads \.jpg .*\.webp\): .*anim\.gif.*notes\.txt.*scan\.pdf") \
            as record:
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert len(record) == 1 and len(ds) == 2
    assert ds.unsupported == [str(tmp_path / "a" / "anim.gif"), str(tmp_path / "a" / "notes.txt"),
                              str(tmp_path / "b" / "deep" / "scan.pdf")]


def test_cars_fname_escaping_the_root_is_an_error(tmp_path):
    import scipy.io

    from protokern.data import StanfordCars
    from tests.data.test_cars import TRAIN, make_cars, struct_array

    make_cars(tmp_path)
    rows = [TRAIN[0], ("../../etc/hostname",) + TRAIN[1][1:]]
    scipy.io.savemat(tmp_path / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(rows)})
    with pytest.raises(ValueError, match=r"cars_train_annos\.mat: annotation #2: image path .* leads outside"):
        StanfordCars(tmp_path, "train")


def test_cub_view_without_a_bad_image_keeps_its_annotations(tmp_path):
    base = make_cub(tmp_path)
    ds = CUB200(tmp_path, "train", image_size=8)
    good_boxes = ds.boxes.clone()
    ds = CUB200(tmp_path, "train", image_size=8)  # fresh: no header sizes cached yet
    bad = ds.paths[1]
    (base / "images" / bad.split("images" + os.sep, 1)[1]).write_bytes(b"garbage")
    with pytest.raises(BadImageError, match=os.path.basename(bad)):
        ds.boxes  # the header of the bad file cannot be read: named
    with pytest.warns(BadImageWarning):
        view = prepare_images(ds, "memory", skip_bad_images=True, progress=False)
    assert view.skipped == [bad] and view.image_ids == [ds.image_ids[0], ds.image_ids[2]]
    assert torch.equal(view.boxes, good_boxes[[0, 2]])
    assert torch.equal(view.part_locations(1), ds.part_locations(2)) and torch.equal(view.box(1), good_boxes[2])
