"""The fused prototype op: public functions, input checks, torch.library registration and autograd.

``prototype_similarity`` is registered as the custom op ``protokern::prototype_similarity`` with a fake
implementation and a hand-written backward (``protokern::prototype_similarity_backward``), so it works
under ``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck`` for every backend. Eager calls
go through an equivalent ``torch.autograd.Function`` over the same implementation, which skips the custom-op
dispatch (tens of microseconds a call, comparable to the kernels themselves).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from protokern import backends, torch_backend
from protokern.utils import positive_int

try:  # private functorch API, for _refuse_nested_forward_mode only: where it moved, that check is skipped
    from torch._C._functorch import TransformType as _TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_interpreters
except ImportError:  # pragma: no cover
    _functorch_interpreters = None

PRECISIONS = ("auto",) + backends.SEARCH_PRECISIONS  # "auto": backends.AUTO_PRECISION
SIMILARITIES = ("log", "linear", "cosine")


def _cosine_eps() -> float:
    # the |x| floor of the 'cosine' similarity (F.cosine_similarity's default eps), as the unit-vector Function
    # reads it: torch.compile(dynamic=True) makes a float read from a module global a graph input, which it
    # cannot lift into an autograd.Function's subgraph (an internal assertion); a call returning it is constant
    return 1e-8


COSINE_EPS = _cosine_eps()
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


EPS_RANGE = (1e-30, 1.0)  # [low, high) of the "log" similarity's eps (check_eps)
_UNUSED_EPS = 0.5  # the eps of calls that use no similarity (nearest_patches): any value in EPS_RANGE


def check_eps(eps) -> float:
    """Return ``eps`` as a float if it lies in ``EPS_RANGE``, [1e-30, 1); raise a one-line error otherwise.

    Below 1: log((d + 1) / (d + eps)) falls as the distance grows only for eps < 1 (at eps = 1 it is 0, above
    it rises). From 1e-30: its slope at d = 0, about -1 / eps, is then at most 1e30, so the gradient 2 g (z - p)
    stays finite in float32 for upstream gradients up to ~1e8 (at eps = 1e-38 an upstream gradient of 2
    overflowed it, and inf * (z - p) = inf * 0 made a whole row of grad_p NaN).

    While torch.compile traces, ``eps`` may be a symbolic float (Dynamo makes a float that changed between
    calls dynamic), which only comparisons can read: the same range is checked with them (with
    ``fullgraph=True`` Dynamo reports the ValueError as an unsupported exception)."""
    low, high = EPS_RANGE
    if torch.compiler.is_compiling():
        if not (eps >= low and eps < high):
            raise ValueError(f"eps must be in [{low:g}, {high:g}), got {eps}")
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not (low <= value < high):  # False for NaN
        raise ValueError(f"eps must be in [{low:g}, {high:g}) (the log similarity falls with the distance only for "
                         f"eps < 1; below {low:g} its gradient at d = 0 nears float32's limit), got {eps!r}")
    return value


def _check(z: Tensor, prototypes: Tensor, eps: float = _UNUSED_EPS, precision: str = "auto") -> Tensor:
    """Validate the op's inputs; return the prototypes as an (M, D * kh * kw) view ((M, D) for 1 x 1)."""
    if not isinstance(z, Tensor) or not isinstance(prototypes, Tensor):
        raise TypeError("z and prototypes must be torch.Tensors")
    if z.dim() != 4:
        raise ValueError(f"z must be 4-D (B, D, H, W), got shape {tuple(z.shape)}")
    if prototypes.dim() not in (2, 4):
        raise ValueError(f"prototypes must be (M, D) or (M, D, kh, kw), got shape {tuple(prototypes.shape)}")
    p = prototypes.flatten(1)
    if z.shape[1] != prototypes.shape[1]:
        raise ValueError(f"channel mismatch: z has D={z.shape[1]} but prototypes have D={prototypes.shape[1]}")
    if z.shape[1] == 0 or z.shape[2] * z.shape[3] == 0 or p.shape[0] * p.shape[1] == 0:
        raise ValueError(f"empty input: z {tuple(z.shape)}, prototypes {tuple(prototypes.shape)}")
    window_positions(z.shape[2:], _window(prototypes))
    if z.device != p.device:
        raise ValueError(f"device mismatch: z on {z.device}, prototypes on {p.device}")
    for name, t in (("z", z), ("prototypes", p)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    check_eps(eps)
    check_precision(precision)
    return p


def check_precision(precision) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else a one-line ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def window_size(value) -> tuple[int, int]:
    """``value`` (an int k or a pair (kh, kw) of ints >= 1) as (kh, kw), else a one-line error."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"prototype_size must be an integer or a pair (kh, kw), got {value!r}")
        return positive_int("prototype_size[0]", value[0]), positive_int("prototype_size[1]", value[1])
    k = positive_int("prototype_size", value)
    return k, k


def window_positions(feature_size, window) -> tuple[int, int]:
    """(Hout, Wout): the positions of a (kh, kw) window on a feature map of ``feature_size`` (H, W), or a
    one-line ``ValueError`` where the window is larger than the map."""
    (H, W), (kh, kw) = feature_size, window  # (no int(): symbolic sizes under torch.compile stay symbolic)
    if kh > H or kw > W:
        raise ValueError(f"prototype window {kh} x {kw} is larger than the feature map {H} x {W}")
    return H - kh + 1, W - kw + 1


def _window(prototypes: Tensor) -> tuple[int, int]:
    """(kh, kw) of prototypes (M, D) or (M, D, kh, kw)."""
    return (1, 1) if prototypes.dim() == 2 else (prototypes.shape[2], prototypes.shape[3])


def check_similarity(similarity) -> str:
    """Return ``similarity`` if it is one of ``SIMILARITIES``; raise a one-line error otherwise."""
    if not isinstance(similarity, str) or similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    return similarity


def _unit_parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(u_normal, r, u_small, a, small, inf) of ``_UnitVectors`` for x (N, K, ...), each vector along dim 1.

    ``small``: |x| < COSINE_EPS (zero vectors included; not NaN or inf vectors), ``inf``: some |x_i| = inf;
    every other vector (NaN ones included) is normal. ``u_normal`` = x / |x| and r = |x| (norm scaled by the
    largest |x_i|: no overflow or underflow) on normal vectors; ``u_small`` = x / COSINE_EPS and
    a = sqrt(1 - |u_small|^2) on small ones. Each branch computes on its own vectors only (1 or 0 elsewhere),
    so that derivatives through these torch ops never carry another branch's inf or NaN: differentiable to any
    order.
    """
    with torch.no_grad():  # the masks
        scale = x.abs().amax(1, keepdim=True)  # NaN if the vector holds a NaN
        norm_w = torch.linalg.vector_norm(x / scale, dim=1, keepdim=True)
        small = torch.where(scale == 0, 0.0, scale * norm_w) < _cosine_eps()  # False for NaN and inf vectors
        inf = scale == float("inf")
    xn = torch.where(small | inf, 1.0, x)
    sn = xn.abs().amax(1, keepdim=True)
    wn = xn / sn
    norm = torch.linalg.vector_norm(wn, dim=1, keepdim=True)
    us = torch.where(small, x, 0.0) / _cosine_eps()
    a = torch.where(small, (1 - (us * us).sum(1, keepdim=True)).clamp_min(0).sqrt(), 0.0)
    return wn / norm, sn * norm, us, a, small, inf


class _UnitVectors(torch.autograd.Function):
    """x (N, K, ...) -> (N, K + 2, ...): each vector along dim 1 divided by max(|x|, COSINE_EPS), followed by
    two padding channels (a, 0) (``slot`` 0) or (0, a) (``slot`` 1) with a = sqrt(1 - |x_hat|^2), which is 0
    unless |x| < COSINE_EPS (a = 1 for a zero vector).

    The padding makes every output a unit vector (so the squared distance of a z output and a prototype output
    is exactly 2 - 2 cos, cos = x_hat . y_hat, also for zero vectors, whose cos is 0) without changing any dot
    product between a z output and a prototype output. A vector holding NaN gives NaN; one holding +-inf
    (no NaN) is passed through unchanged, so the fused op puts it at distance +inf. Backward: the exact
    Jacobian of that map ((I - x_hat x_hat^T) / |x| for |x| >= COSINE_EPS; the padding's derivative inside the
    eps ball), recomputed from x (nothing saved but x) in torch ops: differentiable again under
    create_graph=True, vmappable (``generate_vmap_rule``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, slot):
        un, _, us, a, small, inf = _unit_parts(x)
        u = torch.where(small, us, torch.where(inf, x, un))
        pad = (a, torch.zeros_like(a)) if slot == 0 else (torch.zeros_like(a), a)
        return torch.cat((u, *pad), 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.slot = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        un, r, us, a, small, inf = _unit_parts(x)
        K = x.shape[1]
        gu, ga = grad[:, :K], grad[:, K + ctx.slot:K + ctx.slot + 1]
        normal = (gu - (gu * un).sum(1, keepdim=True) * un) / r
        inside = (gu - ga * us / torch.where(small, a, 1.0)) / _cosine_eps()
        return torch.where(small, inside, torch.where(inf, gu, normal)), None


class _UnitVectorsEager(_UnitVectors):
    """``_UnitVectors`` with forward mode (torch.func.jvp, jacfwd, hessian) for eager calls: torch.compile
    cannot trace an autograd.Function that defines ``jvp``, so compiled graphs use the base class."""

    @staticmethod
    def jvp(ctx, dx, _):
        x, = ctx.saved_tensors
        un, r, us, a, small, inf = _unit_parts(x)
        normal = (dx - (dx * un).sum(1, keepdim=True) * un) / r
        du = torch.where(small, dx / _cosine_eps(), torch.where(inf, dx, normal))
        da = torch.where(small, -(us * dx).sum(1, keepdim=True) / (_cosine_eps() * torch.where(small, a, 1.0)), 0.0)
        pad = (da, torch.zeros_like(da)) if ctx.slot == 0 else (torch.zeros_like(da), da)
        return torch.cat((du, *pad), 1)


def _prepare(z: Tensor, prototypes: Tensor, similarity: str, eps: float = _UNUSED_EPS,
             precision: str = "auto") -> tuple[Tensor, Tensor]:
    """Checked inputs of the fused op for any window and similarity: (z' (B, K, Hout, Wout), p' (M, K)).

    1 x 1 'log' and 'linear' calls get today's (z, p) unchanged. A kh x kw window unfolds z (F.unfold: every
    valid position, no padding; channel order d * kh * kw + i * kw + j, that of ``prototypes.flatten(1)``).
    'cosine' maps both sides to unit vectors (``_UnitVectors``) in float32 (float64 if both are float64).
    """
    check_similarity(similarity)
    p = _check(z, prototypes, eps, precision)
    kh, kw = _window(prototypes)
    if (kh, kw) != (1, 1):
        B, _, H, W = z.shape
        z = F.unfold(z, (kh, kw)).view(B, p.shape[1], H - kh + 1, W - kw + 1)
    if similarity == "cosine":
        dtype = torch_backend.compute_dtype(z, p)
        unit = _UnitVectors if torch.compiler.is_compiling() else _UnitVectorsEager
        z, p = unit.apply(z.to(dtype), 0), unit.apply(p.to(dtype), 1)
    return z, p


def _out_dtype(z: Tensor, p: Tensor, backend: str) -> torch.dtype:
    if backend == "torch":
        return torch_backend.compute_dtype(z, p)
    return torch.float32


def _backend_inputs(z: Tensor, p: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    z3, p = z.flatten(2), p.contiguous()  # flatten(2) is a view for contiguous and channels_last z
    if backend == "cuda":
        z3, p = z3.float(), p.float()
    return z3, p


def _forward_impl(z: Tensor, p: Tensor, eps: float, backend: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    check_eps(eps)  # a compiled caller's eps was checked only symbolically (two comparisons: cheap)
    if torch_backend.shapes_only(z):  # the op's outputs are shapes, no kernel runs
        return _forward_fake(z, p, eps, backend, precision)
    z3, p = _backend_inputs(z, p, backend)
    if z3.shape[0] == 0:
        return _forward_fake(z, p, eps, backend, precision)
    sim, dist, idx = backends.get(backend).forward(z3, p, eps, precision)
    dtype = _out_dtype(z, p, backend)
    return sim.to(dtype), dist.to(dtype), idx


def _backward_impl(grad_sim, grad_dist, z, p, idx, dist, eps: float, backend: str) -> tuple[Tensor, Tensor]:
    if torch_backend.shapes_only(z):  # the op's outputs are shapes, no kernel runs
        return _backward_fake(grad_sim, grad_dist, z, p, idx, dist, eps, backend)
    z3, p3 = _backend_inputs(z, p, backend)
    if z3.shape[0] == 0:
        return torch.zeros_like(z, memory_format=torch.contiguous_format), torch.zeros_like(p)
    grad_z3, grad_p = backends.get(backend).backward(grad_sim, grad_dist, z3, p3, idx, dist, eps)
    return grad_z3.view(z.shape).to(z.dtype), grad_p.to(p.dtype)


# torch.compile path: custom ops with fake implementations, so graphs capture the op whole.
@torch.library.custom_op("protokern::prototype_similarity", mutates_args=())
def _forward_op(z: Tensor, p: Tensor, eps: float, backend: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    if not torch_backend.shapes_only(z):  # (cached) a graph traced elsewhere holds the backend resolved there
        backends.resolve(backend, z.device.type)
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
    if not torch_backend.shapes_only(z):
        backends.resolve(backend, z.device.type)
    return _backward_impl(grad_sim, grad_dist, z, p, idx, dist, eps, backend)


@_backward_op.register_fake
def _backward_fake(grad_sim, grad_dist, z, p, idx, dist, eps, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(p)


def _no_second_order(ctx, *grads):
    raise RuntimeError("second derivatives of protokern's op are computed in eager mode only; a compiled, traced or "
                       "exported graph has its first derivatives (call the model eagerly for create_graph=True)")


# (without it, torch's message told the op's user to register an autograd formula)
torch.library.register_autograd("protokern::prototype_similarity_backward", _no_second_order,
                                setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    z, p, eps, backend, _ = inputs
    _, dist, idx = output
    ctx.save_for_backward(z, p, idx, dist)  # O(B*M) state beyond the inputs (z as the backend reads it)
    ctx.eps, ctx.backend = eps, backend


def _legacy_batched(t: Tensor) -> bool:
    return torch._C._functorch.is_legacy_batchedtensor(t)


def _backward(ctx, grad_sim, grad_dist, _grad_idx):
    z, p, idx, dist = ctx.saved_tensors
    grad_sim = torch.zeros_like(dist) if grad_sim is None else grad_sim
    grad_dist = torch.zeros_like(dist) if grad_dist is None else grad_dist
    eager = getattr(ctx, "eager", False)
    backend = ctx.backend
    if eager and torch.is_grad_enabled() and any(
            t.requires_grad for t in (z, p, dist, grad_sim, grad_dist)):
        # create_graph=True (double backward, gradient penalties, torch.func.grad): the kernels' gradients
        # would be constants to autograd, silently dropping every second-order term. The torch backend's
        # backward is written in differentiable torch ops (with `dist` an output of this op, so its own
        # derivative comes back through here): same first-order values, exact second order.
        backend = "torch"
    if _legacy_batched(grad_sim) or _legacy_batched(grad_dist):
        # batched gradients (autograd.grad(is_grads_batched=True), gradcheck's batched checks): torch's older
        # vmap hands them in as BatchedTensors, which no kernel can read; the torch backend's ops it can batch
        backend, eager = "torch", True
    backward = _backward_impl if eager else _backward_op
    grad_z, grad_p = backward(grad_sim, grad_dist, z, p, idx, dist, ctx.eps, backend)
    return grad_z, grad_p, None, None, None


class _PrototypeSimilarity(torch.autograd.Function):
    """Eager path: the custom op's implementation and autograd without the custom-op dispatch overhead."""

    @staticmethod
    def forward(z, p, eps, backend, precision):
        return _forward_impl(z, p, eps, backend, precision)

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward, as torch.func transforms require
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], inputs[1], output[2], output[1])  # as saved for backward
        ctx.mark_non_differentiable(output[2])
        ctx.eager = True

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, dz, dp, *_):
        """Forward mode (torch.func.jvp, jacfwd, hessian): the tangent of the winner's exact distance
        2 (z_win - p) . (dz_win - dp), in torch ops (it holds the (B, M, D) winners at once)."""
        z, p, idx, dist = ctx.saved_tensors
        dtype = torch_backend.compute_dtype(z, p)

        W = z.shape[3]
        images = torch.arange(z.shape[0], device=z.device)[:, None]

        def winners(x):  # (B, D, H, W) -> (B, M, D) at the winning patches, by indexing: no view (torch's
            return x[images, :, idx // W, idx % W].to(dtype)  # older vmap, batched jvp, has no rule for them)

        tangent = (winners(dz) if dz is not None else 0) - (dp.to(dtype)[None] if dp is not None else 0)
        dd = 2 * ((winners(z) - p.to(dtype)[None]) * tangent).sum(-1)
        dsim = dd * torch_backend.similarity_slope(dist, ctx.eps)
        return dsim.to(dist.dtype), dd.to(dist.dtype), None

    @staticmethod
    def vmap(info, in_dims, z, p, eps, backend, precision):
        """torch.vmap (per-sample gradients: ``vmap(grad(...))``): one op call over the vmapped batch folded
        into B (z batched) or into M (prototypes batched); one call per entry when both are."""
        z_dim, p_dim = in_dims[:2]
        n = info.batch_size
        apply = _PrototypeSimilarity.apply
        if p_dim is None:  # (n, B, ...) -> (n * B, ...): every output row is one (entry, image)
            out = apply(z.movedim(z_dim, 0).flatten(0, 1), p, eps, backend, precision)
            return tuple(o.unflatten(0, (n, -1)) for o in out), (0, 0, 0)
        p = p.movedim(p_dim, 0)
        if z_dim is None:  # (n, M, ...) -> (n * M, ...): every output column is one (entry, prototype)
            out = apply(z, p.flatten(0, 1), eps, backend, precision)
            return tuple(o.unflatten(1, (n, -1)) for o in out), (1, 1, 1)
        z = z.movedim(z_dim, 0)
        outs = [apply(z[i], p[i], eps, backend, precision) for i in range(n)]
        return tuple(torch.stack(o) for o in zip(*outs)), (0, 0, 0)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def prototype_similarity(z: Tensor, prototypes: Tensor, *, similarity: str = "log", eps: float = 1e-4,
                         backend: str = "auto", precision: str = "auto") -> tuple[Tensor, Tensor]:
    """Fused ProtoPNet prototype layer: similarity and min distance of each prototype over the map's windows.

    Args:
        z: features (B, D, H, W), float16/bfloat16/float32 (float64 on the torch backend), any strides.
        prototypes: (M, D), (M, D, 1, 1) or (M, D, kh, kw) with kh <= H and kw <= W, same device as ``z``.
            A kh x kw prototype is compared with every valid kh x kw window of ``z`` (no padding, as the
            original's conv2d), over the window's D * kh * kw values.
        similarity: "log" (ProtoPNet's ``log((d + 1) / (d + eps))``), "linear" (``-d``, the original's
            'linear' activation) or "cosine" (the cosine between prototype and window, max over windows).
        eps: the epsilon of the "log" similarity, in [1e-30, 1) (``check_eps``). Checked for every similarity,
            used by "log" only.
        backend: "auto" (fastest available for the device), "torch", "triton" or "cuda".
        precision: "highest" (exact fp32 products), "high" (3xTF32) or "medium" (TF32) for the search over
            windows, or "auto" (the default): the backend's own choice (``backends.AUTO_PRECISION``: each one's
            fastest certified search on an H200, "high" for cuda and "medium" for triton; "highest" for
            torch). The search is certified (docs/design.md): every window it cannot rule out is rescored
            exactly, so the precision changes the speed, not the result.

    Returns:
        ``(similarity, min_distances)``, each (B, M), float32 (float64 for float64 inputs on the torch
        backend). For "log" and "linear", ``min_distances[b, m]`` is the min over windows of the squared L2
        distance ``sum (z_window - p[m])^2``; ``similarity`` is ``log1p((1 - eps) / (d + eps))`` or ``-d``.
        For "cosine", both sides are first divided by ``max(|v|, COSINE_EPS)`` (and padded so that each is a
        unit vector, see ``_UnitVectors``): ``min_distances`` is the min squared distance between those unit
        vectors, ``d = 2 - 2 cos``, and ``similarity = 1 - d / 2`` is the largest cosine (0 for a zero window
        or prototype). Gradients flow to ``z`` (at the winning window only: the lowest index of the exact
        minimum; a window's gradient is folded back onto the pixels it covers) and to ``prototypes``.
        A NaN distance makes that (b, m) NaN; a window holding +-inf is at distance +inf (similarity 0 for
        "log", -inf for "linear", -inf for "cosine" if every window holds one).

    A 1 x 1 "log" call is exactly the single fused op; kh x kw runs that op on the unfolded map (memory
    kh * kw times that of ``z``) and "cosine" on unit vectors, so every backend's certified search, NaN, tie
    and determinism rules and hand-written backward apply unchanged.
    """
    _refuse_nested_forward_mode()
    zin, p = _prepare(z, prototypes, similarity, eps, precision)
    name = backends.resolve(backend, z.device.type)
    zin = backends.features_layout(name, zin)  # saved for the backward as laid out: one copy, if any
    op = _forward_op if torch_backend.traced(zin) else _PrototypeSimilarity.apply
    sim, dist, _ = op(zin, p, float(eps), name, backends.search_precision(name, precision))
    if similarity != "log":  # the fused kernels compute the log similarity themselves
        sim = distance_to_similarity(dist, similarity)
    return sim, dist


def _refuse_nested_forward_mode() -> None:
    """``NotImplementedError`` under nested forward mode (``jacfwd(jacfwd(f))``, a jvp of a jvp): PyTorch gives
    an autograd.Function's forward-mode rule zero derivatives at the outer level there (pytorch/pytorch#197867),
    so the op's second derivatives would silently be 0. One forward level (``jvp``, ``jacfwd``, ``hessian``, which
    is forward over reverse) is exact."""
    if _functorch_interpreters is None or torch.compiler.is_compiling():
        return
    if sum(i.key() == _TransformType.Jvp for i in _functorch_interpreters()) > 1:
        raise NotImplementedError("nested forward mode (jacfwd of jacfwd, a jvp of a jvp) is not supported: PyTorch "
                                  "gives an autograd.Function's forward rule zero second derivatives there "
                                  "(pytorch/pytorch#197867); use torch.func.hessian (forward over reverse) or jacrev")


def nearest_patches(z: Tensor, prototypes: Tensor, *, similarity: str = "log", backend: str = "auto",
                    precision: str = "auto") -> tuple[Tensor, Tensor]:
    """Min distance (B, M) and winning window index (B, M) int64 (``h * Wout + w`` of the window's top-left
    position, ``Wout = W - kw + 1``; ``h * W + w`` for 1 x 1 prototypes); no gradient.

    The same winners and distances as ``prototype_similarity`` with the same ``similarity`` ("log" and
    "linear" search the same squared L2 distance; "cosine" the distance between unit vectors) and prototype
    shape (lowest index of the exact minimum, or of the first NaN), at every ``precision``."""
    zin, p = _prepare(z, prototypes, similarity, precision=precision)
    name = backends.resolve(backend, z.device.type)
    op = _forward_op if torch_backend.traced(zin) else _PrototypeSimilarity.apply  # .apply: vmap's rule
    with torch.no_grad():
        _, dist, idx = op(zin, p, _UNUSED_EPS, name, backends.search_precision(name, precision))
    return dist, idx


def prototype_distances(z: Tensor, prototypes: Tensor, *, similarity: str = "log", paired: bool = False,
                        chunk: int = 256) -> Tensor:
    """Full distance map (B, M, Hout, Wout) over the windows (``Hout = H - kh + 1``; (B, M, H, W) for 1 x 1
    prototypes), clamped at 0: for heatmaps, not for training. Squared L2 for "log" and "linear", the
    distance between unit vectors (2 - 2 cos) for "cosine". Float32 (float64 for float64 inputs) whatever the
    input precision, with the op's rules for non-finite values: a window holding +-inf is at +inf, NaN is NaN.

    ``paired=True`` takes one image per prototype (``z`` (M, D, H, W)) and returns (M, Hout, Wout), prototype
    m on image m only, in the difference form ``sum (z_window - p)^2``: exactly 0 where a window equals its
    prototype for "log" and "linear" (push's self-activation maps; "cosine": within the rounding of the two
    sides' normalisation, ~1e-13). It works ``chunk`` prototypes at a time.

    Materialises B*M*Hout*Wout values; use ``nearest_patches`` or ``prototype_similarity`` where the min is
    enough.
    """
    if not isinstance(z, Tensor) or not isinstance(prototypes, Tensor):
        raise TypeError("z and prototypes must be torch.Tensors")
    if paired and (z.dim() != 4 or z.shape[0] != prototypes.shape[0]):
        raise ValueError(f"paired=True needs one image per prototype: z {tuple(z.shape)}, "
                         f"prototypes {tuple(prototypes.shape)}")
    chunk = positive_int("chunk", chunk)
    zin, p = _prepare(z, prototypes, similarity)
    B, _, H, W = zin.shape
    if paired:  # float32 (float64 for float64 inputs) like the op, whatever the input precision
        dtype = torch_backend.compute_dtype(zin, p)
        z3, p = zin.flatten(2).to(dtype), p.to(dtype)
        return torch.cat([(zc - pc[:, :, None]).square().sum(1) for zc, pc in zip(z3.split(chunk), p.split(chunk))]
                         ).view(B, H, W)
    return torch_backend.distances(zin.flatten(2), p).view(B, p.shape[0], H, W)


def prototype_windows(z: Tensor, index: Tensor, prototype_size=(1, 1)) -> Tensor:
    """The kh x kw windows of ``z`` (N, D, H, W) whose top-left positions are ``index`` (N,) (``h * Wout + w``,
    as ``nearest_patches`` returns them, ``Wout = W - kw + 1``): (N, D, kh, kw), window n from image n.

    These are the values push copies into prototypes (the raw features, also for "cosine"). ``prototype_size``
    is an int k or a pair (kh, kw); an index outside [0, Hout * Wout) is a one-line ``ValueError``.
    """
    kh, kw = window_size(prototype_size)
    if not isinstance(z, Tensor) or not isinstance(index, Tensor):
        raise TypeError(f"z and index must be torch.Tensors, got {type(z).__name__} and {type(index).__name__}")
    if z.dim() != 4:
        raise ValueError(f"z must be 4-D (N, D, H, W), got shape {tuple(z.shape)}")
    N, D, H, W = z.shape
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must hold integers, got {index.dtype}")
    if index.shape != (N,):
        raise ValueError(f"index must be (N,) = ({N},), got {tuple(index.shape)}")
    hout, wout = window_positions((H, W), (kh, kw))
    if N and bool(((index < 0) | (index >= hout * wout)).any()):
        raise ValueError(f"index must lie in [0, {hout * wout}) (the {hout} x {wout} window positions), got "
                         f"values from {int(index.min())} to {int(index.max())}")
    rows = (index // wout)[:, None] + torch.arange(kh, device=z.device)  # (N, kh)
    cols = (index % wout)[:, None] + torch.arange(kw, device=z.device)  # (N, kw)
    n = torch.arange(N, device=z.device)[:, None, None]
    return z.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def distance_to_similarity(distances: Tensor, similarity: str = "log", eps: float = 1e-4) -> Tensor:
    """The similarity of min distances or distance maps, elementwise, as ``prototype_similarity`` returns it:
    "log" ``log_similarity(d, eps)``, "linear" ``-d``, "cosine" ``1 - d / 2`` (``d`` between unit vectors)."""
    check_similarity(similarity)
    if similarity == "log":
        return log_similarity(distances, eps)
    return -distances if similarity == "linear" else 1 - distances / 2


def log_similarity(distances: Tensor, eps: float = 1e-4) -> Tensor:
    """ProtoPNet's similarity ``log((d + 1) / (d + eps))`` of squared distances, elementwise.

    The one Python home of the formula (the fused kernels carry their own copy): computed as
    ``log1p((1 - eps) / (d + eps))``, accurate for large ``d`` and exactly 0 at ``d = +inf``. ``eps`` as the
    op takes it (:func:`check_eps`).
    """
    return torch_backend.similarity(distances, check_eps(eps))
