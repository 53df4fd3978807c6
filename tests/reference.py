"""The original ProtoPNet prototype layer, in float64: the reference every backend is checked against."""

import math
import random

import torch
import torch.nn.functional as F

import protokern


def original_layer(z: torch.Tensor, prototypes: torch.Tensor, eps: float = 1e-4):
    """conv2d expansion + ReLU, -max_pool2d(-d) over the whole map, log-similarity (as the original).

    Computes in float64 on z's device; differentiable. Returns (similarity, min_distances), each (B, M).
    """
    z = z.double()
    p = prototypes.double().reshape(prototypes.shape[0], -1, 1, 1)
    ones = torch.ones_like(p)
    d = F.conv2d(z * z, ones) - 2 * F.conv2d(z, p) + (p * p).sum((1, 2, 3)).view(1, -1, 1, 1)
    d = F.relu(d)
    min_d = -F.max_pool2d(-d, kernel_size=d.shape[2:]).flatten(1)
    return torch.log((min_d + 1) / (min_d + eps)), min_d


def check_against_reference(z, p, backend, *, grad_tol=1e-4, grad_tol_z=None, precision="highest"):
    """Forward values and both gradients of ``protokern.prototype_similarity(z, p, backend=backend)`` against
    the float64 original layer; ``grad_tol_z`` (default ``grad_tol``) bounds z's gradient.
    Returns the op's (similarity, min_distances), detached."""
    z = z.detach().requires_grad_()
    p = p.detach().requires_grad_()
    sim, dist = protokern.prototype_similarity(z, p, backend=backend, precision=precision)
    assert sim.dtype == dist.dtype == torch.float32 and sim.shape == dist.shape == (z.shape[0], p.shape[0])
    zr = z.detach().double().requires_grad_()
    pr = p.detach().double().requires_grad_()
    sim_ref, dist_ref = original_layer(zr, pr)
    assert rel_err(dist, dist_ref) < 1e-5
    assert (sim.double() - sim_ref).abs().max().item() < 1e-4
    w_sim, w_dist = torch.randn_like(sim_ref), torch.randn_like(sim_ref)
    ((sim * w_sim).sum() + (dist * w_dist).sum()).backward()
    ((sim_ref * w_sim).sum() + (dist_ref * w_dist).sum()).backward()
    assert z.grad.dtype == z.dtype and p.grad.dtype == p.dtype
    assert rel_err(z.grad, zr.grad) < (grad_tol_z or grad_tol)
    assert rel_err(p.grad, pr.grad) < grad_tol
    return sim.detach(), dist.detach()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref||."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def float64_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Squared distances of every prototype to every patch in float64, difference form (no cancellation):
    (B, M, HW) for z (B, D, H, W) or (B, D, HW) and p (M, D), on z's device, detached. Materialises
    B*M*D*HW values: small inputs only."""
    z64 = z.detach().double().flatten(2)
    p64 = p.detach().double().reshape(p.shape[0], -1)
    return (z64[:, None] - p64[None, :, :, None]).square().sum(2)


def check_winners_and_gradients(z, p, sim, dist, idx, w_sim, w_dist, grad_z, grad_p, eps=1e-4, search_tol=1e-5):
    """Large-shape check robust to near-ties: with B*M pairs, some best and second-best patches differ by less
    than fp32 rounding, and an fp32 search may legitimately pick either. So: the picked patch must be a
    minimiser up to the search's rounding (`search_tol`, relative; larger for a TF32 search) in float64, the
    reported distance and similarity must be those of the picked patch, exact to fp32, and the gradients must
    equal the float64 gradients at the picked patches."""
    B, D = z.shape[:2]
    z64 = z.detach().double().flatten(2)
    p64 = p.detach().double().reshape(p.shape[0], -1)
    full = (z64 * z64).sum(1)[:, None, :] + (p64 * p64).sum(1)[None, :, None] - 2 * torch.einsum("md,bdk->bmk", p64, z64)
    true_min = full.amin(-1)
    picked = full.gather(2, idx[..., None]).squeeze(-1)
    assert ((picked - true_min) <= search_tol * (1 + true_min)).all(), "picked patch is not a minimiser"
    assert rel_err(dist, picked) < 1e-5
    assert rel_err(dist, true_min) < max(1e-5, search_tol)
    assert (sim.double() - torch.log((picked + 1) / (picked + eps))).abs().max().item() < 1e-4
    diff = z64.gather(2, idx[:, None, :].expand(-1, D, -1)) - p64.T[None]  # (B, D, M)
    d = (diff * diff).sum(1)
    g = w_dist.double() + w_sim.double() * (1 / (d + 1) - 1 / (d + eps))
    ref_gz, ref_gp = winner_gradients(z64, p64, idx, g)
    assert rel_err(grad_z.flatten(2), ref_gz) < 1e-5
    assert rel_err(grad_p.reshape(p64.shape), ref_gp) < 1e-5


def winner_gradients(z: torch.Tensor, p: torch.Tensor, idx: torch.Tensor, g: torch.Tensor):
    """Float64 gradients of sum_{b,m} g[b, m] |z[b, :, idx[b, m]] - p[m]|^2 (the op's backward at given winners
    and coefficients dL/dd), difference form: (grad_z (B, D, HW), grad_p (M, D)). z (B, D, HW), p (M, D)."""
    z64, p64 = z.detach().double(), p.detach().double()
    gather = idx[:, None, :].expand(-1, z64.shape[1], -1)
    contrib = 2 * g.double()[:, None, :] * (z64.gather(2, gather) - p64.T[None])  # (B, D, M)
    return torch.zeros_like(z64).scatter_add_(2, gather, contrib), -contrib.sum(0).T


# ---- The op's result contract (docs/design.md): exact winner, NaN and inf rules, adversarial inputs ----


def contract_result(z: torch.Tensor, p: torch.Tensor):
    """Float64 reference of the contract: (min_distances (B, M) float64, patch_index (B, M) int64, CPU).

    Exact distances in the difference form; the winner is the lowest NaN patch if any (distance NaN), else
    the lowest index of smallest distance (a patch holding +-inf is at +inf). Materialises B*M*D*HW values:
    small inputs only.
    """
    e = float64_distances(z.cpu(), p.cpu())
    arange = torch.arange(e.shape[-1])
    is_nan = e.isnan()
    has_nan = is_nan.any(-1)
    e = torch.where(is_nan, float("inf"), e)
    e_min = e.amin(-1)
    first = torch.where(e == e_min[..., None], arange, e.shape[-1]).amin(-1)
    first_nan = torch.where(is_nan, arange, e.shape[-1]).amin(-1)
    return torch.where(has_nan, float("nan"), e_min), torch.where(has_nan, first_nan, first)


def dyadic_features(B: int, D: int, H: int, W: int, generator=None) -> torch.Tensor:
    """Features in [0, 4), multiples of 1/16: every fp32 distance between them is exact (19 bits)."""
    return torch.randint(0, 64, (B, D, H, W), generator=generator).float() / 16


def near_tie_case(kind: str, B: int = 4, D: int = 128, H: int = 7, W: int = 7, generator=None):
    """Adversarial near-ties: prototype b belongs to image b; returns (z, p, winners (B,)).

    In image b the winning patch w_b has a rival r_b < w_b (lower index, so a search that cannot tell them
    apart picks the wrong one) whose exact distance is larger by 2^-20 (~1e-6). Kinds: "zero" (d_w = 0,
    d_r = 2^-20), "small" (2^-20 against 2^-19), "one" (1 against 1 + 2^-20), "duplicates" (patches after
    w_b duplicate it exactly: the lowest index, w_b, wins), "equal" (every patch of image b equals p_b:
    patch 0 wins), "last" (0 / 1 features, the rivals' channel 1 raised by 1/64: every patch a rival 2^-12
    away, the last one at d = 0; a search certifies all HW patches, the winner the last one rescored). All
    these distances are exact in fp32 (those of "last" for every pair, in any summation order).
    """
    z = dyadic_features(B, D, H, W, generator).flatten(2)
    HW = H * W
    step = 2.0 ** -10
    winners = torch.empty(B, dtype=torch.int64)
    p = torch.empty(B, D)
    for b in range(B):
        w, r = HW // 2 + b % (HW // 2 - 1), b % (HW // 2)
        p[b] = z[b, :, w]
        if kind == "one":
            p[b, 0] -= 1.0
        elif kind == "small":
            p[b, 2] += step
        if kind in ("zero", "small", "one"):
            z[b, :, r] = z[b, :, w]
            z[b, 1, r] += step
        elif kind == "duplicates":
            z[b, :, w + 1:] = z[b, :, w, None]
        elif kind == "equal":
            z[b] = p[b, :, None]
            w = 0
        elif kind == "last":
            p[b] = (p[b] >= 2).float()
            z[b] = p[b, :, None]
            z[b, 1, :-1] += 16 * step
            w = HW - 1
        else:
            raise ValueError(f"unknown near-tie kind {kind!r}")
        winners[b] = w
    return z.view(B, D, H, W), p, winners


def issue_case(B: int = 16, D: int = 128, H: int = 7, W: int = 7, generator=None):
    """Issue 9's case: prototype b equals a patch w_b of image b, and a lower patch of the same image lies
    1e-6..1.6e-5 away in squared distance (values in [0, 4)). Returns (z, p, winners (B,))."""
    z = (torch.rand(B, D, H * W, generator=generator) * 4).float()
    HW = H * W
    winners = torch.empty(B, dtype=torch.int64)
    gaps = torch.linspace(1e-6, 1.6e-5, B)
    for b in range(B):
        w, r = HW // 2 + b % (HW // 2 - 1), b % (HW // 2)
        z[b, :, r] = z[b, :, w]
        z[b, b % D, r] += gaps[b].sqrt()
        winners[b] = w
    p = z[torch.arange(B), :, winners].clone()
    return z.view(B, D, H, W), p, winners


def residual_case(B: int = 4, D: int = 64, H: int = 5, W: int = 5, generator=None):
    """TF32's worst operands: every value in [1, 2) with its 13 low mantissa bits set (the largest truncation
    residual, all of one sign, so that the errors add up). Prototype b equals patch w_b of image b (d = 0); a
    lower patch r_b holds p_b truncated to TF32 (d = |p_b - tf32(p_b)|^2, about D 2^-20), which a TF32 search
    ranks first by about 3 D 2^-10: only the rescoring finds w_b. Returns (z, p, winners (B,))."""
    z = torch.rand(B, D, H * W, generator=generator) + 1
    z = (z.view(torch.int32) | 0x1FFF).view(torch.float32)
    HW = H * W
    winners = torch.empty(B, dtype=torch.int64)
    for b in range(B):
        w, r = HW // 2 + b % (HW // 2 - 1), b % (HW // 2)
        z[b, :, r] = (z[b, :, w].view(torch.int32) & -8192).view(torch.float32)
        winners[b] = w
    p = z[torch.arange(B), :, winners].clone()
    return z.view(B, D, H, W), p, winners


def huge_prototype_case(B: int = 2, D: int = 8, H: int = 3, W: int = 4, generator=None):
    """Prototypes whose |p|^2 overflows fp32 (one channel at +-1.9e19, past sqrt(FLT_MAX) = 1.84e19) over
    features exact in TF32 (multiples of 2^58 in (-2^65, 2^65), as bfloat16 / float16 inputs always are): a TF32
    search's residual term is inf * 0 there, a NaN bound that must still leave every patch a candidate. Most
    patches are at an fp32 distance of +inf (and have |z|^2 = +inf); patch w_b of image b (late in the map) lies
    2^62 along prototype 0's axis (distance ~2.1e38), patch 1 2^61 (~2.8e38): their |z|^2 - 2 z.p is finite
    (nearer patches' overflows, which makes them candidates anyway), so only the bound can make them candidates.
    Prototype 1 likewise (w_b - 2). Prototype 2 is at +inf from every patch: the lowest index, patch 0, the zero
    patch (whose bound is inf * 0 in the CUDA search), wins. Returns (z (B, D, H, W), p (3, D), winners (B,))."""
    HW = H * W
    z = torch.randint(-128, 128, (B, D, HW), generator=generator).float() * 2.0 ** 58
    z[:, 2] = z[:, 2].abs()
    z[:, :, 0] = 0.0
    p = torch.zeros(3, D)
    p[0, 0], p[1, 1], p[2, 2] = 1.9e19, -1.9e19, -1.9e19
    winners = torch.empty(B, dtype=torch.int64)
    for b in range(B):
        w = HW - 1 - b
        z[b, :, w] = z[b, :, 1] = z[b, :, w - 2] = 0.0
        z[b, 0, w], z[b, 0, 1] = 2.0 ** 62, 2.0 ** 61  # prototype 0's nearest, and a farther finite one
        z[b, 1, w - 2] = -(2.0 ** 62)  # prototype 1's nearest
        winners[b] = w
    return z.view(B, D, H, W), p, winners


def bound_cases(batch: int = 3):
    """(z3, p) pairs for checking a search-error bound: random features and prototypes at several scales,
    prototypes near patches (cancellation), exact copies of a patch, mixed magnitudes, and operands whose
    TF32 truncation residuals are the largest (``residual_case``)."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for scale, offset in [(1.0, 0.0), (4.0, 0.0), (1e-3, 0.0), (1e3, 0.0), (1e-2, 100.0), (1e-20, 0.0)]:
        z3 = torch.rand(batch, 64, 20, generator=g) * scale + offset
        p = torch.rand(30, 64, generator=g) * scale + offset
        p[:10] = z3[0, :, :10].T + scale * 1e-4 * torch.randn(10, 64, generator=g)
        p[10] = z3[1, :, 3]
        cases.append((z3, p))
    z3 = torch.randn(2, 64, 20, generator=g)
    z3[:, :, ::2] *= 1e4  # mixed magnitudes
    cases.append((z3, torch.randn(30, 64, generator=g)))
    z, p, _ = residual_case(B=batch, D=64, H=4, W=5, generator=g)  # TF32's largest truncation residuals
    cases.append((z.flatten(2), torch.cat([p, z[0].flatten(1).T[:27]])))
    return cases


# Odd and tile-edge sizes for random_case (tile widths 32 and 64, the p-resident limit D = 128, 7x7 maps).
_RANDOM_B = (1, 1, 2, 3, 5)
_RANDOM_D = (1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 136)
_RANDOM_HW = (1, 2, 3, 9, 16, 25, 31, 32, 33, 48, 49, 50, 63, 64, 65, 100, 127, 128, 129, 196, 257)
_RANDOM_M = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65, 127, 128, 129, 130, 200)
RANDOM_KINDS = ("dyadic", "pushed", "near_tie", "duplicates", "scaled", "signed", "nonfinite", "float",
                "float_pushed")


def random_case(seed: int, kind: str | None = None, *, max_b: int = 5, max_d: int = 136, max_hw: int = 257,
                max_m: int = 200):
    """A random contract case from ``seed``: (z3 (B, D, HW), p (M, D), exact), float32, contiguous.

    The shape is drawn from odd and tile-edge sizes within the limits, the values from ``kind`` (by default
    one of RANDOM_KINDS, drawn): on the 1/16 grid in [0, 4) ("dyadic"), with prototypes copied from patches
    ("pushed", "nonfinite", "signed"), a rival patch one grid step or 1/8 or 1 away in one channel
    ("near_tie"), exact copies of a prototype's patch ("duplicates"), the grid scaled by 2^-30..2^40
    ("scaled"), in [-4, 4) ("signed"), or with NaN / +-inf in z or p ("nonfinite"); or uniform floats
    ("float", "float_pushed": every prototype at or 1e-4 from a patch, a rival patch 1e-3 away in one channel:
    squared distance 1e-6, below TF32's search error, which only the certified rescoring tells apart).
    ``exact``: every fp32 squared distance is exact (grid values, D <= 256: at most 22 significant bits), so
    the contract's winner is known in float64 (``contract_result``); for the float kinds fp32 rounding may
    break near-ties either way (by D 2^-24 of the distance at most)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B = rng.choice([b for b in _RANDOM_B if b <= max_b])
    D = rng.choice([d for d in _RANDOM_D if d <= max_d])
    HW = rng.choice([k for k in _RANDOM_HW if k <= max_hw])
    M = rng.choice([m for m in _RANDOM_M if m <= max_m])
    kind = kind or rng.choice(RANDOM_KINDS)
    low = -64 if kind == "signed" else 0
    z = torch.randint(low, 64, (B, D, HW), generator=gen).float() / 16
    p = torch.randint(0, 64, (M, D), generator=gen).float() / 16
    if kind.startswith("float"):
        z = torch.rand(B, D, HW, generator=gen) * rng.choice([1.0, 4.0, 100.0])
        p = torch.rand(M, D, generator=gen) * float(z.max())
    if kind in ("pushed", "near_tie", "duplicates", "signed", "nonfinite", "float_pushed"):
        for m in range(M):
            if kind == "float_pushed" or rng.random() < 0.6:
                b, k = rng.randrange(B), rng.randrange(HW)
                p[m] = z[b, :, k]
                if kind == "float_pushed" and rng.random() < 0.3:
                    p[m] += 1e-4 * torch.randn(D, generator=gen)
                if kind in ("near_tie", "float_pushed") and (r := rng.randrange(HW)) != k:
                    z[b, :, r] = z[b, :, k]
                    z[b, rng.randrange(D), r] += rng.choice([1e-3] if kind == "float_pushed" else [1 / 16, 1 / 8, 1.0])
                if kind == "duplicates":
                    for _ in range(rng.randrange(1, 4)):
                        z[b, :, rng.randrange(HW)] = z[b, :, k]
    if kind == "scaled":
        s = 2.0 ** rng.choice([-30, -12, -3, 5, 20, 40])
        z, p = z * s, p * s
    if kind == "nonfinite":
        for _ in range(rng.randrange(1, 4)):
            value = rng.choice([math.nan, math.inf, -math.inf])
            if rng.random() < 0.7:
                z[rng.randrange(B), rng.randrange(D), rng.randrange(HW)] = value
            else:
                p[rng.randrange(M), rng.randrange(D)] = value
    return z, p, not kind.startswith("float")
