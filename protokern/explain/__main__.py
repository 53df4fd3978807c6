"""``python -m protokern.explain --checkpoint RUN/best.pt --image IMG.jpg [--top-k 10] [--out DIR] [--class C]``.

Rebuilds the model from a trainer checkpoint, explains its decision on the image ("this looks like that")
and writes the PNGs and ``index.html`` to ``--out`` (default: a new folder ``RUN/explanations/image_<image name>``,
``-1``, ``-2`` ... appended when that name is taken, so it never replaces the trainer's ``test_NNNNN``
explanations nor an earlier one). The image is explained at the training images' size, as they were resized
(a note says so when that changes its shape); ``--image-size native`` keeps its own. Sizes are height x width.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings

from protokern.checkpoint import EXPLANATIONS_DIR
from protokern.cli import exit_on_error
from protokern.data.transforms import MAX_IMAGE_PIXELS, broken_link
from protokern.explain.local import explain_image, model_from_checkpoint
from protokern.utils import checked_device, parse_sides, printable

PROG = "python -m protokern.explain"


def _checked_data_root(data_root: str | None) -> str | None:
    if data_root is not None and not os.path.isdir(data_root):
        raise ValueError(f"--data-root {data_root}: no such folder")
    return data_root


def _image_size(text: str):
    """--image-size: "auto", "native", a side N or HxW."""
    if text in ("auto", "native"):
        return text
    sides = parse_sides(text)
    if sides is None:
        raise argparse.ArgumentTypeError(f"expected auto, native, a side N or HxW, got {text!r}")
    return sides


def _file_header(path: str) -> tuple[tuple[int, int] | None, int | None]:
    """From an image file's header: its (height, width) and its EXIF orientation tag when that turns or mirrors
    the image (2 to 8), each None where unknown (the image's own loading says what is wrong: a decompression
    bomb too, which PIL's header read warns about or raises)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.height, image.width
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        turn = image.getexif().get(0x0112)
                    except Exception:  # noqa: BLE001 (unreadable EXIF: the loading reads the pixels alone)
                        turn = None
    except Exception:  # noqa: BLE001 (any reason: the loading reports it in its own words)
        return None, None
    return size, (turn if isinstance(turn, int) and 2 <= turn <= 8 else None)  # (1: upright; others are none)


def _training_size(records, state: dict) -> tuple[int, int] | None:
    """The size the model's images had: its push records', else its training config's (a checkpoint from before
    the first push), else None."""
    if records is not None:
        return tuple(records.image_size)
    side = (state.get("config") or {}).get("image_size")
    return (side, side) if isinstance(side, int) and not isinstance(side, bool) and side > 0 else None


def _default_out(run_dir: str, image: str) -> str:
    """A new folder ``run_dir/explanations/image_<image stem>[-N]`` (created here, so never an existing one)."""
    base = os.path.join(run_dir, EXPLANATIONS_DIR, "image_" + os.path.splitext(os.path.basename(image))[0])
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for n in itertools.count():
        out = f"{base}-{n}" if n else base
        try:
            os.mkdir(out)
            return out
        except FileExistsError:
            continue


SYNTHETIC_REBUILD_BYTES = 1 << 30  # the most memory explain spends rendering a synthetic run's images again


def _push_dataset(state: dict, data_root: str | None):
    """The run's push set rebuilt from the checkpoint's training config, or None (then push PNGs are used).
    An explicit ``data_root`` that is not a folder is a ValueError."""
    data_root = _checked_data_root(data_root)
    config = state.get("config")
    if not config:
        return None
    from protokern.train.config import TrainConfig
    from protokern.train.data import build_datasets

    try:
        cfg = TrainConfig.from_saved(config).validate(schedule=False)  # (no schedule: its size is the epochs')
    except (TypeError, ValueError) as error:
        warnings.warn(f"push set not rebuilt (saved config unusable: {error})", stacklevel=2)
        return None
    if data_root is not None:
        cfg.data_root = data_root
    if cfg.dataset == "synthetic":  # rendered whole, in memory: a checkpoint's settings must not decide gigabytes
        size = (cfg.synthetic_train_per_class + cfg.synthetic_test_per_class) * cfg.synthetic_classes * 3 * (
            cfg.image_size ** 2)
        if size > SYNTHETIC_REBUILD_BYTES:
            warnings.warn(f"push set not rebuilt (the synthetic images would take {size / 2 ** 30:.1f} GiB); using the "
                          f"prototype images saved by push", stacklevel=2)
            return None
    if cfg.dataset != "synthetic" and not (cfg.data_root and os.path.isdir(cfg.data_root)):
        return None
    try:
        return build_datasets(cfg)[2]
    except (OSError, TypeError, ValueError) as error:
        warnings.warn(f"push set not rebuilt ({error}); using the prototype images saved by push", stacklevel=2)
        return None


def _class_names(push_set, state: dict) -> list[str] | None:
    """The classes' names: the rebuilt push set's, else those the checkpoint's data record keeps (a dataset
    folder moved or gone since training)."""
    names = getattr(push_set, "classes", None)
    if names is None:
        names = (state.get("data") or {}).get("classes")
    return [str(name) for name in names] if isinstance(names, (list, tuple)) else None


def main(argv: list[str] | None = None) -> str:
    """Command-line entry point; returns the path of the ``index.html`` written.

    Bad input (missing or corrupt checkpoint, a checkpoint that does not fit its config, an unreadable image)
    ends with one line on stderr and exit code 2; ``--debug`` raises the error with its traceback instead.
    """
    description = __doc__.split("\n\n")[1].replace("``", "") if __doc__ else None  # plain text, not RST
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    parser.add_argument("--checkpoint", required=True,
                        help="trainer checkpoint (RUN/best.pt, RUN/pruned.pt ...) or run folder (its best.pt, else "
                             "last.pt; the run's own explanations/ show its final model, RUN/pruned.pt after --prune)")
    parser.add_argument("--image", required=True, help="image file (any mode: RGBA, grayscale, CMYK ...)")
    parser.add_argument("--top-k", type=int, default=10, help="prototypes shown (default 10)")
    parser.add_argument("--out", default=None, help="output folder (default: a new folder RUN/explanations/"
                        "image_<image name>, with -1, -2 ... appended when taken); an explicit --out is written "
                        "even if it holds an earlier explanation: its prototype panels are replaced")
    parser.add_argument("--class", dest="class_idx", type=int, default=None,
                        help="class index to explain (default: the predicted class)")
    parser.add_argument("--image-size", type=_image_size, default="auto",
                        help="size the image is explained at: auto (default: the training images' size, to which "
                             "they were resized; a note says when that changes the image's shape; the image's own "
                             "size for a checkpoint that does not say), native (its own size), a side N or HxW "
                             "(height x width)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--data-root", default=None, help="dataset folder, to show the prototypes' source images "
                                                          "if it moved since training")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    with exit_on_error(PROG, ["--debug"] if args.debug else []):
        return _explain(args, parser)


def _checked_image(path: str) -> None:
    """A one-line error unless ``path`` is a file (before the checkpoint is read)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--image {path} is a folder: give one image file")
    broken = broken_link(path)
    if broken:
        raise FileNotFoundError(f"--image {path} is {broken}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")


def _explain(args, parser) -> str:
    _checked_image(args.image)
    _checked_data_root(args.data_root)  # before the slow part
    args.device = checked_device(args.device)
    model, records, state = model_from_checkpoint(args.checkpoint, device=args.device)
    if args.class_idx is not None and not 0 <= args.class_idx < model.num_classes:
        parser.error(f"--class must be in [0, {model.num_classes})")
    if records is None:
        print(f"warning: the prototypes of {args.checkpoint} were never pushed (a checkpoint from before the first "
              "push): they are learned vectors, not patches of training images, so no source patches are shown",
              file=sys.stderr, flush=True)
    push_set = _push_dataset(state, args.data_root)  # source images (with records) and class names
    own, turn = _file_header(args.image)
    own = own if args.image_size in ("auto", "native") else None
    if own is not None and own[0] * own[1] > MAX_IMAGE_PIXELS:
        own = None  # the loading refuses the file in its own words (a possible decompression bomb)
    size = {"auto": _training_size(records, state), "native": own}.get(args.image_size, args.image_size)
    explanation = explain_image(model, args.image, push_records=records, top_k=args.top_k, class_idx=args.class_idx,
                                push_images=push_set if records is not None else None,
                                class_names=_class_names(push_set, state), device=args.device, image_size=size)
    h, w = explanation.image.shape[1:]
    if args.image_size == "auto" and own is not None and own[0] * w != own[1] * h:
        print(f"note: the {own[0]} x {own[1]} image (height x width) is explained resized to {h} x {w}, the training "
              f"images' size (they were resized so); --image-size native explains it at its own size", file=sys.stderr,
              flush=True)
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
    out = args.out or _default_out(run_dir, args.image)
    page = explanation.save(out)
    c = explanation.class_idx
    kh, kw = explanation.prototype_size
    name = lambda k: printable(explanation.class_name(k))  # noqa: E731 - names from the data, shown in a terminal
    print(f"class {name(c)} (logit {float(explanation.logits[c]):.4f}, predicted "
          f"{name(explanation.predicted_class)}); top prototypes ({kh} x {kw} windows):")
    for e in explanation.top:
        print(f"  {e.rank:2d}. prototype {e.prototype:4d} (class {name(e.prototype_class)}): "
              f"{explanation.similarity_kind} similarity {e.similarity:.4f} x weight {e.weight:.4f} = "
              f"{e.contribution:.4f}")
    if turn is not None:
        print(f"note: the image's EXIF orientation tag ({turn}: photo viewers show it turned or mirrored) is not "
              f"applied: it is explained as its pixels are stored, as training images are read; save it upright "
              f"(PIL.ImageOps.exif_transpose) to explain it so", file=sys.stderr, flush=True)
    print(f"-> {page}")
    return page


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
