"""Push (prototype projection): replace each prototype by its nearest training patch of its own class.

As the original ProtoPNet's ``push.py``: over the (unaugmented, unnormalised) push set in eval mode, each
prototype keeps the globally nearest patch among images of its own class, and is then overwritten by that
patch's feature vector, so that its min distance on its source image is 0. Here the search is one fused
``nearest_patches`` call per batch plus a few tensor ops (no Python loop over prototypes or images), the
self-activation maps are tracked alongside the best patches (no second pass over the data), DDP ranks
merge their bests with ``all_gather``, and the prototype PNGs are written by background threads.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from protokern.checkpoint import PUSH_DIR
from protokern.imaging import jet, normalised, save_png, to_uint8, upsample
from protokern.utils import (distributed, eval_mode, image_batches, image_order, listed, model_device, positive_int,
                             progress as progress_bar, unwrap)

__all__ = ["PushRecords", "push_prototypes", "activation_boxes"]

_NO_INDEX = torch.iinfo(torch.int64).max
RECORDS_FILE = "push_records.pt"


@dataclass
class PushRecords:
    """Where each prototype came from after a push (one row per prototype, P rows).

    Attributes:
        image_index: (P,) int64 index of the source image in the push set (the dataset index when the
            loader is a ``DataLoader`` over a dataset or a ``Subset`` of it, else the position in the
            loader); -1 for prototypes that were not pushed (no image of their class).
        prototype_class: (P,) int64 class of each prototype.
        patch: (P, 2) int64 ``(h, w)`` of the source window's top-left cell on the feature map (for 1 x 1
            prototypes, the source patch); -1 if not pushed.
        min_distance: (P,) float32 distance of the prototype *before* the push to its source window (inf if
            not pushed); after the push the distance is 0.
        rf_box: (P, 4) int64 receptive-field box ``(y0, y1, x0, x1)`` (half-open pixel rows / columns) of the
            source window; -1 if not pushed or if the model has no receptive field.
        activation_box: (P, 4) int64 ``(y0, y1, x0, x1)`` box of the pixels at or above the 95th percentile of
            the bicubically upsampled self-activation map on the source image; -1 if not pushed.
        activation_map: (P, Hout, Wout) float32 low-resolution self-activation maps: the layer's similarity
            (``ProtoLayer.to_similarity``) of the pushed prototype to every window of its source image.
        image_size: ``(height, width)`` of the push images; feature_size: ``(H, W)`` of the feature map.
        window: ``(kh, kw)`` of the prototypes (``Hout = H - kh + 1``, ``Wout = W - kw + 1``).
        image_dir: folder the prototype PNGs are (being) written to, or None.
        pushed_as: (P,) int64 each prototype's index at the push, which names its PNGs (``{pushed_as[j]}_source.png``
            ...): j itself, until pruning (:func:`protokern.prune.select_records`) renumbers the prototypes.
    """

    image_index: Tensor
    prototype_class: Tensor
    patch: Tensor
    min_distance: Tensor
    rf_box: Tensor
    activation_box: Tensor
    activation_map: Tensor = field(repr=False)
    image_size: tuple[int, int]
    feature_size: tuple[int, int]
    window: tuple[int, int] = (1, 1)
    image_dir: str | None = None
    pushed_as: Tensor | None = None
    _pending: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        if self.pushed_as is None:
            self.pushed_as = torch.arange(len(self.image_index))

    def png(self, j: int, kind: str = "source") -> str | None:
        """The path of prototype j's push PNG ``kind`` (source, overlay, rf, act), or None without ``image_dir``."""
        return None if self.image_dir is None else os.path.join(self.image_dir, _png_name(self.pushed_as[j], kind))

    @property
    def pushed(self) -> Tensor:
        """(P,) bool: prototypes that were projected onto a patch."""
        return self.image_index >= 0

    def original_boxes(self, kind: str = "rf") -> np.ndarray:
        """The original's box arrays, (P, 6) int ``[image_index, y0, y1, x0, x1, class]``.

        ``kind`` is "rf" (the original's ``proto_rf_boxes``) or "activation" (``proto_bound_boxes``).
        """
        boxes = {"rf": self.rf_box, "activation": self.activation_box}.get(kind)
        if boxes is None:
            raise ValueError(f"kind must be 'rf' or 'activation', got {kind!r}")
        return torch.cat([self.image_index[:, None], boxes, self.prototype_class[:, None]], 1).numpy()

    def to_dict(self) -> dict:
        """Plain dict of CPU tensors / ints / str (what checkpoints store); inverse of :meth:`from_dict`."""
        out = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        out.update(image_size=list(self.image_size), feature_size=list(self.feature_size), window=list(self.window),
                   image_dir=self.image_dir, pushed_as=self.pushed_as)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PushRecords:
        """Rebuild records from :meth:`to_dict` output."""
        missing = [k for k in _TENSOR_FIELDS + ("image_size", "feature_size") if k not in data]
        if missing:
            raise ValueError(f"not push records: missing {missing}")
        return cls(**{k: torch.as_tensor(data[k]) for k in _TENSOR_FIELDS},
                   image_size=tuple(data["image_size"]), feature_size=tuple(data["feature_size"]),
                   window=tuple(data.get("window", (1, 1))), image_dir=data.get("image_dir"),
                   pushed_as=None if data.get("pushed_as") is None else torch.as_tensor(data["pushed_as"]))

    def save(self, path: str) -> None:
        """Write the :meth:`to_dict` form to ``path`` as checkpoints are written
        (:func:`protokern.checkpoint.atomic_save`: a write stopped halfway leaves the previous file intact)."""
        from protokern.checkpoint import atomic_save, check_safe_types

        data = self.to_dict()
        check_safe_types(data, "push records")
        atomic_save(data, path)

    @classmethod
    def load(cls, path: str) -> PushRecords:
        """Read records written by :meth:`save` (``torch.load(weights_only=True)``: a file holding anything but
        tensors and plain values is refused with ``protokern.checkpoint.CheckpointError``)."""
        from protokern.checkpoint import CheckpointError, safe_load

        data = safe_load(path, what="push records file")
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is not a push records file (it holds a {type(data).__name__})")
        records = cls.from_dict(data)
        records.find_images(os.path.dirname(os.path.abspath(path)))  # they sit beside the file
        return records

    def find_images(self, folder: str) -> None:
        """Point ``image_dir`` at ``folder`` if it holds this push's PNGs (a moved or copied run keeps the path
        of the original), or if the stored folder is gone; records without images are left alone."""
        if self.image_dir is None:
            return
        pushed = (self.image_index >= 0).nonzero().flatten()
        here = pushed.numel() and os.path.isfile(os.path.join(folder, _png_name(self.pushed_as[pushed[0]], "source")))
        if here or not os.path.isdir(self.image_dir):
            self.image_dir = folder

    def find_run_images(self, run_dir: str) -> None:
        """:meth:`find_images` in run ``run_dir``'s own push folder: ``run_dir/push/<the stored folder's name>``
        (records saved in a run that has since been moved or copied name the original's folder)."""
        if self.image_dir is not None:
            self.find_images(run_push_folder(run_dir, self.image_dir))

    @property
    def images_pending(self) -> bool:
        """Whether this push's background PNG writing is still going on (:meth:`wait_images` would block)."""
        return any(not future.done() for future in self._pending)

    def wait_images(self) -> None:
        """Block until the background PNG writing of this push has finished (re-raises its errors)."""
        while self._pending:
            self._pending.pop().result()

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the PNG writing still going on (its threads and locks): wait on the
        original (:meth:`wait_images`) for it."""
        return {**self.__dict__, "_pending": []}


def run_push_folder(run_dir: str, stored: str) -> str:
    """``run_dir/push/<name of stored>``: the folder of run ``run_dir`` that a stored push folder of that run
    (``RUN/push/epoch_NNN``, perhaps written before the run was moved or copied) stands for."""
    return os.path.join(os.path.abspath(run_dir), PUSH_DIR, os.path.basename(os.path.normpath(stored)))


_TENSOR_FIELDS = ("image_index", "prototype_class", "patch", "min_distance", "rf_box", "activation_box",
                  "activation_map")


# ---------------------------------------------------------------------------------------------- models
# ---------------------------------------------------------------------------------------------- k nearest
@dataclass
class Neighbours:
    """The ``k`` nearest images of every prototype, one window (patch, for 1 x 1 prototypes) per image,
    nearest first.

    Attributes:
        distance: (P, k) float32 distance of the prototype to the image's nearest window.
        image_index: (P, k) int64 dataset index of the image (position in the loader for loaders that are
            not a ``DataLoader`` over a dataset).
        label: (P, k) int64 class of the image.
        patch: (P, k, 2) int64 ``(h, w)`` of the nearest window's top-left cell on the feature map.
        image_size: ``(height, width)`` of the images; feature_size: ``(H, W)`` of the feature map.
        dataset: the loader's dataset (to fetch the images), or None.
        window: ``(kh, kw)`` of the prototypes.
    """

    distance: Tensor
    image_index: Tensor
    label: Tensor
    patch: Tensor
    image_size: tuple[int, int]
    feature_size: tuple[int, int]
    dataset: object = None
    window: tuple[int, int] = (1, 1)


@torch.no_grad()
def nearest_training_patches(model: nn.Module, loader, *, k: int, device=None, progress: bool = True,
                             desc: str = "nearest patches") -> Neighbours:
    """The ``k`` nearest images of every prototype of ``model`` over ``loader`` (one patch per image).

    Args:
        model: a ``ProtoPNet`` (images normalised with its input statistics); run in eval mode, its mode
            is restored.
        loader: iterable of ``(images, labels, ...)`` batches, images unnormalised in [0, 1] (B, C, S, S),
            in a fixed order (a ``DataLoader`` must not shuffle).
        k: neighbours per prototype (at most the number of images).
        device: the model's device (default; another one is a ValueError: the model is not moved).
        progress: show a tqdm bar.

    Returns:
        :class:`Neighbours`, nearest first; equal distances go to the lower image index (as the original's
        heap, which keeps the earliest image), so the result does not depend on the batch size. NaN distances
        count as infinitely far.
    """
    model = unwrap(model)
    from protokern.data import model_input

    k = positive_int("k", k)
    device = model_device(model, device)
    order, dataset = image_order(loader)
    layer = model.prototype_layer
    prototypes = search_dtype(layer.prototypes.detach().to(device))
    num = prototypes.shape[0]
    best_d = torch.empty(num, 0, device=device)
    best_i = torch.empty(num, 0, dtype=torch.int64, device=device)
    best_y = torch.empty(num, 0, dtype=torch.int64, device=device)
    best_p = torch.empty(num, 0, dtype=torch.int64, device=device)
    image_size = feature_size = None
    position = 0
    with eval_mode(model):
        batches = image_batches(loader, getattr(model, "num_classes", None))
        for images, labels in progress_bar(batches, desc, progress):
            images = images.to(device).float()
            batch = images.shape[0]
            z = search_dtype(model.conv_features(model_input(model, images)))
            if feature_size is None:
                image_size, feature_size = tuple(images.shape[-2:]), tuple(z.shape[-2:])
            elif tuple(z.shape[-2:]) != feature_size:
                raise ValueError(f"all images must have one size: got {tuple(images.shape[-2:])} after {image_size}")
            distance, patch = layer.nearest(z, prototypes)  # (B, P)
            distance = torch.nan_to_num(distance, nan=math.inf)
            if order is not None:
                index = order[position:position + batch].to(device)
            else:
                index = torch.arange(position, position + batch, device=device)
            position += batch
            labels = labels.to(device)

            cand_d = torch.cat([best_d, distance.t()], 1)  # (P, k + B)
            cand_i = torch.cat([best_i, index.expand(num, batch)], 1)
            # the k smallest (distance, image index): equal distances go to the lowest index, whatever the
            # batch size (a plain topk breaks ties by position within the batch)
            by_index = cand_i.argsort(dim=1, stable=True)
            pick = by_index.gather(1, cand_d.gather(1, by_index).argsort(dim=1, stable=True)[:, :k])
            best_d, best_i = cand_d.gather(1, pick), cand_i.gather(1, pick)
            best_y = torch.cat([best_y, labels.expand(num, batch)], 1).gather(1, pick)
            best_p = torch.cat([best_p, patch.t()], 1).gather(1, pick)
    if feature_size is None:
        raise ValueError("the loader yielded no images")
    if best_d.shape[1] < k:
        raise ValueError(f"k={k} nearest images asked for, but the loader holds only {best_d.shape[1]} images")
    wout = layer.output_size(feature_size)[1]
    patch = torch.stack([best_p // wout, best_p % wout], -1)
    return Neighbours(distance=best_d.cpu(), image_index=best_i.cpu(), label=best_y.cpu(), patch=patch.cpu(),
                      image_size=image_size, feature_size=feature_size, dataset=dataset, window=layer.prototype_size)


# ---------------------------------------------------------------------------------------------- boxes
@torch.no_grad()
def activation_boxes(similarity_maps: Tensor, image_size: tuple[int, int], percentile: float = 95.0,
                     chunk: int = 128, window: tuple[int, int] = (1, 1)) -> Tensor:
    """Boxes ``(y0, y1, x0, x1)`` (half-open) of the pixels >= the ``percentile`` of each upsampled map.

    ``similarity_maps`` (P, H, W) are upsampled bicubically (as the original's cv2 INTER_CUBIC) to
    ``image_size`` (maps over the positions of ``window``-sized windows as :func:`upsample` says); the
    threshold is NumPy's default (linear) percentile of each map. A constant map (a 1 x 1 feature map, a
    prototype equally near everywhere) gives the whole image: every pixel is at its percentile, whatever
    rounding noise the upsampling adds. Returns (P, 4) int64.
    """
    out = []
    q = percentile / 100.0
    for maps in similarity_maps.float().split(chunk):
        up = upsample(maps, image_size, window)
        threshold = torch.quantile(up.flatten(1), q, dim=1)
        mask = up >= threshold[:, None, None]
        flat = maps.flatten(1).amax(1) == maps.flatten(1).amin(1)
        mask |= flat[:, None, None]
        out.append(torch.cat([_span(mask.any(2)), _span(mask.any(1))], 1))
    return torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.int64)


def _span(rows: Tensor) -> Tensor:
    """(P, 2) ``[first True, last True + 1]`` of each row of a bool (P, N) tensor with a True per row."""
    n = rows.shape[1]
    first = rows.int().argmax(1)
    last = n - rows.flip(1).int().argmax(1)
    return torch.stack([first, last], 1).long()


# ---------------------------------------------------------------------------------------------- push
def search_dtype(t: Tensor) -> Tensor:
    """Features (or prototypes) as push, pruning and the explanations search them: float16 / bfloat16 as
    float32, float32 and float64 as they are (a float64 model pushes onto its own float64 features)."""
    return t if t.dtype == torch.float64 else t.float()


@torch.no_grad()
def push_prototypes(model: nn.Module, loader, *, device: torch.device | str | None = None,
                    save_dir: str | None = None, save_images: bool = True, progress: bool = True,
                    autocast_dtype: torch.dtype | None = None, image_workers: int = 4) -> PushRecords:
    """Project every prototype of ``model`` onto its nearest window of an image of its own class.

    A window is a patch (one cell of the feature map) for 1 x 1 prototypes, kh x kw cells for (kh, kw)
    prototypes; the prototype becomes that window's features (the raw features also for "cosine"), and the
    distances are those of the layer's similarity.

    Args:
        model: a ``ProtoPNet`` (DDP- or DataParallel-wrapped too), or any module with its ``prototype_layer``
            (a ``ProtoLayer``), ``prototype_classes`` and ``conv_features(x)`` (``conv_features(x,
            autocast_dtype=...)`` with ``autocast_dtype``, as ``ProtoPNet``'s); it is given the images normalised here
            with its ``input_mean`` and ``input_std`` (``protokern.data.model_input``; ImageNet's for a module
            without them).
        loader: iterable of ``(images, labels)``: unnormalised images in [0, 1], (B, C, S, S), in a fixed
            order. Image indices are dataset indices for a
            ``DataLoader`` with a sequential or non-shuffling distributed sampler (through ``Subset``s), else
            positions in the loader (``position * world_size + rank`` under torch.distributed).
        device: the model's device (default; another one is a ValueError: the model is not moved).
        save_dir: if given, rank 0 writes ``push_records.pt`` there and, with ``save_images``, the prototype
            PNGs (``{j}_source.png``, ``{j}_overlay.png``, ``{j}_rf.png``, ``{j}_act.png`` per prototype j)
            in background threads (see :meth:`PushRecords.wait_images`). PNGs need the loader's dataset.
        progress: show a tqdm bar (rank 0 only).
        autocast_dtype: run the trunk (not the add-on) under ``torch.autocast`` with this dtype, as the
            trainer does.
        image_workers: threads writing PNGs.

    Under torch.distributed each rank passes its shard; the bests are merged across ranks (ties go to
    the lowest image index), so every rank ends with the same prototypes. Prototypes of classes without
    images keep their values (with a warning). The model's train/eval mode is restored afterwards.

    Returns:
        :class:`PushRecords`.
    """
    from protokern.data import model_input

    net = unwrap(model)
    layer = net.prototype_layer
    if torch.nn.utils.parametrize.is_parametrized(layer, "prototypes"):  # its .data is a computed copy
        raise ValueError("push writes training patches into the prototypes, which a parametrization "
                         "(torch.nn.utils.parametrize) would recompute from its own parameter: remove it "
                         "(parametrize.remove_parametrizations(layer, 'prototypes')) before pushing")
    prototypes = layer.prototypes
    device = model_device(net, device)
    classes = net.prototype_classes.to(device)
    num_protos = prototypes.shape[0]
    sharded = distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)

    order, dataset = image_order(loader)
    best_d = torch.full((num_protos,), math.inf, device=device)
    best_idx = torch.full((num_protos,), -1, dtype=torch.int64, device=device)
    best_patch = torch.full((num_protos,), -1, dtype=torch.int64, device=device)
    kept = search_dtype(prototypes.detach().to(device))  # the values of prototypes no image is pushed onto
    best_feat = torch.zeros_like(kept)  # (P, D, kh, kw)
    best_map = None  # (P, Hout*Wout), created with the first batch
    image_size = feature_size = None
    nan_count = torch.zeros((), dtype=torch.int64, device=device)
    arange_p = torch.arange(num_protos, device=device)

    position = 0
    with eval_mode(net):
        bar = progress_bar(image_batches(loader, getattr(net, "num_classes", None)), "push",
                           progress and rank == 0)
        for images, labels in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            batch = images.shape[0]
            if order is not None:
                gidx = order[position:position + batch].to(device, non_blocking=True)
            else:
                gidx = (torch.arange(position, position + batch, device=device) * world + rank)
            position += batch
            x = model_input(net, images.float())
            z = search_dtype(net.conv_features(x) if autocast_dtype is None else
                             net.conv_features(x, autocast_dtype=autocast_dtype))  # as in training
            if feature_size is None:
                image_size, feature_size = tuple(images.shape[-2:]), tuple(z.shape[-2:])
                best_map = torch.zeros(num_protos, math.prod(layer.output_size(feature_size)), device=device)
            elif tuple(z.shape[-2:]) != feature_size:
                raise ValueError(f"push images must all have one size: got {tuple(images.shape[-2:])} "
                                 f"after {image_size}")

            distances, patch = layer.nearest(z)  # (B, P)
            nan_count += distances.isnan().sum()
            own = labels[:, None] == classes[None, :]
            distances = torch.where(own & ~distances.isnan(), distances, math.inf)
            batch_d = distances.amin(0)  # (P,)
            # lowest image index among the batch's ties
            key = torch.where(distances == batch_d, gidx[:, None], _NO_INDEX)
            row = key.argmin(0)  # (P,) local image of each prototype's batch best
            batch_idx = gidx[row]
            better = batch_d.isfinite() & ((batch_d < best_d) | ((batch_d == best_d) & (batch_idx < best_idx)))

            batch_patch = patch[row, arange_p]
            source = z[row]  # (P, D, H, W): each prototype's best image of the batch
            feat = layer.windows(source, batch_patch)  # (P, D, kh, kw)
            self_map = layer.distance_maps(source, feat, paired=True).flatten(1)  # (P, Hout*Wout), 0 at the winner
            del source

            best_d = torch.where(better, batch_d, best_d)
            best_idx = torch.where(better, batch_idx, best_idx)
            best_patch = torch.where(better, batch_patch, best_patch)
            best_feat = torch.where(better[:, None, None, None], feat, best_feat)
            best_map = torch.where(better[:, None], self_map, best_map)

    if feature_size is None:
        raise ValueError("push: the loader yielded no images")
    if sharded:
        best_d, best_idx, best_patch, best_feat, best_map = _merge_ranks(
            best_d, best_idx, best_patch, best_feat, best_map)
    if int(nan_count) > 0:
        warnings.warn(f"push: {int(nan_count)} NaN distances ignored (NaN features?)", stacklevel=2)

    pushed = best_idx >= 0
    prototypes.data.copy_(torch.where(pushed[:, None, None, None], best_feat, kept).to(prototypes.dtype))
    missing = (~pushed).nonzero().flatten().tolist()
    if missing:
        absent = sorted({int(c) for c in classes[missing].tolist()})
        warnings.warn(f"push: no images of classes {listed(absent, 10)}: "
                      f"{len(missing)} prototypes keep their values", stacklevel=2)

    records = _make_records(net, best_d, best_idx, best_patch, best_map, classes, image_size, feature_size)
    if save_dir is not None and rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        write = save_images and dataset is not None and hasattr(dataset, "__getitem__")
        if save_images and not write:
            warnings.warn("push: prototype images need a DataLoader over a dataset; not written", stacklevel=2)
        if write:
            records.image_dir = os.path.abspath(save_dir)  # before the save: the file names where its images are
        records.save(os.path.join(save_dir, RECORDS_FILE))
        if write:
            records._pending.extend(_write_images(records, dataset, save_dir, image_workers))
    return records


def _merge_ranks(best_d, best_idx, best_patch, best_feat, best_map):
    """Per prototype, the rank with the smallest (distance, image index); all ranks get the same answer."""
    def gather(t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    ds, ids = gather(best_d), gather(best_idx)  # (R, P)
    d_min = ds.amin(0)
    key = torch.where((ds == d_min) & ds.isfinite(), ids, _NO_INDEX)
    winner = key.argmin(0)  # (P,) rank
    cols = torch.arange(ds.shape[1], device=ds.device)
    pick = lambda t: t[winner, cols]  # noqa: E731
    return (pick(ds), pick(ids), pick(gather(best_patch)), pick(gather(best_feat)), pick(gather(best_map)))


def _make_records(net, best_d, best_idx, best_patch, best_map, classes, image_size, feature_size) -> PushRecords:
    layer = net.prototype_layer
    hout, wout = layer.output_size(feature_size)
    pushed = best_idx >= 0
    sim_maps = layer.to_similarity(best_map.view(-1, hout, wout))
    act_box = activation_boxes(sim_maps, image_size, window=layer.prototype_size)
    act_box[~pushed] = -1
    patch = torch.stack([best_patch // wout, best_patch % wout], 1)
    patch[~pushed] = -1
    patch, pushed_cpu = patch.cpu(), pushed.cpu()
    rf_box = torch.full((len(patch), 4), -1, dtype=torch.int64)
    from protokern.models.receptive_field import checked_receptive_field, patch_box

    rf = checked_receptive_field(net, image_size, feature_size)
    if rf is not None:
        for j in pushed_cpu.nonzero().flatten().tolist():  # once per push, P small calls
            rf_box[j] = torch.tensor(patch_box(rf, image_size, int(patch[j, 0]), int(patch[j, 1]),
                                               window=layer.prototype_size))
    return PushRecords(
        image_index=best_idx.cpu(), prototype_class=classes.cpu(), patch=patch, min_distance=best_d.float().cpu(),
        rf_box=rf_box, activation_box=act_box.cpu(), activation_map=sim_maps.float().cpu(),
        image_size=tuple(int(s) for s in image_size), feature_size=tuple(int(s) for s in feature_size),
        window=layer.prototype_size,
    )


# ---------------------------------------------------------------------------------------------- PNGs
def _png_name(j, kind: str) -> str:
    """The file name of the push PNG ``kind`` (source, overlay, rf, act) of the prototype numbered j at the push."""
    return f"{int(j)}_{kind}.png"


def _write_one(j: int, image: Tensor, sim_map: Tensor, rf_box, act_box, save_dir: str, window) -> None:
    """The original's PNGs of prototype j: its source image, the image under its activation map (the original's
    blend, 0.5 image + 0.3 jet) and the crops of its receptive field and activation box."""
    img = to_uint8(image)  # (S, S, 3)
    heat = jet(normalised(upsample(sim_map, img.shape[:2], window).numpy()))
    save_png(img, os.path.join(save_dir, _png_name(j, "source")))
    blend = (0.5 * img.astype(np.float32) + 0.3 * heat.astype(np.float32)).round().astype(np.uint8)
    save_png(blend, os.path.join(save_dir, _png_name(j, "overlay")))
    for name, (y0, y1, x0, x1) in (("rf", rf_box), ("act", act_box)):
        if y1 > y0 and x1 > x0:
            save_png(img[y0:y1, x0:x1], os.path.join(save_dir, _png_name(j, name)))


def _write_images(records: PushRecords, dataset, save_dir: str, workers: int) -> list[Future]:
    """Write the PNGs of every pushed prototype in a thread pool; returns the futures (not waited for)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="push-png")
    futures = []
    for j in records.pushed.nonzero().flatten().tolist():
        def job(j=j, index=int(records.image_index[j])):
            _write_one(j, dataset[index][0], records.activation_map[j], records.rf_box[j].tolist(),
                       records.activation_box[j].tolist(), save_dir, records.window)

        futures.append(pool.submit(job))
    pool.shutdown(wait=False)  # the threads finish the queue; Python joins them at exit
    return futures
