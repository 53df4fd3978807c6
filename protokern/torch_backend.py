"""Pure-PyTorch backend of the fused prototype op: any device, bounded memory.

Same result contract and hand-written backward as the fused kernels (docs/design.md): a certified search
(``search``, with the precisions' products emulated: TF32 truncation, 3xTF32 split) and an exact rescoring
of the candidates (``exact_distances``). The (B, M, H*W) map is only ever held one slab at a time (at most
``SLAB`` elements), and the rescoring gathers at most ``SLAB`` feature values at once, so huge problems run
in bounded memory. Computes in float64 when both inputs are float64 (for ``gradcheck``), else in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from protokern.kernels import search_bound

SLAB = 1 << 22  # elements of the (b, m, HW) search slab held at once (a few such tensors live together)


def _slabs(B: int, M: int, HW: int) -> Iterator[tuple[slice, slice]]:
    bc = max(1, min(B, SLAB // HW))
    mc = max(1, min(M, SLAB // (bc * HW)))
    for b0 in range(0, B, bc):
        for m0 in range(0, M, mc):
            yield slice(b0, b0 + bc), slice(m0, m0 + mc)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def _winners(zt: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Feature vectors (b, m, D) at the winning patches idx (b, m) of zt (b, HW, D)."""
    return torch.gather(zt, 1, idx[..., None].expand(-1, -1, zt.shape[-1]))


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
    level = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[precision]
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
    approx = z_norm[:, None, :] + p_norm[None, :, None] - 2 * _dot(p, z3, precision)
    z_len, p_len = z_norm.sqrt()[:, None, :], p_norm.sqrt()[None, :, None]
    if precision == "medium" and level == "tf32":  # _dot truncated the operands itself: their residuals bound it
        coef, res, tiny = search_bound.truncated_tf32_bound(D)
        z_lo = (z3 - _tf32(z3)).square().sum(1).sqrt()[:, None, :]
        p_lo = (p - _tf32(p)).square().sum(1).sqrt()[None, :, None]
        return approx, coef * ((z_len + p_len).square() + tiny) + res * (z_lo * p_len + z_len * p_lo)
    coef = search_bound.coefficient(level, D, unit)
    return approx, coef * ((z_len + p_len).square() + search_bound.TINY)


def exact_distances(zv: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """sum_d (zv - pv)^2 over the last dim, in a fixed pairwise order that depends only on D.

    Elementwise operations only: the bits do not depend on how many rows are scored at once, on the device,
    or on the search precision that selected them.
    """
    x = (zv - pv).square()
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (0, 1))  # + exact zeros
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def _rescore(zt: torch.Tensor, p: torch.Tensor, cand: torch.Tensor):
    """Exact distances at the candidates of ``cand`` (b, m, HW): (row b * m_count + m, patch, distance),
    each (K,), rows in order and patches increasing within a row; at most SLAB feature values at once."""
    b, m, i = cand.nonzero(as_tuple=True)
    e = torch.empty(b.shape, device=zt.device, dtype=zt.dtype)
    chunk = max(1, SLAB // zt.shape[-1])  # never B*M*HW*D
    for s in range(0, b.numel(), chunk):
        e[s:s + chunk] = exact_distances(zt[b[s:s + chunk], i[s:s + chunk]], p[m[s:s + chunk]])
    return b * cand.shape[1] + m, i, e


def _row_min(rows: int, row: torch.Tensor, value: torch.Tensor, init) -> torch.Tensor:
    """Per-row minimum of ``value`` (order-free, hence deterministic); ``init`` where a row has none."""
    out = torch.full((rows,), init, device=value.device, dtype=value.dtype)
    return out.scatter_reduce_(0, row, value, "amin")


def similarity(dist: torch.Tensor, eps: float) -> torch.Tensor:
    """log((d + 1) / (d + eps)) as log1p((1 - eps) / (d + eps)): accurate for large d, 0 at d = +inf."""
    return torch.log1p((1 - eps) / (dist + eps))


def forward(z3: torch.Tensor, p: torch.Tensor, eps: float, precision: str = "highest"):
    """Returns (similarity, min_distances, patch_index) for z3 (B, D, HW) and p (M, D).

    Certified search (see ``protokern.kernels.search_bound``): every patch whose approximate distance could
    be the minimum, and every patch whose approximate distance is not finite, is rescored exactly; the
    winner is the lowest index with the smallest exact distance, or the lowest NaN patch if there is one
    (then the distance is NaN). A patch holding +-inf is at distance +inf.
    """
    dtype = _compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    B, D, HW = z3.shape
    M = p.shape[0]
    zt = z3.transpose(1, 2)
    dist = torch.empty((B, M), device=z3.device, dtype=dtype)
    idx = torch.empty((B, M), device=z3.device, dtype=torch.int64)
    for bs, ms in _slabs(B, M, HW):
        approx, delta = search(z3[bs], p[ms], precision)
        finite = approx.isfinite()
        thr = torch.where(finite, approx + delta, float("inf")).amin(-1, keepdim=True)
        cand = (approx - delta <= thr) | ~finite  # at least one per (b, m)
        del approx, delta, finite
        row, patch, e = _rescore(zt[bs], p[ms], cand)
        rows = cand.shape[0] * cand.shape[1]
        is_nan = e.isnan()
        first_nan = _row_min(rows, row, torch.where(is_nan, patch, HW), HW)
        e = torch.where(is_nan, float("inf"), e)
        e_min = _row_min(rows, row, e, float("inf"))
        first = _row_min(rows, row, torch.where(e == e_min[row], patch, HW), HW)
        has_nan = first_nan < HW
        dist[bs, ms] = torch.where(has_nan, float("nan"), e_min).view(cand.shape[:2])
        idx[bs, ms] = torch.where(has_nan, first_nan, first).clamp_(max=HW - 1).view(cand.shape[:2])
    return similarity(dist, eps), dist, idx


def backward(grad_sim, grad_dist, z3, p, idx, dist, eps: float):
    """Returns (grad_z3 (B, D, HW) contiguous, grad_p (M, D)) in the compute dtype; deterministic.

    Written out of place in differentiable torch ops, so that it is also the op's backward wherever that must
    itself be differentiated or vmapped (create_graph=True, torch.func transforms; see ops._backward).
    """
    dtype = _compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    B, D, HW = z3.shape
    M = p.shape[0]
    g = grad_dist.to(dtype) + grad_sim.to(dtype) * (1 / (dist + 1) - 1 / (dist + eps))
    zt = z3.transpose(1, 2)
    patches = torch.arange(HW, device=z3.device)
    grad_zt: list[torch.Tensor] = []  # one (b, HW, D) sum per image slab
    grad_p: dict[int, torch.Tensor] = {}  # one (m, D) sum per prototype slab, over the image slabs in order
    for bs, ms in _slabs(B, M, HW):
        gs, ids = g[bs, ms], idx[bs, ms]
        # Direct differences g * (z - p), never |z|^2-style expansions: no cancellation when g is huge (d ~ 0).
        contrib = 2 * gs[..., None] * (_winners(zt[bs], ids) - p[None, ms])  # (b, m, D)
        grad_p[ms.start] = grad_p.get(ms.start, 0) - contrib.sum(0)
        # 0/1 matrix (b, HW, m) with one 1 per column: each patch sums exactly the pairs it won.
        won = (ids[:, None, :] == patches[:, None]).to(dtype)
        part = won @ contrib
        if ms.start == 0:
            grad_zt.append(part)
        else:
            grad_zt[-1] = grad_zt[-1] + part
    return torch.cat(grad_zt).transpose(1, 2).contiguous(), torch.cat([grad_p[m] for m in sorted(grad_p)])


def distances(z3: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full squared-L2 map (B, M, HW), clamped at 0 (heatmaps only: it materialises B*M*HW values)."""
    dtype = _compute_dtype(z3, p)
    z3, p = z3.to(dtype), p.to(dtype)
    d = (z3 * z3).sum(1)[:, None, :] + (p * p).sum(1)[None, :, None] - 2 * torch.matmul(p, z3)
    return d.clamp_min(0)
