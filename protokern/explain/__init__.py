"""Explanations of a ProtoPNet: local ("this looks like that"), global (prototype gallery) and metrics.

- :func:`explain_image` -> :class:`Explanation` (``.save(dir)`` writes PNGs and ``index.html``);
  command line: ``python -m protokern.explain --checkpoint RUN/best.pt --image IMG.jpg``.
- :func:`gallery`: every prototype with its k nearest training patches.
- :mod:`protokern.explain.metrics`: part localisation; consistency and stability (Huang et al. 2023).
- :func:`explain_run`: all of the above for a finished training run (called by the trainer).
"""

from __future__ import annotations

import html
import logging
import os

from torch import nn
from torch.utils.data import DataLoader

from protokern.checkpoint import EXPLANATIONS_DIR, GALLERY_DIR, INTERPRETABILITY_FILE, PART_LOCALISATION_FILE
from protokern.explain import render
from protokern.explain.gallery import gallery
from protokern.explain.local import (Explanation, PrototypeEvidence, explain_image, load_image_tensor,
                                     model_from_checkpoint)
from protokern.explain.metrics import (consistency_and_stability, consistency_score, part_boxes,
                                       part_localisation, stability_score)
from protokern.utils import strict_json, unwrap

__all__ = [
    "Explanation",
    "PrototypeEvidence",
    "consistency_and_stability",
    "consistency_score",
    "explain_image",
    "explain_run",
    "gallery",
    "load_image_tensor",
    "model_from_checkpoint",
    "part_boxes",
    "part_localisation",
    "stability_score",
]

log = logging.getLogger(__name__)


def _pick_images(dataset, n: int) -> list[int]:
    """Up to ``n`` dataset indices, the first image of each class in turn (so that classes differ)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(min(len(dataset), 50 * n))]
    picked, seen = [], set()
    for i, y in enumerate(targets):
        if len(picked) == n:
            break
        if int(y) not in seen:
            seen.add(int(y))
            picked.append(i)
    for i in range(len(targets)):  # fewer classes than n: fill up in order
        if len(picked) == n:
            break
        if i not in picked:
            picked.append(i)
    return picked


def explain_run(run_dir: str, model: nn.Module, *, test_dataset, push_records=None, push_dataset=None,
                n_images: int = 3, top_k: int = 10, k: int = 5, device=None, batch_size: int = 64,
                config=None, progress: bool | None = None, part_localisation_result: dict | None = None) -> dict:
    """Explanations and interpretability metrics of a trained (pushed) model, written into ``run_dir``.

    Writes ``run_dir/explanations/`` (local explanations of ``n_images`` test images of different classes,
    with an ``index.html``), ``run_dir/gallery/`` (every prototype with its ``k`` nearest training patches,
    when ``push_dataset`` is given), ``run_dir/part_localisation.json`` (when the test set has part
    ``boxes``, :func:`part_boxes`: not CUB's or Cars' object boxes) and ``run_dir/interpretability.json``
    (consistency and stability, when the test set has ``part_locations``, as CUB-200-2011 with
    ``parts/part_locs.txt``).

    Args:
        run_dir: the run folder. model: the trained ``ProtoPNet``.
        test_dataset: ``(image, label)`` items in [0, 1]. push_records: the model's push records.
        push_dataset: the push set (unaugmented training images) the records index into.
        n_images, top_k, k: images explained, prototypes per explanation, neighbours per gallery row (at most
            the push set's images).
        device, batch_size: how to run. config: the training config (only ``quiet`` is read).
        progress: tqdm bars (default: unless ``config.quiet``).
        part_localisation_result: :func:`part_localisation` of this model on ``test_dataset`` with
            ``location="rf_centre"`` when the caller has it already (the trainer's summary): not computed again.

    Returns:
        dict with the paths written and the metrics.
    """
    model = unwrap(model)
    quiet = bool(getattr(config, "quiet", False))
    progress = (not quiet) if progress is None else progress
    classes = getattr(test_dataset, "classes", None)
    summary: dict = {}

    exp_dir = os.path.join(run_dir, EXPLANATIONS_DIR)
    rows = []
    for i in _pick_images(test_dataset, n_images):
        image, label = test_dataset[i][:2]
        explanation = explain_image(model, image, push_records=push_records, top_k=top_k, push_images=push_dataset,
                                    class_names=classes, device=device)
        name = f"test_{i:05d}"
        explanation.save(os.path.join(exp_dir, name))
        rows.append((name, i, int(label), explanation))
    if rows:
        render.write_html(os.path.join(exp_dir, "index.html"), "protokern explanations", _index_html(rows))
        summary["explanations"] = exp_dir

    if push_dataset is not None:
        loader = DataLoader(push_dataset, batch_size=batch_size, shuffle=False)
        # a push set smaller than k (a tiny dataset) shows all its images, rather than failing the steps after
        result = gallery(model, loader, k=min(k, len(push_dataset)), out_dir=os.path.join(run_dir, GALLERY_DIR),
                         push_records=push_records, device=device, progress=progress)
        summary["gallery"] = result["html"]

    if part_boxes(test_dataset) is not None:
        results = {loc: part_localisation(model, test_dataset, location=loc, device=device, batch_size=batch_size,
                                          progress=progress)
                   for loc in ("rf_centre", "argmax") if loc != "rf_centre" or part_localisation_result is None}
        if part_localisation_result is not None:
            results["rf_centre"] = part_localisation_result
        record = {"part_localisation": results["rf_centre"]["overall"],
                  "definition": "fraction of (test image, prototype of its class) pairs whose most activated "
                                "location (centre of the receptive field of the nearest window of the prototype "
                                "layer, kh x kw cells) lies in the part box",
                  "argmax_part_localisation": results["argmax"]["overall"], **results}
        path = os.path.join(run_dir, PART_LOCALISATION_FILE)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(strict_json(record, indent=1))
        summary.update(part_localisation=record["part_localisation"], part_localisation_file=path)
        if not quiet:
            print(f"part localisation: {record['part_localisation']:.3f} (receptive-field centre), "
                  f"{record['argmax_part_localisation']:.3f} (upsampled argmax) -> {path}", flush=True)

    if hasattr(test_dataset, "part_locations"):
        try:
            scores = consistency_and_stability(model, test_dataset, device=device, batch_size=batch_size,
                                               progress=progress)
        except FileNotFoundError as error:  # no parts/part_locs.txt
            log.warning("consistency / stability skipped: %s", error)
        else:
            path = os.path.join(run_dir, INTERPRETABILITY_FILE)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(strict_json(scores, indent=1))
            summary.update(consistency=scores["consistency"], stability=scores["stability"],
                           interpretability_file=path)
    return summary


def _index_html(rows) -> str:
    esc = html.escape
    parts = ["<h1>Local explanations</h1><table><tr><th>image</th><th class=left>true class</th>"
             "<th class=left>predicted</th><th>logit</th><th class=left>explanation</th></tr>"]
    for name, i, label, e in rows:
        parts.append(f"<tr><td>{i}</td><td class=left>{esc(e.class_name(label))}</td>"
                     f"<td class=left>{esc(e.class_name(e.predicted_class))}</td>"
                     f"<td>{float(e.logits[e.predicted_class]):.4f}</td>"
                     f"<td class=left><a href='{name}/index.html'><img src='{name}/image.png' width=96></a></td></tr>")
    parts.append("</table>")
    return "\n".join(parts)
