"""Datasets and loaders of a training run (built on ``protokern.data``)."""

from __future__ import annotations

import os
import unicodedata
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protokern.data import CUB200, ImageFolderDataset, StanfordCars, SyntheticParts
from protokern.data.cache import cached_batches, prepare_images
from protokern.data.loader import worker_init_fn
from protokern.train.config import TrainConfig
from protokern.train.distributed import DistInfo, resolve_device
from protokern.utils import default_num_workers, listed, positive_int


class Splits(NamedTuple):
    """The datasets of a run. ``train`` and ``push`` are the same images (the training set less the held-out
    validation images); ``val`` is None when ``val_fraction`` is 0 (then the test set selects best.pt)."""

    train: Dataset
    val: Dataset | None
    test: Dataset
    push: Dataset
    num_classes: int


class LabelledSubset(Dataset):
    """Images ``indices`` of a dataset, keeping its ``classes``, ``targets``, ``paths`` and ``boxes``.

    Not a :class:`~torch.utils.data.Subset` on purpose: push records index the images of this set (push
    unwraps Subsets, which DDP sharding adds, down to the dataset they select from)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in indices]
        paths = getattr(dataset, "paths", None)
        if paths is not None:  # the files explanations name as prototypes' sources
            self.paths = [paths[i] for i in indices]
        boxes = getattr(dataset, "boxes", None)
        if boxes is not None:
            self.boxes = torch.as_tensor(boxes)[torch.as_tensor(self.indices, dtype=torch.long)]
            self.box_kind = getattr(dataset, "box_kind", "part")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def stratified_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(kept, held_out)`` sorted indices: about ``fraction`` of each class held out, at least one image of
    each class with two or more, never a class's last image; the same for the same ``(targets, seed)``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(targets, dtype=torch.long)
    held_out = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held_out += members[torch.randperm(len(members), generator=generator)[:count]].tolist()
    held = set(held_out)
    return [i for i in range(len(labels)) if i not in held], sorted(held)


def build_splits(cfg: TrainConfig) -> Splits:
    """Datasets of a run: a stratified, seeded (``cfg.seed``) hold-out of ``cfg.val_fraction`` of the training
    set for model selection; push, pruning and the last-layer stage see only the rest."""
    train, test = _load(cfg)
    num_classes = len(train.classes)
    if cfg.val_fraction == 0:
        return Splits(train, None, test, train, num_classes)
    kept, held_out = stratified_split(train.targets, cfg.val_fraction, cfg.seed)
    if not held_out:
        raise ValueError(f"--val-fraction {cfg.val_fraction} holds out no image: every class of the {len(train)} "
                         "training images has a single image (use --val-fraction 0)")
    train, val = LabelledSubset(train, kept), LabelledSubset(train, held_out)
    return Splits(train, val, test, train, num_classes)


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset, Dataset, int]:
    """``(train, test, push, num_classes)`` of :func:`build_splits`; the push set is the unaugmented train set
    (less the validation images), as the original's."""
    splits = build_splits(cfg)
    return splits.train, splits.test, splits.push, splits.num_classes


def _load(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The dataset's own ``(train, test)`` splits."""
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
            raise ValueError(_class_mismatch(cfg.data_root, train.classes, test.classes))
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"dataset {cfg.dataset!r}: empty train ({len(train)}) or test ({len(test)}) split")
    train, test = _prepared(train, cfg, "train"), _prepared(test, cfg, "test")
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise ValueError(f"dataset {cfg.dataset!r}: no {name} images left after --skip-bad-images "
                             f"({len(getattr(split, 'skipped', []))} skipped)")
    empty = [str(train.classes[c]) for c in (class_counts(train) == 0).nonzero().flatten().tolist()]
    if empty:
        raise ValueError(f"dataset {cfg.dataset!r}: {len(empty)} of its {len(train.classes)} classes have no training "
                         f"images ({listed(map(repr, empty), 5)}"
                         + ("; --skip-bad-images left some out" if getattr(train, "skipped", None) else "")
                         + "): nothing would teach the model those classes and push would find no image for their "
                         "prototypes; leave them out of the dataset (its class list)")
    return train, test


def class_counts(dataset: Dataset) -> torch.Tensor:
    """Images per class of ``dataset``: its ``targets`` counted over its ``classes``."""
    return torch.bincount(torch.as_tensor(dataset.targets, dtype=torch.int64), minlength=len(dataset.classes))


def _class_mismatch(root: str, train: list[str], test: list[str]) -> str:
    """The one-line reason why train/ and test/ of a folder dataset do not have the same class folders."""
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    parts = [f"{where} only: {listed(map(repr, names), 5)}"
             for where, names in (("train/", only_train), ("test/", only_test)) if names]
    if not parts:  # the same names in another order cannot happen (both sorted); say so rather than nothing
        parts = ["the same names, in another order"]
    nfc = lambda names: {unicodedata.normalize("NFC", n) for n in names}  # noqa: E731
    hint = ("; some differ only in their Unicode form (folders copied from macOS?): rename them"
            if nfc(only_train) & nfc(only_test) else "")
    return f"train/ and test/ of {root} must hold the same class folders: {'; '.join(parts)}{hint}"


def _prepared(dataset: Dataset, cfg: TrainConfig, name: str) -> Dataset:
    """``dataset`` through the input pipeline (``--data-cache``, ``--skip-bad-images``; protokern.data.cache):
    file images decoded once into a uint8 cache, bad ones left out and listed in ``dataset.skipped``."""
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    return prepare_images(dataset, cfg.data_cache, skip_bad_images=cfg.skip_bad_images, device=device,
                          progress=not cfg.quiet and os.environ.get("RANK", "0") == "0",
                          desc=f"decoding {cfg.dataset} {name}")


class Repeated(Dataset):
    """``copies`` copies of ``dataset`` back to back: item ``i`` is ``dataset[i % len(dataset)]``.

    With the training loader's shuffling and the on-device augmentation every copy is a fresh augmentation: an
    epoch over ``Repeated(train, 30)`` is the original's epoch over its 30 offline-augmented copies."""

    def __init__(self, dataset: Dataset, copies: int):
        self.dataset, self.copies = dataset, positive_int("copies", copies)

    def __len__(self) -> int:
        return len(self.dataset) * self.copies

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


def process_batch_size(global_batch: int, world_size: int) -> int:
    """This process's share of the global training batch; ``ValueError`` when it does not divide evenly."""
    if global_batch % world_size:
        raise ValueError(f"--train-batch-size {global_batch} is the global batch and must divide evenly across "
                         f"the {world_size} processes (try {max(world_size, global_batch // world_size * world_size)})")
    return global_batch // world_size


def train_loader(dataset: Dataset, cfg: TrainConfig, info: DistInfo) -> DataLoader:
    """Shuffling loader whose order depends only on ``(seed, epoch)``: call ``loader.sampler.set_epoch``.

    An epoch holds ``cfg.augment_copies`` copies of every image (:class:`Repeated`), shuffled together; each
    process loads ``cfg.train_batch_size / world_size`` of them per step (the global batch is
    ``train_batch_size``, as the original's DataParallel batch), so the steps per epoch do not depend on the
    number of processes.

    An adapter over ``protokern.data.make_loader``'s settings: a ``DistributedSampler`` (with this process's
    rank, even for one process) instead of a generator-driven ``RandomSampler``, so a resumed run sees
    exactly the batches an uninterrupted run would, whatever the number of workers. With N processes an epoch
    leaves out its last (N - 1 at most, a new draw every epoch) images rather than train on and count some twice,
    as the sampler's padding to a multiple of N would.
    """
    batch = process_batch_size(cfg.train_batch_size, info.world_size)
    if cfg.augment_copies > 1:
        dataset = Repeated(dataset, cfg.augment_copies)
    if len(dataset) < info.world_size:
        raise ValueError(f"{len(dataset)} training images (with --augment-copies) for {info.world_size} processes: "
                         "each needs at least one")
    workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    cached = cached_batches(dataset, sampler, batch, resolve_device(cfg.device, info.local_rank))
    if cached is not None:  # batches gathered from the uint8 cache, converted and prefetched on the device
        return cached
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      worker_init_fn=worker_init_fn())
