"""Datasets and loaders of a training run (built on ``protokern.data``)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protokern.data import CUB200, ImageFolderDataset, StanfordCars, SyntheticParts
from protokern.data.loader import default_num_workers
from protokern.train.config import TrainConfig
from protokern.train.distributed import DistInfo


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, Dataset, int]:
    """``(train, test, push, num_classes)``; the push set is the unaugmented train set, as the original's."""
    size = cfg.image_size
    if cfg.dataset == "synthetic":
        seed = cfg.seed if cfg.synthetic_seed is None else cfg.synthetic_seed
        common = dict(num_classes=cfg.synthetic_classes, image_size=size, seed=seed, part_size=cfg.synthetic_part_size)
        train = SyntheticParts(images_per_class=cfg.synthetic_train_per_class, split="train", **common)
        test = SyntheticParts(images_per_class=cfg.synthetic_test_per_class, split="test", **common)
    elif cfg.dataset == "cub":
        train = CUB200(cfg.data_root, split="train", crop=cfg.crop, image_size=size)
        test = CUB200(cfg.data_root, split="test", crop=cfg.crop, image_size=size)
    elif cfg.dataset == "cars":
        train = StanfordCars(cfg.data_root, split="train", image_size=size, crop=cfg.crop)
        test = StanfordCars(cfg.data_root, split="test", image_size=size, crop=cfg.crop)
    elif cfg.dataset == "folder":
        parts = [os.path.join(cfg.data_root, name) for name in ("train", "test")]
        for path in parts:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"dataset 'folder' expects {cfg.data_root}/train and /test; missing {path}")
        train, test = (ImageFolderDataset(path, image_size=size) for path in parts)
        if train.classes != test.classes:
            raise ValueError(f"train and test folders of {cfg.data_root} have different classes")
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"dataset {cfg.dataset!r}: empty train ({len(train)}) or test ({len(test)}) split")
    return train, test, train, len(train.classes)


def train_loader(dataset: Dataset, cfg: TrainConfig, info: DistInfo) -> DataLoader:
    """Shuffling loader whose order depends only on ``(seed, epoch)``: call ``loader.sampler.set_epoch``.

    An adapter over ``protokern.data.make_loader``'s settings: a ``DistributedSampler`` (with this process's
    rank, even for one process) instead of a generator-driven ``RandomSampler``, so a resumed run sees
    exactly the batches an uninterrupted run would, whatever the number of workers.
    """
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
    return DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


class WithIndex(Dataset):
    """``(image, label, index)`` items of a dataset (for metrics that need per-image annotations)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index
