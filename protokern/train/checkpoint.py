"""The trainer's side of checkpoints: RNG states in checkpoint-safe types, the run-directory lock, and the
clean-up of temporary files a killed write left behind. Reading and writing files is
:mod:`protokern.checkpoint` (re-exported here)."""

from __future__ import annotations

import fcntl
import glob
import os
import random
import warnings

import numpy as np
import torch

from protokern.checkpoint import (BEST, INTERRUPTED, LAST, CheckpointError, atomic_save, atomic_write_text,
                                  find_checkpoint, load_checkpoint, nonfinite_tensors, save_checkpoint)

__all__ = ["BEST", "INTERRUPTED", "LAST", "CheckpointError", "RunDirLocked", "RunLock", "atomic_save",
           "atomic_write_text", "find_checkpoint", "linked_entry", "load_checkpoint", "nonfinite_tensors",
           "remove_orphan_temps", "rng_state", "save_checkpoint", "set_rng_state"]

LOCK_FILE = ".lock"


def rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device), NumPy and Python's ``random``, as tensors and plain
    values only (what ``torch.load(weights_only=True)`` reads back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), list(internal), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output (also the first checkpoint format's NumPy tuple); CUDA states only if
    the device count matches."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = (numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["pos"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive ``fcntl`` lock on ``run_dir/.lock`` for as long as this object is open.

    The file holds the holder's PID; a second process gets :class:`RunDirLocked` naming it. The lock goes
    with the process (also on SIGKILL), so a stale ``.lock`` file never blocks a later run.
    """

    def __init__(self, run_dir: str):
        self._fd: int | None = None
        self.path = os.path.join(run_dir, LOCK_FILE)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never truncate a link's target
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirLocked(f"run directory {run_dir} is in use by process {holder} (another training or "
                               f"--resume of it); wait for it to end or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()


def linked_entry(run_dir: str) -> str | None:
    """The first symbolic link inside ``run_dir`` (the folder itself may be one), as "name -> target", or None.

    The run writes its files in place (metrics are appended, push PNGs and pages saved by name): through a link
    left in a shared or handed-over folder it would overwrite a file elsewhere."""
    folders = [run_dir]
    while folders:  # (scandir's entry types: no stat per file, for the ~10^5 PNGs of a long run's pushes)
        folder = folders.pop()
        try:
            listing = os.scandir(folder)
        except PermissionError:
            if folder == run_dir:
                raise
            continue  # a folder the run cannot read (a mount's lost+found) it cannot write into either
        with listing as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_symlink():
                    return f"{os.path.relpath(entry.path, run_dir)} -> {os.readlink(entry.path)}"
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return None


def remove_orphan_temps(run_dir: str) -> list[str]:
    """Remove the ``NAME.XXXX.tmp`` files an interrupted atomic write left in ``run_dir`` (call it holding the
    :class:`RunLock`, so that no live writer owns them); return their paths."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), "*.*.tmp"))):
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        warnings.warn(f"removed {len(removed)} temporary file(s) of an interrupted write: "
                      f"{', '.join(os.path.basename(p) for p in removed)}", stacklevel=2)
    return removed


