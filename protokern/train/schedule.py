"""The original ProtoPNet schedule: stages, which parameters train in each, optimisers and the LR schedule.

- ``warm`` epochs (``epoch < warm_epochs``): trunk frozen; Adam on the add-on (lr 3e-3, wd 1e-3) and the
  prototypes (lr 3e-3).
- ``joint`` epochs: Adam on trunk (1e-4, wd 1e-3), add-on (3e-3, wd 1e-3) and prototypes (3e-3), with
  ``StepLR(5, 0.1)`` stepped at the start of every joint epoch (as the original, which steps before training).
- ``push`` after epoch ``e`` when ``e >= push_start`` and ``e % push_every == 0`` (and, with
  ``push_at_end``, after the final epoch; the original does not), followed by ``last_layer_epochs`` ``last``
  epochs training only the last layer (Adam 1e-4); none for the "linear" similarity, as the original
  (whose last-layer stage runs only for its 'log' activation).

The last layer is in neither the warm nor the joint optimiser.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # (annotations only: config.py builds its schedule with this module)
    from protokern.train.config import TrainConfig


@dataclass(frozen=True)
class Step:
    """One unit of the schedule: a training epoch of a stage, or a push. ``index`` is its position."""

    index: int
    stage: str
    epoch: int
    iteration: int = 0  # last-layer epoch number after a push


def build_schedule(cfg: TrainConfig) -> list[Step]:
    """The whole run as a flat list of steps (resuming continues at the step after the checkpoint's)."""
    steps: list[Step] = []

    def add(stage, epoch, iteration=0):
        steps.append(Step(len(steps), stage, epoch, iteration))

    last_layer_epochs = 0 if cfg.similarity == "linear" else cfg.last_layer_epochs
    for epoch in range(cfg.epochs):
        add("warm" if epoch < cfg.warm_epochs else "joint", epoch)
        is_push = epoch >= cfg.push_start and epoch % cfg.push_every == 0
        if is_push or (cfg.push_at_end and epoch == cfg.epochs - 1):
            add("push", epoch)
            for i in range(last_layer_epochs):
                add("last", epoch, i)
    return steps


def optimizer_steps(schedule: list[Step], steps_per_epoch: int) -> dict[str, int]:
    """Optimiser steps of each training stage (``warm``, ``joint``, ``last``) and in all (``total``) of
    ``schedule``, for epochs of ``steps_per_epoch`` steps (``len`` of the training loader)."""
    steps = {stage: steps_per_epoch * sum(s.stage == stage for s in schedule) for stage in ("warm", "joint", "last")}
    steps["total"] = sum(steps.values())
    return steps


def set_trainable(model: nn.Module, stage: str) -> None:
    """``requires_grad`` per stage: warm (add-on, prototypes), joint (+ trunk), last (last layer only)."""
    if stage not in ("warm", "joint", "last"):
        raise ValueError(f"not a training stage: {stage!r}")
    flags = {
        "features": stage == "joint",
        "add_on": stage in ("warm", "joint"),
        "prototype_layer": stage in ("warm", "joint"),
        "last_layer": stage == "last",
    }
    for name, flag in flags.items():
        for p in getattr(model, name).parameters():
            p.requires_grad_(flag)


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """The three Adam optimisers of the original: ``warm``, ``joint``, ``last``."""
    features = list(model.features.parameters())
    add_on = list(model.add_on.parameters())
    prototypes = [model.prototype_layer.prototypes]
    wd = cfg.weight_decay
    return {
        "warm": torch.optim.Adam([
            {"params": add_on, "lr": cfg.warm_add_on_lr, "weight_decay": wd, "name": "add_on"},
            {"params": prototypes, "lr": cfg.warm_prototypes_lr, "name": "prototypes"},
        ]),
        "joint": torch.optim.Adam([
            {"params": features, "lr": cfg.joint_features_lr, "weight_decay": wd, "name": "features"},
            {"params": add_on, "lr": cfg.joint_add_on_lr, "weight_decay": wd, "name": "add_on"},
            {"params": prototypes, "lr": cfg.joint_prototypes_lr, "name": "prototypes"},
        ]),
        "last": torch.optim.Adam([
            {"params": model.last_layer.parameters(), "lr": cfg.last_layer_lr, "name": "last_layer"},
        ]),
    }


def make_scheduler(joint: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """StepLR of the joint optimiser (stepped at the start of each joint epoch, see :func:`step_scheduler`)."""
    return torch.optim.lr_scheduler.StepLR(joint, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)


def step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Step before the epoch's optimiser steps, as the original (silencing PyTorch's order warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr_<group name>": lr}`` of an optimiser's groups."""
    return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
