"""The "cuda" backend: a thin wrapper over the compiled extension ``protokern._C`` (csrc/).

The extension registers ``torch.ops.protokern_C.forward`` and ``torch.ops.protokern_C.backward``
(CUDA kernels only); this module loads it lazily, registers their fake (meta) implementations so that
they trace under ``torch.compile`` / ``opcheck``, and exposes the backend functions of docs/design.md.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch import Tensor

from protokern.utils import first_line


@functools.cache
def _load() -> str | None:
    """Import the extension once; None on success, else why it is unusable."""
    try:
        importlib.import_module("protokern._C")  # loading the library registers the ops
    except ModuleNotFoundError as exc:
        if exc.name != "protokern._C":
            raise
        return ("protokern._C not built (no CUDA toolkit found at install time, or PROTOKERN_NO_CUDA=1: "
                "`pip install -v` says which; reinstall with CUDA_HOME set to build it)")
    except ImportError as exc:  # built, but does not load (e.g. built against another torch)
        return f"protokern._C failed to load (rebuild it against this torch): {exc}"
    _register_fakes()
    return None


def available() -> str | None:
    """None if the cuda backend can run here (on the current CUDA device), else the reason it cannot."""
    reason = _load()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _device_reason(torch.cuda.current_device())


def built() -> bool:
    """Whether the extension was built at all (an install without a CUDA toolkit has none)."""
    return importlib.util.find_spec("protokern._C") is not None


def _probe(device: int) -> None:
    """A one-element forward on CUDA device ``device``."""
    z = torch.zeros(1, 1, 1, device=f"cuda:{device}")
    forward(z, torch.zeros(1, 1, device=z.device), 1e-4)


@functools.cache
def _device_reason(device: int) -> str | None:
    """Why the extension's kernels cannot run on CUDA device ``device``, or None; probed once per device. A build
    for other GPUs (TORCH_CUDA_ARCH_LIST defaults to the build machine's GPU, or 9.0 without one) has no kernel
    image for this one, which would otherwise surface as a CUDA error at the first real call."""
    try:
        _probe(device)
    except RuntimeError as exc:
        major, minor = torch.cuda.get_device_capability(device)
        first = first_line(exc)
        return (f"protokern._C cannot run on cuda:{device} (sm_{major}{minor}): {first}; rebuild it on this "
                f"machine, or with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
    return None


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"protokern cuda backend unavailable: {reason}")


def forward(z3: Tensor, p: Tensor, eps: float, precision: str = "highest") -> tuple[Tensor, Tensor, Tensor]:
    """(similarity, min_distances, patch_index), each (B, M), for z3 (B, D, HW) float32 (any strides)
    and p (M, D) float32 on one CUDA device. See docs/design.md.

    ``precision`` ("highest" FFMA, "high" 3xTF32, "medium" TF32 search) changes speed only: every patch the
    search cannot rule out is rescored exactly in fp32 (csrc/forward.cuh), so the outputs are the same for
    all three: the lowest-index exact minimum, NaN outputs and the lowest NaN patch where a distance is NaN,
    +inf patches never winning unless all are. A build whose kernels lack the tensor-core code (below
    compute_80) runs the FFMA search for every precision."""
    _require()
    return torch.ops.protokern_C.forward(z3, p, float(eps), precision)


def backward(grad_sim: Tensor, grad_min: Tensor, z3: Tensor, p: Tensor, patch_index: Tensor,
             min_distances: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(grad_z3 (B, D, HW) contiguous, grad_p (M, D)), float32, in one kernel launch; z3 is read with its own
    strides (no copy). Bitwise deterministic: every sum runs in a fixed order that does not depend on z3's
    layout (csrc/backward.cuh)."""
    _require()
    return torch.ops.protokern_C.backward(grad_sim, grad_min, z3, p, patch_index, min_distances, float(eps))


def _register_fakes() -> None:
    """Shape/dtype-only implementations of the two ops (for FakeTensor tracing and opcheck)."""

    @torch.library.register_fake("protokern_C::forward")
    def _forward_fake(z, p, eps, precision):
        torch._check(z.dim() == 3 and p.dim() == 2, lambda: "expected z (B, D, HW) and p (M, D)")
        torch._check(z.shape[1] == p.shape[1], lambda: "channel mismatch between z and p")
        shape = (z.shape[0], p.shape[0])
        return (z.new_empty(shape, dtype=torch.float32), z.new_empty(shape, dtype=torch.float32),
                z.new_empty(shape, dtype=torch.int64))

    @torch.library.register_fake("protokern_C::backward")
    def _backward_fake(grad_sim, grad_min, z, p, patch_index, min_distances, eps):
        torch._check(z.dim() == 3 and p.dim() == 2, lambda: "expected z (B, D, HW) and p (M, D)")
        return z.new_empty(z.shape, dtype=torch.float32), p.new_empty(p.shape, dtype=torch.float32)
