"""Training configuration: one dataclass, named presets, YAML/JSON files and command-line flags.

Precedence, lowest first: dataclass defaults < preset < ``--config FILE`` < flags given on the command line.
Each field carries its flag help in ``metadata["help"]``. Renamed settings (:data:`RENAMED`) are still
accepted under their old names (flag, config file, a checkpoint's saved config) with a ``DeprecationWarning``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import reprlib
import typing
import warnings
from dataclasses import dataclass, field, fields

import numpy as np

from protokern.data import CROPS
from protokern.data.augment import MODES as AUGMENT_MODES
from protokern.data.cache import CACHE_MODES
from protokern.models import ADD_ONS, BACKBONES
from protokern.ops import SIMILARITIES
from protokern.utils import parse_sides

DATASETS = ("synthetic", "cub", "cars", "folder")
AMP_MODES = ("none", "bf16", "fp16")
PRUNE_RETRAIN = ("original", "cached")
NAN_POLICIES = ("stop", "skip")

# old name -> new name (the old ones counted epochs, not iterations)
RENAMED = {"last_layer_iters": "last_layer_epochs", "prune_retrain_iters": "prune_retrain_epochs"}
# settings naming files or folders: a leading "~" is expanded (a config file's or a quoted flag's, that no shell did)
PATH_SETTINGS = ("data_root", "backbone_weights", "out", "resume")
# those a saved config (config.yaml, a checkpoint's) is read back with: made absolute, so that --resume, --config
# and the explain CLI find them from any working directory
SAVED_PATH_SETTINGS = ("data_root", "backbone_weights")
# where and how far this session goes: flags only, never in a config file (config.yaml leaves them out)
SESSION_SETTINGS = ("out", "resume", "max_steps")


def _opt(default, help: str):  # noqa: A002 - argparse's word
    """A config field with its flag help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the original ProtoPNet's CUB settings (preset ``cub``).

    Each field's meaning is its ``metadata["help"]`` (``python -m protokern.train --help`` shows them, with the
    flag ``--field-name``); :func:`parse_config` builds one from flags, a preset and a config file."""

    preset: str = _opt("cub", "named base configuration: demo (the CPU demo), cub or cars (the original's recipe); "
                                       "flags override it")

    # data
    dataset: str = _opt("cub", f"one of {', '.join(DATASETS)}")
    data_root: str | None = _opt(None, "dataset folder (cub: holding CUB_200_2011/, cars: the devkit layout, "
                                       "folder: train/ and test/)")
    image_size: int = _opt(224, "side of the square images fed to the model, in pixels")
    crop: str = _opt("bbox", "cub / cars: crop each image to its object box (bbox) or keep it whole (none)")
    val_fraction: float = _opt(0.1, "fraction of the training set held out (stratified by class, seeded by "
                                    "--seed) to choose best.pt (best validation accuracy; once a push has happened "
                                    "among pushed models only); 0 chooses on the test set as the original did")
    augment: bool = _opt(True, "augmentation of training batches on their device (rotate / skew / shear / flip)")
    aug_rotate: float = _opt(15.0, "max rotation in degrees")
    aug_skew: float = _opt(0.2, "perspective skew magnitude")
    aug_shear: float = _opt(10.0, "max shear in degrees")
    aug_flip: float = _opt(0.5, "left-right flip probability")
    augment_mode: str = _opt("original", "original: each image gets one of rotate / skew / shear, zoomed so no "
                                         "border shows, as the original's Augmentor pipelines; compose: all of "
                                         "them on every image, borders reflected")
    augment_copies: int = _opt(30, "augmented copies of each training image per epoch, each a fresh augmentation "
                                    "(the original trains on 30 offline copies: an epoch of 5,994 CUB images is "
                                    "2,248 steps of 80)")
    synthetic_classes: int = _opt(10, "synthetic dataset: number of classes")
    synthetic_train_per_class: int = _opt(60, "synthetic dataset: training images per class")
    synthetic_test_per_class: int = _opt(30, "synthetic dataset: test images per class")
    synthetic_part_size: int | None = _opt(None, "synthetic dataset: side of the class part in pixels "
                                                 "(default image_size // 4)")
    synthetic_seed: int | None = _opt(None, "seed of the synthetic images (default: --seed)")

    # model
    backbone: str = _opt("vgg19", f"trunk: one of {', '.join(BACKBONES)}")
    pretrained: bool = _opt(True, "load torchvision ImageNet weights into the trunk")
    backbone_weights: str | None = _opt(None, "local state-dict file for the trunk")
    prototypes_per_class: int = _opt(10, "prototypes of each class")
    prototype_dim: int = _opt(128, "channels of the add-on output and of each prototype")
    add_on: str = _opt("regular", f"add-on layers between trunk and prototypes: one of {', '.join(ADD_ONS)}")
    prototype_size: str = _opt("1", "prototype window on the feature map: K (K x K) or KHxKW, e.g. 1, 3 or 2x3 "
                                    "(the original's prototype_shape[2:], 1 x 1 in its runs)")
    similarity: str = _opt("log", "prototype similarity: log (log((d + 1) / (d + eps)), the original's default), "
                                  "linear (-d; as the original, no last-layer epochs after a push) or cosine")

    # schedule (epochs count the warm-up + joint epochs; last-layer epochs come on top after each push)
    epochs: int = _opt(31, "warm-up + joint epochs (last-layer epochs after each push come on top)")
    warm_epochs: int = _opt(5, "warm-up epochs (trunk frozen) at the start of --epochs")
    push_start: int = _opt(10, "prototypes are pushed after each epoch (0-based) e >= push_start that is a multiple "
                               "of --push-every (the original's rule)")
    push_every: int = _opt(10, "pushes come after the epochs that are multiples of this, from --push-start on")
    push_at_end: bool = _opt(False, "also push after the final epoch if it is not a push epoch (the original "
                                    "does not)")
    last_layer_epochs: int = _opt(20, "last-layer-only epochs after each push (none with --similarity linear, as "
                                       "the original; formerly --last-layer-iters)")
    max_steps: int | None = _opt(None, "stop after this many schedule steps of this session (a resumed run counts "
                                       "from where it goes on; resume later with --resume)")

    # batches (training: global, split across torchrun processes; test and push: per process)
    train_batch_size: int = _opt(80, "global training batch, split evenly across torchrun processes (it must "
                                     "divide by their number)")
    test_batch_size: int = _opt(100, "evaluation batch size per process")
    push_batch_size: int = _opt(75, "push batch size per process")

    # optimisation
    warm_add_on_lr: float = _opt(3e-3, "warm-up learning rate of the add-on")
    warm_prototypes_lr: float = _opt(3e-3, "warm-up learning rate of the prototypes")
    joint_features_lr: float = _opt(1e-4, "joint learning rate of the trunk")
    joint_add_on_lr: float = _opt(3e-3, "joint learning rate of the add-on")
    joint_prototypes_lr: float = _opt(3e-3, "joint learning rate of the prototypes")
    weight_decay: float = _opt(1e-3, "weight decay of the trunk and add-on")
    lr_step_size: int = _opt(5, "joint epochs between learning-rate decays (StepLR)")
    lr_gamma: float = _opt(0.1, "learning-rate decay factor (StepLR)")
    last_layer_lr: float = _opt(1e-4, "learning rate of the last layer (last-layer epochs and prune retraining)")

    # loss
    ce_coef: float = _opt(1.0, "weight of the cross entropy")
    cluster_coef: float = _opt(0.8, "weight of the cluster cost")
    separation_coef: float = _opt(-0.08, "weight of the separation cost (negative: pushes apart)")
    l1_coef: float = _opt(1e-4, "weight of the L1 penalty on the last layer's wrong-class connections")

    # runtime
    out: str | None = _opt(None, "run directory (default runs/<timestamp>): new, or holding none of the files a run "
                                 "writes, and no symbolic link")
    seed: int = _opt(0, "seed of initialisation, shuffling, augmentation and the validation split")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int | None = _opt(None, "data-loader worker processes (None: usable CPUs - 1, at most 8)")
    data_cache: str = _opt("auto", "image files decoded once and kept as uint8: memory, gpu, off (decode at every "
                                   "access) or auto (gpu if it takes <= 1/5 of the free GPU memory, else memory if "
                                   "<= 1/2 of the available RAM, else off)")
    skip_bad_images: bool = _opt(False, "leave out images that do not decode (one warning each, counted in "
                                        "summary.json) instead of stopping with an error naming the file")
    amp: str = _opt("none", "autocast dtype of the trunk: none, bf16 or fp16")
    channels_last: bool = _opt(False, "channels-last memory format for the trunk")
    compile: bool = _opt(False, "torch.compile the trunk")
    resume: str | None = _opt(None, "run directory or checkpoint file to continue from (RUN or RUN/last.pt; "
                                    "interrupted.pt holds a mid-step state and is refused)")
    nan_policy: str = _opt("stop", "on a non-finite training loss: stop (the run ends with an error, "
                                   "checkpoints untouched) or skip (skip the batch, e.g. with fp16 AMP)")
    debug: bool = _opt(False, "show the full traceback of errors (default: one line on stderr)")
    push_images: bool = _opt(True, "write prototype PNGs at each push")
    quiet: bool = _opt(False, "no progress bars or per-step lines (the last line, done or stopped, still prints)")
    explain: bool = _opt(True, "after training, write explanations, the prototype gallery and part "
                               "localisation to the run directory (protokern.explain.explain_run)")
    prune: bool = _opt(False, "after the last push, prune prototypes whose nearest training images are mostly "
                              "of other classes, then retrain the last layer (writes pruned.pt and prune.json)")
    prune_k: int = _opt(6, "nearest training images (one patch each) looked at per prototype")
    prune_threshold: int = _opt(3, "prune when fewer than this many of the k nearest images are of the "
                                   "prototype's class")
    prune_retrain: str = _opt("original", "last-layer retraining after pruning: original (epochs over the "
                                          "augmented training set in train mode, testing after each) or cached "
                                          "(fast: similarities of the unaugmented images computed once, eval mode)")
    prune_retrain_epochs: int = _opt(100, "last-layer epochs after pruning (the original: 100, at the last-layer "
                                          "lr; formerly --prune-retrain-iters)")

    def __post_init__(self):  # every way a config is made (flags, config file, preset, dataclasses.replace)
        for f in fields(self):  # NumPy scalars as Python values: checkpoints hold the config, plain values only
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())
        self._expand_paths()

    def _expand_paths(self) -> None:
        """Expand a leading "~" of the :data:`PATH_SETTINGS` and make the :data:`SAVED_PATH_SETTINGS` absolute
        (in place)."""
        for name in PATH_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                value = os.path.expanduser(value)
            if isinstance(value, str) and value and name in SAVED_PATH_SETTINGS and not os.path.isabs(value):
                value = os.path.join(os.getcwd(), value)  # (not abspath: it would resolve "link/.." textually)
            setattr(self, name, value)

    @property
    def window(self) -> tuple[int, int]:
        """``prototype_size`` as (kh, kw)."""
        return parse_window(self.prototype_size)

    def validate(self, schedule: bool = True) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad setting; return self (its paths' "~" expanded). ``schedule``:
        also build the schedule to check its push (a warning, or an error with ``prune``): its cost grows with
        the epochs, which a saved config that is only read (``python -m protokern.explain``) skips."""
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"bad config: {message}")

        self._expand_paths()  # also those set after the config was made
        for f in fields(self):  # inf / nan learning rates, coefficients, magnitudes
            value = getattr(self, f.name)
            need(not isinstance(value, float) or math.isfinite(value), f"{f.name} must be finite, got {value!r}")
        need(self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        need(self.nan_policy in NAN_POLICIES, f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        need(self.data_cache in CACHE_MODES, f"data_cache must be one of {CACHE_MODES}, got {self.data_cache!r}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(self.dataset == "synthetic" or bool(self.data_root),
             f"dataset {self.dataset!r} needs --data-root (the dataset folder)")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.augment_mode in AUGMENT_MODES,
             f"augment_mode must be one of {AUGMENT_MODES}, got {self.augment_mode!r}")
        need(self.prune_retrain in PRUNE_RETRAIN,
             f"prune_retrain must be one of {PRUNE_RETRAIN}, got {self.prune_retrain!r}")
        need(self.crop in CROPS, f"crop must be 'bbox' or 'none', got {self.crop!r}")
        need(self.backbone in BACKBONES, f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        need(self.add_on in ADD_ONS, f"add_on must be one of {ADD_ONS}, got {self.add_on!r}")
        need(self.similarity in SIMILARITIES, f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        self.window  # noqa: B018 - raises the one-line error of a bad prototype_size
        need(not (self.pretrained and self.backbone_weights), "give either --pretrained or --backbone-weights")
        for name in ("image_size", "prototypes_per_class", "prototype_dim", "epochs", "push_every",
                     "train_batch_size", "test_batch_size", "push_batch_size", "lr_step_size", "augment_copies",
                     "synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an int >= 1, got {value!r}")
        for name in ("warm_epochs", "push_start", "last_layer_epochs", "prune_retrain_epochs", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        need(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps!r}")
        need(self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        for name in ("warm_add_on_lr", "warm_prototypes_lr", "joint_features_lr", "joint_add_on_lr",
                     "joint_prototypes_lr", "last_layer_lr", "weight_decay", "lr_gamma"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(self.warm_epochs <= self.epochs, f"warm_epochs ({self.warm_epochs}) > epochs ({self.epochs})")
        need(isinstance(self.prune_k, int) and not isinstance(self.prune_k, bool) and self.prune_k >= 1,
             f"prune_k must be an int >= 1, got {self.prune_k!r}")
        need(isinstance(self.prune_threshold, int) and not isinstance(self.prune_threshold, bool)
             and 0 <= self.prune_threshold <= self.prune_k,
             f"prune_threshold must be an int in [0, prune_k={self.prune_k}], got {self.prune_threshold!r}")
        if schedule:
            self._check_push()
        return self

    def _check_push(self) -> None:
        """A schedule without a push: ``ValueError`` with ``prune`` (it prunes after the last push), else a warning."""
        from protokern.train.schedule import build_schedule  # here: schedule.py imports this module

        if any(step.stage == "push" for step in build_schedule(self)):
            return
        why = (f"--push-start {self.push_start} with --push-every {self.push_every} leaves no push epoch within "
               f"--epochs {self.epochs} (the last is epoch {self.epochs - 1}, 0-based)")
        if self.prune:
            raise ValueError(f"bad config: --prune needs a push, but {why}: lower --push-start, raise --epochs, "
                             "add --push-at-end or drop --prune")
        warnings.warn(f"{why}: the run will have no push (prototypes never projected onto training patches); "
                      "lower --push-start, raise --epochs or add --push-at-end", UserWarning, stacklevel=3)

    def to_dict(self) -> dict:
        """Plain dict of all settings."""
        return dataclasses.asdict(self)

    @classmethod
    def from_saved(cls, settings: dict) -> TrainConfig:
        """The config of a checkpoint's or ``config.yaml``'s saved settings (old names accepted).

        A saved config without ``val_fraction`` predates the validation split: its run trained on the whole
        training set and selected on the test set, so it gets ``val_fraction=0``. One without ``augment_mode``
        predates the original's recipe: it continues with one copy per image, the composed augmentation and
        the cached retraining after pruning, as it started.
        """
        settings = renamed_settings(settings, "saved config")
        settings.setdefault("val_fraction", 0.0)
        if "augment_mode" not in settings:
            settings.update(augment_mode="compose", augment_copies=1, prune_retrain="cached")
        return cls(**settings)


def parse_window(text) -> tuple[int, int]:
    """(kh, kw) of a ``prototype_size`` setting "K" or "KHxKW" (an int K is taken too)."""
    sides = parse_sides(text)
    if sides is not None:
        return sides
    raise ValueError(f"bad config: prototype_size must be K or KHxKW with integers >= 1 (e.g. 1, 3, 2x3), "
                     f"got {text!r}")


def _warn_renamed(old: str, where: str) -> None:
    # "always": DeprecationWarning is hidden by default outside __main__, and a user of an old flag should see it
    with warnings.catch_warnings():
        warnings.simplefilter("always", DeprecationWarning)
        names = (old, RENAMED[old])
        if where == "flag":
            names = tuple("--" + n.replace("_", "-") for n in names)
        warnings.warn(f"{where} {names[0]} is deprecated (it counts epochs): use {names[1]}",
                      DeprecationWarning, stacklevel=3)


def _renamed_attribute(old: str) -> property:
    """A deprecated attribute ``old`` read and written through its new field (:data:`RENAMED`)."""
    new = RENAMED[old]

    def get(self):
        _warn_renamed(old, "attribute")
        return getattr(self, new)

    def set(self, value):
        _warn_renamed(old, "attribute")
        setattr(self, new, value)

    return property(get, set, doc=f"Deprecated name of :attr:`{new}`.")


for _old in RENAMED:  # the old attribute names, read and written through the new fields
    setattr(TrainConfig, _old, _renamed_attribute(_old))


def renamed_settings(settings: dict, where: str) -> dict:
    """A copy of ``settings`` with the old names of :data:`RENAMED` replaced (one ``DeprecationWarning`` each);
    ``ValueError`` if both an old name and its new one are given."""
    out = dict(settings)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise ValueError(f"bad config: {where} gives both {old!r} (deprecated) and {new!r}")
            _warn_renamed(old, where)
            out[new] = out.pop(old)
    return out


# Presets: overrides of the dataclass defaults.
PRESETS: dict[str, dict] = {
    # The original ProtoPNet on CUB-200-2011 (cropped), VGG19, 2000 prototypes of depth 128: its schedule,
    # optimisers, losses, augmentation (one of rotate / skew / shear + flip) and epoch length (30 augmented
    # copies per image: 2,248 steps of 80), and pruning retraining. What stays different (docs/differences.md):
    # 31 epochs (3 pushes) instead of the settings' 1000 (99 pushes; later epochs repeat last-layer stages at
    # joint learning rates below 1e-8; --epochs 1000 reproduces its push schedule exactly), fresh augmentations
    # every epoch instead of 30 fixed copies, and push pictures drawn from the prototype after replacement.
    "cub": {},
    # The same recipe on Stanford Cars (196 classes).
    "cars": {"dataset": "cars"},
    # CPU demo: the embedded SyntheticParts dataset with the tiny trunk; about 1-2 minutes on 2 cores.
    # Tuned for a randomly initialised trunk (the original assumes an ImageNet one); see the notes.
    "demo": {
        "dataset": "synthetic", "image_size": 64, "backbone": "tiny", "pretrained": False,
        "synthetic_classes": 10, "synthetic_train_per_class": 100, "synthetic_test_per_class": 30,
        # one part per class -> one prototype per class: the cluster cost pulls only the nearest prototype of
        # the class, so extra ones tend to go unused and fire off the part
        "prototypes_per_class": 1, "prototype_dim": 32,
        "epochs": 20, "warm_epochs": 1, "push_start": 19, "push_every": 19, "last_layer_epochs": 3,
        "train_batch_size": 32, "test_batch_size": 100, "push_batch_size": 100,
        # with random features the original 0.8 / -0.08 collapse every patch onto the prototypes before
        # cross entropy can make them discriminative; a weaker pull and a relatively stronger push (which
        # keeps prototypes off the background all images share) let them find the part
        "cluster_coef": 0.1, "separation_coef": -0.05,
        # ~30 optimiser steps per epoch (the original's augmented CUB epoch has ~2000): faster prototypes
        "warm_prototypes_lr": 3e-2, "joint_prototypes_lr": 3e-2, "joint_features_lr": 3e-3,
        "lr_step_size": 14, "last_layer_lr": 3e-3,
        # flips only: the synthetic shapes are left-right symmetric; rotation / skew / shear slow learning
        "aug_rotate": 0.0, "aug_skew": 0.0, "aug_shear": 0.0, "augment_mode": "compose", "augment_copies": 1,
        "prune_retrain": "cached",
        "num_workers": 0,
    },
}


def preset_config(name: str) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], "preset": name})


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out[name] = args[0] if args else hint
    return out


_SHORT = reprlib.Repr()  # a value echoed in an error: a YAML alias tree in a line, not expanded to gigabytes
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _coerce(name: str, value, kind: type):
    """Check / convert a value from a config file to the field's type."""
    if value is None:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if name == "prototype_size" and isinstance(value, int) and not isinstance(value, bool):  # YAML: 3
        return str(value)
    raise ValueError(f"bad config: {name} must be {kind.__name__}, got {type(value).__name__} {_SHORT.repr(value)}")


def load_config_file(path: str) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON file of settings (a mapping of field names, ``-`` or ``_``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    import yaml

    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"config file {path} is not a {kind} text file: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ValueError(f"config file {path} is nested too deeply to be a file of settings") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    data = renamed_settings({str(k).replace("-", "_"): v for k, v in data.items()}, f"config file {path}: setting")
    types = _field_types()
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {unknown}")
    return {k: _coerce(k, v, types[k]) for k, v in data.items()}


def _without_session(from_file: dict, flags: dict, path: str) -> dict:
    """A config file's settings less those of the session (:data:`SESSION_SETTINGS`), which only flags give: a
    shared file must not choose where a run writes with no flag showing it. One the flags give too is dropped,
    as is an unset one (config.yaml files before 30ec979 held them, as null); another is a ``ValueError``."""
    kept = [k for k in SESSION_SETTINGS if from_file.get(k) is not None and k not in flags]
    if kept:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        one = len(kept) == 1
        raise ValueError(f"config file {path}: {', '.join(kept)} {'is a setting' if one else 'are settings'} of the "
                         f"command line only ({', '.join(map(flag, kept))}), so that a shared file cannot choose where "
                         f"a run writes: remove {'it' if one else 'them'} from the file")
    return {k: v for k, v in from_file.items() if k not in SESSION_SETTINGS}


_CHOICES = {"dataset": DATASETS, "amp": AMP_MODES, "crop": CROPS, "backbone": BACKBONES, "add_on": ADD_ONS,
            "augment_mode": AUGMENT_MODES, "prune_retrain": PRUNE_RETRAIN,
            "nan_policy": NAN_POLICIES, "data_cache": CACHE_MODES, "similarity": SIMILARITIES}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors only rank 0 of a torchrun job prints: every process parses the same
    command line, and N usage blocks buried the one line that mattered. The others exit with the same status."""

    def error(self, message):
        if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") and os.environ.get("RANK", "0") != "0":
            self.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser: ``--config``, plus one flag per :class:`TrainConfig` field (``--field-name``) and
    the deprecated flags of :data:`RENAMED`."""
    parser = _Parser(
        prog="python -m protokern.train", argument_default=argparse.SUPPRESS,
        description="Train a ProtoPNet (warm-up, joint, push, last-layer stages as the original).")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)")
    types = _field_types()
    demo = preset_config("demo")  # the defaults are the demo preset's
    others = {name: preset_config(name) for name in sorted(PRESETS) if name != "demo"}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = types[f.name]
        shown = getattr(demo, f.name)
        parts = [] if shown is None and "(default" in f.metadata["help"] else [f"default {shown!r}"]
        parts += [f"--preset {name}: {getattr(preset, f.name)!r}" for name, preset in others.items()
                  if f.name != "preset" and getattr(preset, f.name) != shown]
        help_text = f.metadata["help"] + (f" ({'; '.join(parts)})" if parts else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "preset":
            parser.add_argument(flag, choices=sorted(PRESETS), help=help_text)
        else:
            choices = _CHOICES.get(f.name)
            parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else f.name.upper(),
                                help=help_text)
    for old, new in RENAMED.items():
        parser.add_argument("--" + old.replace("_", "-"), type=types[new], metavar=new.upper(),
                            help=f"deprecated: use --{new.replace('_', '-')}")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Parse command-line arguments into a validated config; also returns the names of the explicit flags.

    Without arguments the ``demo`` preset is used.
    """
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    args = renamed_settings(args, "flag")
    from_file = _without_session(load_config_file(config_file), args, config_file) if config_file else {}
    preset = args.get("preset", from_file.get("preset", "demo"))
    config = preset_config(preset)
    explicit = set(from_file) | set(args)
    config = dataclasses.replace(config, **{**from_file, **args})
    if config.backbone_weights and "pretrained" not in args and ("backbone_weights" in args
                                                               or "pretrained" not in from_file):
        config.pretrained = False  # a trunk file replaces the preset's (or config file's) ImageNet download
    if config.resume:  # checked once merged into the resumed run's saved settings (Trainer), not the preset's
        return config, explicit
    return config.validate(), explicit
