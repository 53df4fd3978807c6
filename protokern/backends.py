"""Backend registry of the fused prototype op: which implementations work here, and which 'auto' picks.

Every backend module exposes ``forward(z3, p, eps, precision)`` and
``backward(grad_sim, grad_dist, z3, p, patch_index, dist, eps)`` (see docs/design.md).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import subprocess
from types import ModuleType

import torch

from protokern.utils import first_line

BACKENDS = ("torch", "triton", "cuda")
SEARCH_PRECISIONS = ("highest", "high", "medium")  # FFMA, 3xTF32, TF32 products in the certified search
# What precision="auto" (the default) searches with on each backend. Every precision returns the same outputs
# (certified search, docs/design.md), so this is a speed choice alone, taken from the fastest op-only fwd+bwd
# (CUDA-graph replays) of an H200 at all four default shapes (benchmarks/results/distance-2026-11-30-h200-v12.md):
# - cuda: "high" (3xTF32): 151 / 1265 / 498 / 1607 us at (80,128,7x7,2000) / (128,256,14x14,2000) /
#   (64,128,7x7,10000) / (32,512,28x28,2000), against 159 / 1315 / 527 / 1688 at "medium" (its wider bound
#   rescores more patches) and 185 / 1585 / 643 / 2147 at "highest".
# - triton: "medium" (TF32): 405 / 3738 / 1323 / 5171 us, against 416 / 4129 / 1396 / 5969 at "high" and
#   652 / 7393 / 2353 / 10983 at "highest".
# - torch: "highest": "high" and "medium" emulate TF32 products with extra passes, never faster.
AUTO_PRECISION = {"torch": "highest", "triton": "medium", "cuda": "high"}
_log = logging.getLogger("protokern")


@functools.cache
def _triton_reason() -> str | None:
    try:
        importlib.import_module("protokern.kernels.prototype_distance")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
        return f"triton kernels failed to import: {exc}"
    return None


@functools.cache
def _triton_gpu_reason() -> str | None:
    """Why Triton cannot launch kernels on this GPU machine, or None. At first use Triton builds a small C module
    (its CUDA utilities) with the host C compiler and Python's headers; without them (a slim container) every
    launch would fail deep inside Triton, so it is built (or loaded from Triton's cache) once, here."""
    reason = _triton_reason()
    if reason is not None:
        return reason
    try:
        import triton

        triton.runtime.driver.active.utils  # noqa: B018 - the build (or cache load) is the probe
    except Exception as exc:  # noqa: BLE001 - whatever fails here fails every launch
        if isinstance(exc, subprocess.CalledProcessError):
            detail = f"{os.path.basename(str(exc.cmd[0]))} failed with exit status {exc.returncode}"
        else:
            detail = first_line(exc)
        return (f"triton cannot build its CUDA launcher here ({detail}); it needs a C compiler (gcc or clang, or "
                "CC) and the Python headers (python3-dev)")
    return None


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device_type``, or None if it can."""
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device"
            return _triton_gpu_reason()
        if device_type != "cpu" or not _interpreter():
            return f"runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (got {device_type})"
        return _triton_reason()
    if name == "cuda":
        if device_type != "cuda":
            return f"runs on CUDA tensors only (got {device_type})"
        from protokern import _cuda

        return _cuda.available()
    return f"unknown backend {name!r}; choose from 'auto', " + ", ".join(repr(b) for b in BACKENDS)


def check_name(backend) -> str:
    """``backend`` if it names a backend or is "auto", else the one-line ``ValueError`` of an unknown name
    (whether it runs on a device is :func:`resolve`'s question)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(_unavailable(backend, "cpu"))
    return backend


def available_backends(device: str | torch.device | None = None) -> dict[str, str | None]:
    """Map each backend name to None if it works for tensors on ``device``, else the reason it does not.

    ``device`` defaults to CUDA when a GPU is visible, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: _unavailable(name, device_type) for name in BACKENDS}


_RESOLVED: dict[tuple[str, str], str] = {}


def resolve(backend: str, device_type: str) -> str:
    """Turn a backend request into a usable backend name for ``device_type``, or raise.

    Cached: 'auto' is decided (and logged) once per device type. ``torch.compile`` does not trace the decision
    (it imports modules and probes devices): it runs it eagerly and treats the answer as a constant.
    """
    if not isinstance(backend, str):  # (the cache key must be hashable)
        raise ValueError(_unavailable(backend, device_type))
    key = (backend, device_type)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(backend, device_type)
    return _RESOLVED[key]


@torch.compiler.assume_constant_result  # torch.compile calls it eagerly and bakes in the answer
def _resolve(backend: str, device_type: str) -> str:
    if backend == "auto":
        from protokern import _cuda

        order = ("cuda", "triton", "torch") if device_type == "cuda" else ("torch",)
        name = next(b for b in order if _unavailable(b, device_type) is None)
        skipped = {b: _unavailable(b, device_type) for b in order[:order.index(name)]}
        if skipped and (name == "torch" or _cuda.built()):  # a fused backend that should run here does not
            _log.warning("protokern: backend 'auto' -> %r for %s tensors, not the fastest: %s", name, device_type,
                         "; ".join(f"{b}: {why}" for b, why in skipped.items()))
        else:
            _log.info("protokern: backend 'auto' -> %r for %s tensors", name, device_type)
        return name
    reason = _unavailable(backend, device_type)
    if reason is not None:
        if backend not in BACKENDS:
            raise ValueError(reason)
        raise RuntimeError(f"backend {backend!r} is not available for {device_type} tensors: {reason}")
    return backend


def search_precision(name: str, precision: str) -> str:
    """The search precision backend ``name`` (already resolved) runs for ``precision`` ("auto" or one of
    ``SEARCH_PRECISIONS``, already checked)."""
    return AUTO_PRECISION[name] if precision == "auto" else precision


def features_layout(name: str, z: torch.Tensor) -> torch.Tensor:
    """z (B, D, H, W) laid out as backend ``name``'s kernels read it: triton's gather whole channel vectors and
    take them with unit channel stride (``channels_innermost``: a channels_last copy unless already so); the
    others read any strides. The op lays z out once, inside the autograd graph, so that the forward and the
    backward share the copy instead of each making its own."""
    if name != "triton":
        return z
    from protokern.kernels.prototype_distance import channels_innermost

    return channels_innermost(z)


def get(name: str) -> ModuleType:
    """The module implementing backend ``name`` (already resolved)."""
    if name == "torch":
        from protokern import torch_backend as module
    elif name == "triton":
        from protokern.kernels import prototype_distance as module
    else:
        from protokern import _cuda as module
    return module
