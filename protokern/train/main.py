"""The training run: build everything from a :class:`TrainConfig`, walk the schedule, log, checkpoint, push.

Run directory (written by rank 0)::

    config.yaml        the resolved settings, less the session's own (out, resume, max_steps): ``--config
                       config.yaml --out NEW`` trains the same run again
    metrics.csv        one row per schedule step (stage, epoch, accuracies, loss terms, lrs, timing)
    metrics.jsonl      the same rows as JSON lines
    last.pt, best.pt   checkpoints (see Trainer.state_dict); best.pt has the best validation accuracy
                       (test accuracy with --val-fraction 0); interrupted.pt after Ctrl-C or SIGTERM (until a resume
                       has done its step again)
    push/epoch_NNN/    push_records.pt and the prototype PNGs of each push
    summary.json       test accuracy of the last and of the selected (best.pt) checkpoint, the split that
                       selected it, part localisation of the final model, push records path, timings
    pruned.pt          with --prune: the pruned model (then the final model: the part localisation,
    prune.json         explanations and gallery are its own; summary.json's "pruned" has its test accuracy and
                       the names of the classes it left without prototypes)
    explanations/, gallery/, part_localisation.json (synthetic), interpretability.json (CUB)
                       of the final model: three test images explained, the prototype gallery, part localisation,
                       consistency and stability
    tb/                TensorBoard events (when tensorboard is installed)
    .lock              held (fcntl) by the process training in the directory; it holds that PID (a folder with
                       it and no last.pt is a run stopped before its first step: the same command starts again)

A fresh run takes a new folder, or one holding none of these names (:data:`RUN_ENTRIES`: they would be replaced
or appended to); no run writes into a folder holding a symbolic link (its writes would land elsewhere).

Checkpoints hold only tensors and plain values and are read with ``torch.load(weights_only=True)``
(:mod:`protokern.checkpoint`); none is written holding non-finite weights. ``--resume RUN`` (or RUN/last.pt)
continues after the last completed step, on the same data (checkpoints record its classes and training image
list; ``--data-root`` may move). ``interrupted.pt`` (Ctrl-C) keeps the half-done step's state for
inspection or explanation only: ``--resume`` refuses it and names the command that resumes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import shlex
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protokern.checkpoint import (EXPLANATIONS_DIR, GALLERY_DIR, INTERPRETABILITY_FILE, PART_LOCALISATION_FILE, PRUNED,
                                  PUSH_DIR)
from protokern.cli import exit_on_error
from protokern.data import GpuAugment, make_loader, skipped_images
from protokern.explain import explain_run
from protokern.explain.metrics import part_boxes, part_localisation
from protokern.losses import TERMS, ProtoPNetLoss
from protokern.models import ProtoPNet
from protokern.models.backbones import fetch_imagenet_weights
from protokern.models.receptive_field import backbone_receptive_field
from protokern.push import RECORDS_FILE, PushRecords, push_prototypes, run_push_folder
from protokern.train import checkpoint as ckpt
from protokern.train.config import SESSION_SETTINGS, TrainConfig, parse_config, parse_window
from protokern.train.data import LabelledSubset, build_splits, class_counts, train_loader
from protokern.train.distributed import (DistInfo, PeerStopped, barrier, cleanup, from_main, init_distributed,
                                        peer_lost, shard)
from protokern.train.loop import TrainForward, run_epoch
from protokern.train.schedule import (Step, build_schedule, learning_rates, make_optimizers, make_scheduler,
                                      optimizer_steps, set_trainable, step_scheduler)
from protokern.utils import distributed, listed, stop_deferred, strict_json

CSV_COLUMNS = (["step", "stage", "epoch", "iteration", "train_accuracy", "val_accuracy", "test_accuracy"]
               + [f"{split}_{t}" for split in ("train", "val", "test") for t in TERMS]
               + ["train_skipped", "lr_features", "lr_add_on", "lr_prototypes", "lr_last_layer", "seconds",
                  "images_per_s"])
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resumable_config(path: str, state: dict) -> TrainConfig:
    """The saved config of a checkpoint that ``--resume`` can continue from; ``CheckpointError`` otherwise.

    ``interrupted.pt`` is refused: it holds the weights of a half-done step (for inspection), and the step
    restarts from ``last.pt``, the state after the last completed step. So is ``pruned.pt`` (no optimisers).
    """
    run = os.path.dirname(os.path.abspath(path))
    if "interrupted_during_step" in state:
        how = (f"resume from the last completed step with --resume {_quoted(run)}"
               if os.path.isfile(os.path.join(run, ckpt.LAST))
               else "no step had completed, so there is nothing to resume: start the run again")
        raise ckpt.CheckpointError(f"{path} holds the mid-step state of an interrupted run (kept for inspection, "
                                   f"not resumable); {how}")
    if state.get("stage") == "prune" or "optimizers" not in state:
        raise ckpt.CheckpointError(f"{path} is a pruned model without optimiser state and cannot be resumed; "
                                   f"explain it with python -m protokern.explain --checkpoint {_quoted(path)}, or "
                                   f"resume the training with --resume {_quoted(run)}")
    try:
        return TrainConfig.from_saved(state["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise ckpt.CheckpointError(f"{path}: its saved training config is unusable ({error})") from None


def _quoted(path: str) -> str:
    """``path`` as a shell word, for the commands printed to be pasted (paths with spaces)."""
    return shlex.quote(str(path))


def _read_metrics(path: str) -> list[dict]:
    """The rows of ``metrics.jsonl``; a torn last line (a kill during its write) is dropped with a warning."""
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON (the file was edited or damaged)") from None
            warnings.warn(f"{path}: dropped a partial last line (the run was killed while writing it)",
                          stacklevel=3)
    return rows


# Settings a resumed run cannot change: the saved model's architecture, its data (the images, their size and
# crop, the validation split and what --seed draws: the split, the synthetic images), and what the saved
# optimiser and scheduler states hold (their learning rates would silently win over a new flag). The schedule
# flags may change only where they leave the steps already done as they were (_check_schedule).
FIXED_ON_RESUME = ("val_fraction", "dataset", "backbone", "prototypes_per_class", "prototype_dim", "add_on",
                   "prototype_size", "similarity", "warm_add_on_lr", "warm_prototypes_lr", "joint_features_lr",
                   "joint_add_on_lr", "joint_prototypes_lr", "weight_decay", "lr_step_size", "lr_gamma",
                   "last_layer_lr", "seed", "image_size", "crop", "synthetic_classes", "synthetic_train_per_class",
                   "synthetic_test_per_class", "synthetic_part_size", "synthetic_seed")
SCHEDULE_FLAGS = ("epochs", "warm_epochs", "push_start", "push_every", "push_at_end", "last_layer_epochs")


def _check_schedule(saved: TrainConfig, cfg: TrainConfig, done: int) -> None:
    """``ValueError`` unless ``cfg``'s schedule begins with the ``done`` steps that ``saved``'s run completed."""
    before, after = build_schedule(saved), build_schedule(cfg)
    changed = [k for k in SCHEDULE_FLAGS if getattr(saved, k) != getattr(cfg, k)]
    flags = ", ".join("--" + k.replace("_", "-") for k in changed) or "the schedule flags"
    if len(after) < done:
        raise ValueError(f"{flags}: the new schedule has {len(after)} steps, but the run has already done {done}")

    def name(step):
        return f"{step.stage} epoch {step.epoch}" + (f".{step.iteration}" if step.stage == "last" else "")

    for old, new in zip(before[:done], after[:done]):
        if (old.stage, old.epoch, old.iteration) != (new.stage, new.epoch, new.iteration):
            raise ValueError(f"{flags} would change steps the run has already done (step {old.index + 1} was "
                             f"{name(old)}, it would be {name(new)}): only later steps can change on resume")


def _data_identity(train) -> dict:
    """What a checkpoint records of its training data, for ``--resume`` to check: the class names, the number
    of training images before the validation split, and a short hash of their (path relative to the folder
    holding them all, or index; label) list. The split and the push records' image indices hold only for that
    list; a moved ``--data-root``, or Stanford Cars' nested ``cars_train/cars_train/`` for a flat one, keeps it.
    Read from the datasets' file lists: no image is decoded for it."""
    full = train.dataset if isinstance(train, LabelledSubset) else train  # the images the split was drawn over
    paths = getattr(full, "paths", None)
    if paths:
        base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        keys = [os.path.relpath(p, base).replace(os.sep, "/") for p in paths]
    else:
        keys = range(len(full))
    listing = "\n".join(f"{key}\t{int(label)}" for key, label in zip(keys, full.targets))
    return {"classes": [str(c) for c in full.classes], "train_images": len(full),
            "images_hash": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]}


def _class_list(names: list[str], limit: int = 8) -> str:
    return f"[{listed(names, limit)}] ({len(names)})"


def _check_same_data(saved: dict | None, now: dict, cfg: TrainConfig) -> None:
    """A one-line ``ValueError`` naming what differs when the data is not the resumed run's: its model's
    classes, its validation split (drawn over the image list) and its push records (indices into the push set)
    would not be this data's. A checkpoint written before the record was kept has none: not checked."""
    if not saved:
        return
    where = "the synthetic dataset" if cfg.dataset == "synthetic" else f"--data-root {cfg.data_root}"
    old, new = saved["classes"], now["classes"]
    if old != new:
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
        detail = f"; class {first} is {new[first]!r}, was {old[first]!r}" if first is not None and first >= 8 else ""
        raise ValueError(f"{where} has classes {_class_list(new)}, the run was trained on {_class_list(old)}{detail}: "
                         f"resume with the run's data")
    if saved["train_images"] != now["train_images"]:
        raise ValueError(f"the training set of {where} has {now['train_images']} images, the run's had "
                         f"{saved['train_images']}: the validation split and push records hold only for the run's "
                         f"images (start a new run to train on these)")
    # (a record written before images_hash hashed paths relative to the data root as train_hash: it is checked on
    # classes and count only)
    if saved.get("images_hash", now["images_hash"]) != now["images_hash"]:
        raise ValueError(f"the {now['train_images']} training images of {where} are not the run's (other files or "
                         f"labels, same count): the validation split and push records hold only for the run's images")


def _class_names(dataset, indices: list[int]) -> list[str]:
    """The names of classes ``indices`` in ``dataset`` (their indices where it has no ``classes``)."""
    names = getattr(dataset, "classes", None)
    return [str(c) if names is None else str(names[c]) for c in indices]


def _check_image_size(cfg: TrainConfig) -> None:
    """A one-line ``ValueError`` for an ``--image-size`` whose feature map is smaller than the prototypes'
    window (the trunk would fail in its first forward, or push find no window), before anything is read."""
    kh, kw = cfg.window
    shortfall = backbone_receptive_field(cfg.backbone).window_shortfall(int(cfg.image_size), cfg.window)
    if shortfall is not None:
        (cells, _), side = shortfall
        raise ValueError(f"--image-size {cfg.image_size} gives {cfg.backbone} a {cells} x {cells} feature map, smaller "
                         f"than the {kh} x {kw} prototypes (--prototype-size)"
                         + (f": it takes at least --image-size {side}" if side else ""))


# what a run writes in its directory (see the module docstring)
RUN_ENTRIES = ("config.yaml", "metrics.csv", "metrics.jsonl", ckpt.LAST, ckpt.BEST, ckpt.INTERRUPTED, PRUNED,
               "summary.json", "prune.json", PART_LOCALISATION_FILE, INTERPRETABILITY_FILE, PUSH_DIR,
               "tb", EXPLANATIONS_DIR, GALLERY_DIR)


class Trainer:
    """One training run (see the module docstring): :func:`train` builds, runs and closes it.

    Args:
        cfg: the run's settings (:class:`TrainConfig`, e.g. from :func:`parse_config`).
        info: this process's place in a torchrun job (``init_distributed(cfg.device)``'s first result).
        device: the device it trains on (its second result).
        explicit: names of the settings given explicitly (on the command line or in a config file): with
            ``cfg.resume``, those are checked against the resumed run's (a changed model, data or optimiser
            setting is refused); the others come from the run.

    ``run()`` trains, writes the run directory and returns the summary dict; ``close()`` releases the run
    directory's lock and logs (always call it). The constructor raises ``ValueError`` for settings, data or an
    ``--out`` it refuses, ``FileNotFoundError`` / ``CheckpointError`` for a checkpoint it cannot resume, and
    ``RunDirLocked`` when another process trains in the directory.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, explicit: set[str] = frozenset()):
        resume_state = None
        if cfg.resume:
            path = ckpt.find_checkpoint(cfg.resume)
            resume_state = ckpt.load_checkpoint(path)
            saved = _resumable_config(path, resume_state)
            overrides = {k: getattr(cfg, k) for k in explicit if k != "resume"}
            same = lambda k: (parse_window(overrides[k]) == saved.window if k == "prototype_size"  # noqa: E731
                              else overrides[k] == getattr(saved, k))
            changed = sorted(k for k in FIXED_ON_RESUME if k in overrides and not same(k))
            if changed:
                flag = "--" + changed[0].replace("_", "-")
                raise ValueError(f"{flag} cannot change on resume (the run used {getattr(saved, changed[0])!r}): "
                                 f"the saved model and optimiser state were made with it")
            overrides.setdefault("max_steps", None)  # a per-session limit, not inherited
            cfg = dataclasses.replace(saved, **overrides, resume=cfg.resume).validate()
            _check_schedule(saved, cfg, resume_state["step"] + 1)
            run = os.path.dirname(os.path.abspath(path))
            if "out" in explicit and cfg.out is not None and os.path.realpath(cfg.out) != os.path.realpath(run):
                raise ValueError(f"--out {cfg.out} is not the resumed run's directory {run}: a resumed run goes on "
                                 f"in its own directory (its metrics, best.pt, pushes); copy that directory first "
                                 f"to continue a copy elsewhere")
            cfg = dataclasses.replace(cfg, out=run)
        self.cfg, self.info, self.device = cfg, info, device
        self.is_main = info.is_main
        self._check_out()  # before the data is read: a refusal comes at once
        _check_image_size(cfg)
        if cfg.data_cache == "gpu" and device.type != "cuda":  # (a dataset without files never reaches the cache)
            raise ValueError(f"--data-cache gpu keeps the images on the training GPU; this run trains on {device}: "
                             f"use --data-cache memory (or auto)")
        if cfg.pretrained and resume_state is None:  # weights neither cached nor downloadable: said before the data
            if cfg.dataset != "synthetic" and not os.path.isdir(cfg.data_root):  # (not after a 550 MB download)
                raise FileNotFoundError(f"--data-root {cfg.data_root} is not a folder")
            fetch_imagenet_weights(cfg.backbone)
        _seed_everything(cfg.seed)

        self.train_set, self.val_set, self.test_set, self.push_set, num_classes = build_splits(cfg)
        self.data_identity = _data_identity(self.train_set)
        if resume_state is not None:  # before the model: another class count would fail there, blaming a flag
            _check_same_data(resume_state.get("data"), self.data_identity, cfg)
        if len(self.push_set) < info.world_size:  # a process without push images would leave the others waiting
            raise ValueError(f"{len(self.push_set)} push images for {info.world_size} processes: each needs at least "
                             f"one")
        if cfg.prune and cfg.prune_k > len(self.push_set):
            raise ValueError(f"bad config: prune_k ({cfg.prune_k}) > the {len(self.push_set)} training images that "
                             f"pruning looks among")
        if cfg.prune and self.is_main:  # said now, not after the training: such a class can keep no prototype
            counts = class_counts(self.push_set)
            small = [c for c, n in enumerate(counts.tolist()) if n < cfg.prune_threshold]
            if small:
                names = [f"{name} ({int(counts[c])})" for c, name in zip(small, _class_names(self.push_set, small))]
                skipped = "; with every class so, pruning will be skipped" if len(small) == num_classes else ""
                have = "has" if len(small) == 1 else "have"
                warnings.warn(f"--prune: {len(small)} of the {num_classes} classes {have} fewer than --prune-threshold "
                              f"{cfg.prune_threshold} push images (training images less the validation hold-out), so "
                              f"pruning will remove every prototype of theirs: {listed(names, 8)}{skipped}",
                              stacklevel=2)
        self.select_on = "test" if self.val_set is None else "val"  # the split that chooses best.pt
        self.model = ProtoPNet(backbone=cfg.backbone, num_classes=num_classes,
                               prototypes_per_class=cfg.prototypes_per_class, prototype_dim=cfg.prototype_dim,
                               # a resumed run's weights all come from its checkpoint: no download, no weights file
                               add_on=cfg.add_on, pretrained=cfg.pretrained and resume_state is None,
                               backbone_weights=None if resume_state is not None else cfg.backbone_weights,
                               prototype_size=cfg.window,
                               similarity=cfg.similarity).to(device)
        if cfg.channels_last:
            self.model.features.to(memory_format=torch.channels_last)
        self.amp_dtype = _AMP[cfg.amp]
        self.forward = TrainForward(self.model, self.amp_dtype, compile_trunk=cfg.compile)
        self.optimizers = make_optimizers(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizers["joint"], cfg)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        self.loss_fn = ProtoPNetLoss(cross_entropy=cfg.ce_coef, cluster=cfg.cluster_coef,
                                     separation=cfg.separation_coef, l1=cfg.l1_coef)
        self.augment = GpuAugment(rotate=cfg.aug_rotate, skew=cfg.aug_skew, shear=cfg.aug_shear,
                                  flip=cfg.aug_flip, mode=cfg.augment_mode).to(device) if cfg.augment else None
        self.generator = torch.Generator(device=device)

        self.train_loader = train_loader(self.train_set, cfg, info)
        self.test_loader = make_loader(shard(self.test_set, info), cfg.test_batch_size, shuffle=False,
                                       num_workers=cfg.num_workers)
        self.push_loader = make_loader(shard(self.push_set, info), cfg.push_batch_size, shuffle=False,
                                       num_workers=cfg.num_workers)
        self.val_loader = None if self.val_set is None else make_loader(
            shard(self.val_set, info), cfg.test_batch_size, shuffle=False, num_workers=cfg.num_workers)

        self.schedule = build_schedule(cfg)
        self.optimizer_steps = optimizer_steps(self.schedule, len(self.train_loader))
        self.next_step = 0
        self.saved_steps = 0  # the completed steps last.pt holds (next_step runs ahead of it while last.pt is written)
        self.best = {"accuracy": -1.0, "step": None, "pushed": False, "split": self.select_on, "test_accuracy": None}
        self.records: PushRecords | None = None
        self.records_path: str | None = None
        self._localisation: dict | None = None  # part_localisation() of the final model, for explain_run
        self._pruned: dict | None = None  # what --prune did, for the summary
        self.stage_seconds: dict[str, float] = {}
        self._wrapped = (None, None)  # (stage, DDP module) in use
        # the run directory, made once the data, model and settings have passed their checks (a refused run
        # leaves no empty folder); one process per run directory: locked before anything is written
        self.run_dir = self._run_dir()
        self._lock = ckpt.RunLock(self.run_dir) if self.is_main else None
        if self.is_main:
            ckpt.remove_orphan_temps(self.run_dir)
            if resume_state is None:  # rows of a first step interrupted before last.pt: no checkpoint has them
                self._truncate_metrics(-1)
        if resume_state is not None:
            try:
                self.load_state_dict(resume_state)
            except BaseException:
                self.close()
                raise
        self.writer = self._tensorboard()

    # ------------------------------------------------------------------------------------ files
    def _check_out(self) -> None:
        """A fresh run refuses an ``--out`` that already holds a run (its checkpoints and metrics would be mixed)
        or files by the names a run writes (they would be overwritten or appended to); no run writes into a
        folder holding a symbolic link. Rank 0 looks, every rank raises."""
        out, refused = self.cfg.out, None
        if self.is_main and out is not None and os.path.lexists(out):
            try:
                refused = self._refusal(out) if os.path.isdir(out) else f"--out {out} is not a folder"
            except OSError as error:  # (rank 0 must reach from_main: the other ranks wait there)
                refused = f"--out {out}: cannot be read ({error})"
        refused = from_main(refused)
        if refused:
            raise ValueError(refused)

    def _refusal(self, out: str) -> str | None:
        link = ckpt.linked_entry(out)
        if link is not None:
            how = ("copy the run without links (cp -rL) and resume the copy" if self.cfg.resume
                   else "choose another --out")
            return (f"run directory {out} holds a symbolic link ({link}): a run writes only its own files there; "
                    f"remove the link or {how}")
        if self.cfg.resume:
            return None
        if os.path.exists(os.path.join(out, ckpt.LAST)):
            return (f"--out {out} already holds a run ({ckpt.LAST}): continue it with --resume {_quoted(out)}, or "
                    f"choose another --out")
        if os.path.exists(os.path.join(out, "summary.json")):  # a run whose last.pt is gone
            best = os.path.join(out, ckpt.BEST)
            how = (f"resume it from its best.pt (--resume {_quoted(best)}) or choose another --out"
                   if os.path.exists(best) else "choose another --out")
            return f"--out {out} already holds a run (summary.json) without its {ckpt.LAST}: {how}"
        if os.path.exists(os.path.join(out, ckpt.LOCK_FILE)):  # a run stopped before its first step: again here
            return None
        taken = sorted(name for name in os.listdir(out) if name in RUN_ENTRIES)
        if taken:
            return (f"--out {out} already holds files a run would write ({listed(taken, 3)}) but no run: choose "
                    f"another --out")
        return None

    def _run_dir(self) -> str:
        """``--out``, or a new ``runs/<timestamp>[-N]`` (two runs started in the same second get two folders)."""
        out = self.cfg.out
        if self.is_main:
            if out is None:
                stamp, n = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), 0
                os.makedirs("runs", exist_ok=True)
                while True:
                    out = stamp + (f"-{n}" if n else "")
                    try:
                        os.mkdir(out)
                        break
                    except FileExistsError:
                        n += 1
            else:
                os.makedirs(out, exist_ok=True)
        return from_main(out)  # every rank uses rank 0's name

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def _tensorboard(self):
        if not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(self._path("tb"))

    def close(self) -> None:
        """Release the run directory (its lock); ``train()`` calls it when the run ends or fails."""
        if self._lock is not None:
            self._lock.release()

    def _write_config(self) -> None:
        import yaml

        settings = {k: v for k, v in self.cfg.to_dict().items() if k not in SESSION_SETTINGS}
        ckpt.atomic_write_text(self._path("config.yaml"), yaml.safe_dump(settings, sort_keys=False))

    def _truncate_metrics(self, last_step: int) -> None:
        """Keep only the metric rows of steps <= ``last_step`` (rows of an interrupted step go)."""
        path = self._path("metrics.jsonl")
        if not os.path.exists(path):
            return
        rows = [r for r in _read_metrics(path) if r["step"] <= last_step]
        ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        ckpt.atomic_write_text(self._path("metrics.csv"), table.getvalue())

    def _log(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self._path("metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        csv_path = self._path("metrics.csv")
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch", "iteration"):
                    self.writer.add_scalar(f"{row['stage']}/{key}", value, row["step"])
            self.writer.flush()
        if not self.cfg.quiet:
            where = f"epoch {row['epoch']}" + (f".{row['iteration']}" if row["stage"] == "last" else "")
            train = f"train acc {row['train_accuracy']:.3f}  " if "train_accuracy" in row else ""
            train += f"val acc {row['val_accuracy']:.3f}  " if "val_accuracy" in row else ""
            print(f"[{row['step'] + 1}/{len(self.schedule)}] {row['stage']:5s} {where}: {train}"
                  f"test acc {row['test_accuracy']:.3f}  loss {row.get('train_total', row['test_total']):.3f}  "
                  f"({row['seconds']:.1f} s)", flush=True)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimisers, scheduler, scaler, RNG, progress."""
        return {
            "model": self.model.state_dict(),
            "model_config": self.model.config,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "step": self.next_step - 1,
            "stage": self.schedule[self.next_step - 1].stage if self.next_step else None,
            "epoch": self.schedule[self.next_step - 1].epoch if self.next_step else None,
            "config": self.cfg.to_dict(),
            "data": self.data_identity,  # what --resume checks the data against
            "best": dict(self.best),
            "push_records": self.records.to_dict() if self.records is not None else None,
            "push_records_path": self.records_path,
            "stage_seconds": dict(self.stage_seconds),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` output; ``CheckpointError`` if it does not fit this configuration."""
        try:
            self.model.load_state_dict(state["model"])
            for key, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state["optimizers"][key])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as error:
            first = " ".join(str(error).split())[:300]
            raise ckpt.CheckpointError(f"the checkpoint does not fit this configuration (a flag that changes the "
                                       f"model or its optimisers?): {first}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.next_step = self.saved_steps = state["step"] + 1
        self.best = {"split": "test", **state["best"]}  # checkpoints before the validation split chose on test
        self.best.setdefault("test_accuracy", self.best["accuracy"] if self.best["split"] == "test" else None)
        self.records = PushRecords.from_dict(state["push_records"]) if state.get("push_records") else None
        self.records_path = state.get("push_records_path")
        if self.records_path is not None:  # this run's own push folder (a copied or moved run kept the original's)
            self.records_path = os.path.join(run_push_folder(self.run_dir, os.path.dirname(self.records_path)),
                                             RECORDS_FILE)
            if self.records is not None:
                self.records.find_run_images(self.run_dir)
        if self.is_main:  # files the run names that are gone (deleted by hand, or lost with a disk)
            if self.best["step"] is not None and not os.path.isfile(self._path(ckpt.BEST)):
                warnings.warn(f"the resumed run's {ckpt.BEST} (step {self.best['step'] + 1}) no longer exists: the "
                              f"summary still reports its accuracy, and explain --checkpoint RUN takes {ckpt.LAST} "
                              f"until a later step does better and writes a new one", stacklevel=2)
            if self.records_path is not None and not os.path.isfile(self.records_path):
                warnings.warn(f"the resumed run's push records {self.records_path} no longer exist (last.pt holds "
                              f"them: explain --checkpoint reads them there)", stacklevel=2)
        self.stage_seconds = dict(state.get("stage_seconds", {}))
        if self.is_main:
            self._truncate_metrics(state["step"])

    def _save(self, row: dict) -> None:
        """Write last.pt, and best.pt when this step has the best validation accuracy so far (test accuracy
        with ``val_fraction`` 0, as the original), once a push has happened among projected models only (push
        and last-layer steps)."""
        pushed = row["stage"] in ("push", "last")
        accuracy = row[f"{self.select_on}_accuracy"]
        improved = (pushed and not self.best["pushed"]) or (
            pushed == self.best["pushed"] and accuracy > self.best["accuracy"])
        if improved:
            self.best = {"accuracy": accuracy, "step": row["step"], "pushed": pushed, "split": self.select_on,
                         "test_accuracy": row["test_accuracy"]}
        if not self.is_main:
            return
        if self.records is not None:  # a push is done only with its PNGs: last.pt must not count one half-written
            if self.records.images_pending and not self.cfg.quiet:  # (tens of seconds at 2000 prototypes)
                print(f"  writing the push's prototype pictures to {self.records.image_dir} ...", flush=True)
            self.records.wait_images()  # (they were written while the step evaluated; a SIGKILL would lose them)
        state = self.state_dict()
        # best.pt before last.pt: a stop between the two leaves last.pt one step behind, and resuming redoes the
        # step and rewrites best.pt; the other order could leave a best.pt older than the one last.pt names.
        # A SIGTERM (utils.stop) waits for both.
        with stop_deferred():
            if improved:
                self._write(state, ckpt.BEST)
            self._write(state, ckpt.LAST)
            self.saved_steps = self.next_step
            with contextlib.suppress(FileNotFoundError):  # an earlier stop's half-done step: done again now
                os.remove(self._path(ckpt.INTERRUPTED))

    def _write(self, state: dict, name: str) -> None:
        """Save a checkpoint in the run directory (safe types only); never one holding non-finite weights."""
        bad = ckpt.nonfinite_tensors({"model": state["model"], "optimizers": state.get("optimizers")})
        if bad:
            raise FloatingPointError(f"not writing {name}: non-finite values in {listed(bad, 3)}")
        ckpt.save_checkpoint(state, self._path(name))

    # ------------------------------------------------------------------------------------ steps
    def _wrapped_forward(self, stage: str):
        """The training forward for ``stage``: DDP is rebuilt when the set of trained parameters changes."""
        if not self.info.enabled:
            return self.forward
        if self._wrapped[0] != stage:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = (stage, DistributedDataParallel(self.forward, device_ids=device_ids))
        return self._wrapped[1]

    def _train(self, step: Step) -> dict:
        set_trainable(self.model, step.stage)
        # warm / joint train the whole model in train mode as the original; last-layer epochs keep BN
        # statistics frozen (eval mode) so the pushed prototypes stay exact patches of their images
        self.model.train(step.stage != "last")
        if step.stage == "joint":
            step_scheduler(self.scheduler)
        optimizer = self.optimizers[step.stage]
        train = self._train_epoch(self._wrapped_forward(step.stage), optimizer, step.index,
                                  f"{step.stage} {step.epoch}")
        row = {f"train_{k}": v for k, v in train.items() if k not in ("images", "seconds")}
        row.update(learning_rates(optimizer), images_per_s=train["images"] / max(train["seconds"], 1e-9))
        return row

    def _train_epoch(self, forward, optimizer, index: int, desc: str) -> dict:
        """One training epoch, the ``index``-th of the run (it seeds the shuffling and the augmentation)."""
        cfg = self.cfg
        self.train_loader.sampler.set_epoch(index)
        self.generator.manual_seed(cfg.seed * 1_000_003 + index * 7919 + self.info.rank)
        train = run_epoch(forward, self.model, self.train_loader, self.loss_fn, self.device, optimizer=optimizer,
                          augment=self.augment, generator=self.generator, scaler=self.scaler,
                          channels_last=cfg.channels_last, progress=self._bars(), desc=desc, nan_policy=cfg.nan_policy)
        if self.info.enabled:  # BN statistics drift per rank after the last forward: use rank 0's everywhere
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        return train

    def _push(self, step: Step) -> dict:
        save_dir = self._path(os.path.join(PUSH_DIR, f"epoch_{step.epoch:03d}"))
        start = time.perf_counter()
        self.records = push_prototypes(self.model, self.push_loader, device=self.device, save_dir=save_dir,
                                       save_images=self.cfg.push_images, progress=self._bars(),
                                       autocast_dtype=self.amp_dtype)
        seconds = time.perf_counter() - start
        self.records_path = os.path.abspath(os.path.join(save_dir, RECORDS_FILE))
        return {"images_per_s": len(self.push_set) / max(seconds, 1e-9)}

    def _evaluate(self) -> dict:
        """Accuracy and loss terms on the test set and, when held out, the validation set."""
        self.model.eval()
        row = {}
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            if loader is not None:
                result = run_epoch(self.forward, self.model, loader, self.loss_fn, self.device,
                                   channels_last=self.cfg.channels_last, progress=self._bars(), desc=split)
                row.update({f"{split}_{k}": v for k, v in result.items() if k not in ("images", "seconds")})
        return row

    def _bars(self) -> bool:
        return self.is_main and not self.cfg.quiet and sys.stderr.isatty()

    def run_step(self, step: Step) -> dict:
        """Run one schedule step and return its metrics row."""
        start = time.perf_counter()
        row = {"step": step.index, "stage": step.stage, "epoch": step.epoch, "iteration": step.iteration}
        row.update(self._push(step) if step.stage == "push" else self._train(step))
        row.update(self._evaluate())
        row["seconds"] = time.perf_counter() - start
        self.stage_seconds[step.stage] = self.stage_seconds.get(step.stage, 0.0) + row["seconds"]
        return row

    # ------------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """Walk the schedule from ``next_step``; return the summary (also written to summary.json)."""
        if self.is_main:
            self._write_config()
            if not self.cfg.quiet:
                print(self._steps_line(), flush=True)
        start, done = time.perf_counter(), 0
        step = None
        try:
            while self.next_step < len(self.schedule):
                if self.cfg.max_steps is not None and done >= self.cfg.max_steps:
                    break
                step = self.schedule[self.next_step]
                try:
                    row = self.run_step(step)
                    self._check_finite(row)
                except FloatingPointError as error:
                    raise FloatingPointError(self._stopped(step, error)) from None
                self.next_step += 1
                done += 1
                self._log(row)
                self._save(row)
                step = None  # a stop from here on comes between steps
        except KeyboardInterrupt:
            if self.is_main:
                self._interrupted(step)
            raise
        finally:
            if self.records is not None:
                self.records.wait_images()
            if self.writer is not None:
                self.writer.close()
        complete = self.next_step >= len(self.schedule)
        phase = "pruning"
        try:
            if complete and self.cfg.prune and self.records is not None:
                self._prune()
            phase = "the summary"
            summary = self._summary(time.perf_counter() - start, complete)
            phase = "the explanations"
            if complete and self.cfg.explain and self.is_main:
                if not self.cfg.quiet:  # minutes at 2000 prototypes: a batch log (no bars) would look hung
                    print(f"writing the explanations, the prototype gallery and the interpretability metrics of "
                          f"the final model ({self.run_dir}) ...", flush=True)
                self._explain()
            if complete:  # the done line's time: from the first step to the end, the explanations included
                self._last_line = _final_line(summary, time.perf_counter() - start)
        except KeyboardInterrupt:
            if self.is_main:
                if phase == "the explanations":  # the result first: the run's files are complete
                    print(self._last_line, flush=True)
                done = (f"after the last step: last.pt and best.pt are complete; --resume {_quoted(self.run_dir)} "
                        f"does what came after the training again" if complete else
                        f"after step {self.next_step}/{len(self.schedule)}: continue with --resume "
                        f"{_quoted(self.run_dir)}")
                print(f"\ninterrupted during {phase}, {done}", flush=True)
            raise
        if self.is_main:
            print(self._last_line, flush=True)
        barrier()
        return summary

    def _check_finite(self, row: dict) -> None:
        """``FloatingPointError`` when the model holds non-finite values after a step; warn on skipped batches."""
        bad = ckpt.nonfinite_tensors(self.model.state_dict())
        if bad:
            raise FloatingPointError(f"non-finite parameters after the step: {listed(bad, 3)}")
        if row.get("train_skipped"):
            warnings.warn(f"step {row['step']} ({row['stage']}): skipped {row['train_skipped']} batch(es) with a "
                          "non-finite loss (--nan-policy skip)", stacklevel=3)

    def _stopped(self, step: Step, error: FloatingPointError) -> str:
        """The message of a run stopped by a non-finite value: where, and which checkpoints are intact."""
        kept = (f"nothing of this step was saved: last.pt and best.pt in {self.run_dir} are as they were"
                if os.path.isfile(self._path(ckpt.LAST)) else "no checkpoint had been written yet")
        hint = (" (or --nan-policy skip to skip such batches)"
                if "loss" in str(error) and self.cfg.nan_policy != "skip" else "")
        return (f"step {step.index + 1}/{len(self.schedule)} ({step.stage}, epoch {step.epoch}): {error}; the run "
                f"stopped and {kept}; lower the learning rates{hint}")

    def _interrupted(self, step: Step | None) -> None:
        """Ctrl-C: write interrupted.pt (the half-done step, for inspection only) and say how to go on."""
        if step is not None and step.index < self.saved_steps:  # a deferred stop at the end of its save
            step = None
        state = self.state_dict()
        state["interrupted_during_step"] = None if step is None else step.index
        try:
            self._write(state, ckpt.INTERRUPTED)
            saved = f"mid-step state in {self._path(ckpt.INTERRUPTED)} (for inspection, not resumable); "
        except (FloatingPointError, OSError) as error:
            saved = f"mid-step state not saved ({error}); "
        if os.path.isfile(self._path(ckpt.LAST)):  # a Ctrl-C while last.pt is written leaves the previous one
            how = (f"resume with --resume {_quoted(self.run_dir)}: it restarts at step {self.saved_steps + 1}/"
                   f"{len(self.schedule)} from last.pt, the state after the last completed step")
        else:
            how = "no step had completed, so there is nothing to resume: run the same command again to start over"
        where = "" if step is None else f" during step {step.index + 1}/{len(self.schedule)} ({step.stage})"
        print(f"\ninterrupted{where}: {saved}{how}", flush=True)

    def _steps_line(self) -> str:
        """The optimiser steps per epoch and per stage of this run (also in summary.json)."""
        cfg, steps = self.cfg, self.optimizer_steps
        return (f"optimiser steps: {len(self.train_loader)} per epoch ({len(self.train_set)} images x "
                f"{cfg.augment_copies} augmented copies, global batch {cfg.train_batch_size}); warm {steps['warm']}, "
                f"joint {steps['joint']}, last layer {steps['last']}, total {steps['total']}")

    def _summary(self, seconds: float, complete: bool) -> dict:
        localisation = None
        boxes = part_boxes(self.test_set)
        no_rf = getattr(self.model, "receptive_field", None) is None
        # why part_localisation is null, where it is
        why_none = ("the test set has no part boxes (CUB's and Cars' boxes are object boxes)" if boxes is None else
                    "the trunk's receptive field is unknown" if no_rf else "no (image, prototype) pair was counted")
        if boxes is not None and not no_rf:
            # once, on rank 0 (the explanations reuse it), then shared so that every rank's summary agrees
            if self.is_main:
                loader = make_loader(self.test_set, self.cfg.test_batch_size, shuffle=False,
                                     num_workers=self.cfg.num_workers)
                self._localisation = part_localisation(self.model, loader, boxes, location="rf_centre",
                                                       device=self.device, progress=self._bars())
                localisation = self._localisation["overall"]
            localisation = from_main(localisation)
        last_test = None
        if self.is_main and os.path.exists(self._path("metrics.jsonl")):
            rows = _read_metrics(self._path("metrics.jsonl"))
            last_test = rows[-1]["test_accuracy"] if rows else None
        last_test = from_main(last_test)  # every rank returns the summary rank 0 writes
        chosen = self.best["step"] is not None
        summary = {
            "run_dir": os.path.abspath(self.run_dir),
            "complete": complete,
            "steps_done": self.next_step,
            "steps_total": len(self.schedule),
            "test_accuracy": last_test,  # of last.pt
            "best_test_accuracy": self.best["test_accuracy"] if chosen else None,  # of best.pt
            "best_step": self.best["step"],
            "selected_on": {"val": "validation", "test": "test"}[self.best["split"]],
            "best_val_accuracy": self.best["accuracy"] if chosen and self.best["split"] == "val" else None,
            "val_images": 0 if self.val_set is None else len(self.val_set),
            "skipped_images": len(skipped_images(self.train_set, self.val_set, self.test_set)),  # --skip-bad-images
            "selection_note": _SELECTION_NOTE[self.best["split"]],
            "part_localisation": localisation,  # of the final model: pruned.pt after --prune, else last.pt
            "part_localisation_note": why_none if localisation is None else None,
            "final_model": PRUNED if self._pruned else ckpt.LAST,  # the one explanations and gallery show
            "pruned": self._pruned,
            "push_records": self.records_path,
            "optimizer_steps": {"per_epoch": len(self.train_loader), **self.optimizer_steps},
            "timings": {"this_session_s": seconds, "steps_total_s": sum(self.stage_seconds.values()),
                        "stage_s": dict(self.stage_seconds)},
        }
        if self.is_main:
            ckpt.atomic_write_text(self._path("summary.json"), strict_json(summary))
        # the last line (run() prints it after the explanations), also with --quiet: the result or --resume command
        self._last_line = (_final_line(summary, seconds) if complete else
                           f"stopped after step {self.next_step}/{len(self.schedule)} (--max-steps): test accuracy "
                           f"last.pt {'n/a' if last_test is None else f'{last_test:.3f}'}; continue with --resume "
                           f"{_quoted(self.run_dir)}")
        return summary

    def _prune(self) -> None:
        """Prune after the last push (``protokern.prune``) and retrain the last layer; save ``pruned.pt``.

        Every rank prunes the same prototypes: each reads the whole (unaugmented) push set in the same order.
        The retraining is the original's (``prune_retrain="original"``, :meth:`_retrain_pruned`) or the fast
        ``cached`` one (:func:`protokern.prune.retrain_last_layer` on similarities of the push set computed once).
        """
        from protokern.prune import prune_prototypes, retrain_last_layer

        loader = make_loader(self.push_set, self.cfg.push_batch_size, shuffle=False, num_workers=self.cfg.num_workers)
        try:
            result = prune_prototypes(self.model, loader, k=self.cfg.prune_k, threshold=self.cfg.prune_threshold,
                                      device=self.device, progress=self._bars(), push_records=self.records)
        except ValueError as error:  # e.g. every prototype would go: keep the trained model as it is
            warnings.warn(f"pruning skipped: {error}", stacklevel=2)
            return
        self.records = result["push_records"]
        self._wrapped = (None, None)  # new prototype and last layers: DDP is rebuilt around them
        epoch_tests = []
        if self.cfg.prune_retrain == "cached":
            retrain = retrain_last_layer(self.model, loader, iters=self.cfg.prune_retrain_epochs,
                                         lr=self.cfg.last_layer_lr, device=self.device, progress=self._bars(),
                                         loss_fn=self.loss_fn, seed=self.cfg.seed)
        else:
            retrain, epoch_tests = self._retrain_pruned()
        self.model.eval()
        test = epoch_tests[-1] if epoch_tests else run_epoch(
            TrainForward(self.model, self.amp_dtype), self.model, self.test_loader, self.loss_fn, self.device,
            channels_last=self.cfg.channels_last)["accuracy"]
        report = {k: v for k, v in result.items() if k not in ("neighbours", "push_records")}
        report.update(retrain=self.cfg.prune_retrain, retrain_epochs=self.cfg.prune_retrain_epochs,
                      retrain_accuracy=retrain["accuracy"], retrain_test_accuracy=epoch_tests, test_accuracy=test)
        # by name: no prototype of theirs is left (prune.json lists their indices)
        empty = _class_names(self.push_set, result.get("classes_without_prototypes", []))
        self._pruned = {"checkpoint": os.path.abspath(self._path(PRUNED)), "num_pruned": report["num_pruned"],
                        "num_remaining": report["num_remaining"], "test_accuracy": test,
                        "classes_without_prototypes": empty}
        if self.is_main:
            state = {"model": self.model.state_dict(), "model_config": self.model.config, "config": self.cfg.to_dict(),
                     "step": self.next_step - 1, "stage": "prune", "push_records": self.records.to_dict(),
                     "prune": report, "data": self.data_identity}
            self._write(state, PRUNED)
            ckpt.atomic_write_text(self._path("prune.json"), strict_json(report))
            if not self.cfg.quiet:
                none = f" (classes left without a prototype of their own: {listed(empty, 8)})" if empty else ""
                print(f"pruned {report['num_pruned']} prototypes, {report['num_remaining']} remain{none}; "
                      f"test accuracy after last-layer retraining {test:.3f} -> {self._path(PRUNED)}", flush=True)

    def _retrain_pruned(self) -> tuple[dict, list[float]]:
        """The original's retraining after pruning: ``prune_retrain_epochs`` epochs of the last layer alone over
        the (augmented, ``augment_copies``) training loader with a fresh Adam at ``last_layer_lr``, the model in
        train mode (BatchNorm statistics keep updating, as the original's ``train_and_test.train``), testing
        after every epoch. Returns the last epoch's training metrics and the test accuracy of every epoch."""
        cfg = self.cfg
        optimizer = torch.optim.Adam(self.model.last_layer.parameters(), lr=cfg.last_layer_lr)
        set_trainable(self.model, "last")
        forward = self._wrapped_forward("last")
        train, tests = {"accuracy": float("nan")}, []
        for epoch in range(cfg.prune_retrain_epochs):
            index = len(self.schedule) + epoch  # shuffling and augmentation seeds continue after the schedule's
            self.model.train()
            train = self._train_epoch(forward, optimizer, index, f"prune retrain {epoch}")
            self.model.eval()
            test = run_epoch(self.forward, self.model, self.test_loader, self.loss_fn, self.device,
                             channels_last=cfg.channels_last, progress=self._bars(), desc="test")
            tests.append(test["accuracy"])
            if self.is_main and not cfg.quiet:
                print(f"prune retrain {epoch + 1}/{cfg.prune_retrain_epochs}: train acc {train['accuracy']:.3f}  "
                      f"test acc {test['accuracy']:.3f}", flush=True)
        return train, tests

    def _explain(self) -> None:
        """Explanations, gallery and interpretability metrics of the finished run (``protokern.explain``)."""
        try:
            explain_run(self.run_dir, self.model, test_dataset=self.test_set, push_records=self.records,
                        push_dataset=self.push_set, device=self.device, config=self.cfg, progress=self._bars(),
                        part_localisation_result=self._localisation)
        except Exception as error:  # noqa: BLE001 - explanations must not lose a finished training run
            warnings.warn(f"the explanations failed ({type(error).__name__}: {error}); the training is complete: "
                          f"--resume {_quoted(self.run_dir)} writes them again", stacklevel=2)


_SELECTION_NOTE = {
    "val": "best.pt has the best accuracy on the validation images held out of the training set (once a push "
           "has happened, among the pushed models only: push and last-layer steps); the test set played no part "
           "in choosing it",
    "test": "best.pt was chosen on the test set (--val-fraction 0, as the original did): "
            "its test accuracy is optimistic",
}


def _final_line(summary: dict, seconds: float) -> str:
    """``done: ...``: the test accuracy of the last and of the selected checkpoint (and of pruned.pt), what
    selected it, and the final model's part localisation."""
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    pruned = summary.get("pruned")
    last = f"last.pt {fmt(summary['test_accuracy'])}"
    if pruned:  # the final model: its accuracy, and how many classes lost all their prototypes
        lost = pruned.get("classes_without_prototypes")
        last += (f", pruned.pt {fmt(pruned['test_accuracy'])}"
                 + (f" (no prototype left for {len(lost)} class{'es' if len(lost) > 1 else ''})" if lost else ""))
    if summary["best_step"] is None:
        return (f"done: test accuracy {last}, no best.pt; "
                f"part localisation {fmt(summary['part_localisation'])}, {seconds:.1f} s -> {summary['run_dir']}")
    # steps counted from 1 of the total, as the per-step lines ("[21/24] push ..."); summary.json's best_step
    # counts from 0, as metrics.jsonl's step
    selected = (f"best.pt (step {summary['best_step'] + 1}/{summary['steps_total']}) "
                f"{fmt(summary['best_test_accuracy'])}")
    if summary["selected_on"] == "validation":
        selected += f", chosen on validation accuracy {fmt(summary['best_val_accuracy'])}"
    else:
        selected += ", chosen on the TEST set (--val-fraction 0)"
    return (f"done: test accuracy {last}, {selected}; "
            f"part localisation {fmt(summary['part_localisation'])}, {seconds:.1f} s -> {summary['run_dir']}")


def train(cfg: TrainConfig, explicit: set[str] = frozenset()) -> dict:
    """Run training for ``cfg`` (initialising torch.distributed under torchrun); return the summary dict (what
    ``summary.json`` holds). ``explicit``: the settings given explicitly, as for :class:`Trainer`, whose errors
    this raises; also ``FloatingPointError`` for a non-finite loss (``--nan-policy stop``), ``KeyboardInterrupt``
    after an orderly stop (interrupted.pt written), and ``PeerStopped`` when another process of the torchrun job
    stopped.
    """
    created = not distributed()
    info, device = init_distributed(cfg.device)
    trainer = None
    try:
        trainer = Trainer(cfg, info, device, explicit)
        try:
            return trainer.run()
        finally:
            trainer.close()
    except RuntimeError as error:
        if not (info.enabled and peer_lost(error)):
            raise
        # not a step count: this process may have finished a step whose last.pt rank 0 had not yet written
        resume = (f"; continue with --resume {_quoted(trainer.run_dir)} (after the last step last.pt holds)"
                  if trainer is not None and trainer.next_step else "")
        raise PeerStopped("another process of this torchrun job stopped (a signal or an error there: its output "
                          f"says which), so this one stops too{resume}") from error
    finally:
        if created:
            cleanup()


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point: ``python -m protokern.train [flags]`` (``--help`` lists them).

    Bad input (settings, config file, data or checkpoint paths, corrupt or unfitting checkpoints) ends with one
    line on stderr and exit code 2; a run stopped by a non-finite value, a run directory in use by another
    process or (under torchrun) another process of the job stopping, with exit code 1. ``--debug`` raises the
    error with its traceback instead.
    """
    stopped = (FloatingPointError, ckpt.RunDirLocked, PeerStopped)
    with exit_on_error("python -m protokern.train", argv, stopped=stopped) as mode:
        cfg, explicit = parse_config(argv)
        mode.debug = cfg.debug  # also a config file's debug: true
        return train(cfg, explicit)
