"""Training configuration: one dataclass, named presets, YAML/JSON files and command-line flags.

Precedence, lowest first: dataclass defaults < preset < ``--config FILE`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, fields

from protokern.models import ADD_ONS, BACKBONES

DATASETS = ("synthetic", "cub", "cars", "folder")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the original ProtoPNet's CUB settings (preset ``cub``)."""

    preset: str = "cub"

    # data
    dataset: str = "cub"
    data_root: str | None = None
    image_size: int = 224
    crop: str = "bbox"
    augment: bool = True
    aug_rotate: float = 15.0
    aug_skew: float = 0.2
    aug_shear: float = 10.0
    aug_flip: float = 0.5
    synthetic_classes: int = 10
    synthetic_train_per_class: int = 60
    synthetic_test_per_class: int = 30
    synthetic_part_size: int | None = None
    synthetic_seed: int | None = None

    # model
    backbone: str = "vgg19"
    pretrained: bool = True
    backbone_weights: str | None = None
    prototypes_per_class: int = 10
    prototype_dim: int = 128
    add_on: str = "regular"

    # schedule (epochs count the warm-up + joint epochs; last-layer epochs come on top after each push)
    epochs: int = 31
    warm_epochs: int = 5
    push_start: int = 10
    push_every: int = 10
    push_at_end: bool = True
    last_layer_iters: int = 20
    max_steps: int | None = None

    # batches (per process)
    train_batch_size: int = 80
    test_batch_size: int = 100
    push_batch_size: int = 75

    # optimisation
    warm_add_on_lr: float = 3e-3
    warm_prototypes_lr: float = 3e-3
    joint_features_lr: float = 1e-4
    joint_add_on_lr: float = 3e-3
    joint_prototypes_lr: float = 3e-3
    weight_decay: float = 1e-3
    lr_step_size: int = 5
    lr_gamma: float = 0.1
    last_layer_lr: float = 1e-4

    # loss
    ce_coef: float = 1.0
    cluster_coef: float = 0.8
    separation_coef: float = -0.08
    l1_coef: float = 1e-4

    # runtime
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = None
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    resume: str | None = None
    push_images: bool = True
    quiet: bool = False
    explain: bool = True
    prune: bool = False
    prune_k: int = 6
    prune_threshold: int = 3
    prune_retrain_iters: int = 100

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad setting; return self."""
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"bad config: {message}")

        need(self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        need(self.dataset == "synthetic" or bool(self.data_root),
             f"dataset {self.dataset!r} needs --data-root (the dataset folder)")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.crop in ("bbox", "none"), f"crop must be 'bbox' or 'none', got {self.crop!r}")
        need(self.backbone in BACKBONES, f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        need(self.add_on in ADD_ONS, f"add_on must be one of {ADD_ONS}, got {self.add_on!r}")
        need(not (self.pretrained and self.backbone_weights), "give either --pretrained or --backbone-weights")
        for name in ("image_size", "prototypes_per_class", "prototype_dim", "epochs", "push_every",
                     "train_batch_size", "test_batch_size", "push_batch_size", "lr_step_size",
                     "synthetic_classes", "synthetic_train_per_class", "synthetic_test_per_class"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an int >= 1, got {value!r}")
        for name in ("warm_epochs", "push_start", "last_layer_iters", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be an int >= 0, got {value!r}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps!r}")
        need(self.num_workers is None or self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        for name in ("warm_add_on_lr", "warm_prototypes_lr", "joint_features_lr", "joint_add_on_lr",
                     "joint_prototypes_lr", "last_layer_lr", "weight_decay", "lr_gamma"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(self.warm_epochs <= self.epochs, f"warm_epochs ({self.warm_epochs}) > epochs ({self.epochs})")
        return self

    def to_dict(self) -> dict:
        """Plain dict of all settings."""
        return dataclasses.asdict(self)


# Presets: overrides of the dataclass defaults.
PRESETS: dict[str, dict] = {
    # The original ProtoPNet on CUB-200-2011 (cropped), VGG19, 2000 prototypes of depth 128.
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
        "epochs": 20, "warm_epochs": 1, "push_start": 19, "push_every": 19, "last_layer_iters": 3,
        "train_batch_size": 32, "test_batch_size": 100, "push_batch_size": 100,
        # with random features the original 0.8 / -0.08 collapse every patch onto the prototypes before
        # cross entropy can make them discriminative; a weaker pull and a relatively stronger push (which
        # keeps prototypes off the background all images share) let them find the part
        "cluster_coef": 0.1, "separation_coef": -0.05,
        # ~30 optimiser steps per epoch (the original's augmented CUB epoch has ~2000): faster prototypes
        "warm_prototypes_lr": 3e-2, "joint_prototypes_lr": 3e-2, "joint_features_lr": 3e-3,
        "lr_step_size": 14, "last_layer_lr": 3e-3,
        # flips only: the synthetic shapes are left-right symmetric; rotation / skew / shear slow learning
        "aug_rotate": 0.0, "aug_skew": 0.0, "aug_shear": 0.0,
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
    raise ValueError(f"bad config: {name} must be {kind.__name__}, got {value!r}")


def load_config_file(path: str) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON file of settings (a mapping of field names, ``-`` or ``_``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    types = _field_types()
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"config file {path}: unknown settings {unknown}")
    return {k: _coerce(k, v, types[k]) for k, v in data.items()}


_HELP = {
    "preset": "named base configuration (demo is the default when no arguments are given)",
    "dataset": f"one of {', '.join(DATASETS)}",
    "data_root": "dataset folder (cub: holding CUB_200_2011/, cars: the devkit layout, folder: train/ and test/)",
    "synthetic_seed": "seed of the synthetic images (default: --seed)",
    "pretrained": "load torchvision ImageNet weights into the trunk",
    "backbone_weights": "local state-dict file for the trunk",
    "epochs": "warm-up + joint epochs (last-layer epochs after each push come on top)",
    "push_start": "first epoch (0-based) after which prototypes are pushed",
    "push_every": "push every this many epochs after push_start",
    "push_at_end": "also push after the final epoch if it is not a push epoch",
    "last_layer_iters": "last-layer-only epochs after each push",
    "max_steps": "stop after this many schedule steps (resume later with --resume)",
    "out": "run directory (default runs/<timestamp>)",
    "device": "auto, cpu, cuda or cuda:N",
    "amp": "autocast dtype of the trunk: none, bf16 or fp16",
    "channels_last": "channels-last memory format for the trunk",
    "compile": "torch.compile the trunk",
    "resume": "run directory or checkpoint file to continue from",
    "push_images": "write prototype PNGs at each push",
    "augment": "GPU augmentation of training batches (the paper's rotate / skew / shear / flip)",
    "aug_rotate": "max rotation in degrees", "aug_skew": "perspective skew magnitude",
    "aug_shear": "max shear in degrees", "aug_flip": "left-right flip probability",
    "quiet": "no progress bars",
    "explain": "call protokern.explain.explain_run after training when it exists",
    "prune": "after the last push, prune prototypes whose nearest training images are mostly of other classes, "
             "then retrain the last layer (writes pruned.pt and prune.json)",
    "prune_k": "nearest training images (one patch each) looked at per prototype",
    "prune_threshold": "prune when fewer than this many of the k nearest images are of the prototype's class",
    "prune_retrain_iters": "last-layer epochs after pruning (the original: 100, at the last-layer lr)",
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser: ``--config``, plus one flag per :class:`TrainConfig` field (``--field-name``)."""
    parser = argparse.ArgumentParser(
        prog="python -m protokern.train", argument_default=argparse.SUPPRESS,
        description="Train a ProtoPNet (warm-up, joint, push, last-layer stages as the original).")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (flags override it)")
    types = _field_types()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = types[f.name]
        help_text = _HELP.get(f.name, "") + f" (default {f.default!r}, or the preset's)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.name == "preset":
            parser.add_argument(flag, choices=sorted(PRESETS), help=help_text)
        else:
            choices = {"dataset": DATASETS, "amp": AMP_MODES, "crop": ("bbox", "none"),
                       "backbone": BACKBONES, "add_on": ADD_ONS}.get(f.name)
            parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else f.name.upper(),
                                help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Parse command-line arguments into a validated config; also returns the names of the explicit flags.

    Without arguments the ``demo`` preset is used.
    """
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    from_file = load_config_file(config_file) if config_file else {}
    preset = args.get("preset", from_file.get("preset", "demo"))
    config = preset_config(preset)
    explicit = set(from_file) | set(args)
    config = dataclasses.replace(config, **{**from_file, **args})
    return config.validate(), explicit
