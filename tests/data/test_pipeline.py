"""The input pipeline in the trainer: --data-cache picks cached or streamed datasets and loaders, and
--skip-bad-images leaves bad files out and counts them in summary.json."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from protokern.data import CachedBatches, ImageFolderDataset, ImageView
from protokern.data.cache import cached_batches, prepare_images
from protokern.train.config import parse_config
from protokern.train.data import build_datasets, train_loader
from protokern.train.distributed import DistInfo
from tests.fake_trees import write_bad_images
from tests.train.conftest import TINY_ARGS


def folder_dataset(root, per_class=4, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 60, (size, size + 6, 3), dtype=np.uint8)
                arr[8:24, 8:24, c] = 230  # the class cue: a square in the class's channel
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
    return root


def config(root, *flags):
    cfg, _ = parse_config(["--dataset", "folder", "--data-root", str(root), "--image-size", "16", "--device", "cpu",
                           "--num-workers", "0", "--quiet", "--train-batch-size", "5", *flags])
    return cfg


def test_data_cache_flag(tmp_path):
    root = folder_dataset(tmp_path)
    cfg = config(root, "--data-cache", "memory")
    train, test, push, classes = build_datasets(cfg)
    assert classes == 3 and isinstance(test, ImageView) and test.cached
    assert prepare_images is not None and ImageView is type(test)
    loader = train_loader(train, cfg, DistInfo())
    assert isinstance(loader, CachedBatches)
    off = config(root, "--data-cache", "off")
    s_train, s_test, _, _ = build_datasets(off)
    assert isinstance(s_test, ImageFolderDataset)
    streamed = train_loader(s_train, off, DistInfo())
    assert isinstance(streamed, DataLoader)
    for epoch in (0, 3):  # same batches, cached or streamed
        loader.sampler.set_epoch(epoch)
        streamed.sampler.set_epoch(epoch)
        got, want = list(loader), list(streamed)
        assert len(got) == len(want) == len(loader) == len(streamed)
        for (x, y), (rx, ry) in zip(got, want):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(SystemExit):
        config(root, "--data-cache", "disk")


def test_cached_batches_through_index_wrappers(tmp_path):
    root = folder_dataset(tmp_path)
    ds = ImageFolderDataset(root / "train", image_size=16)
    view = prepare_images(ds, "memory", progress=False)

    class Twice(torch.utils.data.Dataset):  # a repeat-like wrapper
        def __init__(self, dataset):
            self.dataset, self.copies = dataset, 2

        def __len__(self):
            return 2 * len(self.dataset)

        def __getitem__(self, i):
            return self.dataset[i % len(self.dataset)]

    wrapped = Twice(Subset(view, [5, 1, 7, 0, 3]))
    order = list(range(len(wrapped)))[::-1]
    got = list(cached_batches(wrapped, order, 4, "cpu"))
    want = list(DataLoader(Twice(Subset(ds, [5, 1, 7, 0, 3])), batch_size=4, sampler=order))
    assert len(got) == len(want) == 3
    for (x, y), (rx, ry) in zip(got, want):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert cached_batches(Twice(ds), order, 4, "cpu") is None  # not cached: the trainer keeps its DataLoader


def tiny_run(root, tmp_path, *flags):
    from protokern.train.main import main

    args = TINY_ARGS + ["--dataset", "folder", "--data-root", str(root), "--image-size", "32",
                        "--out", str(tmp_path / "run"), *flags]
    return main(args)


def test_trainer_skips_and_counts_bad_images(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data")
    names = write_bad_images(tmp_path / "bad")
    (root / "train" / "bee" / "broken.jpg").write_bytes((tmp_path / "bad" / names["truncated"]).read_bytes())
    (root / "test" / "cat" / "junk.jpg").write_bytes((tmp_path / "bad" / names["garbage"]).read_bytes())
    with pytest.raises(SystemExit) as info:  # one line on stderr naming the file (the cache pass meets it)
        tiny_run(root, tmp_path)
    assert info.value.code == 2 and "broken.jpg: cannot decode image" in capsys.readouterr().err
    # streamed through DataLoader workers: the worker's error comes back as itself, one line (was a RuntimeError
    # with both tracebacks)
    with pytest.raises(SystemExit) as info:
        tiny_run(root, tmp_path, "--data-cache", "off", "--num-workers", "2", "--out", str(tmp_path / "run2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert ".jpg: cannot decode image" in err[0] and "DataLoader worker" not in err[0]
    summary = tiny_run(root, tmp_path, "--skip-bad-images", "--data-cache", "off")
    assert summary["skipped_images"] == 2
    assert summary["part_localisation"] is None and "no part boxes" in summary["part_localisation_note"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == 2


def test_splits_emptied_by_skipped_images_and_classes_without_training_images_are_refused(tmp_path):
    """--skip-bad-images leaving no test image gave 'test accuracy 0.000' and exit 0; a class without training
    images (a CUB classes.txt longer than the images, a class whose only images are bad) trained a model that
    nothing taught that class, with prototypes push could not place. Both: one line before training."""
    from protokern.train.data import build_splits

    names = write_bad_images(tmp_path / "bad")
    garbage = (tmp_path / "bad" / names["garbage"]).read_bytes()
    root = folder_dataset(tmp_path / "no_test")
    for path in (root / "test").rglob("*.png"):
        path.write_bytes(garbage)
    with pytest.raises(ValueError, match=r"^dataset 'folder': no test images left after --skip-bad-images \(12 "):
        build_splits(config(root, "--skip-bad-images"))
    root = folder_dataset(tmp_path / "one_class_bad")
    for path in (root / "train" / "bee").glob("*.png"):
        path.write_bytes(garbage)
    with pytest.raises(ValueError, match=r"1 of its 3 classes have no training images \('bee'; --skip-bad-images "
                                         r"left some out\): nothing would teach the model those classes and push "
                                         r"would find no image for their prototypes"):
        build_splits(config(root, "--skip-bad-images"))


def test_folder_classes_of_train_and_test_must_match_and_the_line_names_them(tmp_path):
    import shutil
    import unicodedata

    from protokern.train.data import build_splits

    root = folder_dataset(tmp_path / "missing")
    shutil.rmtree(root / "test" / "cat")
    with pytest.raises(ValueError, match=r"must hold the same class folders: train/ only: 'cat'$"):
        build_splits(config(root))
    root = folder_dataset(tmp_path / "unicode")
    (root / "train" / "cat").rename(root / "train" / unicodedata.normalize("NFC", "café"))
    (root / "test" / "cat").rename(root / "test" / unicodedata.normalize("NFD", "café"))
    with pytest.raises(ValueError, match=r"train/ only: '.*'; test/ only: '.*'; some differ only in their Unicode form"):
        build_splits(config(root))
