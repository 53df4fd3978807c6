"""The fused prototype op: public functions, input checks, torch.library registration and autograd.

``prototype_similarity`` is registered as the custom op ``protokern::prototype_similarity`` with a fake
implementation and a hand-written backward (``protokern::prototype_similarity_backward``), so it works
under ``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck`` for every backend. Eager calls
go through an equivalent ``torch.autograd.Function`` over the same implementation, which skips the custom-op
dispatch (tens of microseconds a call, comparable to the kernels themselves).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from protokern import backends, torch_backend

PRECISIONS = ("highest", "high", "medium")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_EPS_CHECKED: dict[float, bool] = {}


@torch.compiler.assume_constant_result  # torch.compile evaluates it eagerly, like the eps it checks
def _similarity_at_zero_is_finite(eps: float) -> bool:
    if eps not in _EPS_CHECKED:
        e = torch.tensor(eps, dtype=torch.float32)
        _EPS_CHECKED[eps] = bool(e > 0) and bool(torch.isfinite(torch.log1p((1 - e) / e)))
    return _EPS_CHECKED[eps]


def check_eps(eps) -> float:
    """Return ``eps`` as a float if it is a real number > 0 whose similarity at d = 0,
    log((0 + 1) / (0 + eps)), is finite in float32; raise a one-line error otherwise."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0 and _similarity_at_zero_is_finite(value)):
        raise ValueError(f"eps must be a finite number > 0 whose similarity log(1 / eps) is finite in float32, "
                         f"got {eps!r}")
    return value


def _check(z: Tensor, prototypes: Tensor, eps: float = 1.0, precision: str = "highest") -> Tensor:
    """Validate the op's inputs; return the prototypes as an (M, D) view."""
    if not isinstance(z, Tensor) or not isinstance(prototypes, Tensor):
        raise TypeError("z and prototypes must be torch.Tensors")
    if z.dim() != 4:
        raise ValueError(f"z must be 4-D (B, D, H, W), got shape {tuple(z.shape)}")
    if not (prototypes.dim() == 2 or (prototypes.dim() == 4 and prototypes.shape[2:] == (1, 1))):
        raise ValueError(f"prototypes must be (M, D) or (M, D, 1, 1), got shape {tuple(prototypes.shape)}")
    p = prototypes.flatten(1)
    if z.shape[1] != p.shape[1]:
        raise ValueError(f"channel mismatch: z has D={z.shape[1]} but prototypes have D={p.shape[1]}")
    if z.shape[1] == 0 or z.shape[2] * z.shape[3] == 0 or p.shape[0] == 0:
        raise ValueError(f"empty input: z {tuple(z.shape)}, prototypes {tuple(prototypes.shape)}")
    if z.device != p.device:
        raise ValueError(f"device mismatch: z on {z.device}, prototypes on {p.device}")
    for name, t in (("z", z), ("prototypes", p)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    check_eps(eps)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return p


def _out_dtype(z: Tensor, p: Tensor, backend: str) -> torch.dtype:
    if backend == "torch":
        return torch_backend._compute_dtype(z, p)
    return torch.float32


def _backend_inputs(z: Tensor, p: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    z3, p = z.flatten(2), p.contiguous()  # flatten(2) is a view for contiguous and channels_last z
    if backend == "cuda":
        z3, p = z3.float(), p.float()
    return z3, p


def _forward_impl(z: Tensor, p: Tensor, eps: float, backend: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    z3, p = _backend_inputs(z, p, backend)
    if z3.shape[0] == 0:
        return _forward_fake(z, p, eps, backend, precision)
    sim, dist, idx = backends.get(backend).forward(z3, p, eps, precision)
    dtype = _out_dtype(z, p, backend)
    return sim.to(dtype), dist.to(dtype), idx


def _backward_impl(grad_sim, grad_dist, z, p, idx, dist, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    z3, p3 = _backend_inputs(z, p, backend)
    if z3.shape[0] == 0:
        return torch.zeros_like(z, memory_format=torch.contiguous_format), torch.zeros_like(p)
    grad_z3, grad_p = backends.get(backend).backward(grad_sim, grad_dist, z3, p3, idx, dist, eps)
    return grad_z3.view(z.shape).to(z.dtype), grad_p.to(p.dtype)


# torch.compile path: custom ops with fake implementations, so graphs capture the op whole.
@torch.library.custom_op("protokern::prototype_similarity", mutates_args=())
def _forward_op(z: Tensor, p: Tensor, eps: float, backend: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(z, p, eps, backend, precision)


@_forward_op.register_fake
def _forward_fake(z, p, eps, backend, precision):
    dtype = _out_dtype(z, p, backend)
    shape = (z.shape[0], p.shape[0])
    return (z.new_empty(shape, dtype=dtype), z.new_empty(shape, dtype=dtype),
            z.new_empty(shape, dtype=torch.int64))


@torch.library.custom_op("protokern::prototype_similarity_backward", mutates_args=())
def _backward_op(grad_sim: Tensor, grad_dist: Tensor, z: Tensor, p: Tensor, idx: Tensor, dist: Tensor,
                 eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad_sim, grad_dist, z, p, idx, dist, eps, backend)


@_backward_op.register_fake
def _backward_fake(grad_sim, grad_dist, z, p, idx, dist, eps, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(p)


def _setup_context(ctx, inputs, output):
    z, p, eps, backend, _ = inputs
    _, dist, idx = output
    ctx.save_for_backward(z, p, idx, dist)  # O(B*M) state beyond the inputs
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad_sim, grad_dist, _grad_idx):
    z, p, idx, dist = ctx.saved_tensors
    grad_sim = torch.zeros_like(dist) if grad_sim is None else grad_sim
    grad_dist = torch.zeros_like(dist) if grad_dist is None else grad_dist
    backward = _backward_impl if getattr(ctx, "eager", False) else _backward_op
    grad_z, grad_p = backward(grad_sim, grad_dist, z, p, idx, dist, ctx.eps, ctx.backend)
    return grad_z, grad_p, None, None, None


class _PrototypeSimilarity(torch.autograd.Function):
    """Eager path: the custom op's implementation and autograd without the custom-op dispatch overhead."""

    @staticmethod
    def forward(ctx, z, p, eps, backend, precision):
        output = _forward_impl(z, p, eps, backend, precision)
        _setup_context(ctx, (z, p, eps, backend, precision), output)
        ctx.mark_non_differentiable(output[2])
        ctx.eager = True
        return output

    backward = staticmethod(_backward)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def prototype_similarity(z: Tensor, prototypes: Tensor, *, eps: float = 1e-4, backend: str = "auto",
                         precision: str = "highest") -> tuple[Tensor, Tensor]:
    """Fused ProtoPNet prototype layer: log-similarity and min squared-L2 distance of each prototype.

    Args:
        z: features (B, D, H, W), float16/bfloat16/float32 (float64 on the torch backend), any strides.
        prototypes: (M, D) or (M, D, 1, 1), same device as ``z``.
        eps: the epsilon of ``log((d + 1) / (d + eps))``; a finite number > 0 with log(1 / eps) finite in
            float32 (about 3e-39 < eps < 1.7e7).
        backend: "auto" (fastest available for the device), "torch", "triton" or "cuda".
        precision: "highest" (exact fp32 products), "high" (3xTF32) or "medium" (TF32) for the search over
            patches. The search is certified (docs/design.md): every patch it cannot rule out is rescored
            exactly, so the precision changes the speed, not the result.

    Returns:
        ``(similarity, min_distances)``, each (B, M), float32 (float64 for float64 inputs on the torch
        backend), where ``min_distances[b, m] = min_{h,w} ||z[b, :, h, w] - p[m]||^2`` and
        ``similarity = log((min_distances + 1) / (min_distances + eps))``. Gradients flow to ``z`` (at the
        winning patch only: the lowest h*W + w of the exact minimum) and to ``prototypes``. A NaN distance
        makes that (b, m) NaN; a patch holding +-inf is at distance +inf (similarity 0 if every patch is).
    """
    p = _check(z, prototypes, eps, precision)
    name = backends.resolve(backend, z.device.type)
    op = _forward_op if torch.compiler.is_compiling() else _PrototypeSimilarity.apply
    sim, dist, _ = op(z, p, float(eps), name, precision)
    return sim, dist


def nearest_patches(z: Tensor, prototypes: Tensor, *, backend: str = "auto",
                    precision: str = "highest") -> tuple[Tensor, Tensor]:
    """Min squared-L2 distance (B, M) and winning patch index (B, M) int64 (``h * W + w``); no gradient.

    The same winners and distances as ``prototype_similarity`` (lowest index of the exact minimum, or of
    the first NaN), at every ``precision``."""
    p = _check(z, prototypes, precision=precision)
    name = backends.resolve(backend, z.device.type)
    with torch.no_grad():
        _, dist, idx = _forward_impl(z, p, 1.0, name, precision)
    return dist, idx


def prototype_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """Full squared-L2 distance map (B, M, H, W), clamped at 0: for heatmaps, not for training.

    Materialises B*M*H*W values; use ``nearest_patches`` or ``prototype_similarity`` where the min is enough.
    """
    p = _check(z, prototypes)
    B, _, H, W = z.shape
    return torch_backend.distances(z.flatten(2), p).view(B, p.shape[0], H, W)


def log_similarity(distances: Tensor, eps: float = 1e-4) -> Tensor:
    """ProtoPNet's similarity ``log((d + 1) / (d + eps))`` of squared distances, elementwise.

    The one Python home of the formula (the fused kernels carry their own copy): computed as
    ``log1p((1 - eps) / (d + eps))``, accurate for large ``d`` and exactly 0 at ``d = +inf``.
    """
    return torch_backend.similarity(distances, eps)
