"""Prototype pruning and last-layer retraining (the original ProtoPNet's ``prune.py`` / ``run_pruning.py``).

A prototype is pruned when fewer than ``threshold`` (3) of its ``k`` (6) nearest training patches, taken one
per image, come from images of its own class: such a prototype stands for background or for a part shared
with other classes. Afterwards the last layer is retrained (100 epochs, Adam lr 1e-4, the ProtoPNet loss of
which only the cross entropy and the L1 term reach the last layer). The original retrains over its augmented
training set with the model in train mode, testing after every epoch (:func:`retrain_last_layer` with
``augment``, ``train_mode=True`` and ``on_epoch``; the trainer's ``--prune-retrain original``); the cached
path (similarities of the unaugmented images computed once) is a fast alternative.

The search for each prototype's nearest images is one fused :func:`protokern.nearest_patches` call per batch
and a running top-k over ``(P, k + B)`` candidates (stable sorts: equal distances go to the lower image
index): no Python loop over prototypes or images. It is
shared with the global explanation (:func:`protokern.explain.gallery`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from protokern.models.protopnet import prototype_indices
from protokern.push import PushRecords, nearest_training_patches
from protokern.utils import (distributed, image_batches, listed, model_device, positive_int, progress as _progress,
                             unwrap)

__all__ = ["prune_prototypes", "retrain_last_layer", "select_records"]

log = logging.getLogger(__name__)


def select_records(records: PushRecords, keep) -> PushRecords:
    """Push records of the prototypes ``keep`` only (in that order), e.g. those left after pruning.

    ``keep``: prototype indices, or a boolean mask over the records' prototypes (as
    ``ProtoPNet.prune_prototypes`` takes). ``pushed_as`` keeps each prototype's index at the push, which names
    its PNGs in ``image_dir``.
    """
    keep = prototype_indices(keep, len(records.image_index))
    fields = {f.name: getattr(records, f.name) for f in dataclasses.fields(records) if not f.name.startswith("_")}
    for name, value in fields.items():
        if isinstance(value, Tensor):
            fields[name] = value[keep]
    return PushRecords(**fields)


def prune_prototypes(model: nn.Module, loader, *, k: int = 6, threshold: int = 3, device=None,
                     progress: bool = True, push_records: PushRecords | None = None, apply: bool = True) -> dict:
    """Prune the prototypes of ``model`` whose ``k`` nearest training images are mostly of other classes.

    For each prototype, its ``k`` nearest patches over ``loader`` are found, one per image (see
    :func:`nearest_training_patches`); the prototype is pruned when fewer than ``threshold`` of those images
    are of its own class (the original: k=6, threshold=3). ``model.prune_prototypes`` then removes them with
    their last-layer columns (rebuild optimisers afterwards); retrain the last layer with
    :func:`retrain_last_layer`.

    Args:
        model: a ``ProtoPNet`` (DataParallel-wrapped too; not DistributedDataParallel: see ``utils.unwrap``).
        loader: the (unaugmented) training images, ``(images, labels, ...)`` batches in [0, 1], fixed order.
        k, threshold: the pruning rule; ``0 <= threshold <= k``.
        device: the model's device (default; another one is a ValueError). progress: tqdm bar.
        push_records: if given, the result holds ``push_records`` for the prototypes that are kept.
        apply: False only reports what would be pruned (the model is left unchanged).

    Returns:
        dict with ``pruned`` (old indices of the pruned prototypes), ``kept`` (old indices of the others, in
        their new order), ``own_class_neighbours`` ((P,) list: how many of the k nearest images are of the
        prototype's class), ``pruned_per_class`` and ``remaining_per_class`` (lists indexed by class),
        ``classes_without_prototypes`` (the classes left with none of their own, which the model then predicts only
        through other classes' prototypes, and which no explanation can show a prototype of: a warning names
        them), ``num_pruned``, ``num_remaining``, ``k``, ``threshold``, ``neighbours``
        (:class:`Neighbours`) and, with ``push_records``, the kept prototypes' ``push_records``.
    """
    model = unwrap(model, ddp=False)
    if apply:
        model.check_prunable()  # before the pass over the data
    k = positive_int("k", k)
    if not isinstance(threshold, numbers.Integral) or isinstance(threshold, bool) or not 0 <= threshold <= k:
        raise ValueError(f"threshold must be an int in [0, k={k}], got {threshold!r}")
    threshold = int(threshold)
    if push_records is not None and len(push_records.image_index) != model.num_prototypes:
        raise ValueError(f"push_records hold {len(push_records.image_index)} prototypes, "
                         f"the model {model.num_prototypes}")
    neighbours = nearest_training_patches(model, loader, k=k, device=device, progress=progress, desc="prune")
    classes = model.prototype_classes.cpu()
    own = (neighbours.label == classes[:, None]).sum(1)  # (P,)
    prune = own < threshold
    pruned = prune.nonzero().flatten()
    kept = (~prune).nonzero().flatten()
    if apply and kept.numel() == 0:
        targets = getattr(getattr(loader, "dataset", None), "targets", None)
        small = (targets is not None and len(targets) > 0
                 and int(torch.bincount(torch.as_tensor(targets, dtype=torch.long)).max()) < threshold)
        why = (f"every class has fewer than {threshold} images here: too small for threshold {threshold}" if small else
               f"a class with fewer than {threshold} images here can keep none; else is the model trained and pushed?")
        raise ValueError(f"every prototype has fewer than {threshold} of its {k} nearest images in its own "
                         f"class: pruning would remove them all ({why})")
    num_classes = model.num_classes
    remaining = torch.bincount(classes[kept], minlength=num_classes).tolist()
    empty = [c for c, n in enumerate(remaining) if n == 0]
    result = {
        "pruned": pruned.tolist(),
        "kept": kept.tolist(),
        "own_class_neighbours": own.tolist(),
        "pruned_per_class": torch.bincount(classes[pruned], minlength=num_classes).tolist(),
        "remaining_per_class": remaining,
        "classes_without_prototypes": empty,
        "num_pruned": int(pruned.numel()),
        "num_remaining": int(kept.numel()),
        "k": k,
        "threshold": threshold,
        "neighbours": neighbours,
    }
    if apply:
        model.prune_prototypes(pruned)
    if push_records is not None:
        result["push_records"] = select_records(push_records, kept)
    log.info("pruning (k=%d, threshold=%d): %d of %d prototypes %s, %d remain", k, threshold,
             result["num_pruned"], model.num_prototypes + (result["num_pruned"] if apply else 0),
             "pruned" if apply else "would be pruned", result["num_remaining"])
    one_process = not distributed() or dist.get_rank() == 0
    if empty and one_process:  # a warning, not a log line: these classes lose all their own evidence
        names = getattr(getattr(loader, "dataset", None), "classes", None)
        named = [f"{c} ({names[c]})" if names is not None and len(names) == num_classes else str(c) for c in empty]
        warnings.warn(f"pruning (k={k}, threshold={threshold}) {'left' if apply else 'would leave'} {len(empty)} of "
                      f"{num_classes} classes without prototypes of their own: {listed(named, 8)} (none of their "
                      f"prototypes has {threshold} images of its class among its {k} nearest)"
                      + (f"; the model {'predicts' if apply else 'would predict'} them only through other classes' "
                         f"prototypes" if kept.numel() else ""), stacklevel=2)
    return result


@torch.no_grad()
def _similarities(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    from protokern.data import model_input

    return model.prototype_layer(model.conv_features(model_input(model, images.float())))


def retrain_last_layer(model: nn.Module, loader, *, iters: int = 100, lr: float = 1e-4, device=None,
                       progress: bool = True, loss_fn: nn.Module | None = None, augment: nn.Module | None = None,
                       seed: int = 0, train_mode: bool = False,
                       on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train only ``model.last_layer`` for ``iters`` epochs over ``loader`` (Adam, ``lr``), as after pruning.

    The loss is the ProtoPNet loss (``loss_fn``, default :class:`protokern.losses.ProtoPNetLoss`); with the
    trunk, add-on and prototypes frozen only its cross-entropy and L1 terms reach the last layer.

    Two paths:

    - cached (the fast one; without ``augment`` and ``train_mode``): the similarities are computed once in
      eval mode, and the epochs reshuffle them in batches of the loader's batch size (seeded by ``seed``).
    - live: every epoch runs the model over ``loader``, each batch augmented by ``augment`` (e.g.
      ``protokern.data.GpuAugment``, seeded by ``seed``) when given. With ``train_mode=True`` the model runs in
      train mode, so BatchNorm statistics keep following the (augmented) training batches, as the original's
      retraining after pruning; otherwise in eval mode (statistics frozen, as the trainer's last-layer epochs).

    ``on_epoch(epoch, stats)`` is called after every epoch (0-based) with that epoch's ``{"loss", "accuracy"}``,
    e.g. to test the model as the original does; it may change the model's mode (it is reset every epoch).

    Returns ``{"iters", "loss", "accuracy"}``: the last epoch's mean loss and training accuracy. The model's
    mode and the last layer's ``requires_grad`` are restored.
    """
    model = unwrap(model, ddp=False)
    from protokern.losses import ProtoPNetLoss

    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    device = model_device(model, device)
    loss_fn = loss_fn if loss_fn is not None else ProtoPNetLoss()
    weight = model.last_layer.weight
    optimizer = torch.optim.Adam(model.last_layer.parameters(), lr=lr)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    aug_generator = torch.Generator(device=device).manual_seed(seed) if augment is not None else None

    def live_batches():
        for images, labels in image_batches(loader, model.num_classes):
            images = images.to(device).float()
            if augment is not None:
                images = augment(images, generator=aug_generator)
            yield (*_similarities(model, images), labels.to(device))

    cache = None
    was_training, requires_grad = model.training, weight.requires_grad
    model.eval()
    weight.requires_grad_(True)
    stats = {"iters": iters, "loss": math.nan, "accuracy": math.nan}
    try:
        if augment is None and not train_mode:
            batches = _progress(image_batches(loader, model.num_classes), "last layer: features", progress)
            parts = [(*_similarities(model, images.to(device)), labels.to(device)) for images, labels in batches]
            if not parts:
                raise ValueError("the loader yielded no images")
            cache = [torch.cat(p) for p in zip(*parts)]
            batch_size = getattr(loader, "batch_size", None) or parts[0][0].shape[0]

        for epoch in _progress(range(iters), "last layer", progress):
            model.train(train_mode)
            if cache is not None:
                perm = torch.randperm(cache[0].shape[0], generator=generator).to(device)
                batches = ((t[idx] for t in cache) for idx in perm.split(batch_size))
            else:
                batches = live_batches()
            total, correct, count = 0.0, 0, 0
            for similarity, min_distances, labels in batches:
                logits = model.class_logits(similarity)
                loss, _ = loss_fn(logits, min_distances, labels, model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = labels.shape[0]
                total += loss.item() * n
                correct += int((logits.argmax(1) == labels).sum())
                count += n
            if count == 0:
                raise ValueError("the loader yielded no images")
            stats.update(loss=total / max(count, 1), accuracy=correct / max(count, 1))
            if on_epoch is not None:
                on_epoch(epoch, {"loss": stats["loss"], "accuracy": stats["accuracy"]})
    finally:
        model.train(was_training)
        weight.requires_grad_(requires_grad)
    log.info("last layer retrained for %d epochs (lr %g): loss %.4f, train accuracy %.4f",
             iters, lr, stats["loss"], stats["accuracy"])
    return stats
