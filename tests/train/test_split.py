"""The validation split: a stratified, seeded hold-out of the training set, for every dataset kind."""

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from protokern.train.config import TrainConfig
from protokern.train.data import build_datasets, build_splits, stratified_split
from tests.data import test_cars
from tests.data.test_cub import make_cub


def test_stratified_split_holds_out_a_fraction_of_each_class():
    targets = [0] * 20 + [1] * 10 + [2] * 5 + [3] * 2 + [4]  # class 4 has one image: it stays in training
    kept, held = stratified_split(targets, 0.2, seed=0)
    assert sorted(kept + held) == list(range(len(targets))) and not set(kept) & set(held)
    assert kept == sorted(kept) and held == sorted(held)
    per_class = collections.Counter(targets[i] for i in held)
    assert per_class == {0: 4, 1: 2, 2: 1, 3: 1}  # round(0.2 n), at least one, never a class's last image
    assert stratified_split(targets, 0.2, seed=0) == (kept, held)
    assert stratified_split(targets, 0.2, seed=1) != (kept, held)


def test_stratified_split_shuffles_within_each_class():
    targets = [i % 2 for i in range(200)]
    _, held = stratified_split(targets, 0.5, seed=3)
    assert len(held) == 100 and held != list(range(0, 200, 2))[:50] + list(range(1, 200, 2))[:50]
    assert max(held) > 150 and min(held) < 50  # drawn from the whole class, not its first images


def _check(cfg: TrainConfig, full_train_len: int, classes_with_val: int):
    splits = build_splits(cfg)
    train, val = splits.train, splits.val
    assert splits.push is train
    assert len(train) + len(val) == full_train_len
    assert not set(train.indices) & set(val.indices) and train.dataset is val.dataset
    assert len(set(val.targets)) == classes_with_val and train.classes == val.classes == splits.test.classes
    assert splits.num_classes == len(train.classes)
    for subset in (train, val):
        for i in range(len(subset)):
            image, label = subset[i]
            assert label == subset.targets[i] == subset.dataset.targets[subset.indices[i]]
            torch.testing.assert_close(image, subset.dataset[subset.indices[i]][0])
    # build_datasets (the old 4-tuple) gives the same training / push images
    old_train, _, old_push, num_classes = build_datasets(cfg)
    assert old_train.indices == train.indices and old_push.indices == train.indices
    # val_fraction 0: the whole training set, no validation set (selection on test, as the original)
    whole = build_splits(TrainConfig(**{**cfg.to_dict(), "val_fraction": 0.0}))
    assert whole.val is None and len(whole.train) == full_train_len and whole.push is whole.train
    return splits


def test_synthetic_split():
    cfg = TrainConfig(dataset="synthetic", synthetic_classes=3, synthetic_train_per_class=10,
                      synthetic_test_per_class=2, image_size=32, val_fraction=0.2, seed=5)
    splits = _check(cfg, 30, 3)
    assert collections.Counter(splits.val.targets) == {0: 2, 1: 2, 2: 2}
    full = build_splits(TrainConfig(**{**cfg.to_dict(), "val_fraction": 0.0})).train
    torch.testing.assert_close(splits.val.boxes, torch.as_tensor(full.boxes)[splits.val.indices])


def test_cub_split(tmp_path):
    box = (4.0, 4.0, 20.0, 20.0)
    images = [(cid, train, (40, 40), box, "RGB") for cid in (1, 2, 3) for train in (1, 1, 1, 1, 0)]
    make_cub(tmp_path, images)
    cfg = TrainConfig(dataset="cub", data_root=str(tmp_path), image_size=32, pretrained=False, val_fraction=0.25)
    splits = _check(cfg, 12, 3)
    assert collections.Counter(splits.val.targets) == {0: 1, 1: 1, 2: 1}


def test_cars_split(tmp_path, monkeypatch):
    rows = [(f"{i:05d}.jpg", (40, 30), (3, 3, 30, 25), 1 + i % 3) for i in range(1, 10)]
    monkeypatch.setattr(test_cars, "TRAIN", rows)
    test_cars.make_cars(tmp_path)
    cfg = TrainConfig(dataset="cars", data_root=str(tmp_path), image_size=32, pretrained=False, val_fraction=0.3)
    splits = _check(cfg, 9, 3)
    assert len(splits.val) == 3


def test_folder_split(tmp_path):
    for part, count in (("train", 5), ("test", 1)):
        for c, colour in enumerate(((200, 0, 0), (0, 200, 0))):
            folder = tmp_path / part / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(folder / f"{i}.png")
    cfg = TrainConfig(dataset="folder", data_root=str(tmp_path), image_size=16, pretrained=False, val_fraction=0.4)
    splits = _check(cfg, 10, 2)
    assert collections.Counter(splits.val.targets) == {0: 2, 1: 2}


def test_a_split_that_holds_out_nothing_is_an_error():
    cfg = TrainConfig(dataset="synthetic", synthetic_classes=2, synthetic_train_per_class=1,
                      synthetic_test_per_class=1, image_size=32, val_fraction=0.5)
    with pytest.raises(ValueError, match="holds out no image.*--val-fraction 0"):
        build_splits(cfg)


def test_held_out_indices_are_sorted_whatever_the_draw():
    """(kept, held_out) are both sorted lists (the validation subset follows the dataset's order) for several
    seeds and class layouts; the draw order within a class (randperm) must not leak out (seed 0 of the existing
    test happens to draw in increasing order)."""
    for targets in ([i % 3 for i in range(60)], [0] * 20 + [1] * 10 + [2] * 5):
        for seed in range(4):
            kept, held = stratified_split(targets, 0.3, seed=seed)
            assert held == sorted(held) and kept == sorted(kept), (seed, held)
            assert sorted(kept + held) == list(range(len(targets)))
