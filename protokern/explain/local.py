"""Local explanation ("this looks like that") of one image: which prototypes the decision rests on.

For a class (the predicted one unless given), the logit is a sum over all prototypes of
``similarity_j * last_layer.weight[c, j]``; :func:`explain_image` ranks those contributions and, for the top
``k``, shows where on the image the prototype is most activated next to the training patch it was pushed
onto. :meth:`Explanation.save` writes one PNG per prototype and an ``index.html`` page. Any prototype layer
works: kh x kw prototypes (maps over the window positions, boxes of whole windows) and every similarity kind.
"""

from __future__ import annotations

import html
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from protokern.backends import available_backends
from protokern.checkpoint import BEST, LAST, CheckpointError, load_checkpoint
from protokern.explain import render
from protokern.models import ProtoPNet
from protokern.models.receptive_field import checked_receptive_field, patch_box
from protokern.push import PushRecords, activation_boxes, search_dtype
from protokern.utils import (base_dataset, check_unit_range, class_name, eval_mode, first_line, item_image,
                             model_device, positive_int, strict_json, unwrap)

__all__ = ["Explanation", "PrototypeEvidence", "explain_image", "load_image_tensor", "model_from_checkpoint"]
_PANEL = re.compile(r"rank\d{2,}_prototype\d+\.png")  # the per-prototype files of Explanation.save

Box = tuple[int, int, int, int]


@dataclass
class PrototypeEvidence:
    """One prototype's part in a decision.

    Attributes:
        rank: 1 for the first shown (:func:`explain_image`'s order). prototype: index j. prototype_class: its class.
        similarity: the prototype layer's similarity (log, linear or cosine, see
            :attr:`Explanation.similarity_kind`) of the prototype to its nearest window of the image;
            distance: that window's distance (squared L2; 2 - 2 cos for cosine); weight:
            ``last_layer.weight[c, j]``; contribution: similarity x weight.
        patch: ``(h, w)`` of the nearest window's top-left cell, on the (Hout, Wout) grid of window positions
            (the feature map itself for 1 x 1 prototypes).
        box: ``(y0, y1, x0, x1)`` box of the pixels at or above the 95th percentile of the upsampled
            activation map (the original's "most activated" box); rf_box: receptive field of the whole
            nearest kh x kw window (None when the model has no receptive field).
        heatmap: (S, S) similarity map of the (Hout, Wout) window positions, each at its window's centre,
            bicubically upsampled to the image (:func:`protokern.imaging.upsample`).
        source_index: index of the prototype's source image in the push set (None if not pushed).
        pushed_as: the prototype's index at the push, which names its push PNGs (another one than ``prototype``
            after pruning renumbered the prototypes; None without push records).
        source_box / source_rf_box: high-activation / receptive-field box on the source image.
        source_image: (3, S, S) or (1, S, S) source image in [0, 1], when available.
        source_file: the source image's file (the push set's ``paths``), when it has one.
        file: the PNG written by :meth:`Explanation.save`, relative to its folder.
    """

    rank: int
    prototype: int
    prototype_class: int
    similarity: float
    distance: float
    weight: float
    contribution: float
    patch: tuple[int, int]
    box: Box
    rf_box: Box | None
    heatmap: Tensor = field(repr=False)
    source_index: int | None = None
    source_box: Box | None = None
    source_rf_box: Box | None = None
    source_image: Tensor | None = field(default=None, repr=False)
    source_file: str | None = None
    pushed_as: int | None = None
    file: str | None = None


@dataclass
class Explanation:
    """Explanation of a model's decision on one image (see :func:`explain_image`).

    Attributes: ``image`` (3, S, S), or (1, S, S) for a grayscale model, in [0, 1]; ``logits`` (C,);
    ``predicted_class``; ``class_idx`` (the class explained); ``similarity`` and ``min_distances`` (P,);
    ``weights`` (C, P) last-layer weights; ``prototype_classes`` (P,); ``top`` (the top-k
    :class:`PrototypeEvidence`, in :func:`explain_image`'s order); ``class_names`` (optional);
    ``similarity_kind`` ("log", "linear" or "cosine") and ``prototype_size``
    (kh, kw) of the model's prototype layer.
    """

    image: Tensor = field(repr=False)
    logits: Tensor
    predicted_class: int
    class_idx: int
    similarity: Tensor = field(repr=False)
    min_distances: Tensor = field(repr=False)
    weights: Tensor = field(repr=False)
    prototype_classes: Tensor = field(repr=False)
    top: list[PrototypeEvidence]
    class_names: list[str] | None = None
    similarity_kind: str = "log"
    prototype_size: tuple[int, int] = (1, 1)

    def contributions(self, class_idx: int | None = None) -> Tensor:
        """(P,) ``similarity_j * weight[c, j]`` of every prototype j to class c (default: the explained one).

        They add up to ``logits[c]`` (the last layer has no bias).
        """
        c = self.class_idx if class_idx is None else int(class_idx)
        return self.similarity * self.weights[c]

    def class_name(self, c: int) -> str:
        """Name of class ``c`` (its index when no names are known)."""
        return class_name(self.class_names, c)

    def table(self, class_idx: int | None = None) -> list[dict]:
        """Every prototype's contribution to a class, largest first, as dicts (also in ``explanation.json``)."""
        c = self.class_idx if class_idx is None else int(class_idx)
        contributions = self.contributions(c)
        order = torch.argsort(contributions, descending=True, stable=True).tolist()
        return [{"prototype": j, "prototype_class": int(self.prototype_classes[j]),
                 "similarity": float(self.similarity[j]), "distance": float(self.min_distances[j]),
                 "weight": float(self.weights[c, j]), "contribution": float(contributions[j])} for j in order]

    def to_dict(self) -> dict:
        """The numbers of the explanation (no images), JSON-ready."""
        c = self.class_idx
        return {
            "predicted_class": self.predicted_class,
            "predicted_name": self.class_name(self.predicted_class),
            "class_idx": c,
            "class_name": self.class_name(c),
            "logits": [float(v) for v in self.logits],
            "logit": float(self.logits[c]),
            "sum_of_contributions": float(self.contributions(c).sum()),
            "similarity_kind": self.similarity_kind,
            "prototype_size": list(self.prototype_size),
            "image_size": list(self.image.shape[1:]),  # (height, width) explained, the boxes' pixels
            "box_format": render.BOX_FORMAT,
            "top": [{"rank": e.rank, "prototype": e.prototype, "prototype_class": e.prototype_class,
                     "similarity": e.similarity, "distance": e.distance, "weight": e.weight,
                     "contribution": e.contribution, "patch": list(e.patch), "box": list(e.box),
                     "rf_box": None if e.rf_box is None else list(e.rf_box), "source_index": e.source_index,
                     "source_box": None if e.source_box is None else list(e.source_box),
                     "source_file": e.source_file, "pushed_as": e.pushed_as, "file": e.file}
                    for e in self.top],
            "all_prototypes": self.table(c),
        }

    def save(self, out_dir: str, *, min_side: int = 192) -> str:
        """Write ``index.html``, ``explanation.json``, ``image.png`` and one PNG per top prototype.

        Each prototype PNG shows: the image with the activation heatmap and the most activated box | that box
        ("this") | the source patch ("looks like that") | the source image with its box. Small images are
        enlarged (nearest neighbour) to at least ``min_side`` pixels. Returns the path of ``index.html``.
        """
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # the panels of an earlier explanation saved here (other top-k) go
            if _PANEL.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
        image = render.to_uint8(self.image)
        render.save_png(render.upscale(image, min_side), os.path.join(out_dir, "image.png"))
        for e in self.top:
            e.file = f"rank{e.rank:02d}_prototype{e.prototype}.png"
            panel = _evidence_panel(image, e, min_side, self.similarity_kind)
            render.save_png(panel, os.path.join(out_dir, e.file))
        with open(os.path.join(out_dir, "explanation.json"), "w", encoding="utf-8") as fh:
            fh.write(strict_json(self.to_dict(), indent=1))
        return render.write_html(os.path.join(out_dir, "index.html"), "protokern explanation", self._html())

    def _html(self) -> str:
        c, esc = self.class_idx, html.escape
        kh, kw = self.prototype_size
        probs = torch.softmax(self.logits.double(), 0)
        order = torch.argsort(self.logits, descending=True)[:5].tolist()
        rows = "".join(f"<tr><td class=left>{esc(self.class_name(k))}</td><td>{float(self.logits[k]):.4f}</td>"
                       f"<td>{float(probs[k]):.4f}</td></tr>" for k in order)
        parts = [
            f"<h1>This looks like that: {esc(self.class_name(c))}</h1>",
            "<p><img src='image.png' alt='input image'></p>",
            f"<p>Predicted class: <b>{esc(self.class_name(self.predicted_class))}</b>"
            f" (logit {float(self.logits[self.predicted_class]):.4f}). Explained class: <b>{esc(self.class_name(c))}"
            f"</b>, logit {float(self.logits[c]):.4f} = sum over all {len(self.similarity)} prototypes of "
            f"similarity &times; weight = {float(self.contributions(c).sum()):.4f}.</p>",
            f"<p>Prototypes: {kh} &times; {kw} windows of the feature map; similarity: "
            f"{esc(render.SIMILARITY_NAMES[self.similarity_kind])} "
            f"(d: {esc(render.DISTANCE_NAMES[self.similarity_kind])}).</p>",
            f"<table><tr><th class=left>class</th><th>logit</th><th>probability</th></tr>{rows}</table>",
            f"<h2>Top {len(self.top)} prototypes: those weighing for the class first, each by contribution</h2>",
            "<p>Each row: the image with the prototype's activation map and most activated box "
            "(95th percentile) | this patch | looks like that: the prototype's source patch | its source image "
            "(push image N: image N of the push set; the trainer's is its training images less the validation "
            "hold-out).</p>",
            "<table><tr><th>rank</th><th>prototype</th><th class=left>prototype class</th><th>similarity</th>"
            "<th>weight</th><th>contribution</th><th class=left>this looks like that</th></tr>",
        ]
        for e in self.top:
            parts.append(f"<tr><td>{e.rank}</td><td>{e.prototype}</td><td class=left>"
                         f"{esc(self.class_name(e.prototype_class))}</td><td>{e.similarity:.4f}</td>"
                         f"<td>{e.weight:.4f}</td><td>{e.contribution:.4f}</td><td class=left>"
                         f"<img src='{esc(e.file or '')}' alt='prototype {e.prototype}'>"
                         + (f"<br>source: {esc(os.path.basename(e.source_file))}" if e.source_file else "")
                         + "</td></tr>")
        parts.append("</table><h2>All prototypes</h2><table><tr><th>prototype</th><th class=left>class</th>"
                     "<th>similarity</th><th>distance</th><th>weight</th><th>contribution</th></tr>")
        for row in self.table(c):
            parts.append(f"<tr><td>{row['prototype']}</td><td class=left>"
                         f"{esc(self.class_name(row['prototype_class']))}</td><td>{row['similarity']:.4f}</td>"
                         f"<td>{row['distance']:.4f}</td><td>{row['weight']:.4f}</td>"
                         f"<td>{row['contribution']:.4f}</td></tr>")
        parts.append("</table>")
        return "\n".join(parts)


def _crop(image: np.ndarray, box: Box | None, size: int) -> np.ndarray:
    """The ``box`` region of ``image`` scaled to fit a ``size`` square (a placeholder if there is none)."""
    if box is None or box[1] <= box[0] or box[3] <= box[2]:
        return render.placeholder(size, size)
    y0, y1, x0, x1 = box
    patch = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    scale = size / max(y1 - y0, x1 - x0)
    new = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    return np.asarray(patch.resize(new, Image.NEAREST), dtype=np.uint8)


def _evidence_panel(image: np.ndarray, e: PrototypeEvidence, min_side: int, kind: str) -> np.ndarray:
    test = render.draw_box(render.overlay(image, e.heatmap), e.box)
    test = render.upscale(test, min_side)
    side = test.shape[0]
    tiles = [render.label(test, f"prototype {e.prototype}: {kind} sim {e.similarity:.3f} x w {e.weight:.3f}"),
             render.label(_crop(image, e.box, side), "this")]
    if e.source_image is not None:
        source = render.to_uint8(e.source_image)
        tiles.append(render.label(_crop(source, e.source_box, side), "looks like that"))
        framed = render.upscale(render.draw_box(source, e.source_box), min_side)
        tiles.append(render.label(framed, f"push image {e.source_index}"))
    else:
        tiles.append(render.label(render.placeholder(side, side, "no source image"), "looks like that"))
    return render.hstack(tiles)


# ------------------------------------------------------------------------------------------------ inputs
def load_image_tensor(image, image_size: int | tuple[int, int] | None = None, channels: int | None = 3) -> Tensor:
    """An image as a float32 (C, H, W) tensor in [0, 1].

    ``image`` is a path (any PIL mode, RGBA / grayscale / CMYK included, is converted to RGB by
    ``protokern.data.load_image``), a PIL image, or a tensor (C, H, W) / (1, C, H, W) in [0, 1]. With
    ``image_size`` (a side S, or (H, W), at most ``MAX_IMAGE_PIXELS`` pixels as the files read) the image is
    resized (bilinear, antialiased) to S x S or H x W. ``channels``: 3 (RGB) or 1 (grayscale: a path, PIL
    image or RGB tensor is converted to its luma, ``0.299 R + 0.587 G + 0.114 B`` as PIL's "L"). None takes a
    tensor of 1 or 3 channels as it is and reads a path or PIL image as RGB.
    """
    from protokern.data.transforms import MAX_IMAGE_PIXELS, load_image, pil_to_tensor, to_luma, to_rgb

    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None, got {channels!r}")
    size = None
    if image_size is not None:
        pair = (image_size, image_size) if not isinstance(image_size, (tuple, list, torch.Size)) else image_size
        if len(pair) != 2:
            raise ValueError(f"image_size must be a side or (height, width), got {image_size!r}")
        size = (positive_int("image_size", pair[0]), positive_int("image_size", pair[1]))
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise ValueError(f"image_size {size[0]} x {size[1]} is more than the {MAX_IMAGE_PIXELS} pixels an image "
                             f"may have (protokern.data.transforms.MAX_IMAGE_PIXELS)")
    if isinstance(image, (str, os.PathLike)):
        square = size is not None and size[0] == size[1]
        image, _ = load_image(image, size[0] if square else None)
        if square or size is None:
            return to_luma(image) if channels == 1 else image
    elif isinstance(image, Image.Image):
        img = to_rgb(image)
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return to_luma(pil_to_tensor(img)) if channels == 1 else pil_to_tensor(img)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a path, a PIL image or a tensor, got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    rgb = image.dim() == 3 and image.shape[0] == 3 and channels is not None
    if image.dim() != 3 or image.shape[0] not in ((1, 3) if channels is None else (channels, 3)) \
            or not image.is_floating_point():
        want = "(3, H, W) or (1, H, W)" if channels is None else f"({channels}, H, W)"
        raise ValueError(f"expected a float image tensor {want} in [0, 1], got {image.dtype} {tuple(image.shape)}")
    if not bool(image.isfinite().all()):
        raise ValueError("the image holds NaN or inf values")
    check_unit_range(image, "image")
    image = image.detach().float().cpu()
    if size is not None and tuple(image.shape[1:]) != size:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp(0, 1)
    return to_luma(image) if rgb and channels == 1 else image


def _source_file(index: int | None, push_images) -> str | None:
    """The file of push image ``index`` (records hold indices of the dataset under a Subset), if it has one."""
    paths = None if index is None or push_images is None else getattr(base_dataset(push_images), "paths", None)
    return str(paths[index]) if paths is not None and 0 <= index < len(paths) else None


def _source_image(j: int, index: int, records: PushRecords | None, push_images) -> Tensor | None:
    """The source image of prototype j: from ``push_images`` if given, else the PNG written by push."""
    if index < 0:
        return None
    if push_images is not None:
        image = item_image(base_dataset(push_images), index)  # records hold indices of the dataset under a Subset
        try:
            return load_image_tensor(image, channels=None)
        except TypeError as error:  # the image argument's message would blame the explained image
            raise TypeError(f"push_images[{index}] must be an image (a path, a PIL image or a tensor) or an (image, "
                            f"label) pair, got {type(image).__name__}") from error
    path = None if records is None else records.png(j)
    if path is not None and os.path.isfile(path):
        return load_image_tensor(path, channels=None)
    return None


def _box(values) -> Box | None:
    box = tuple(int(v) for v in values)
    return None if box[0] < 0 else box


# ------------------------------------------------------------------------------------------------ explain
def _check_image_size(model: nn.Module, size) -> None:
    """A one-line ``ValueError`` for an image too small to give the model a feature map of one window."""
    rf = getattr(model, "receptive_field", None)
    if rf is None:
        return
    kh, kw = model.prototype_layer.prototype_size
    shortfall = rf.window_shortfall((int(size[0]), int(size[1])), (kh, kw))
    if shortfall is not None:
        (h, w), side = shortfall
        raise ValueError(f"the image is too small for this model: {size[0]} x {size[1]} pixels give a {h} x {w} "
                         f"feature map, smaller than the prototypes' {kh} x {kw} window"
                         + (f" (it takes at least {side} x {side} pixels)" if side else ""))


@torch.no_grad()
def explain_image(model: nn.Module, image, *, push_records: PushRecords | None = None, top_k: int = 10,
                  class_idx: int | None = None, push_images=None, class_names=None, device=None,
                  image_size: int | tuple[int, int] | None = None) -> Explanation:
    """Explain ``model``'s decision on one image ("this looks like that").

    Args:
        model: a ``ProtoPNet`` (the image is normalised here with its input statistics).
        image: a path (RGBA / grayscale / CMYK ... are read as RGB, or as grayscale for a model of grayscale
            inputs, see :func:`load_image_tensor`), a PIL image or a (C, H, W) tensor in [0, 1].
        push_records: the model's :class:`protokern.push.PushRecords` (one row per prototype), for the source
            patches; None leaves them out.
        top_k: how many prototypes to show: those with a positive weight for the class first (its evidence when
            the image looks like them), then the others, each by contribution (similarity x weight) to the class.
            (By contribution alone, a "linear" similarity -d ranked first the prototypes of other classes the
            image looks least like: a negative weight times a large -d.)
        class_idx: the class to explain (default: the predicted class).
        push_images: the push set (``push_images[i]`` is an image tensor or an ``(image, label)`` pair), for
            the source images; without it the ``{j}_source.png`` files written by push are used if present.
            A ``Subset`` is read through to its dataset, whose indices the records of a DataLoader hold (records
            of a plain iterable of batches hold positions: pass what those positions index).
        class_names: names of the classes (default: ``push_images.classes`` when available).
        device: the model's device (default; another one is a ValueError: the model is not moved).
        image_size: resize the image to this side, or (height, width); default: the push images' size (from
            ``push_records``), or the image's own size.

    Returns:
        :class:`Explanation`; call ``.save(out_dir)`` for the PNGs and ``index.html``.
    """
    model = unwrap(model)
    layer = model.prototype_layer
    prototypes = layer.prototypes
    num_protos = prototypes.shape[0]
    if push_records is not None and len(push_records.image_index) != num_protos:
        raise ValueError(f"push_records describe {len(push_records.image_index)} prototypes but the model has "
                         f"{num_protos} (records from before pruning? use protokern.prune.select_records)")
    top_k = positive_int("top_k", top_k)
    if class_idx is not None and not 0 <= int(class_idx) < model.num_classes:
        raise ValueError(f"class_idx must be in [0, {model.num_classes}), got {class_idx}")
    if image_size is None and push_records is not None:
        image_size = tuple(push_records.image_size)
    from protokern.data import model_input, model_stats

    x = load_image_tensor(image, image_size, channels=len(model_stats(model)[0]))
    _check_image_size(model, x.shape[1:])
    device = model_device(model, device)

    with eval_mode(model):
        batch = model_input(model, x[None].to(device))
        z = model.conv_features(batch)  # the trunk runs once per image
        logits, min_distances, similarity = model.classify_features(z)
        z = search_dtype(z)
        _, nearest = layer.nearest(z)  # the op's winning windows: (1, P), h * Wout + w
        distances = layer.distance_maps(z)[0]  # (P, Hout, Wout) in the layer's distance
    logits, min_distances, similarity = logits[0].cpu(), min_distances[0].cpu(), similarity[0].cpu()
    weights = model.last_layer.weight.detach().float().cpu()
    predicted = int(logits.argmax())
    c = predicted if class_idx is None else int(class_idx)
    classes = model.prototype_classes.cpu()

    k = min(top_k, num_protos)
    contributions = similarity * weights[c]
    order = torch.argsort(contributions, descending=True, stable=True)
    top = order[torch.argsort((weights[c][order] > 0).int(), descending=True, stable=True)][:k].tolist()
    maps = layer.to_similarity(distances[top]).cpu()  # (k, Hout, Wout)
    size = tuple(x.shape[1:])
    heatmaps = render.upsample(maps, size, layer.prototype_size)
    boxes = activation_boxes(maps, size, window=layer.prototype_size)
    wout = distances.shape[2]
    patches = nearest[0, top].cpu()
    window = layer.prototype_size
    rf = checked_receptive_field(model, size, z.shape[-2:])
    if class_names is None:
        class_names = getattr(base_dataset(push_images), "classes", None)

    evidence = []
    for rank, (j, patch, box, heat) in enumerate(zip(top, patches.tolist(), boxes.tolist(), heatmaps), 1):
        h, w = divmod(patch, wout)
        rf_box = None
        if rf is not None:
            rf_box = patch_box(rf, size, h, w, window=window)
        source_index = source_box = source_rf = None
        if push_records is not None and int(push_records.image_index[j]) >= 0:
            source_index = int(push_records.image_index[j])
            source_box = _box(push_records.activation_box[j])
            source_rf = _box(push_records.rf_box[j])
        evidence.append(PrototypeEvidence(
            rank=rank, prototype=j, prototype_class=int(classes[j]), similarity=float(similarity[j]),
            distance=float(min_distances[j]), weight=float(weights[c, j]), contribution=float(contributions[j]),
            patch=(h, w), box=tuple(box), rf_box=rf_box, heatmap=heat, source_index=source_index,
            source_box=source_box, source_rf_box=source_rf,
            source_image=_source_image(j, -1 if source_index is None else source_index, push_records, push_images),
            source_file=_source_file(source_index, push_images),
            pushed_as=None if push_records is None else int(push_records.pushed_as[j]),
        ))
    return Explanation(image=x, logits=logits, predicted_class=predicted, class_idx=c, similarity=similarity,
                       min_distances=min_distances, weights=weights, prototype_classes=classes, top=evidence,
                       class_names=list(class_names) if class_names is not None else None,
                       similarity_kind=layer.similarity, prototype_size=tuple(window))


# ------------------------------------------------------------------------------------ a trained model from its file
def _unfit_sizes(config: dict, weights) -> str | None:
    """What differs between the prototype and last-layer sizes ``config`` would build and the saved ``weights``,
    checked before anything is allocated (the last layer and class identity grow as classes x prototypes: a
    config edited in a small file could ask for gigabytes); None if they agree or cannot be read here (the build
    and ``load_state_dict`` then say what is wrong)."""
    try:
        classes = config.get("prototype_classes")
        num_classes, dim = int(config["num_classes"]), int(config["prototype_dim"])
        count = len(classes) if classes is not None else num_classes * int(config["prototypes_per_class"])
        saved = {name: tuple(weights[name].shape) for name in ("prototype_layer.prototypes", "last_layer.weight")}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if saved["last_layer.weight"] != (num_classes, count) or saved["prototype_layer.prototypes"][:2] != (count, dim):
        return (f"the config makes {count} prototypes of {dim} channels for {num_classes} classes; the weights hold "
                f"prototypes {saved['prototype_layer.prototypes']} and a last layer {saved['last_layer.weight']}")
    return None


def model_from_checkpoint(path: str, device=None, backbone=None):
    """Rebuild a trained ``ProtoPNet`` from a trainer checkpoint (``RUN/best.pt``, or a run folder: its best.pt,
    else its last.pt).

    Returns ``(model in eval mode, push records or None, the checkpoint dict)``. The model is rebuilt with
    ``ProtoPNet.from_config(checkpoint["model_config"], backbone=backbone)`` (``backbone``: the trunk module of a
    model built around one, which a config cannot hold) and loaded from ``checkpoint["model"]``; a checkpoint
    that does not fit its config raises :class:`CheckpointError`. A model saved with a backend that cannot run
    on ``device`` (default CPU), such as "cuda" on a machine without a GPU, gets "auto", with a warning.
    """
    default = BEST if os.path.isdir(path) and os.path.isfile(os.path.join(path, BEST)) else LAST
    state = load_checkpoint(path, default=default)
    if not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{path}: checkpoint has no 'model_config' to rebuild the model from")
    unfit = _unfit_sizes(state["model_config"], state.get("model"))
    if unfit:
        raise CheckpointError(f"{path}: the weights do not fit the saved model config ({unfit})")
    try:
        model = ProtoPNet.from_config(state["model_config"], backbone=backbone)
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the model from its saved config ({first_line(error)[:300]})"
                              ) from None
    try:
        model.load_state_dict(state["model"])
        records = PushRecords.from_dict(state["push_records"]) if state.get("push_records") else None
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        first = first_line(error)[:300]
        raise CheckpointError(f"{path}: the weights do not fit the saved model config ({first})") from None
    if records is not None:  # RUN/push/epoch_NNN of this run, moved or copied
        records.find_run_images(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    model.eval()
    if device is not None:
        model.to(device)
    layer, target = model.prototype_layer, torch.device("cpu" if device is None else device)
    why = None if layer.backend == "auto" else available_backends(target)[layer.backend]
    if why is not None:
        warnings.warn(f"{path}: the model was saved with backend {layer.backend!r}, which cannot run on {target} "
                      f"({why}): using 'auto'", stacklevel=2)
        layer.backend = "auto"
    return model, records, state
