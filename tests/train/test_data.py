"""The trainer's data: the training loader's order and epoch length, the synthetic seed, subsets' box kind and
per-class counts (known answers on the synthetic set and small stand-ins)."""

from __future__ import annotations

import torch

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
