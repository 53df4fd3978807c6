"""Checkpoints: atomic writes, RNG states, and finding the checkpoint of a run directory."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

LAST, BEST, INTERRUPTED = "last.pt", "best.pt", "interrupted.pt"


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: readers never see a
    partial file, and an interrupted write leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device), NumPy and Python's ``random``."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output (CUDA states only if the device count matches)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def find_checkpoint(path: str) -> str:
    """``path`` if it is a file, else ``path/last.pt``; raise ``FileNotFoundError`` if missing."""
    candidate = os.path.join(path, LAST) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"no checkpoint at {candidate}")
    return candidate


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by the trainer (a dict; see ``protokern.train.main``)."""
    path = find_checkpoint(path)
    # RNG states hold NumPy arrays / Python tuples: trusted files written by this trainer
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not a protokern training checkpoint")
    return state
