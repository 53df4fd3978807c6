"""One pass over a loader: training (with augmentation and optimiser steps) or evaluation."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from protokern.data import model_input
from protokern.losses import TERMS
from protokern.train.distributed import all_reduce_sum
from protokern.utils import distributed, progress as progress_bar


class TrainForward(nn.Module):
    """The model's forward with the trunk under autocast (and optionally compiled).

    The add-on layers, the prototype op and the last layer stay float32. Wrap this (not the model) in
    DDP. ``forward(x) -> (logits, min_distances)`` like ``ProtoPNet.forward``.
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None, compile_trunk: bool = False):
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        # a plain attribute: the compiled wrapper shares the trunk's parameters and adds no state-dict keys
        object.__setattr__(self, "_trunk", torch.compile(model.features) if compile_trunk else model.features)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        similarity, min_distances = self.model.prototype_layer(
            self.model.conv_features(x, autocast_dtype=self.amp_dtype, trunk=self._trunk))
        return self.model.class_logits(similarity), min_distances


def _on_any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over ranks, so that every rank takes the same decision (one that skips or stops alone
    would hang DDP); just ``flag`` without a process group."""
    if not distributed():
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


def run_epoch(forward: nn.Module, model: nn.Module, loader, loss_fn: nn.Module, device: torch.device, *,
              optimizer: torch.optim.Optimizer | None = None, augment: nn.Module | None = None,
              generator: torch.Generator | None = None, scaler=None, channels_last: bool = False,
              progress: bool = False, desc: str = "", nan_policy: str = "stop") -> dict[str, float]:
    """Train (when ``optimizer`` is given) or evaluate over ``loader``; metrics summed over all ranks.

    Images come unnormalised in [0, 1]; they are moved to ``device``, augmented (training only, with
    ``generator``) and normalised there with the model's input statistics. ``forward`` is the (possibly DDP-wrapped)
    :class:`TrainForward`; ``model`` the bare ProtoPNet (for the loss). The caller sets train/eval mode.

    A non-finite training loss raises ``FloatingPointError`` before its backward (``nan_policy="stop"``) or
    skips the batch (``"skip"``, counted in ``skipped``).

    Returns ``accuracy``, each loss term (batch-weighted means), ``images``, ``seconds`` and (training)
    ``skipped``.
    """
    training = optimizer is not None
    start = time.perf_counter()
    sums = torch.zeros(len(TERMS), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = skipped = 0
    bar = progress_bar(loader, desc, progress)
    for batch_index, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if training and augment is not None:
            images = augment(images, generator=generator)
        images = model_input(model, images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(training):
            logits, min_distances = forward(images)
            loss, terms = loss_fn(logits, min_distances, labels, model)
        if training and _on_any_rank(not math.isfinite(terms["total"]), device):
            if nan_policy != "skip":
                value = terms["total"]  # finite here when another process's loss was not
                what = f"({value})" if not math.isfinite(value) else "on another process"
                raise FloatingPointError(f"non-finite loss {what} at batch {batch_index}")
            skipped += 1
            continue
        if training:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        batch = labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        count += batch
        sums += torch.tensor([terms[t] for t in TERMS], dtype=torch.float64) * batch
        if getattr(bar, "disable", True) is False:
            bar.set_postfix(loss=f"{terms['total']:.3f}", refresh=False)
    totals = torch.cat([sums, torch.tensor([float(correct.item()), float(count)], dtype=torch.float64)])
    totals = all_reduce_sum(totals.to(device)).cpu()
    if training and skipped and totals[-1].item() == 0:
        raise FloatingPointError(f"every one of the {skipped} batches had a non-finite loss (--nan-policy skip "
                                 "skipped them all): nothing was trained")
    n = max(totals[-1].item(), 1.0)
    out = {t: totals[i].item() / n for i, t in enumerate(TERMS)}
    out.update(accuracy=totals[-2].item() / n, images=int(totals[-1].item()), seconds=time.perf_counter() - start)
    if training:
        out["skipped"] = skipped
    return out
