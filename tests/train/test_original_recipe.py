"""The cub preset trains like the original ProtoPNet: optimiser steps per stage on a CUB-sized training set,
the push schedule of its 1000-epoch settings, the global batch under torchrun (2 gloo processes), the
original's retraining after pruning."""

import collections
import dataclasses
import json
import math
import os
import socket

import pytest
import torch
from torch.utils.data import Dataset

from protokern.train.config import parse_config, preset_config
from protokern.train.data import Repeated, process_batch_size, train_loader
from protokern.train.distributed import DistInfo
from protokern.train.main import main
from protokern.train.schedule import build_schedule, optimizer_steps

from .conftest import TINY_ARGS

CUB_TRAIN_IMAGES = 5994


class Blank(Dataset):
    """``n`` items of a 1x1 image labelled by their index (the loader's length and order is all that is looked at)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return torch.zeros(3, 1, 1), index


def original_run(num_train_epochs: int):
    """The original's main.py loop with its settings.py, as (stage, epoch) items: warm-up epochs 0-4, a push at
    every epoch >= push_start (10) in push_epochs (multiples of 10), each followed by 20 last-layer epochs."""
    num_warm_epochs, push_start = 5, 10
    push_epochs = [i for i in range(num_train_epochs) if i % 10 == 0]
    items = []
    for epoch in range(num_train_epochs):
        items.append(("warm" if epoch < num_warm_epochs else "joint", epoch))
        if epoch >= push_start and epoch in push_epochs:
            items.append(("push", epoch))
            items += [("last", epoch)] * 20
    return items


def original_steps(items, steps_per_epoch):
    counts = collections.Counter(stage for stage, _ in items)
    steps = {stage: counts[stage] * steps_per_epoch for stage in ("warm", "joint", "last")}
    return {**steps, "total": sum(steps.values())}


def test_cub_steps_per_stage_equal_the_original():
    cfg = dataclasses.replace(preset_config("cub"), num_workers=0)
    loader = train_loader(Blank(CUB_TRAIN_IMAGES), cfg, DistInfo())
    # the original's epoch: its 30 augmented copies of each image, in batches of 80 (the last one partial)
    assert len(loader) == math.ceil(CUB_TRAIN_IMAGES * 30 / 80) == 2248
    seen = collections.Counter(i % CUB_TRAIN_IMAGES for i in loader.sampler)
    assert set(seen.values()) == {30} and len(seen) == CUB_TRAIN_IMAGES
    steps = optimizer_steps(build_schedule(cfg), len(loader))
    assert steps == original_steps(original_run(cfg.epochs), 2248)
    assert (steps["warm"], steps["joint"], steps["last"]) == (11_240, 58_448, 134_880)
    # the demo keeps one copy per image
    demo = dataclasses.replace(preset_config("demo"), num_workers=0)
    assert len(train_loader(Blank(1000), demo, DistInfo())) == math.ceil(1000 / demo.train_batch_size)


def test_epochs_1000_reproduce_the_original_push_schedule():
    cfg = dataclasses.replace(preset_config("cub"), epochs=1000)
    schedule = build_schedule(cfg)
    assert [(s.stage, s.epoch) for s in schedule] == original_run(1000)
    assert sum(s.stage == "push" for s in schedule) == 99
    # the preset's 31 epochs are the original's first 31: three pushes, the last one at the final epoch
    short = build_schedule(preset_config("cub"))
    assert [(s.stage, s.epoch) for s in short] == original_run(31)


def test_cub_and_cars_presets_use_the_original_recipe():
    for name in ("cub", "cars"):
        cfg = preset_config(name)
        assert (cfg.augment_copies, cfg.augment_mode, cfg.prune_retrain, cfg.push_at_end) == (30, "original",
                                                                                              "original", False)
        assert (cfg.train_batch_size, cfg.aug_rotate, cfg.aug_skew, cfg.aug_shear) == (80, 15, 0.2, 10)
    demo = preset_config("demo")
    assert (demo.augment_copies, demo.augment_mode, demo.prune_retrain) == (1, "compose", "cached")
    cfg, _ = parse_config(["--preset", "cub", "--data-root", "x", "--augment-mode", "compose", "--augment-copies",
                           "2", "--prune-retrain", "cached"])
    assert (cfg.augment_mode, cfg.augment_copies, cfg.prune_retrain) == ("compose", 2, "cached")
    with pytest.raises(SystemExit):
        parse_config(["--augment-mode", "augmentor"])
    with pytest.raises(ValueError, match="augment_copies must be an int >= 1"):
        dataclasses.replace(preset_config("demo"), augment_copies=0).validate()


def test_repeated_and_process_batch():
    data = Repeated(Blank(5), 3)
    assert len(data) == 15 and [data[i][1] for i in (0, 4, 5, 13)] == [0, 4, 0, 3]
    with pytest.raises(ValueError, match="copies"):
        Repeated(Blank(5), 0)
    assert process_batch_size(80, 4) == 20 and process_batch_size(80, 1) == 80
    with pytest.raises(ValueError, match="--train-batch-size 81 is the global batch and must divide evenly across "
                                         "the 2 processes"):
        process_batch_size(81, 2)


def test_steps_per_stage_in_log_and_summary(tiny_args, capsys):
    args = [a for a in tiny_args if a != "--quiet"] + ["--augment-copies", "2", "--no-explain"]
    summary = main(args)
    cfg, _ = parse_config(args)
    steps = summary["optimizer_steps"]
    with open(os.path.join(cfg.out, "summary.json")) as fh:
        assert json.load(fh)["optimizer_steps"] == steps
    per_epoch = steps["per_epoch"]
    assert per_epoch >= 2 and steps == {"per_epoch": per_epoch, "warm": per_epoch, "joint": per_epoch,
                                        "last": per_epoch, "total": 3 * per_epoch}
    out = capsys.readouterr().out
    assert f"optimiser steps: {per_epoch} per epoch (" in out and "x 2 augmented copies, global batch 8" in out
    assert f"warm {per_epoch}, joint {per_epoch}, last layer {per_epoch}, total {3 * per_epoch}" in out


def test_original_prune_retraining(tiny_args):
    """--prune-retrain original: last-layer epochs over the augmented training set in train mode (BatchNorm
    statistics move), tested after every epoch."""
    from protokern.train import checkpoint as ckpt

    args = tiny_args + ["--prune", "--prune-k", "4", "--prune-threshold", "0", "--prune-retrain", "original",
                        "--prune-retrain-epochs", "2", "--no-explain"]
    main(args)
    run = args[args.index("--out") + 1]
    with open(os.path.join(run, "prune.json")) as fh:
        report = json.load(fh)
    assert report["retrain"] == "original" and report["retrain_epochs"] == 2
    assert len(report["retrain_test_accuracy"]) == 2 and report["test_accuracy"] == report["retrain_test_accuracy"][-1]
    before = ckpt.load_checkpoint(os.path.join(run, "last.pt"))["model"]
    after = ckpt.load_checkpoint(os.path.join(run, "pruned.pt"))["model"]
    assert not torch.equal(before["last_layer.weight"], after["last_layer.weight"])
    assert torch.equal(before["prototype_layer.prototypes"], after["prototype_layer.prototypes"])  # threshold 0
    moved = [k for k in before if k.endswith("running_mean") and not torch.equal(before[k], after[k])]
    frozen = [k for k in before if k.startswith(("features", "add_on")) and k.endswith(("weight", "bias"))]
    assert moved and all(torch.equal(before[k], after[k]) for k in frozen)


def test_processes_share_an_epoch_without_repeating_an_image():
    """With N processes an epoch leaves out at most N - 1 images (a new draw each epoch) instead of training
    on and counting some twice (the sampler's default padding)."""
    cfg = dataclasses.replace(preset_config("demo"), num_workers=0, augment_copies=1, train_batch_size=4)
    for epoch in (0, 1):
        shares = []
        for rank in (0, 1):
            loader = train_loader(Blank(15), cfg, DistInfo(rank, 2, rank))
            loader.sampler.set_epoch(epoch)
            shares.append([int(i) for _, labels in loader for i in labels])
        seen = shares[0] + shares[1]
        assert len(shares[0]) == len(shares[1]) == 7 and len(set(seen)) == 14
    with pytest.raises(ValueError, match="1 training images .* for 2 processes"):
        train_loader(Blank(1), cfg, DistInfo(0, 2, 0))


# ------------------------------------------------------------------------------------------- torchrun, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    from protokern.train.main import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        cfg = dataclasses.replace(preset_config("cub"), num_workers=0)
        loader = train_loader(Blank(CUB_TRAIN_IMAGES), cfg, DistInfo(rank, world, rank))
        loader.sampler.set_epoch(3)
        result["cub"] = (loader.batch_size, len(loader), list(loader.sampler))
        try:
            train_loader(Blank(10), dataclasses.replace(cfg, train_batch_size=81), DistInfo(rank, world, rank))
        except ValueError as error:
            result["error"] = str(error)
        cfg, _ = parse_config(TINY_ARGS + ["--out", os.path.join(out, "run"), "--no-push-images", "--max-steps", "1",
                                           "--augment-copies", "3"])
        trainer = Trainer(cfg, DistInfo(rank, world, rank), torch.device("cpu"))
        summary = trainer.run()
        result["tiny"] = (trainer.train_loader.batch_size, summary["optimizer_steps"],
                          len(train_loader(trainer.train_set, cfg, DistInfo())))
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batch_under_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (a, b):
        batch, steps, _ = r["cub"]
        assert batch == 40 and steps == 2248  # each process loads half of the global 80: the original's steps
        assert "must divide evenly across the 2 processes" in r["error"]
        tiny_batch, tiny_steps, single_process_steps = r["tiny"]
        assert tiny_batch == 4 and tiny_steps["per_epoch"] == single_process_steps  # global batch 8
    # the two shards of an epoch are the 30 copies of every image, each exactly once (5994 x 30 divides by 2)
    seen = collections.Counter(a["cub"][2] + b["cub"][2])
    assert len(seen) == CUB_TRAIN_IMAGES * 30 and set(seen.values()) == {1}


def test_runs_saved_before_the_recipe_resume_as_they_started():
    from protokern.train.config import TrainConfig

    saved = preset_config("cub").to_dict()
    for name in ("augment_mode", "augment_copies", "prune_retrain"):
        del saved[name]
    cfg = TrainConfig.from_saved(saved)
    assert (cfg.augment_mode, cfg.augment_copies, cfg.prune_retrain) == ("compose", 1, "cached")
    cfg = TrainConfig.from_saved(preset_config("cub").to_dict())
    assert (cfg.augment_mode, cfg.augment_copies, cfg.prune_retrain) == ("original", 30, "original")
