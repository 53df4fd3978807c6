"""Global explanation: every prototype next to its k nearest training patches (one per image).

The search is :func:`protokern.push.nearest_training_patches` (one fused op call per batch, a running
top-k); the result is drawn as PNG pages (one row per prototype: its source image with its high-activation
box, then the k nearest images with the receptive field of the nearest patch: the whole kh x kw window of
the prototype layer) and an ``index.html`` page.
"""

from __future__ import annotations

import html
import os

import numpy as np
from PIL import Image
from torch import nn

from protokern.explain import render
from protokern.models.receptive_field import checked_receptive_field, patch_box
from protokern.push import PushRecords, nearest_training_patches
from protokern.utils import base_dataset, class_name, item_image, positive_int, strict_json, unwrap

__all__ = ["gallery"]


def _tile(image, box, size: int, caption: str, colour=render.BOX_COLOUR) -> np.ndarray:
    """``image`` scaled to ``size`` pixels on its long side, with ``box`` (in its own pixels) drawn."""
    array = render.to_uint8(image)
    h, w = array.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    scaled = np.asarray(Image.fromarray(array).resize(new, resample), dtype=np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        scaled = render.draw_box(scaled, (round(y0 * scale), round(y1 * scale), round(x0 * scale),
                                          round(x1 * scale)), colour, width=max(1, size // 48))
    return render.label(scaled, caption)


def _window_box(rf, image_size, feature_size, h: int, w: int, window: tuple[int, int]):
    """Receptive field of the ``window`` (kh, kw) of cells with top-left cell (h, w), or the window's share of
    the image when the model has none."""
    if rf is not None:
        return patch_box(rf, image_size, h, w, window=window)
    kh, kw = window
    sy, sx = image_size[0] / feature_size[0], image_size[1] / feature_size[1]
    return round(h * sy), round((h + kh) * sy), round(w * sx), round((w + kw) * sx)


def gallery(model: nn.Module, loader, *, k: int = 5, out_dir: str, push_records: PushRecords | None = None,
            push_images=None, class_names=None, device=None, progress: bool = True, tile: int = 96,
            per_page: int = 50) -> dict:
    """Draw every prototype with its ``k`` nearest training patches, one per image (the original's global analysis).

    Args:
        model: a ``ProtoPNet``.
        loader: the training images (unaugmented), ``(images, labels, ...)`` batches in [0, 1] from a
            non-shuffling ``DataLoader`` over a dataset (the images are fetched from ``loader.dataset``).
        k: nearest images per prototype (5 in the original).
        out_dir: output folder: ``gallery_NNN.png`` pages of ``per_page`` rows, ``index.html``, ``gallery.json``.
        push_records: the model's push records, for the first column (the prototype's source image with its
            high-activation box); without them the column is left out.
        push_images: the push set the records index into (default: the loader's dataset; push and gallery
            both run over the unaugmented training set); a ``Subset`` is read through to its dataset, as for
            :func:`explain_image`.
        class_names: class names (default: the dataset's ``classes``).
        device, progress: the model's device (default; another one is a ValueError); tqdm bars.
        tile: side of each image tile in pixels.

    Returns:
        dict with ``pages`` (PNG paths), ``html`` (path), ``neighbours`` (:class:`protokern.push.Neighbours`).
    """
    model = unwrap(model)
    from tqdm.auto import tqdm

    per_page = positive_int("per_page", per_page)
    num_protos = model.num_prototypes
    if push_records is not None and len(push_records.image_index) != num_protos:
        raise ValueError(f"push_records describe {len(push_records.image_index)} prototypes, the model {num_protos}")
    neighbours = nearest_training_patches(model, loader, k=k, device=device, progress=progress, desc="gallery")
    dataset = neighbours.dataset
    if dataset is None:
        raise ValueError("gallery needs a DataLoader over a dataset (to fetch the neighbour images)")
    push_images = dataset if push_images is None else base_dataset(push_images)  # records index the base
    class_names = class_names if class_names is not None else getattr(dataset, "classes", None)
    classes = model.prototype_classes.cpu().tolist()
    rf = checked_receptive_field(model, neighbours.image_size, neighbours.feature_size)
    os.makedirs(out_dir, exist_ok=True)

    rows, pages, entries = [], [], []
    for j in tqdm(range(num_protos), desc="gallery images", disable=not progress, leave=False, dynamic_ncols=True):
        name = class_name(class_names, classes[j])
        row, entry = [], {"prototype": j, "class": classes[j], "class_name": name, "neighbours": []}
        if push_records is not None:
            source = int(push_records.image_index[j])
            entry["source_index"] = source if source >= 0 else None
            entry["pushed_as"] = int(push_records.pushed_as[j])  # the index naming its push PNGs
            if source >= 0:
                box = tuple(int(v) for v in push_records.activation_box[j])
                row.append(_tile(item_image(push_images, source), box, tile, f"p{j} {name}"[:18],
                                 colour=(255, 60, 60)))
            else:
                row.append(render.label(render.placeholder(tile, tile, "not pushed"), f"p{j}"))
        for r in range(k):
            index = int(neighbours.image_index[j, r])
            label = int(neighbours.label[j, r])
            h, w = (int(v) for v in neighbours.patch[j, r])
            distance = float(neighbours.distance[j, r])
            box = _window_box(rf, neighbours.image_size, neighbours.feature_size, h, w, neighbours.window)
            mark = "" if label == classes[j] else "x"  # other class
            row.append(_tile(item_image(dataset, index), box, tile, f"{mark}d={distance:.3g} c{label}"[:18]))
            entry["neighbours"].append({"image_index": index, "class": label, "distance": distance,
                                        "patch": [h, w], "box": list(box)})
        entry["own_class"] = sum(n["class"] == classes[j] for n in entry["neighbours"])
        entries.append(entry)
        rows.append(row)
        if len(rows) == per_page or j == num_protos - 1:
            pages.append(render.save_png(render.grid(rows), os.path.join(out_dir, f"gallery_{len(pages):03d}.png")))
            rows = []

    with open(os.path.join(out_dir, "gallery.json"), "w", encoding="utf-8") as fh:  # an inf distance: null
        fh.write(strict_json({"k": k, "window": list(neighbours.window), "box_format": render.BOX_FORMAT,
                              "similarity": model.prototype_layer.similarity, "prototypes": entries}, indent=1))
    page_path = render.write_html(os.path.join(out_dir, "index.html"), "protokern prototype gallery",
                                  _html(entries, pages, k, per_page, push_records is not None, neighbours.window,
                                        model.prototype_layer.similarity))
    return {"pages": pages, "html": page_path, "neighbours": neighbours}


def _html(entries: list[dict], pages: list[str], k: int, per_page: int, with_source: bool,
          window: tuple[int, int], similarity: str) -> str:
    esc = html.escape
    kh, kw = window
    first = "the prototype's source image (red: most activated box), then " if with_source else ""
    parts = [f"<h1>Prototypes and their {k} nearest training patches</h1>",
             f"<p>One row per prototype: {first}its {k} nearest training images, one patch each (yellow: "
             f"receptive field of the nearest {kh} &times; {kw} window of feature cells; d = "
             f"{render.DISTANCE_NAMES[similarity]}, "
             "c = class, x = another class than the prototype's).</p>"]
    for page, path in enumerate(pages):
        chunk = entries[page * per_page:(page + 1) * per_page]
        parts.append(f"<h2>Prototypes {chunk[0]['prototype']}&ndash;{chunk[-1]['prototype']}</h2>"
                     f"<p><img src='{esc(os.path.basename(path))}' alt='gallery page {page}'></p>")
        parts.append("<table><tr><th>prototype</th><th class=left>class</th><th>source (push image)</th>"
                     f"<th>own class among {k}</th>"
                     "<th class=left>nearest images (index (class, distance); ...)</th></tr>")
        for e in chunk:
            near = "; ".join(f"{n['image_index']} ({n['class']}, {n['distance']:.4g})" for n in e["neighbours"])
            source = "" if e.get("source_index") is None else e["source_index"]
            parts.append(f"<tr><td>{e['prototype']}</td><td class=left>{esc(e['class_name'])}</td>"
                         f"<td>{source}</td><td>{e['own_class']}</td>"
                         f"<td class=left>{esc(near)}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)
