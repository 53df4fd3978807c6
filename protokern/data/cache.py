"""The input pipeline of file datasets: decode once, keep uint8, skip bad images, feed batches ahead.

:func:`prepare_images` wraps a dataset that decodes files (one with ``decode(index) -> uint8 (3, S, S)``,
as :class:`~protokern.data.CUB200`, :class:`~protokern.data.StanfordCars` and
:class:`~protokern.data.ImageFolderDataset`) in an :class:`ImageView`:

- ``cache="memory"``: every image is decoded, cropped and resized once (threads, a progress bar on a tty)
  into one uint8 (N, 3, S, S) tensor in host memory; ``"gpu"``: the same tensor on the GPU; ``"off"``:
  images are decoded at each access (streaming); ``"auto"``: the GPU when the cache takes at most a fifth of
  its free memory, else host memory when it takes at most half of the available memory (times the
  processes on this node), else streaming.
- ``skip_bad_images=True``: images that do not decode (:class:`~protokern.data.transforms.BadImageError`)
  are left out of the view, one warning per file, their paths in ``view.skipped``. Streaming with skipping
  decodes every image once up front to find them (a dataset's indices must not change mid-epoch: push and
  the per-image metrics rely on them). Without skipping the first bad image raises, naming the file.

Items of a view are the wrapped dataset's, exactly (float32 = uint8 / 255, on the CPU). :class:`CachedBatches`
serves training batches straight from the cache: gathered as uint8 (into pinned memory when the target is a
GPU), copied without blocking on a side stream, converted to float on the device, one batch ahead.
"""
from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import BatchSampler, Dataset

from protokern.utils import checked_device, default_num_workers, printable

from .transforms import BadImageError, uint8_to_float

__all__ = ["CACHE_MODES", "BadImageWarning", "ImageView", "CachedBatches", "cached_batches", "prepare_images",
           "cache_bytes", "choose_cache", "find_view", "skipped_images"]

CACHE_MODES = ("auto", "memory", "gpu", "off")
_PER_ITEM_LISTS = ("targets", "paths", "image_ids", "samples")
_PER_ITEM_METHODS = ("part_locations", "mapping", "source_size", "box")


class BadImageWarning(UserWarning):
    """An image left out by ``skip_bad_images`` (one warning per file)."""


class ImageView(Dataset):
    """The decodable images of a file dataset, optionally served from a uint8 cache (see the module docstring).

    Args:
        dataset: the wrapped dataset (with ``decode(index)`` and ``targets``).
        rows: dataset indices of the view's items, in order.
        skipped: paths of the images left out.
        images: None (decode at access) or a uint8 (len(dataset), 3, S, S) tensor indexed by dataset index.

    Per-item attributes (``targets``, ``paths``, ``image_ids``, ``samples``, ``boxes``, ``source_boxes``) and
    methods (``part_locations``, ``mapping``, ``source_size``, ``box``) follow the view's indices; other attributes
    (``classes``, ``root``, ``image_size``, ...) are the dataset's.
    """

    def __init__(self, dataset: Dataset, rows: list[int], skipped: list[str], images: torch.Tensor | None = None):
        self.dataset = dataset
        self.rows = torch.as_tensor(rows, dtype=torch.int64)
        self.skipped = list(skipped)
        self.images = images
        for name in _PER_ITEM_LISTS:
            if hasattr(dataset, name):
                values = getattr(dataset, name)
                setattr(self, name, [values[r] for r in rows])
        self._labels = torch.as_tensor(self.targets, dtype=torch.int64)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "rows", "images"):  # unpickling, half-built objects
            raise AttributeError(name)
        value = getattr(self.dataset, name)
        if name in _PER_ITEM_METHODS:
            return lambda index, *args, **kwargs: value(int(self.rows[index]), *args, **kwargs)
        return value

    @property
    def boxes(self) -> torch.Tensor:
        """The dataset's ``boxes`` of the view's items (per item when it has ``box(index)``: the boxes of
        skipped images may not be computable)."""
        if self.__dict__.get("_boxes") is None:
            box = getattr(self.dataset, "box", None)
            if callable(box):
                self._boxes = torch.stack([box(int(r)) for r in self.rows]) if len(self) else torch.zeros(0, 4)
            else:
                self._boxes = self.dataset.boxes[self.rows]
        return self._boxes

    @property
    def source_boxes(self) -> torch.Tensor:
        """The view's boxes in source-image pixels (the dataset's ``source_boxes`` of its rows)."""
        return self.dataset.source_boxes[self.rows]

    @property
    def device(self) -> torch.device:
        """Where the cache lives (cpu when there is none)."""
        return self.images.device if self.images is not None else torch.device("cpu")

    @property
    def cached(self) -> bool:
        """Whether the images are held decoded in memory (else each item is decoded from its file)."""
        return self.images is not None

    def __len__(self) -> int:
        return len(self.rows)

    def decode(self, index: int) -> torch.Tensor:
        """uint8 (3, S, S) image ``index`` on the CPU (from the cache when there is one)."""
        row = int(self.rows[index])
        return self.images[row].cpu() if self.images is not None else self.dataset.decode(row)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return uint8_to_float(self.decode(index)), self.targets[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Items of a DataLoader batch: one gather and one conversion for a cached view."""
        if self.images is None:
            return [self[i] for i in indices]
        rows = self.rows[torch.as_tensor(indices, dtype=torch.int64)]
        batch = uint8_to_float(self.images[rows.to(self.images.device)].cpu())
        return list(zip(batch.unbind(0), (self.targets[i] for i in indices)))

    def uint8_batch(self, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (b, 3, S, S) images of view ``indices`` on the cache's device (into ``out`` on the CPU)."""
        rows = self.rows[indices]
        if self.images.device.type != "cpu":
            return self.images.index_select(0, rows.to(self.images.device))
        return torch.index_select(self.images, 0, rows, out=out)

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 labels of view ``indices`` (CPU)."""
        return self._labels[indices]

    def __repr__(self) -> str:
        where = "streamed" if self.images is None else f"cached on {self.device}"
        return f"ImageView({self.dataset!r}, n={len(self)}, skipped={len(self.skipped)}, {where})"


def find_view(dataset) -> ImageView | None:
    """The :class:`ImageView` under ``dataset``'s chain of ``.dataset`` wrappers (Subset, ...), if any."""
    seen = 0
    while dataset is not None and seen < 16:
        if isinstance(dataset, ImageView):
            return dataset
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return None


def skipped_images(*datasets) -> list[str]:
    """Sorted paths of the images left out (``skip_bad_images``) by the views under ``datasets`` (each once)."""
    return sorted({path for ds in datasets if (view := find_view(ds)) is not None for path in view.skipped})


def cache_bytes(dataset) -> int:
    """Bytes of a uint8 cache of ``dataset`` (N * 3 * S * S)."""
    return len(dataset) * 3 * int(dataset.image_size) ** 2


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_cache(dataset, mode: str = "auto", device: torch.device | str | None = None) -> str:
    """The cache ``mode`` resolved for ``dataset``: "memory", "gpu" or "off" (see the module docstring)."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {mode!r}")
    device = checked_device(device) if device is not None else None  # one line for a GPU this machine lacks
    if mode == "gpu" and (device is None or device.type != "cuda"):
        raise ValueError(f"cache 'gpu' needs a CUDA device, got {device}")
    if mode != "auto":
        return mode
    need = cache_bytes(dataset)
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= free // 5:
            return "gpu"
    copies = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # every process on this node holds one
    return "memory" if need * copies <= _available_host_memory() // 2 else "off"


def _bad(err: BadImageError, skip: bool, skipped: list[str]) -> None:
    if not skip:
        raise BadImageError(err.path, f"{err.reason} (--skip-bad-images leaves such files out)") from err
    warnings.warn(f"skipping bad image {printable(str(err))}", BadImageWarning, stacklevel=3)
    skipped.append(err.path)


def prepare_images(dataset: Dataset, cache: str = "auto", *, skip_bad_images: bool = False,
                   device: torch.device | str | None = None, progress: bool = True,
                   workers: int | None = None, desc: str = "decoding") -> Dataset:
    """``dataset`` ready for training: an :class:`ImageView` (cached and/or without bad images) or itself.

    Args:
        dataset: any dataset; one without ``decode`` (e.g. SyntheticParts, already in memory) is returned as is.
        cache: "auto", "memory", "gpu" or "off" (see the module docstring).
        skip_bad_images: leave out images that do not decode, one warning per file (else the first raises).
        device: the training device ("auto" may pick a GPU cache on CUDA).
        progress: show a progress bar while decoding (only when stderr is a terminal).
        workers: decoding threads (default: :func:`~protokern.utils.default_num_workers`, at least 1).
        desc: the progress bar's label.
    """
    if not callable(getattr(dataset, "decode", None)) or (isinstance(dataset, ImageView) and dataset.cached):
        return dataset  # (a cached view is ready: decoding it again would hold a second copy)
    mode = choose_cache(dataset, cache, device)
    if mode == "off" and not skip_bad_images:
        return dataset
    keep = mode != "off"
    size = int(dataset.image_size)
    images = torch.empty((len(dataset), 3, size, size), dtype=torch.uint8) if keep else None
    good, skipped = [], []

    def decode(index: int):
        try:
            return index, dataset.decode(index), None
        except BadImageError as err:
            return index, None, err

    from tqdm.auto import tqdm

    threads = max(1, default_num_workers() if workers is None else int(workers))
    with ThreadPoolExecutor(threads) as pool:
        results = pool.map(decode, range(len(dataset)))
        for index, image, err in tqdm(results, total=len(dataset), desc=desc, leave=False, dynamic_ncols=True,
                                      disable=not progress or not sys.stderr.isatty()):
            if err is not None:
                _bad(err, skip_bad_images, skipped)
                continue
            if image.shape != (3, size, size):
                raise ValueError(f"{desc}: item {index} decoded to {tuple(image.shape)}, expected (3, {size}, {size})")
            if keep:
                images[index] = image
            good.append(index)
    if mode == "gpu":
        images = images.to(device)
    return ImageView(dataset, good, skipped, images)


def _index_chain(dataset):
    """``(view, to_view)`` when ``dataset`` is a cached :class:`ImageView` or one seen through index wrappers
    (Subset-like: ``.dataset`` and ``.indices``; repeat-like: ``.dataset`` and ``.copies``, item i is
    ``dataset[i % len(dataset)]``); ``to_view`` maps an int64 index tensor to view indices. Else None."""
    steps = []
    for _ in range(16):
        if isinstance(dataset, ImageView):
            if not dataset.cached:
                return None

            def to_view(indices: torch.Tensor) -> torch.Tensor:
                for kind, value in reversed(steps):
                    indices = value[indices] if kind == "indices" else indices % value
                return indices
            return dataset, to_view
        inner = getattr(dataset, "dataset", None)
        if inner is None:
            return None
        if getattr(dataset, "indices", None) is not None:
            steps.insert(0, ("indices", torch.as_tensor(list(dataset.indices), dtype=torch.int64)))
        elif isinstance(getattr(dataset, "copies", None), int):
            steps.insert(0, ("modulo", len(inner)))
        else:
            return None
        dataset = inner
    return None


class CachedBatches:
    """Training batches from a cached :class:`ImageView`, in the order of ``sampler`` (as a DataLoader would).

    ``dataset`` is the view or the view seen through Subset-like / repeat-like wrappers (see
    :func:`cached_batches`). Each batch is gathered as uint8 on the cache's device (into pinned memory when the
    cache is on the host and ``device`` is a GPU), copied to ``device`` on a side stream without blocking,
    converted to float32 / 255 there, and prepared one batch ahead of the one being trained on. Yields
    ``(images, labels)`` on ``device``; ``sampler`` (e.g. a DistributedSampler) keeps its ``set_epoch``.
    """

    def __init__(self, dataset, sampler, batch_size: int, device: torch.device | str, drop_last: bool = False):
        chain = _index_chain(dataset)
        if chain is None:
            raise TypeError("CachedBatches needs a cached ImageView (see prepare_images), possibly under "
                            "Subset-like or repeat-like wrappers")
        self.view, self._to_view = chain
        self.dataset, self.sampler, self.batch_size = dataset, sampler, int(batch_size)
        self.device, self.drop_last = torch.device(device), drop_last
        self._pin = self.device.type == "cuda" and self.view.device.type == "cpu"
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _fetch(self, indices: list[int]):
        idx = self._to_view(torch.as_tensor(indices, dtype=torch.int64))
        labels = self.view.labels(idx)
        out = None
        if self._pin:
            out = torch.empty((len(indices), *self.view.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
        if self._stream is None:
            return uint8_to_float(self.view.uint8_batch(idx, out=out).to(self.device)), labels.to(self.device), None
        # everything on the side stream (a GPU gather too), so its temporaries live and die there
        with torch.cuda.stream(self._stream):
            images = uint8_to_float(self.view.uint8_batch(idx, out=out).to(self.device, non_blocking=True))
            labels = labels.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return images, labels, done

    def _ready(self, batch):
        """``(images, labels)`` usable on the current stream (it waits for this batch only, not the next)."""
        images, labels, done = batch
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            images.record_stream(current)
            labels.record_stream(current)
        return images, labels

    def __iter__(self):
        if self._stream is not None:  # the cache's own writes first; after that the side stream runs ahead
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        ahead = None
        for indices in BatchSampler(self.sampler, self.batch_size, self.drop_last):
            batch = self._fetch(indices)
            if ahead is not None:
                yield self._ready(ahead)
            ahead = batch
        if ahead is not None:
            yield self._ready(ahead)


def cached_batches(dataset, sampler, batch_size: int, device: torch.device | str,
                   drop_last: bool = False) -> CachedBatches | None:
    """:class:`CachedBatches` over ``dataset`` when it reads a cached view (see :class:`CachedBatches`), else None."""
    if _index_chain(dataset) is None:
        return None
    return CachedBatches(dataset, sampler, batch_size, device, drop_last)
