"""Pure-PyTorch backend of the fused prototype op: any device, bounded memory.

Same result contract and hand-written backward as the fused kernels (docs/design.md): a certified search
(``search``, with the precisions' products emulated: TF32 truncation, 3xTF32 split) and an exact rescoring
of the candidates (``exact_distances``). The (B, M, H*W) map is only ever held one slab at a time, and
every slab-sized temporary ((b, m, H*W), the rescored and backward (b, m, D) features) holds at most ``SLAB``
elements (``CPU_SLAB`` on a CPU), so huge problems run in bounded memory (and, on CPUs, in allocations that the
allocator reuses instead of mapping fresh pages for each, small enough to stay near the last-level cache).
Computes in float64 when both inputs are float64 (for ``gradcheck``), else in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from protokern.kernels import search_bound

SLAB = 1 << 22  # elements of one slab-sized temporary (a few such tensors live together)
CPU_SLAB = 1 << 21  # at most this on a CPU: a slab's temporaries stay near a last-level cache (NOTES.md, CPU)


def _slab(device: torch.device) -> int:
    """The slab size (elements) on ``device``: ``SLAB``, at most ``CPU_SLAB`` on a CPU."""
    return min(SLAB, CPU_SLAB) if device.type == "cpu" else SLAB


def _slabs(B: int, M: int, width: int, slab: int, prototypes_first: bool) -> Iterator[tuple[slice, slice]]:
    """(images, prototypes) slices covering (B, M) once, each with b * m * width <= slab (or one pair); images
    in the outer loop. ``prototypes_first`` (CPUs): as many prototypes a slab as fit, then images: one image's
    search is then a (m, D) x (D, HW) product with a larger m, and the backward sums fewer (b HW, D) parts
    (NOTES.md, CPU); else as many images as fit, then prototypes."""
    if prototypes_first:
        mc = max(1, min(M, slab // width))
        bc = max(1, min(B, slab // (mc * width)))
    else:
        bc = max(1, min(B, slab // width))
        mc = max(1, min(M, slab // (bc * width)))
    for b0 in range(0, B, bc):
        for m0 in range(0, M, mc):
            yield slice(b0, b0 + bc), slice(m0, m0 + mc)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the op computes in: float64 when every input is float64, else float32 (fp16 / bf16 / fp32)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _patch_rows(z3: torch.Tensor) -> torch.Tensor:
    """z3 (B, D, HW) as (B * HW, D) rows, one per patch, channels contiguous (a view of channels-last z, else
    one copy): the rescoring and the backward read whole rows of it with ``index_select``, which copies rows
    where gathering from the (B, D, HW) layout reads one strided value at a time (about 10x slower on a CPU)."""
    B, D, HW = z3.shape
    return z3.transpose(1, 2).reshape(B * HW, D)


def _rows(b0: int, idx: torch.Tensor, HW: int) -> torch.Tensor:
    """Row (b0 + b) * HW + idx[b, m] of ``_patch_rows`` for each pair (b, m) of idx (b, m), flattened."""
    return (idx + HW * torch.arange(b0, b0 + idx.shape[0], device=idx.device)[:, None]).flatten()


def _winner_rows(rows: torch.Tensor, b0: int, idx: torch.Tensor, HW: int) -> torch.Tensor:
    """Feature vectors (b, m, D) of ``rows`` (``_patch_rows``) at the patches idx (b, m) of images b0.."""
    return rows.index_select(0, _rows(b0, idx, HW)).view(*idx.shape, rows.shape[1])


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x (float32) truncated to TF32 (10 mantissa bits), as tensor cores read it; NaN stays NaN."""
    return torch.where(x.isnan(), x, (x.view(torch.int32) & -8192).view(torch.float32))  # 0xffffe000


def search_level(precision: str, dtype: torch.dtype, device: torch.device) -> str:
    """The search arithmetic (a ``search_bound.LEVELS`` name) of ``precision`` on this device and dtype.

    float64 always searches in float64 products. In float32 "high" and "medium" emulate 3xTF32 and TF32
    products; torch's own matmul settings (TF32/bf16 matmuls) can only make the search less accurate.
    """
    if dtype == torch.float64:
        return "ieee"
    level = search_bound.PRECISION_LEVELS[precision]
    return search_bound.worst(level, matmul_level(device))


def matmul_level(device: torch.device) -> str:
    """The least accurate products torch.matmul may use for float32 on this device type under the process's
    settings, as a ``search_bound.LEVELS`` name: the per-backend ``fp32_precision`` (torch's newer API: "tf32",
    "bf16"; "none" and "ieee" are fp32) and, where they can be read, the older ones
    (``get_float32_matmul_precision``: "high" TF32, "medium" bfloat16; ``allow_tf32`` on CUDA). Those raise a
    RuntimeError once the newer API has been used in the process, so they are only consulted when they answer."""
    backends = torch.backends.cuda if device.type == "cuda" else getattr(torch.backends, "mkldnn", None)
    setting = getattr(getattr(backends, "matmul", None), "fp32_precision", "none")
    level = {"tf32": "tf32", "bf16": "bf16"}.get(setting, "ieee")
    try:
        level = search_bound.worst(level, {"highest": "ieee", "high": "tf32"}.get(torch.get_float32_matmul_precision(),
                                                                                  "bf16"))
        if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            level = search_bound.worst(level, "tf32")
    except RuntimeError:  # "... you have used mix of the legacy and new APIs ...": the newer setting above decides
        pass
    return level


def _dot(p: torch.Tensor, z3: torch.Tensor, precision: str) -> torch.Tensor:
    """p (m, D) @ z3 (b, D, HW) with the products of ``precision`` (float64: always exact products)."""
    if precision == "highest" or p.dtype == torch.float64:
        return torch.matmul(p, z3)
    ph, zh = _tf32(p), _tf32(z3)
    if precision == "medium":
        return torch.matmul(ph, zh)
    pl, zl = _tf32(p - ph), _tf32(z3 - zh)  # 3xTF32: hi.hi + (hi.lo + lo.hi)
    return torch.matmul(ph, zh) + (torch.matmul(ph, zl) + torch.matmul(pl, zh))


def search(z3: torch.Tensor, p: torch.Tensor, precision: str = "highest") -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate distances a~ (b, m, HW) = |z|^2 + |p|^2 - 2 z.p and their bound delta >= |a~ - e|.

    Materialises (b, m, HW): the forward calls it one slab at a time. The bound is derived in
    ``protokern.kernels.search_bound``.
    """
    D = z3.shape[1]
    unit = search_bound.FP64_UNIT if z3.dtype == torch.float64 else search_bound.FP32_UNIT
    level = search_level(precision, z3.dtype, z3.device)
    z_norm, p_norm = (z3 * z3).sum(1), (p * p).sum(1)
    # In place where a fresh slab-sized tensor can take the result (the same roundings as the plain formulas:
    # (|z|^2 + |p|^2) - 2 z.p, 2 z.p exact; c ((|z| + |p|)^2 + tiny) [+ r (...)]).
    approx = (z_norm[:, None, :] + p_norm[None, :, None]).sub_(_dot(p, z3, precision), alpha=2)
    z_len, p_len = z_norm.sqrt()[:, None, :], p_norm.sqrt()[None, :, None]
    if precision == "medium" and level == "tf32":  # _dot truncated the operands itself: their residuals bound it
        coef, res, tiny = search_bound.truncated_tf32_bound(D)
        z_lo = (z3 - _tf32(z3)).square().sum(1).sqrt()[:, None, :]
        p_lo = (p - _tf32(p)).square().sum(1).sqrt()[None, :, None]
        residual = (z_lo * p_len).add_(z_len * p_lo).mul_(res)
        return approx, (z_len + p_len).square_().add_(tiny).mul_(coef).add_(residual)
    coef = search_bound.coefficient(level, D, unit)
    return approx, (z_len + p_len).square_().add_(search_bound.TINY).mul_(coef)


def separable_candidates(z3: torch.Tensor, p: torch.Tensor,
                         precision: str = "highest") -> tuple[torch.Tensor, torch.Tensor] | None:
    """The certified search's candidates by the separable form of its bound (``search_bound.separable``), as the
    kernels evaluate it: hi = |z|^2 (1 + c_s) - 2 z.p, lo = |z|^2 (1 - c_s) - 2 z.p, a candidate where
    lo - B_m <= min over the row of hi + B_m (|p|^2, the same for every patch of a row, cancels).

    Returns (cand (b, m, HW) bool, lead (b, m, 1): a patch of each row that is a candidate), or None where the
    form does not apply: a squared norm not finite or above ``search_bound.SEPARABLE_MAX_NORM2`` (``search``'s
    per-pair form then certifies), or "medium"'s truncation-residual bound, whose extra term is per pair.
    Five passes over the slab (``search`` and its use take about twelve).
    """
    level = search_level(precision, z3.dtype, z3.device)
    if precision == "medium" and level == "tf32":
        return None
    z_norm, p_norm = (z3 * z3).sum(1), (p * p).sum(1)
    limit = search_bound.SEPARABLE_MAX_NORM2
    if not bool((z_norm <= limit).all() & (p_norm <= limit).all()):  # NaN fails too
        return None
    unit = search_bound.FP64_UNIT if z3.dtype == torch.float64 else search_bound.FP32_UNIT
    coef = search_bound.coefficient(level, z3.shape[1], unit)
    sep = search_bound.separable(coef, unit)
    dot = _dot(p, z3, precision)
    lo = torch.add((z_norm * (1 - sep))[:, None, :], dot, alpha=-2)  # one rounding: 2 z.p is exact
    low, lead = dot.mul_(-2).add_((z_norm * (1 + sep))[:, None, :]).min(-1, keepdim=True)
    row = (sep * p_norm + coef * search_bound.TINY)[None, :, None]  # B_m
    return lo.sub_(row) <= low.add_(row), lead


def exact_distances(zv: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """sum_d (zv - pv)^2 over the last dim, in a fixed pairwise order that depends only on D.

    Elementwise operations only: the bits do not depend on how many rows are scored at once, on the device,
    or on the search precision that selected them.
    """
    x = (zv - pv).square_()
    while (n := x.shape[-1]) > 1:  # pairs (i, i + half); an odd n's middle value pairs with an exact zero
        half = (n + 1) // 2
        x[..., :n - half].add_(x[..., half:])
        x = x[..., :half]
    return x[..., 0]


def _rescore(rows: torch.Tensor, b0: int, p: torch.Tensor, cand: torch.Tensor):
    """Exact distances at the candidates of ``cand`` (b, m, HW) of images b0.. (``rows``: ``_patch_rows``):
    (row b * m_count + m, patch, distance), each (K,), rows in order and patches increasing within a row; at
    most a slab of feature values at once."""
    b, m, i = cand.nonzero(as_tuple=True)
    HW = cand.shape[2]
    e = torch.empty(b.shape, device=rows.device, dtype=rows.dtype)
    chunk = max(1, _slab(rows.device) // rows.shape[-1])  # never B*M*HW*D
    for s in range(0, b.numel(), chunk):
        c = slice(s, s + chunk)
        e[c] = exact_distances(rows.index_select(0, (b0 + b[c]) * HW + i[c]), p.index_select(0, m[c]))
    return b * cand.shape[1] + m, i, e


def _row_min(rows: int, row: torch.Tensor, value: torch.Tensor, init) -> torch.Tensor:
    """Per-row minimum of ``value`` (order-free, hence deterministic); ``init`` where a row has none."""
    out = torch.full((rows,), init, device=value.device, dtype=value.dtype)
    return out.scatter_reduce_(0, row, value, "amin")


def shapes_only(t: torch.Tensor) -> bool:
    """Meta or fake tensors (shape propagation, FakeTensorMode): there are shapes to give, no values to compute."""
    return t.is_meta or (type(t) is not torch.Tensor and is_fake(t))  # (a plain tensor is never fake: no call)


def traced(t: torch.Tensor) -> bool:
    """Whether this call is being traced into a graph (torch.compile, torch.export, and the tracers they build on
    that eager code also calls: make_fx, aot_function; also torch.jit.trace): an op must then be recorded as a
    registered custom op, one node whose fake rule gives the shapes. Inlined, eager code would record the
    shapes-only placeholders of fake inputs (or miss a Triton launch, or a data-dependent fix-up, or the
    torch backend's data-dependent branches) as the graph's values."""
    return (torch.compiler.is_compiling() or shapes_only(t) or get_proxy_mode() is not None
            or torch.jit.is_tracing())


def similarity(dist: torch.Tensor, eps: float) -> torch.Tensor:
    """log((d + 1) / (d + eps)) as log1p((1 - eps) / (d + eps)): accurate for large d, 0 at d = +inf."""
    return torch.log1p((1 - eps) / (dist + eps))


def similarity_slope(dist: torch.Tensor, eps: float) -> torch.Tensor:
    """d/dd log((d + 1) / (d + eps)) as (eps - 1) / ((d + 1)(d + eps)): no cancellation at large d (the
    difference 1/(d + 1) - 1/(d + eps) loses all its digits by d ~ 1e7 in float32)."""
    return (eps - 1) / ((dist + 1) * (dist + eps))


def forward(z3: torch.Tensor, p: torch.Tensor, eps: float, precision: str = "highest"):
    """Returns (similarity, min_distances, patch_index) for z3 (B, D, HW) and p (M, D).

    Certified search (see ``protokern.kernels.search_bound``): every patch whose approximate distance could
    be the minimum, and every patch whose approximate distance is not finite, is rescored exactly; the
    winner is the lowest index with the smallest exact distance, or the lowest NaN patch if there is one
    (then the distance is NaN). A patch holding +-inf is at distance +inf.
    """
    dtype = compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    B, D, HW = z3.shape
    M = p.shape[0]
    rows = _patch_rows(z3)
    dist = torch.empty((B, M), device=z3.device, dtype=dtype)
    idx = torch.empty((B, M), device=z3.device, dtype=torch.int64)
    cpu = z3.device.type == "cpu"
    for bs, ms in _slabs(B, M, max(HW, D), _slab(z3.device), cpu):  # (b, m, HW), (b, m, D) temporaries within it
        candidates = separable_candidates(z3[bs], p[ms], precision)
        if candidates is None:
            approx, delta = search(z3[bs], p[ms], precision)
            infinite = approx * 0 != 0  # NaN exactly where approx is +-inf or NaN (2 passes; isfinite takes 4)
            thr, lead = (approx + delta).masked_fill_(infinite, float("inf")).min(-1, keepdim=True)
            candidates = (approx.sub_(delta) <= thr).logical_or_(infinite), lead  # ``lead`` is always a candidate
            del approx, delta, infinite
        cand, lead = candidates
        # Each pair's lead candidate is rescored densely (no gather of p), the few others through the list.
        b, m = cand.shape[:2]
        lead_e = exact_distances(_winner_rows(rows, bs.start, lead[..., 0], HW), p[None, ms])
        row, patch, e = _rescore(rows, bs.start, p[ms], cand.scatter_(-1, lead, False))
        row = torch.cat((torch.arange(b * m, device=row.device), row))
        patch, e = torch.cat((lead.flatten(), patch)), torch.cat((lead_e.flatten(), e))
        n = b * m
        is_nan = e.isnan()
        first_nan = _row_min(n, row, torch.where(is_nan, patch, HW), HW)
        e = torch.where(is_nan, float("inf"), e)
        e_min = _row_min(n, row, e, float("inf"))
        first = _row_min(n, row, torch.where(e == e_min[row], patch, HW), HW)
        has_nan = first_nan < HW
        dist[bs, ms] = torch.where(has_nan, float("nan"), e_min).view(b, m)
        idx[bs, ms] = torch.where(has_nan, first_nan, first).clamp_(max=HW - 1).view(b, m)
    return similarity(dist, eps), dist, idx


def patch_sums(contrib: torch.Tensor, ids: torch.Tensor, HW: int, serial: bool) -> torch.Tensor:
    """(b * HW, D): for each patch of each image, the sum of the pairs' contrib (b, m, D) it won (ids (b, m)).

    Deterministic either way: ``serial`` (the CPU, whose index_add adds the pairs one after the other) by
    index_add; otherwise (CUDA's index_add uses atomics) through a 0/1 matrix (b, HW, m) with one 1 per column.
    """
    b, m, D = contrib.shape
    if serial:
        return contrib.new_zeros((b * HW, D)).index_add(0, _rows(0, ids, HW), contrib.view(b * m, D))
    won = ids[:, None, :] == torch.arange(HW, device=ids.device)[:, None]
    return (won.to(contrib.dtype) @ contrib).view(b * HW, D)


def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Returns (grad_z3 (B, D, HW) contiguous, grad_p (M, D)) in the compute dtype; deterministic.

    Written out of place in differentiable torch ops, so that it is also the op's backward wherever that must
    itself be differentiated or vmapped (create_graph=True, torch.func transforms; see ops._backward).
    """
    dtype = compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    B, D, HW = z3.shape
    M = p.shape[0]
    g = grad_dist.to(dtype) + grad_sim.to(dtype) * similarity_slope(dist, eps)
    rows = _patch_rows(z3)
    grad_zt: list[torch.Tensor] = []  # one (b * HW, D) sum per image slab
    grad_p: dict[int, torch.Tensor] = {}  # one (m, D) sum per prototype slab, over the image slabs in order
    cpu = z3.device.type == "cpu"
    for bs, ms in _slabs(B, M, max(HW, D), _slab(z3.device), cpu):  # (b, m, D), (b, HW, m) temporaries within it
        whole = (bs.stop - bs.start, ms.stop - ms.start) == (B, M)  # (no view: torch's older vmap has no rule)
        gs, ids = (g, idx) if whole else (g[bs, ms], idx[bs, ms])
        # Direct differences g * (z - p), never |z|^2-style expansions: no cancellation when g is huge (d ~ 0).
        contrib = 2 * gs[..., None] * (_winner_rows(rows, bs.start, ids, HW) - p[None, ms])
        grad_p[ms.start] = grad_p.get(ms.start, 0) - contrib.sum(0)
        part = patch_sums(contrib, ids, HW, serial=cpu)
        if ms.start == 0:
            grad_zt.append(part)
        else:
            grad_zt[-1] = grad_zt[-1] + part
    grad_z3 = torch.cat(grad_zt).view(B, HW, D).transpose(1, 2).contiguous()
    return grad_z3, torch.cat([grad_p[k] for k in sorted(grad_p)])


def distances(z3: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full squared-L2 map (B, M, HW), clamped at 0 (heatmaps only: it materialises B*M*HW values).

    Expanded as |z|^2 + |p|^2 - 2 p.z; an entry that comes out inf or NaN (a patch holding +-inf, norms past
    float range) is recomputed in the difference form sum (z - p)^2, so that the map follows the op's rules
    (a patch holding +-inf is at +inf, NaN stays NaN, equal vectors are at 0 however large).
    """
    dtype = compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    d = ((z3 * z3).sum(1)[:, None, :] + (p * p).sum(1)[None, :, None] - 2 * torch.matmul(p, z3)).clamp_min_(0)
    if traced(d):  # one graph node that runs the recompute below on the real values
        return _recompute_nonfinite_op(d, z3, p)
    return _recompute_nonfinite(d, z3, p)


def _recompute_nonfinite(d: torch.Tensor, z3: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``d`` with its non-finite entries recomputed in the difference form, in place."""
    bad = (~d.isfinite()).nonzero()
    for part in bad.split(max(1, _slab(d.device) // max(1, z3.shape[1]))):  # (K, 3) entries, K * D within a slab
        b, m, s = part.unbind(1)
        d[b, m, s] = (z3[b, :, s] - p[m]).square().sum(1)
    return d


@torch.library.custom_op("protokern::recompute_nonfinite", mutates_args=())
def _recompute_nonfinite_op(d: torch.Tensor, z3: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return _recompute_nonfinite(d.clone(), z3, p)


@_recompute_nonfinite_op.register_fake
def _(d, z3, p):
    return torch.empty_like(d)


def _recompute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0].isfinite())


def _recompute_backward(ctx, grad):
    # the map's gradient (heatmaps are not for training) flows through its finite entries; the recomputed
    # ones (+inf, NaN, or past float range in the expanded form) pass none to z or p
    finite, = ctx.saved_tensors
    return grad * finite, None, None


_recompute_nonfinite_op.register_autograd(_recompute_backward, setup_context=_recompute_setup)
