"""Small helpers shared across protokern's layers (imports nothing from protokern).

One owner each: the progress bar of long loops (and the stop signal they take between items), the eval-mode
context, the dataset order of a loader (and the dataset under its Subsets), a loader's checked image batches,
the device a model computes on, the check of a count argument, a message's shortened list, an error's first
line, and strict JSON for the reports a run writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sys
import unicodedata
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler, Subset, SubsetRandomSampler, WeightedRandomSampler)


def distributed() -> bool:
    """Whether a torch.distributed process group is running (push, pruning and the trainer then work on shards)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def unwrap(model: nn.Module, ddp: bool = True) -> nn.Module:
    """The model inside ``DataParallel`` and (``ddp``) ``DistributedDataParallel`` wrappers (push and explanations
    read its attributes, which the wrappers do not forward), else ``model``. ``ddp=False``: a DDP wrapper is a
    one-line ``TypeError`` (pruning and last-layer retraining are not shard-aware, and pruning replaces the layers
    a wrapper holds: give them the model inside, the whole training set on every process, and wrap it again)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        if isinstance(model, nn.parallel.DistributedDataParallel) and not ddp:
            raise TypeError("give the model inside DistributedDataParallel (.module), with the whole training set on "
                            "every process, and wrap it again after pruning (which replaces its layers)")
        model = model.module
    return model


def model_device(model: nn.Module, device=None) -> torch.device:
    """The device ``model`` computes on: that of its first parameter, or ``device`` where given, which must be
    the same one (the model is not moved: a one-line ``ValueError`` instead of a device mismatch deep inside)."""
    own = next((p.device for p in model.parameters()), None)
    if device is None:
        return own if own is not None else torch.device("cpu")
    asked = checked_device(device)
    if own is None:  # nothing to move: any device
        return asked
    if asked.type == own.type and asked.index is None:  # "cuda" names the model's cuda:i
        asked = own
    if asked != own:
        raise ValueError(f"device={str(device)!r} but the model is on {own}: move the model there first "
                         f"(model.to({str(asked)!r}))")
    return asked


def checked_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)``, or a one-line ``ValueError`` for a name torch does not know or a device this
    machine lacks (CUDA or MPS not available, a CUDA index past the visible GPUs), instead of a traceback from
    the first tensor moved there."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {str(name)!r} (cpu, cuda, cuda:N, mps, ...): {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            gpu_build = (f"CUDA {torch.version.cuda}" if torch.version.cuda
                         else f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else None)
            build = f"built for {gpu_build}, no GPU visible" if gpu_build else "a CPU-only build"
            raise ValueError(f"device {str(name)!r} requested but CUDA is not available (torch {torch.__version__}: "
                             f"{build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} requested but {torch.cuda.device_count()} CUDA device(s) are "
                             "visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r} requested but MPS is not available here")
    return device


class _Stop:
    """A stop requested by a signal handler (:func:`stop`) while :func:`stop_deferred` blocks are open."""

    depth = 0
    pending = False


STOP_SIGNALS: set[int] = set()  # the signals this process's handler turns into stop() (python -m protokern.train)


def stop() -> None:
    """What a stop-signal handler calls: ``KeyboardInterrupt`` now, or, inside a :func:`stop_deferred` block, as
    soon as the block ends."""
    if _Stop.depth:
        _Stop.pending = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Hold :func:`stop` until the block ends (also when it ends by an exception: the stop wins). For the
    fetch of a DataLoader's next batch: interrupted there, the loader starts workers halfway, or leaves a worker
    handing over a batch to a closed connection."""
    _Stop.depth += 1
    try:
        yield
    finally:
        _Stop.depth -= 1
        if not _Stop.depth and _Stop.pending:
            _Stop.pending = False
            raise KeyboardInterrupt


def _whole_items(iterable: Iterable) -> Iterator:
    """The items of ``iterable``, each fetched under :func:`stop_deferred`."""
    with stop_deferred():
        items = iter(iterable)
    while True:
        with stop_deferred():
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


def progress(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None):
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and stderr is a terminal (else a silent tqdm); a stop
    signal (:func:`stop`) is taken between items, not while one is fetched."""
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)
        except TypeError:  # no length: a generator, a loader over an IterableDataset
            pass
    return tqdm(_whole_items(iterable), desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def image_order(loader) -> tuple[Tensor | None, object | None]:
    """(dataset indices of the loader's samples in order, base dataset) for a DataLoader; (None, None) else.

    Subsets are mapped to the indices of their underlying dataset; a loader over an ``IterableDataset`` has no
    indices (None, None). Raises ``ValueError`` for a loader whose order cannot be known in advance: a random
    sampler (shuffle=True, ``SubsetRandomSampler``, ``WeightedRandomSampler``, a shuffling
    ``DistributedSampler``, also inside a ``batch_sampler``), or a custom sampler or batch sampler that gives two
    different orders in two passes.
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None, None
    batches = loader.batch_sampler
    sampler = getattr(batches, "sampler", loader.sampler)  # with batch_sampler=, the one inside it orders
    if (isinstance(sampler, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))
            or (isinstance(sampler, DistributedSampler) and sampler.shuffle)):
        raise ValueError(f"this needs a loader in a fixed order, not one with a {type(sampler).__name__}: "
                         "build it with shuffle=False and no random sampler")

    def one_pass() -> list[int]:  # the indices in the order the loader yields them
        return [int(i) for batch in batches for i in batch] if batches is not None else list(iter(sampler))

    order = one_pass()
    fixed = (type(batches) in (BatchSampler, type(None))
             and isinstance(sampler, (SequentialSampler, DistributedSampler, range, list, tuple)))
    if not fixed and one_pass() != order:  # a custom (batch) sampler: trusted only if two passes agree
        name = type(batches).__name__ if type(batches) is not BatchSampler else type(sampler).__name__
        raise ValueError(f"this needs a loader in a fixed order: its {name} gave two different orders in two "
                         "passes")
    order = torch.as_tensor(order, dtype=torch.int64)
    dataset = loader.dataset
    while isinstance(dataset, Subset):
        order = torch.as_tensor(dataset.indices, dtype=torch.int64)[order]
        dataset = dataset.dataset
    return order, dataset


def base_dataset(dataset):
    """The dataset under a chain of ``Subset`` objects, whose indices push records and neighbours hold."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def item_image(dataset, index: int):
    """The image of ``dataset[index]``: the first element of an ``(image, label, ...)`` item, else the item."""
    item = dataset[index]
    return item[0] if isinstance(item, (tuple, list)) else item


def class_name(names, c: int) -> str:
    """Name of class ``c`` in ``names`` (a sequence, or None), its index as a string when it has none."""
    return str(names[c]) if names is not None and 0 <= c < len(names) else str(c)


def check_unit_range(images: Tensor, what: str = "images") -> None:
    """A one-line ``ValueError`` for float ``images`` that are clearly not in [0, 1], the datasets' and
    explanations' convention: values above 1.5 (0..255 images) or below -0.5 (normalised ones), which
    would be misread silently. Resampling overshoot and the like (a bicubic resize gives [-0.06, 1.06]) pass;
    NaN is left to the model."""
    if images.numel():
        low, high = (float(v) for v in torch.stack(torch.aminmax(images.detach())).tolist())
        if high > 1.5 or low < -0.5:
            looks = "0..255 values" if low >= -0.5 else "already normalised"
            raise ValueError(f"expected unnormalised {what} in [0, 1] (they are normalised here), got values "
                             f"in [{low:.3f}, {high:.3f}] ({looks}?)")


class image_batches:  # noqa: N801 - used as a function
    """``(images, labels)`` of each batch of ``loader`` (extra items, dataset indices ..., are ignored), checked:
    images a float (B, 3, H, W) or (B, 1, H, W) tensor in [0, 1] (uint8 batches are refused:
    ``protokern.data.uint8_to_float`` converts them; :func:`check_unit_range` on the first batch, which tells
    0..255 or normalised data without a pass over every batch), labels B class indices (a tensor, list or
    array), given as an int64 tensor, in [0, num_classes) when ``num_classes`` is given (checked on every batch
    whose labels are on the CPU, and on the first batch wherever they are). Each misuse is a one-line error. Its
    length is the loader's (so that a progress bar over it has a total)."""

    def __init__(self, loader, num_classes: int | None = None):
        self.loader = loader
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for position, batch in enumerate(self.loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                got = (f"a dict with keys {listed([repr(k) for k in batch], 6)}" if isinstance(batch, dict) else
                       f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
                raise ValueError(f"the loader must yield (images, labels, ...) batches, got {got}")
            images, labels = batch[0], batch[1]
            if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
                got = f"shape {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
                raise ValueError(f"images must be a (B, 3, H, W) tensor (RGB), or (B, 1, H, W) (grayscale), got "
                                 f"{got}")
            if not images.is_floating_point():
                raise TypeError(f"images must be floats in [0, 1], got {images.dtype} (protokern.data.uint8_to_float "
                                "converts uint8 images)")
            if position == 0:
                check_unit_range(images)
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):  # strings, ragged lists
                first = labels[0] if isinstance(labels, (tuple, list)) and labels else labels
                got = type(first).__name__
                raise ValueError(f"labels must be class indices (integers), got {got} values") from None
            if labels.shape != (images.shape[0],) or labels.is_complex():
                raise ValueError(f"labels must be {images.shape[0]} class indices, one per image, got a {labels.dtype} "
                                 f"tensor of shape {tuple(labels.shape)}")
            if labels.is_floating_point() and not bool((labels == labels.round()).all()):
                raise ValueError("labels must be class indices (integers), got fractional values")
            labels = labels.long()
            if (self.num_classes is not None and labels.numel()
                    and (position == 0 or labels.device.type == "cpu")):
                low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())
                if low < 0 or high >= self.num_classes:
                    raise ValueError(f"labels must be in [0, {self.num_classes}) for a model of {self.num_classes} "
                                     f"classes, got labels in [{low}, {high}]")
            yield images, labels


def parse_sides(text) -> tuple[int, int] | None:
    """``(first, last)`` of a size written "N" or "AxB" (integers >= 1, spaces ignored; an int N is taken too),
    or None for anything else: the grammar of --prototype-size and explain's --image-size."""
    parts = str(text).lower().replace(" ", "").split("x")
    if len(parts) in (1, 2) and all(p.isdecimal() and int(p) >= 1 for p in parts):
        return int(parts[0]), int(parts[-1])
    return None


def default_num_workers() -> int:
    """Worker processes (loaders) or threads (image decoding) used when none are given: the usable CPUs minus
    one, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def positive_int(name: str, value) -> int:
    """``value`` (a Python or NumPy integer >= 1; not a bool) as an int, else a one-line error naming ``name``:
    ``TypeError`` for a value that is not an integer, ``ValueError`` for one below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


_UNSHOWN = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))  # bidi embeddings, isolates


def printable(text) -> str:
    """``text`` for a terminal: control characters (escape sequences, newlines), line and paragraph separators,
    lone surrogates and bidirectional overrides (a class folder's name can hold them) as Python escapes; every
    other character, joiners of the scripts that need them included, as it is."""
    return "".join(c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if c in _UNSHOWN or unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") else c for c in str(text))


def listed(items, limit: int) -> str:
    """The first ``limit`` of ``items`` joined by commas, "and N more" after them: a message's list that stays
    one short line (:func:`printable`)."""
    items = [printable(item) for item in items]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty), for a one-line reason."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def strict_json(obj, indent: int | None = 2) -> str:
    """JSON of ``obj`` that strict parsers read: a non-finite float (NaN, an accuracy of no epochs, an infinite
    distance) is ``null``, where ``json.dumps`` would write ``NaN`` / ``Infinity``."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), indent=indent, allow_nan=False)
