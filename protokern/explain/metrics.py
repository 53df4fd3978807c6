"""Quantitative interpretability: part localisation, and the consistency / stability scores on CUB.

- :func:`part_localisation`: for each test image and each prototype of its class (or its most activated
  prototypes), does the prototype's most activated location fall inside the image's ground-truth part box?
- :func:`consistency_and_stability` (:func:`consistency_score`, :func:`stability_score`): the two scores of
  Huang et al. 2023, "Evaluation and Improvement of Interpretability for Self-Explainable Part-Prototype
  Networks" (ICCV). On each test image, each prototype of the image's class is mapped to a square region of
  side ``2 * half_size`` around the maximum of its bicubically upsampled activation map (``half_size`` 36 for
  224-pixel images); the prototype "covers" every annotated, visible object part whose keypoint lies in that
  region. A prototype is *consistent* when some part is covered on at least ``mu`` (0.8) of the images of its
  class on which that part is visible; the consistency score is the fraction of consistent prototypes. The
  stability score is the mean over prototypes of the fraction of images of their class on which the set of
  covered parts stays the same when Gaussian noise (std 0.2, clipped to +-0.25) is added to the normalised
  image. Scores are fractions in [0, 1] (the paper reports percentages).

Every prototype layer works: activation maps are the layer's similarity (log, linear or cosine) over the
(Hout, Wout) positions of its kh x kw windows, upsampled to the image as the original does, and a window's
location is the centre of the receptive field of the whole window
(:func:`protokern.models.receptive_field.window_center`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from protokern.explain import render
from protokern.push import search_dtype
from protokern.utils import (base_dataset, eval_mode, image_batches, image_order, model_device, progress as _progress,
                             unwrap)

__all__ = [
    "PartCorrespondence",
    "consistency_and_stability",
    "consistency_score",
    "part_correspondence",
    "part_localisation",
    "stability_score",
]

LOCATIONS = ("rf_centre", "argmax")
SELECTIONS = ("own_class", "top")


def _indexed_batches(data, batch_size: int, num_workers: int, num_classes: int | None = None):
    """``(base dataset, iterator of (images, labels, dataset indices), length)`` for a dataset or a fixed-order
    DataLoader; indices are those of the dataset under any ``Subset`` (as push records hold), either way."""
    if not isinstance(data, DataLoader):
        if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
            raise TypeError(f"expected a dataset or a DataLoader, got {type(data).__name__}")
        data = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    order, dataset = image_order(data)
    if order is None:
        raise ValueError("metrics need a DataLoader over a dataset")

    def batches():
        position = 0
        for images, labels in image_batches(data, num_classes):
            n = images.shape[0]
            yield images, labels, order[position:position + n]
            position += n

    return dataset, batches(), len(data)


def _argmax_pixels(maps: Tensor, size: tuple[int, int], window: tuple[int, int],
                   chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Pixel centres ``(y, x)`` (N,) of the maximum of each (N, H, W) map of ``window`` positions upsampled
    bicubically to ``size`` (:func:`protokern.imaging.upsample`).

    Ties go to the first maximum in row-major order. Upsampled in chunks of ``chunk`` maps to bound memory.
    """
    flat = torch.cat([render.upsample(part, size, window).flatten(1).argmax(1) for part in maps.split(chunk)]) \
        if maps.shape[0] else torch.zeros(0, dtype=torch.int64, device=maps.device)
    return (flat // size[1]).float() + 0.5, (flat % size[1]).float() + 0.5


def _pair_maps(model: nn.Module, z: Tensor, b: Tensor, j: Tensor, chunk: int = 256) -> Tensor:
    """(N, Hout, Wout) maps in the layer's similarity of prototype ``j[n]`` on image ``b[n]``, over its window
    positions: only the counted pairs, ``chunk`` at a time (every prototype's maps were (B, P, Hout, Wout): 2 GB
    a batch of 64 at 2000 prototypes on a 28 x 28 map), in the difference form of push's self-activation maps."""
    layer = model.prototype_layer
    p = layer.prototypes.detach()
    if not b.numel():
        return z.new_zeros(0, *layer.output_size(z.shape[-2:]))
    return torch.cat([layer.to_similarity(layer.distance_maps(z[bc], p[jc], paired=True))
                      for bc, jc in zip(b.split(chunk), j.split(chunk))])


def part_boxes(dataset):
    """The ``boxes`` of ``dataset`` (of the dataset under any ``Subset``: they are indexed by its indices) if they
    are part boxes, else None: none, or object boxes (``box_kind == "object"``: CUB's and Cars' bird or car boxes,
    against which every location of a cropped image is a hit)."""
    dataset = base_dataset(dataset)
    boxes = getattr(dataset, "boxes", None)
    return boxes if boxes is not None and getattr(dataset, "box_kind", "part") == "part" else None


@torch.no_grad()
def part_localisation(model: nn.Module, data, boxes=None, *, prototypes: str = "own_class", top_k: int = 1,
                      location: str = "rf_centre", device=None, batch_size: int = 64, num_workers: int = 0,
                      progress: bool = True) -> dict:
    """How often a prototype's most activated location falls inside the image's ground-truth part box.

    Args:
        model: a ``ProtoPNet`` (images are normalised here with its input statistics).
        data: a dataset of ``(image, label)`` in [0, 1], or a non-shuffling ``DataLoader`` over one.
        boxes: (N, 4) part boxes ``(x0, y0, x1, y1)`` in pixels of the dataset's images, indexed by dataset
            index (of the dataset under any ``Subset``, as push records); default: that dataset's ``boxes`` (e.g.
            ``SyntheticParts``).
        prototypes: which (image, prototype) pairs count: ``"own_class"`` (every prototype of the image's
            class) or ``"top"`` (the ``top_k`` most activated prototypes of each image).
        location: ``"rf_centre"`` (the centre of the receptive field of the nearest window, the whole kh x kw
            window for kh x kw prototypes) or ``"argmax"`` (the pixel maximum of the similarity map over the
            window positions, bicubically upsampled to the image).
        device, batch_size, num_workers, progress: how to run.

    Returns:
        dict: ``overall`` (fraction of counted pairs on the part, None if none), ``per_prototype`` (P values,
        None for prototypes never counted), ``pairs`` (counted pairs), ``images``, ``prototypes``, ``location``.
    """
    model = unwrap(model)
    if location not in LOCATIONS:
        raise ValueError(f"location must be one of {LOCATIONS}, got {location!r}")
    if prototypes not in SELECTIONS:
        raise ValueError(f"prototypes must be one of {SELECTIONS}, got {prototypes!r}")
    layer = model.prototype_layer
    rf = getattr(model, "receptive_field", None)
    if location == "rf_centre" and rf is None:
        raise ValueError("the model has no receptive field: use location='argmax'")
    dataset, batches, total = _indexed_batches(data, batch_size, num_workers, model.num_classes)
    boxes = part_boxes(dataset) if boxes is None else boxes
    if boxes is None:
        raise ValueError("no part boxes: pass boxes= or use a dataset whose `boxes` are part boxes (CUB's and "
                         "Cars' are object boxes: every location of a cropped image would be a hit)")
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if hasattr(dataset, "__len__") and boxes.shape[0] != len(dataset):  # e.g. one row per item of a Subset
        raise ValueError(f"boxes has {boxes.shape[0]} rows, the dataset {len(dataset)} images: one row per image, "
                         "indexed by dataset index (of the dataset under any Subset)")
    device = model_device(model, device)
    classes = model.prototype_classes.to(device)
    num_protos = classes.shape[0]
    if prototypes == "top" and not 1 <= top_k <= num_protos:
        raise ValueError(f"top_k must be in [1, {num_protos}], got {top_k}")
    hits = torch.zeros(num_protos, dtype=torch.float64)
    counts = torch.zeros(num_protos, dtype=torch.float64)
    images_seen = 0
    from protokern.data import model_input
    from protokern.models.receptive_field import checked_receptive_field, window_center

    with eval_mode(model):
        for images, labels, index in _progress(batches, "part localisation", progress, total):
            if int(index.max()) >= boxes.shape[0]:
                raise ValueError(f"boxes has {boxes.shape[0]} rows but the data has an image {int(index.max())}")
            images, labels = images.to(device).float(), labels.to(device)
            z = search_dtype(model.conv_features(model_input(model, images)))
            distance, patch = layer.nearest(z)  # (B, P), patch = h * Wout + w
            score = -distance  # every similarity kind decreases with the distance
            if prototypes == "own_class":
                selected = labels[:, None] == classes[None, :]
            else:
                selected = torch.zeros_like(score, dtype=torch.bool)
                selected.scatter_(1, score.topk(top_k, dim=1).indices, True)
            b, j = selected.nonzero(as_tuple=True)  # the counted (image, prototype) pairs
            if location == "rf_centre":
                if checked_receptive_field(model, images.shape[-2:], z.shape[-2:]) is None:
                    raise ValueError("the model's receptive field does not match its feature maps: use "
                                     "location='argmax'")
                wout = layer.output_size(z.shape[-2:])[1]
                cy, cx = window_center(rf, (patch[b, j] // wout).double(), (patch[b, j] % wout).double(),
                                       layer.prototype_size)
            else:
                cy, cx = (v.double() for v in _argmax_pixels(_pair_maps(model, z, b, j), tuple(images.shape[-2:]),
                                                             layer.prototype_size))
            box = boxes[index.to(boxes.device)[b.cpu()]].to(device)  # (n, 4)
            inside = (cx >= box[:, 0]) & (cx <= box[:, 2]) & (cy >= box[:, 1]) & (cy <= box[:, 3])
            hits.index_add_(0, j.cpu(), inside.double().cpu())
            counts.index_add_(0, j.cpu(), torch.ones(j.shape[0], dtype=torch.float64))
            images_seen += images.shape[0]
    pairs = counts.sum().item()
    return {
        "overall": hits.sum().item() / pairs if pairs else None,
        "per_prototype": [h / c if c else None for h, c in zip(hits.tolist(), counts.tolist())],
        "pairs": int(pairs),
        "images": images_seen,
        "prototypes": prototypes if prototypes == "own_class" else f"top{top_k}",
        "location": location,
    }


# ------------------------------------------------------------------------------------------ consistency, stability
@dataclass
class PartCorrespondence:
    """Which annotated parts each (test image, own-class prototype) pair covers.

    ``image`` and ``prototype`` (N,) index the pairs (images in dataset order, prototypes ascending);
    ``covered`` (N, K) bool: part k's keypoint lies in the prototype's region on that image; ``visible``
    (N, K) bool: part k is annotated visible on that image. ``num_prototypes``: P of the model.
    """

    image: Tensor
    prototype: Tensor
    covered: Tensor
    visible: Tensor
    num_prototypes: int


def _default_half_size(image_size: int) -> int:
    return max(1, round(36 * image_size / 224))


@torch.no_grad()
def part_correspondence(model: nn.Module, dataset, *, half_size: int | None = None, noise_std: float = 0.0,
                        noise_clip: float = 0.25, seed: int = 0, device=None, batch_size: int = 64,
                        num_workers: int = 0, progress: bool = True) -> PartCorrespondence:
    """The parts covered by each prototype of each test image's class (see the module docstring).

    Args:
        model: a ``ProtoPNet``.
        dataset: ``(image, label)`` items in [0, 1] with ``part_locations(i)`` -> (K, 3) ``(x, y, visible)`` in
            pixels of the returned image (e.g. ``protokern.data.CUB200``; bird-cropped, as in the paper).
        half_size: half side of the region around the activation maximum (default 36 * S / 224).
        noise_std, noise_clip: Gaussian noise added to the normalised image (for stability); 0 for none. In the
            model's normalised units, as the paper's on ImageNet-normalised images: stability scores of models
            with other input statistics (``input_std``) compare only with each other.
        seed: seed of the noise.
    """
    model = unwrap(model)
    if not hasattr(dataset, "part_locations"):
        raise TypeError("the dataset has no part_locations(i) (part annotations, e.g. CUB200)")
    _check_noise(noise_std, noise_clip)
    from protokern.data import model_input

    device = model_device(model, device)
    classes = model.prototype_classes.to(device)
    _, batches, total = _indexed_batches(dataset, batch_size, num_workers, model.num_classes)
    out = {"image": [], "prototype": [], "covered": [], "visible": []}
    with eval_mode(model):
        for images, labels, index in _progress(batches, "part correspondence", progress, total):
            images, labels = images.to(device).float(), labels.to(device)
            S = images.shape[-1]
            half = _default_half_size(S) if half_size is None else half_size
            x = model_input(model, images)
            if noise_std > 0:  # each image's own noise, from (seed, its index): the batch size changes nothing
                noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
                    seed * 1_000_003 + int(i))) for i in index]) * noise_std
                x = x + noise.clamp(-noise_clip, noise_clip).to(device)
            z = search_dtype(model.conv_features(x))
            b, j = (labels[:, None] == classes[None, :]).nonzero(as_tuple=True)  # own-class pairs
            parts = torch.stack([torch.as_tensor(dataset.part_locations(int(i)), dtype=torch.float32)
                                 for i in index]).to(device)  # (B, K, 3)
            if b.numel():
                cy, cx = _argmax_pixels(_pair_maps(model, z, b, j), tuple(images.shape[-2:]),
                                        model.prototype_layer.prototype_size)
                px, py, visible = parts[b, :, 0], parts[b, :, 1], parts[b, :, 2] > 0
                covered = visible & ((px - cx[:, None]).abs() <= half) & ((py - cy[:, None]).abs() <= half)
            else:
                covered = visible = torch.zeros(0, parts.shape[1], dtype=torch.bool, device=device)
            out["image"].append(index.to(device)[b].cpu())
            out["prototype"].append(j.cpu())
            out["covered"].append(covered.cpu())
            out["visible"].append(visible.cpu())
    if not out["image"]:
        raise ValueError("the dataset is empty")
    return PartCorrespondence(**{k: torch.cat(v) for k, v in out.items()}, num_prototypes=classes.shape[0])


def _check_mu(mu: float) -> None:
    if not 0 < mu <= 1:
        raise ValueError(f"mu must be in (0, 1], got {mu}")


def _check_noise(noise_std: float, noise_clip: float) -> None:
    if not (noise_std >= 0 and noise_clip >= 0):  # NaN too
        raise ValueError(f"noise_std and noise_clip must be >= 0, got {noise_std} and {noise_clip}")


def _consistency(corr: PartCorrespondence, mu: float) -> list[bool | None]:
    P, K = corr.num_prototypes, corr.covered.shape[1]
    covered = torch.zeros(P, K).index_add_(0, corr.prototype, corr.covered.float())
    visible = torch.zeros(P, K).index_add_(0, corr.prototype, corr.visible.float())
    fraction = covered / visible.clamp_min(1)
    consistent = (fraction >= mu).any(1)
    seen = torch.bincount(corr.prototype, minlength=P) > 0
    return [bool(c) if s else None for c, s in zip(consistent.tolist(), seen.tolist())]


def _stability(clean: PartCorrespondence, noisy: PartCorrespondence) -> list[float | None]:
    if not (torch.equal(clean.image, noisy.image) and torch.equal(clean.prototype, noisy.prototype)):
        raise ValueError("clean and noisy correspondences do not describe the same (image, prototype) pairs")
    P = clean.num_prototypes
    same = (clean.covered == noisy.covered).all(1).float()
    total = torch.zeros(P).index_add_(0, clean.prototype, same)
    count = torch.bincount(clean.prototype, minlength=P).float()
    return [t / c if c else None for t, c in zip(total.tolist(), count.tolist())]


def _mean(values) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def consistency_and_stability(model: nn.Module, dataset, *, mu: float = 0.8, half_size: int | None = None,
                              noise_std: float = 0.2, noise_clip: float = 0.25, seed: int = 0, device=None,
                              batch_size: int = 64, num_workers: int = 0, progress: bool = True) -> dict:
    """Consistency and stability scores (Huang et al. 2023) of ``model`` on an annotated test set.

    ``dataset`` is as for :func:`part_correspondence` (e.g. ``CUB200(root, "test")``). Prototypes whose class
    has no test image are left out of both scores (``consistent`` and ``stability_per_prototype`` are None
    for them). ``noise_std``, ``noise_clip`` and ``seed`` are the stability pass's noise, as in
    :func:`stability_score`.

    Returns:
        dict: ``consistency`` and ``stability`` (fractions in [0, 1]), ``consistent`` (per prototype bool or
        None), ``stability_per_prototype`` (per prototype fraction or None), ``prototypes_evaluated``, ``mu``,
        ``half_size``, ``noise_std``, ``noise_clip``.
    """
    model = unwrap(model)
    _check_mu(mu)
    _check_noise(noise_std, noise_clip)
    common = dict(half_size=half_size, device=device, batch_size=batch_size, num_workers=num_workers,
                  progress=progress)
    clean = part_correspondence(model, dataset, **common)
    noisy = part_correspondence(model, dataset, noise_std=noise_std, noise_clip=noise_clip, seed=seed, **common)
    consistent = _consistency(clean, mu)
    stable = _stability(clean, noisy)
    first = dataset[0][0]
    return {
        "consistency": _mean(consistent),
        "stability": _mean(stable),
        "consistent": consistent,
        "stability_per_prototype": stable,
        "prototypes_evaluated": sum(c is not None for c in consistent),
        "mu": mu,
        "half_size": _default_half_size(first.shape[-1]) if half_size is None else half_size,
        "noise_std": noise_std,
        "noise_clip": noise_clip,
    }


def consistency_score(model: nn.Module, dataset, *, mu: float = 0.8, half_size: int | None = None, **kwargs) -> float:
    """The consistency score alone (one pass over ``dataset``; :func:`consistency_and_stability` has both): the
    fraction of prototypes whose region covers one same part on at least ``mu`` of their class's test images.

    ``dataset`` needs ``part_locations(i)`` (a ``TypeError`` without; e.g. ``CUB200(root, "test")``); ``kwargs``
    go to :func:`part_correspondence` (``device``, ``batch_size``, ``num_workers``, ``progress``). NaN when no
    prototype's class has a test image.
    """
    _check_mu(mu)
    corr = part_correspondence(model, dataset, half_size=half_size, **kwargs)
    score = _mean(_consistency(corr, mu))
    return math.nan if score is None else score


def stability_score(model: nn.Module, dataset, *, noise_std: float = 0.2, noise_clip: float = 0.25, seed: int = 0,
                    half_size: int | None = None, **kwargs) -> float:
    """The stability score alone (two passes over ``dataset``, clean and noisy): the mean over prototypes of the
    fraction of their class's test images on which the set of covered parts stays the same under Gaussian noise
    (``noise_std``, clipped to +-``noise_clip``, seeded by ``seed``) on the normalised image.

    ``dataset`` and ``kwargs`` as for :func:`consistency_score`; NaN when no prototype's class has a test image.
    """
    _check_noise(noise_std, noise_clip)
    clean = part_correspondence(model, dataset, half_size=half_size, **kwargs)
    noisy = part_correspondence(model, dataset, half_size=half_size, noise_std=noise_std, noise_clip=noise_clip,
                                seed=seed, **kwargs)
    score = _mean(_stability(clean, noisy))
    return math.nan if score is None else score
