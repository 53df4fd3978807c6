"""make_loader: one place for DataLoader settings (shuffling, pinning, workers); the trainer's sharded,
repeating training loader is protokern.train.data.train_loader."""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from protokern.utils import STOP_SIGNALS, default_num_workers, positive_int

from .cache import find_view

__all__ = ["make_loader", "worker_init", "worker_init_fn"]


def worker_init(worker_id: int, ignore_ctrl_c: bool = False) -> None:
    """``worker_init_fn`` of protokern's loaders: a SIGTERM from the main process (its shutdown) ends the worker at
    once, as torch's own handler does; a SIGTERM from anyone else (a scheduler signalling every process of the job:
    SLURM, systemd, ``kill`` of the process group) and a terminal's Ctrl-C (SIGINT, ignored) are left to the main
    process, whose orderly stop then shuts the workers down. Under torch's handler the worker would die of it, and
    the main process would get "DataLoader worker is killed" in the middle of saving. Ctrl-C is ignored only with
    ``ignore_ctrl_c``, which :func:`worker_init_fn` sets where the main process takes it as a stop
    (``utils.STOP_SIGNALS``: ``python -m protokern.train``); elsewhere (a notebook's interrupt, a script) it ends
    the workers as torch's own. Where ``sigwaitinfo`` is missing (macOS, Windows), and in workers started by
    spawn or forkserver (Python 3.14's default on Linux: threads started before this runs do not block the
    signal), torch's SIGTERM handling stays: a foreign SIGTERM ends the worker, and the main process's orderly
    stop still wins (``utils.stop_deferred``)."""
    if ignore_ctrl_c:  # a terminal's Ctrl-C reaches every process of its group
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by every thread started from here
    parent = multiprocessing.parent_process()  # the main process under fork, spawn and forkserver alike
    threading.Thread(target=_sigterm_watch, args=(parent.pid if parent else os.getppid(),), name="protokern-sigterm",
                     daemon=True).start()


def worker_init_fn():
    """The ``worker_init_fn`` of a loader built in this process: :func:`worker_init`, told here whether this process
    takes Ctrl-C as a stop (decided in the main process: workers started by spawn or forkserver import
    ``protokern.utils`` afresh and could not see it)."""
    return functools.partial(worker_init, ignore_ctrl_c=signal.SIGINT in STOP_SIGNALS)


def _sigterm_watch(parent: int) -> None:
    """Take each SIGTERM of this worker; exit on the main process's, ignore the others."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int | None = None,
                drop_last: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader for ``dataset`` with protokern's defaults.

    Args:
        dataset: any map-style dataset.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch; the order is reproducible from ``seed``.
        num_workers: worker processes; None picks :func:`protokern.utils.default_num_workers`.
        drop_last: drop the last incomplete batch.
        seed: seed of the shuffling order.

    Memory is pinned when CUDA is available; workers persist across epochs when there are any. Over a
    cached :class:`~protokern.data.cache.ImageView` (also under Subset wrappers) items are
    gathered in this process (no workers): they are already decoded, and a GPU cache cannot cross processes.
    """
    batch_size = positive_int("batch_size", batch_size)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    view = find_view(dataset)
    if view is not None and view.cached:
        workers = 0
    # the order from a generator of its own: the loader's draws a worker base seed at every epoch's start
    # without persistent workers and only once with them, which would put the order out of step with the
    # number of workers (and so with the machine and the cache) from the second epoch on
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed + 1),  # the workers' base seed
        worker_init_fn=worker_init_fn(),
    )
