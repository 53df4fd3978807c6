"""The trainer's data: the training loader's order and epoch length, the synthetic seed, subsets' box kind and
per-class counts (known answers on the synthetic set and small stand-ins)."""

from __future__ import annotations

import pytest
import torch

import protokern.train.data as train_data
from protokern.train.config import TrainConfig
from protokern.train.data import LabelledSubset, build_splits, class_counts, train_loader
from protokern.train.distributed import DistInfo


def _cfg(**kwargs) -> TrainConfig:
    base = dict(dataset="synthetic", synthetic_classes=2, synthetic_train_per_class=6, synthetic_test_per_class=1,
                image_size=16, val_fraction=0.0, seed=1, device="cpu", num_workers=0, data_cache="off",
                train_batch_size=4, augment_copies=1)
    return TrainConfig(**{**base, **kwargs}).validate(schedule=False)


def _order(cfg: TrainConfig) -> list[int]:
    train = build_splits(cfg).train
    loader = train_loader(train, cfg, DistInfo())
    loader.sampler.set_epoch(0)
    return list(loader.sampler)


def test_the_loader_order_follows_the_seed_and_copies_lengthen_the_epoch():
    one, again, other = _order(_cfg()), _order(_cfg()), _order(_cfg(seed=2))
    assert one == again and one != other and sorted(one) == list(range(12))
    doubled = _order(_cfg(augment_copies=2))
    assert sorted(doubled) == list(range(24))  # each image twice (items i and i + 12 are the same image)


def test_the_synthetic_seed_draws_the_images_and_the_run_seed_does_not():
    images = lambda cfg: torch.stack([build_splits(cfg).train[i][0] for i in range(3)])  # noqa: E731
    base = images(_cfg(seed=1, synthetic_seed=7))
    assert torch.equal(base, images(_cfg(seed=2, synthetic_seed=7)))
    assert not torch.equal(base, images(_cfg(seed=1, synthetic_seed=8)))
    assert torch.equal(images(_cfg(seed=3)), images(_cfg(seed=1, synthetic_seed=3)))  # default: the run's seed


def test_subsets_keep_the_box_kind_and_counts_cover_every_class():
    class Objects(torch.utils.data.Dataset):
        classes = ["a", "b", "c"]
        targets = [0, 1, 0, 1]
        boxes = torch.zeros(4, 4)
        box_kind = "object"

        def __len__(self):
            return 4

    subset = LabelledSubset(Objects(), [0, 2])
    assert subset.box_kind == "object" and subset.targets == [0, 0]
    assert class_counts(subset).tolist() == [2, 0, 0]  # classes without images are counted, as 0


class _Files(torch.utils.data.Dataset):
    """Four labelled 'file' images with paths and part boxes."""

    classes = ["a", "b"]
    targets = [0, 1, 0, 1]
    paths = ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg", "/d/3.jpg"]
    boxes = torch.arange(16.0).view(4, 4)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.full((3, 2, 2), float(index)), self.targets[index]


def test_paths_targets_and_boxes_of_a_subset_are_those_of_its_images():
    """LabelledSubset(d, [3, 0]) names the files of images 3 and 0 (explanations show them as the prototypes'
    sources): paths, targets and boxes are selected by its indices, not the whole dataset's."""
    sub = LabelledSubset(_Files(), [3, 0])
    assert sub.paths == ["/d/3.jpg", "/d/0.jpg"]
    assert sub.targets == [1, 0] and sub.classes == ["a", "b"]
    assert torch.equal(sub.boxes, _Files.boxes[[3, 0]])
    assert float(sub[0][0][0, 0, 0]) == 3.0 and len(sub) == 2


def test_an_empty_test_split_is_refused_as_empty(monkeypatch):
    """A dataset whose test split has no images (train has some) stops with 'empty train (N) or test (0) split',
    not with a later message blaming --skip-bad-images (which was not even given)."""
    real = train_data.SyntheticParts

    def parts(images_per_class, split, **kw):
        data = real(images_per_class=images_per_class, split=split, **kw)
        if split == "test":
            data.targets, data._images = [], data._images[:0]
        return data

    monkeypatch.setattr(train_data, "SyntheticParts", parts)
    cfg = TrainConfig(dataset="synthetic", image_size=32, synthetic_classes=2, synthetic_train_per_class=3,
                      synthetic_test_per_class=2, val_fraction=0.0, data_cache="off", quiet=True, device="cpu")
    with pytest.raises(ValueError, match=r"empty train \(6\) or test \(0\) split"):
        train_data.build_splits(cfg)
