"""StanfordCars on a tiny fake devkit tree (.mat files in the real struct layout)."""
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from protokern.data import StanfordCars
from protokern.data.cars import read_annotations, read_class_names
from tests.fake_trees import check_items

FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
CLASS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
GREY, BLUE = (100, 100, 100), (20, 40, 230)
# (fname, (w, h), 1-based inclusive box x1 y1 x2 y2, class 1-based)
TRAIN = [("00001.jpg", (60, 40), (11, 6, 40, 30), 1), ("00002.jpg", (50, 50), (1, 1, 50, 50), 3),
         ("00003.jpg", (300, 80), (10, 20, 280, 70), 2)]
TEST = [("00001.jpg", (40, 60), (5, 10, 30, 55), 2), ("00002.jpg", (64, 48), (3, 4, 60, 44), 3)]


def struct_array(rows, with_class=True):
    """1 x N MATLAB struct array, each field a (1, 1) integer array or a string, as in the devkit."""
    fields = FIELDS if with_class else FIELDS[:4] + FIELDS[5:]
    arr = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (fname, _, box, cls) in enumerate(rows):
        ints = [np.array([[v]], np.uint8 if v < 256 else np.uint16) for v in box]
        if with_class:
            ints.append(np.array([[cls]], np.uint8))
        arr[0, i] = tuple(ints) + (np.array([fname]),)
    return arr


def write_images(folder, rows, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for fname, (w, h), (x1, y1, x2, y2), _ in rows:
        arr = np.zeros((h, w, 3), np.uint8) + np.array(GREY, np.uint8)
        arr[y1 - 1:y2, x1 - 1:x2] = BLUE  # inclusive 1-based pixel indices
        Image.fromarray(arr).convert(mode).save(folder / fname, "JPEG", quality=100)


def make_cars(root, test_labels_in="root", nested=False):
    devkit = root / "devkit"
    devkit.mkdir(parents=True)
    names = np.empty((1, len(CLASS_NAMES)), dtype=object)
    for i, n in enumerate(CLASS_NAMES):
        names[0, i] = np.array([n])
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": struct_array(TRAIN)})
    scipy.io.savemat(devkit / "cars_test_annos.mat", {"annotations": struct_array(TEST, with_class=False)})
    where = root if test_labels_in == "root" else devkit
    scipy.io.savemat(where / "cars_test_annos_withlabels.mat", {"annotations": struct_array(TEST)})
    write_images(root / "cars_train" / ("cars_train" if nested else ""), TRAIN)
    write_images(root / "cars_test", TEST, mode="CMYK")
    return root


@pytest.fixture()
def cars_root(tmp_path):
    return make_cars(tmp_path)


def test_mat_readers(cars_root):
    assert read_class_names(cars_root / "devkit" / "cars_meta.mat") == CLASS_NAMES
    rows = read_annotations(cars_root / "devkit" / "cars_train_annos.mat")
    assert rows[2] == {"bbox_x1": 10.0, "bbox_y1": 20.0, "bbox_x2": 280.0, "bbox_y2": 70.0,
                       "class": 2.0, "fname": "00003.jpg"}


def test_splits_and_labels(cars_root):
    train = StanfordCars(cars_root, "train", image_size=32)
    test = StanfordCars(cars_root, "test", image_size=32)
    assert train.classes == CLASS_NAMES and len(train) == 3 and len(test) == 2
    assert train.targets == [0, 2, 1] and test.targets == [1, 2]
    for ds in (train, test):
        check_items(ds, 32)


def test_bbox_crop_is_the_car(cars_root):
    blue = torch.tensor(BLUE).view(3, 1, 1) / 255.0
    for split in ("train", "test"):  # test images are CMYK JPEGs
        ds = StanfordCars(cars_root, split, image_size=20, crop="bbox")
        for i in range(len(ds)):
            assert (ds[i][0] - blue).abs().mean() < 0.04, (split, i)
        assert torch.allclose(ds.boxes, torch.tensor([0.0, 0.0, 20.0, 20.0]).expand(len(ds), 4))


def test_no_crop_boxes(cars_root):
    ds = StanfordCars(cars_root, "train", image_size=30, crop="none")
    # image 1: 60x40, 1-based inclusive (11, 6, 40, 30) -> continuous (10, 5, 40, 30), scale (0.5, 0.75)
    assert torch.allclose(ds.boxes[0], torch.tensor([5.0, 3.75, 20.0, 22.5]))
    assert torch.allclose(ds.source_boxes[0], torch.tensor([10.0, 5.0, 40.0, 30.0]))
    x, _ = ds[0]
    assert (x[2, 6:21, 7:19] > 0.8).all() and (x[:, :, 23:] - 100 / 255).abs().max() < 0.05


def test_alternative_layouts(tmp_path):
    make_cars(tmp_path, test_labels_in="devkit", nested=True)
    assert len(StanfordCars(tmp_path, "test", image_size=16)) == 2
    train = StanfordCars(tmp_path, "train", image_size=16)
    assert os.path.join("cars_train", "cars_train") in train.paths[0]
    assert train[0][0].shape == (3, 16, 16)


def test_missing_and_bad_files(cars_root):
    os.rename(cars_root / "cars_test_annos_withlabels.mat", cars_root / "moved.mat")
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        StanfordCars(cars_root, "test")
    # the unlabeled test annotations have no class field
    os.replace(cars_root / "devkit" / "cars_test_annos.mat", cars_root / "cars_test_annos_withlabels.mat")
    with pytest.raises(ValueError, match="class"):
        StanfordCars(cars_root, "test")
    os.remove(cars_root / "devkit" / "cars_meta.mat")
    with pytest.raises(FileNotFoundError, match="cars_meta.mat"):
        StanfordCars(cars_root, "train")


def test_missing_image_and_bad_class(tmp_path):
    root = make_cars(tmp_path)
    ds = StanfordCars(root, "train")
    os.remove(ds.paths[1])
    with pytest.raises(FileNotFoundError, match="00002.jpg"):
        ds[1]
    for cls in (7, 4, 0):  # 3 classes: 1..3 (4, one past the last, and 0, one before the first)
        bad = [(f, s, b, cls) for f, s, b, _ in TRAIN]
        scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(bad)})
        with pytest.raises(ValueError, match=f"annotation #1 has class {cls}, outside 1..3"):
            StanfordCars(root, "train")
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"other": np.zeros(3)})
    with pytest.raises(ValueError, match="annotations"):
        StanfordCars(root, "train")


@pytest.mark.parametrize("field, value, match", [("class", 1.5, "class 1.5 is not an integer"),
                                                 ("class", np.nan, "class is nan"),
                                                 ("bbox_x2", np.inf, "bbox_x2 is inf")])
def test_annotations_hold_finite_numbers_and_integer_classes(tmp_path, field, value, match):
    root = make_cars(tmp_path)
    arr = struct_array(TRAIN)
    arr[0, 1][field] = np.array([[value]], np.float64)
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": arr})
    with pytest.raises(ValueError, match=rf"cars_train_annos.mat: bad annotation #2: {match}"):
        StanfordCars(root, "train")
