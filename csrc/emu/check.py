"""Run the CUDA kernels of csrc/forward.cuh and csrc/backward.cuh on the CPU emulator (emulator.h).

No GPU needed: checks the kernels' indexing, tiling edges, strides, the op's result contract (certified
search + exact rescoring, ties to the lowest index, NaN and inf rules) and gradients on small shapes, at
the three search precisions ("highest" FFMA, "high" 3xTF32 MMA, "medium" TF32 MMA; the MMA through an
emulated mma.sync with TF32-truncated operands). cp.async is emulated asynchronously (data lands at the
wait, the destination is poisoned at issue), so pipeline bugs show as NaN. It cannot see GPU timing or
launch limits; races show under ThreadSanitizer (tests/test_cuda_gates.py).

    python csrc/emu/check.py            # build with g++ and run every check; exit status 1 on failure
    python csrc/emu/check.py --random 600 [FIRST_SEED]   # random cases (check_random) for 10 minutes
"""

from __future__ import annotations

import ctypes
import itertools
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
REPO = CSRC.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import reference  # noqa: E402
from tests.reference import original_layer, rel_err  # noqa: E402

PRECISIONS = {"highest": 0, "high": 1, "medium": 2}  # ForwardParams.precision (params.h kSearch*)
LOG_1_OVER_EPS = math.log(1 / 1e-4)  # similarity at d = 0: 9.2103...


class ForwardParams(ctypes.Structure):
    _fields_ = [("z", ctypes.c_void_p), ("z_sb", ctypes.c_int64), ("z_sd", ctypes.c_int64),
                ("z_sk", ctypes.c_int64), ("zr", ctypes.c_void_p), ("zr_sb", ctypes.c_int64),
                ("zr_sk", ctypes.c_int64), ("p", ctypes.c_void_p), ("similarity", ctypes.c_void_p),
                ("min_distances", ctypes.c_void_p), ("patch_index", ctypes.c_void_p),
                ("B", ctypes.c_int), ("D", ctypes.c_int), ("HW", ctypes.c_int), ("M", ctypes.c_int),
                ("eps", ctypes.c_float), ("precision", ctypes.c_int)]


class BackwardParams(ctypes.Structure):
    _fields_ = [("grad_similarity", ctypes.c_void_p), ("grad_min_distances", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("z_sb", ctypes.c_int64), ("z_sd", ctypes.c_int64),
                ("z_sk", ctypes.c_int64), ("p", ctypes.c_void_p), ("patch_index", ctypes.c_void_p),
                ("min_distances", ctypes.c_void_p),
                ("grad_z", ctypes.c_void_p), ("grad_p", ctypes.c_void_p),
                ("gp_partial", ctypes.c_void_p), ("gp_count", ctypes.c_void_p),
                ("B", ctypes.c_int), ("D", ctypes.c_int), ("HW", ctypes.c_int), ("M", ctypes.c_int),
                ("eps", ctypes.c_float), ("gp_max_parts", ctypes.c_int)]
BACKWARD_LAUNCH = ("blocks", "gz_blocks", "d_slices", "G", "KT", "seg", "gp_images", "gp_stage", "gz_sorted",
                   "gp_first", "gp_parts", "gp_part_images", "gp_part_stages")  # harness.cpp emu_backward_launch


def backward_launch(lib, B: int, D: int, HW: int, M: int, max_parts: int = 0) -> dict[str, int]:
    """backward.cuh backward_launch at (B, D, HW, M), by field name; grad_p in at most max_parts image parts
    (BackwardParams.gp_max_parts, 0: the launcher's default; PROTOKERN_CUDA_GRAD_P_PARTS sets it on a device)."""
    out = (ctypes.c_longlong * len(BACKWARD_LAUNCH))()
    lib.emu_backward_launch(ctypes.byref(BackwardParams(B=B, D=D, HW=HW, M=M, gp_max_parts=max_parts)), out)
    return dict(zip(BACKWARD_LAUNCH, out))


def build(out_dir: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile the kernel headers (forward.cuh, backward.cuh) with the emulator into a shared library."""
    lib = out_dir / "libprotokern_emu.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{HERE / 'fake'}", f"-I{HERE}",
           f"-I{CSRC}", *extra_flags, str(HERE / "harness.cpp"), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(lib))
    lib.emu_errors.restype = ctypes.c_int
    lib.emu_vector_copies.restype = ctypes.c_longlong
    lib.emu_per_pair_tiles.restype = ctypes.c_longlong
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def channel_rows(z3: torch.Tensor) -> torch.Tensor:
    """The forward's z rows (params.h ForwardParams::zr) as protokern.cpp's channel_rows makes them: z3's own
    (B, HW, D) view where its channels are innermost, 16-byte aligned, with image and patch strides multiples
    of 4; else a copy into rows padded to a multiple of 4 channels (the padding NaN: never read)."""
    t = z3.transpose(1, 2)
    if t.stride(2) == 1 and t.stride(0) % 4 == 0 and t.stride(1) % 4 == 0 and t.data_ptr() % 16 == 0:
        return t
    B, D, HW = z3.shape
    rows = torch.full((B, HW, (D + 3) // 4 * 4), math.nan)
    rows[:, :, :D] = t
    return rows


def forward_params(z3: torch.Tensor, rows: torch.Tensor | None, p: torch.Tensor, *outputs, eps: float,
                   precision: str) -> ForwardParams:
    """ForwardParams of a forward on z3 (B, D, HW), its rows (``channel_rows``; None: a null zr) and p (M, D)
    contiguous, into outputs (similarity, min_distances, patch_index)."""
    B, D, HW = z3.shape
    zr = (None, 0, 0) if rows is None else (_ptr(rows), rows.stride(0), rows.stride(1))
    return ForwardParams(_ptr(z3), *z3.stride(), *zr, _ptr(p), *(_ptr(t) for t in outputs), B, D, HW,
                         p.shape[0], eps, PRECISIONS[precision])


def emu_forward(lib, z3: torch.Tensor, p: torch.Tensor, eps: float = 1e-4, precision: str = "highest",
                plan: tuple[bool, int] | None = None, rows: torch.Tensor | None = None):
    """The forward kernel on z3 (B, D, HW) float32 (any strides) and p (M, D); plan (p-resident?, images per
    block), or None for the launcher's choice on a one-SM device (csrc/emu/harness.cpp); rows: z3's rows for the
    rescoring, by default ``channel_rows(z3)``."""
    B, D, HW = z3.shape
    M = p.shape[0]
    p = p.contiguous()
    sim = torch.full((B, M), -7.0)  # poisoned: every element must be written
    dist = torch.full((B, M), -7.0)
    idx = torch.full((B, M), -7, dtype=torch.int64)
    rows = channel_rows(z3) if rows is None else rows
    prm = forward_params(z3, rows, p, sim, dist, idx, eps=eps, precision=precision)
    if plan is None:
        lib.emu_forward(ctypes.byref(prm))
    else:
        lib.emu_forward_plan(ctypes.byref(prm), int(plan[0]), plan[1])
    return sim, dist, idx


def plans(B: int, D: int, precision: str = "highest") -> dict[str, tuple[bool, int]]:
    """The forward's shared-memory plans to run on a case: streaming with 1 image per block, and with 2 at
    "highest" only (the launcher takes 2+ only for B > 65535; the image loop around the search does not depend
    on the precision, and one precision keeps the check's time down), and where D allows p-resident blocks of 2
    images (a partial last block when B is odd) and of all B images."""
    out = {"streaming": (False, 1)}
    if precision == "highest":
        out["streaming x2"] = (False, 2)
    if D <= 128:  # forward.cuh kResidentMaxD
        out["p-resident x2"] = (True, 2)
        out[f"p-resident x{B}"] = (True, B)
    return out


def emu_backward(lib, grad_sim, grad_dist, z3, p, idx, dist, eps: float = 1e-4, reverse: bool = False):
    """The backward kernel (one launch: grad_z and grad_p blocks) on z3 (B, D, HW) with its own strides; with
    `reverse`, its blocks run in decreasing index order (another block adds grad_p's image parts)."""
    B, D, HW = z3.shape
    M = p.shape[0]
    grad_z = torch.full((B, D, HW), -7.0)
    grad_p = torch.full((M, D), -7.0)
    gs, gd, idx, dist, p = (t.contiguous() for t in (grad_sim, grad_dist, idx, dist, p))
    prm = BackwardParams(_ptr(gs), _ptr(gd), _ptr(z3), *z3.stride(), _ptr(p), _ptr(idx),
                         _ptr(dist), _ptr(grad_z), _ptr(grad_p), None, None, B, D, HW, M, eps)
    lib.emu_backward(ctypes.byref(prm), int(reverse))
    return grad_z, grad_p


def emu_search_bounds(lib, z3: torch.Tensor, p: torch.Tensor, precision: str):
    """The forward's certification as it ran, per pair (B, M, HW) in float64: v~ = |z_k|^2 - 2 z_k.p_m as
    searched; delta_hi, what the tile's threshold T_m adds to v~ (T_m <= v~ + delta_hi for every patch of the
    tile); delta_lo, what the flags' test subtracts (a candidate iff v~ - delta_lo <= T_m); and the per-pair
    form's delta (forward.cuh), the separable form's reference. Rows and pairs no tile recorded are NaN."""
    B, D, HW = z3.shape
    M = p.shape[0]
    tiles = (HW + 63) // 64
    p = p.contiguous()
    out = torch.full((B, M, HW, 4), math.nan)
    tile = torch.full((B, M, tiles, 2), math.nan)
    sim, dist, idx = torch.empty(B, M), torch.empty(B, M), torch.empty(B, M, dtype=torch.int64)
    rows = channel_rows(z3)
    prm = forward_params(z3, rows, p, sim, dist, idx, eps=1e-4, precision=precision)
    lib.emu_search_values(ctypes.byref(prm), ctypes.c_void_p(_ptr(out)), ctypes.c_void_p(_ptr(tile)))
    out, tile = out.double(), tile.double().repeat_interleave(64, 2)[:, :, :HW]  # per patch: its tile's row
    v, hi, lo, ref = out.unbind(3)
    return v, hi - v + tile[..., 0], v - lo + tile[..., 1], ref


def emu_search_values(lib, z3: torch.Tensor, p: torch.Tensor, precision: str):
    """(v~, delta) of every pair (B, M, HW), float64: the search's value and a bound that both ends of its
    certification respect (emu_search_bounds: the smaller of delta_hi and delta_lo)."""
    v, hi, lo, _ = emu_search_bounds(lib, z3, p, precision)
    return v, torch.minimum(hi, lo)


def check_bound(lib, precision: str) -> str | None:
    """|a~ - t| <= delta_hi and delta_lo for every pair (emu_search_bounds: the bounds the threshold and the
    flags used; a~ = v~ + |p|^2, t the true distance, in float64) on features at several scales, prototypes
    near patches (cancellation) and mixed magnitudes, all certified in forward.cuh's separable form, and on
    features with norms above its limit (2^100), certified in the per-pair form (the emulator counts the tiles
    of each); both at least the per-pair form's delta (the separable form's claim, which random errors far
    below the bound would not test); and no looser than 1e-4 (FFMA, 3xTF32) or 1e-2 (TF32) of 2 (|z|^2 +
    |p|^2), the separable form's radius ((|z| + |p|)^2, the per-pair form's, is at most that). None if all
    hold, else what failed."""
    g = torch.Generator().manual_seed(2)
    z3, p = torch.rand(2, 64, 20, generator=g) * 2.0**52, torch.rand(30, 64, generator=g) * 2.0**52
    p[:10] = z3[0, :, :10].T * (1 + 1e-4 * torch.randn(10, 64, generator=g))
    cases = reference.bound_cases(batch=2) + [(z3, p)]
    for i, (z3, p) in enumerate(cases):
        before = lib.emu_per_pair_tiles()
        v, hi, lo, ref = emu_search_bounds(lib, z3, p, precision)
        per_pair = lib.emu_per_pair_tiles() - before
        if (per_pair > 0) != (i == len(cases) - 1):
            return f"case {i}: {per_pair} tiles certified in the per-pair form"
        t = reference.float64_distances(z3, p)
        a = v + (p.double() ** 2).sum(1)[None, :, None]
        radius = 2 * ((z3.double() ** 2).sum(1)[:, None, :] + (p.double() ** 2).sum(1)[None, :, None])
        for name, delta in (("delta_hi", hi), ("delta_lo", lo)):
            if not ((a - t).abs() <= delta).all():
                return f"case {i}: |a~ - t| exceeds {name}, by up to {((a - t).abs() / delta).max().item():.3g}x"
            # the per-pair form's own fp32 evaluation (v~ +- delta) may take a few u N off its delta, and
            # subnormal roundings (2^-149 each) a few 2^-149 (c_abs, >= 9 2^-126, is there for them)
            if not (delta >= ref - 2.0 ** -20 * radius - 2.0 ** -140).all():
                return f"case {i}: {name} below the per-pair form's delta, down to {(delta / ref).min().item():.3g}x"
        limit = {"highest": 1e-4, "high": 1e-4, "medium": 1e-2}[precision]
        if not (torch.maximum(hi, lo) <= limit * radius + 1e-30).all():
            return f"case {i}: delta looser than {limit} x 2 (|z|^2 + |p|^2)"
    return None


def make_z3(B, D, HW, layout):
    """z as the kernels see it, (B, D, HW), in several memory layouts."""
    if layout == "contiguous":
        return torch.rand(B, D, HW)
    if layout == "channels_last":  # stride_d = 1, stride_k = D
        return torch.rand(B, HW, D).transpose(1, 2)
    if layout == "strided_k":  # stride_k = 2, stride_d = 4 HW + 2
        return torch.rand(B, 2 * D, 2 * HW + 1)[:, ::2, 1::2]
    if layout == "strided_d":  # stride_d = 3, stride_k = 3 D
        return torch.rand(B, HW, 3 * D).transpose(1, 2)[:, ::3]
    if layout == "padded_k":  # stride_k = 1, rows padded to a multiple of 4: 16-byte copies, a partial last one
        return torch.rand(B, D, (HW + 3) // 4 * 4)[:, :, :HW]
    if layout == "misaligned":  # contiguous strides, base one float past 16-byte alignment: 4-byte copies
        return torch.rand(B * D * HW + 1)[1:].view(B, D, HW)
    raise ValueError(layout)


def accumulation_case(D: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive TF32-exact operands over 15 binades: no operand residual, and every k8 step adds products far
    below the running sum, whose low bits a truncating accumulation drops, all in the same direction."""
    g = torch.Generator().manual_seed(3)

    def tf32(x):
        return (x.contiguous().view(torch.int32) & -8192).view(torch.float32)

    def draw(*shape):
        return tf32(torch.rand(*shape, generator=g) * 2.0 ** torch.randint(-14, 1, shape, generator=g).float())

    return draw(2, D, 20), draw(30, D)


def check_truncating_model(exact, truncating) -> str | None:
    """The certification under the pessimistic accumulation model (``truncating``: a PROTOKERN_EMU_HMMA_TRUNCATE
    build, every term of a k8 step truncated at the largest one's 24th bit): check_bound at both tensor-core
    precisions and on accumulation_case, whose searched values the model must change (else it is not in force)
    while |a~ - t| stays within delta. None if all hold, else what failed.

    What it catches: a bound far too small for the model, not a margin shaved off (under the model the worst
    |a~ - t| is ~3% of delta on the bound cases at "high", 0.3% on accumulation_case, whose TF32-exact operands
    make "high" search as "medium" does): the accumulation budget (20 u a k8 step) is small beside the norms'
    gamma terms, so it is not checked alone. A tensor core adding 4 products at a time (two truncations a k8
    step) is outside the model."""
    z3, p = accumulation_case()
    t = reference.float64_distances(z3, p)
    for precision in ("high", "medium"):
        err = check_bound(truncating, precision)
        if err:
            return f"{precision}: {err}"
        v, delta = emu_search_values(truncating, z3, p, precision)
        if torch.equal(v, emu_search_values(exact, z3, p, precision)[0]):
            return f"{precision}: the truncating model gives the exact model's values"
        worst = ((v + (p.double() ** 2).sum(1)[None, :, None] - t).abs() / delta).max().item()
        if not worst <= 1:
            return f"{precision}: accumulation case: |a~ - t| exceeds delta by up to {worst:.3g}x"
    return None


def contract_reference(z3: torch.Tensor, p: torch.Tensor, eps: float = 1e-4):
    """The op's contract in float64 (tests/reference.contract_result): (similarity, min_distances,
    patch_index), similarity 0 at d = +inf. Exact for cases without fp32-level near-ties."""
    dist, idx = reference.contract_result(z3, p)
    dist = dist.float().double()  # an exact distance past FLT_MAX is +inf in fp32
    return torch.log1p((1 - eps) / (dist + eps)), dist, idx


def check_case(lib, z3, p, *, grads=True, precision="highest") -> dict:
    """Forward (values, index) and backward of the emulated kernels against the float64 original. The picked
    patch must be an exact minimiser up to fp32 rounding of the exact distance at every precision. The result
    holds the checks and, under "outputs", the forward's (similarity, min_distances, patch_index)."""
    B, D, HW = z3.shape
    sim, dist, idx = emu_forward(lib, z3, p, precision=precision)
    zr, pr = z3.double()[..., None].requires_grad_(), p.double().requires_grad_()
    sim_ref, dist_ref = original_layer(zr, pr)
    full = reference.float64_distances(z3, p)  # (B, M, HW)
    res = {
        "dist_rel": rel_err(dist, dist_ref),
        "sim_abs": (sim.double() - sim_ref).abs().max().item(),
        "idx_ok": bool((full.gather(2, idx[..., None])[..., 0] <= full.amin(2) * (1 + 2e-6) + 1e-9).all()),
    }
    if grads:
        w_sim, w_dist = torch.randn(B, p.shape[0]), torch.randn(B, p.shape[0])
        gz, gp = emu_backward(lib, w_sim, w_dist, z3, p, idx, dist)
        ((sim_ref * w_sim).sum() + (dist_ref * w_dist).sum()).backward()
        res["gz_rel"] = rel_err(gz, zr.grad[..., 0])
        res["gp_rel"] = rel_err(gp, pr.grad)
        # The sums run in a fixed order that does not depend on z's strides: bit-identical on a copy.
        gz2, gp2 = emu_backward(lib, w_sim, w_dist, z3.contiguous(), p, idx, dist)
        res["grads_layout_free"] = torch.equal(gz, gz2) and torch.equal(gp, gp2)
        # ... nor on which block adds grad_p's image parts (blocks in the other order).
        gz3, gp3 = emu_backward(lib, w_sim, w_dist, z3, p, idx, dist, reverse=True)
        res["grads_order_free"] = torch.equal(gz, gz3) and torch.equal(gp, gp3)
    res["ok"] = (res["dist_rel"] < 1e-5 and res["sim_abs"] < 1e-4 and res["idx_ok"]
                 and res.get("gz_rel", 0) < 1e-4 and res.get("gp_rel", 0) < 1e-4
                 and res.get("grads_layout_free", True) and res.get("grads_order_free", True))
    res["outputs"] = (sim, dist, idx)
    return res


def _grid(*shape, high=4.0):
    """Values in [0, high) on a grid of 2^-10: sums of their squared differences are exact in fp32."""
    return torch.randint(0, int(high * 1024), shape).float() / 1024


def adversarial_cases(gen_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The contract's adversarial inputs, name -> (z3 (B, D, HW), p (M, D)); the expected outputs are
    contract_reference's (no case holds an fp32-level tie that summation order could break)."""
    torch.manual_seed(gen_seed)
    gen = torch.Generator().manual_seed(gen_seed)
    cases = {}
    # Issue 9: 16 prototypes, each equal to a patch of its image, a lower patch 1e-6..1.6e-5 away in
    # squared distance (D = 128, values in [0, 4)); and the shared near-tie builders (tests/reference.py).
    z, p, _ = reference.issue_case(generator=gen)
    cases["issue: exact patch vs 1e-6..1.6e-5"] = (z.flatten(2), p)
    for kind in ("zero", "small", "one", "duplicates", "equal", "last"):
        z, p, _ = reference.near_tie_case(kind, generator=gen)
        cases[f"near_tie_case {kind!r}"] = (z.flatten(2), p)
    # TF32's largest truncation residuals: the search alone ranks a prototype's truncated copy first.
    z, p, _ = reference.residual_case(B=2, D=128, H=7, W=7, generator=gen)
    cases["largest TF32 residuals: truncated copy vs exact patch"] = (z.flatten(2), p)
    z, p, _ = reference.huge_prototype_case(generator=gen)
    cases["|p|^2 past FLT_MAX over TF32-exact z: NaN bounds stay candidates"] = (z.flatten(2), p)

    # Across patch tiles (HW = 130): the exact distance-1 patch (later tile) against a patch at 1 + 1e-6
    # (earlier tile), and d = 0 against a 1e-6 gap on the 2^-10 grid (both exact in fp32).
    B, D, HW = 2, 40, 130
    z = _grid(B, D, HW)
    p = _grid(4, D)
    for b in range(B):
        z[b, :, 100] = p[0]
        z[b, 0, 100] += 1.0  # distance 1 exactly
        z[b, :, 5] = z[b, :, 100]
        z[b, 1, 5] += 1e-3  # distance 1 + 1e-6
        z[b, :, 70] = p[1]  # distance 0 exactly
        z[b, :, 3] = p[1]
        z[b, 2, 3] += 1e-3  # distance 1e-6
    cases["near-ties at d = 0 and d = 1 across tiles"] = (z, p)

    # Exact duplicates of the winning patch (in three patch tiles) and many equal patches.
    z = _grid(2, 24, 140)
    p = _grid(3, 24)
    for k in (9, 64 + 5, 128 + 1):
        z[:, :, k] = p[0] + 0.25
    z[1] = 0.5  # every patch of image 1 equal
    cases["duplicates and equal patches"] = (z, p)

    # NaN: one patch of image 0 (two NaN patches: the lower wins), one channel of image 1 (every patch),
    # one prototype channel.
    z = torch.rand(3, 20, 70)
    p = torch.rand(5, 20)
    z[0, 3, 66] = math.nan
    z[0, 7, 41] = math.nan
    z[1, 11, :] = math.nan
    p[2, 7] = math.nan
    cases["NaN in a patch, a channel, a prototype"] = (z, p)

    # inf: +inf in one patch, -inf in another (the other patches stay finite and win), every patch of
    # image 2 inf (mixed signs: the lowest index wins at +inf, similarity 0).
    z = torch.rand(3, 20, 70)
    p = torch.rand(6, 20)
    z[0, 4, 10] = math.inf
    z[0, 9, 65] = -math.inf
    z[1, :, 0] = math.inf
    p[4] = z[1, :, 1]  # the winner sits right after an inf patch
    z[2, 0, :] = math.inf
    z[2, 1, ::2] = -math.inf
    cases["+inf and -inf patches, all patches inf"] = (z, p)

    # Every patch but the last one +inf in a channel: all 64 patches of every prototype are candidates, 5
    # prototypes per warp (M = 40) make 320 per warp and tile, more than a warp's rescoring list holds (128 for
    # the MMA searches, 256 for FFMA: forward.cuh kListCap), so later windows hold the finite winners.
    z = torch.rand(2, 8, 64)
    p = torch.rand(40, 8)
    z[:, 3, :63] = math.inf
    cases["inf everywhere but the last patch: several rescoring windows"] = (z, p)

    # A prototype with an inf channel over 7x7 maps whose rows are stored 64 apart with NaN in the gaps: the
    # tile's padding patches (49..63) get a non-finite v~ too (0 * inf) and must never be rescored (their z
    # would be the gaps' NaN, a NaN winner at patch >= HW).
    z = torch.full((2, 16, 64), math.nan)[:, :, :49]
    z.copy_(torch.rand(2, 16, 49))
    p = torch.rand(3, 16)
    p[1, 5] = math.inf
    cases["inf prototype, NaN between 7x7 rows: padding never rescored"] = (z, p)

    # The same over contiguous 7x7 z (the MMA searches stage it densely, forward.cuh kZDense: a tile's padding
    # patches 49..63 see the next channel's values, or stale shared memory) followed in memory by NaN: a padding
    # patch that were rescored would read past the tensor, a NaN winner.
    z = torch.full((2 * 16 * 49 + 64,), math.nan)[:2 * 16 * 49].view(2, 16, 49)
    z.copy_(torch.rand(2, 16, 49))
    p = torch.rand(3, 16)
    p[1, 5] = math.inf
    cases["inf prototype over dense 7x7 z, NaN past it: padding never rescored"] = (z, p)
    return cases


def check_contract(outs: dict, z3, p) -> str | None:
    """outs: precision -> (sim, dist, idx). None if every precision meets the contract and all precisions
    agree bit for bit (check_same_bits), else what failed."""
    sim_ref, dist_ref, idx_ref = contract_reference(z3, p)
    for precision, (sim, dist, idx) in outs.items():
        if not torch.equal(idx, idx_ref):
            bad = (idx != idx_ref).nonzero()[:4].tolist()
            return f"{precision}: patch_index differs from the contract at (b, m) {bad}"
        same_nan = torch.equal(dist.isnan(), dist_ref.isnan()) and torch.equal(sim.isnan(), sim_ref.isnan())
        finite = dist_ref.isfinite()
        if not same_nan or not torch.equal(dist.isinf(), dist_ref.isinf()):
            return f"{precision}: NaN/inf pattern of the outputs differs from the contract"
        if not torch.allclose(dist[finite].double(), dist_ref[finite], rtol=1e-6, atol=1e-7):
            return f"{precision}: min_distances differ from the contract"
        ok_sim = ~sim_ref.isnan()
        if not torch.allclose(sim[ok_sim].double(), sim_ref[ok_sim], rtol=0, atol=1e-4):
            return f"{precision}: similarity differs from the contract"
    return check_same_bits(outs)


def check_same_bits(outs: dict) -> str | None:
    """outs: name -> (similarity, min_distances, patch_index) of one input. None if all are bit-identical to
    the first, else which one is not."""
    first = next(iter(outs.values()))
    for name, out in outs.items():
        if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) if a.is_floating_point() else torch.equal(a, b)
                   for a, b in zip(out, first)):
            return f"{name}: (similarity, min_distances, patch_index) not bit-identical to {next(iter(outs))}"
    return None


# (B, D, HW, M, layout): several patch tiles (HW=323), channel stages (D=67), prototype blocks (M=150);
# the CUB tile configuration (D=128, HW=49, a full and a partial prototype block).
CASES = [
    (2, 67, 17 * 19, 150, "contiguous"),
    (2, 40, 35, 130, "channels_last"),
    (2, 36, 81, 20, "strided_k"),
    (2, 33, 70, 9, "strided_d"),
    (1, 16, 1, 1, "contiguous"),
    (3, 8, 49, 5, "channels_last"),
    (1, 1, 9, 4, "contiguous"),
    (2, 128, 49, 130, "channels_last"),
    (1, 5, 20, 300, "strided_k"),  # several prototype chunks per grad_z warp
    (33, 130, 4, 3, "strided_d"),  # grad_p: several batch chunks and channel passes
    (11, 40, 49, 300, "strided_d"),  # backward: 6 image pairs (last one single), 3 grad_p stages of 5 images
    (9, 20, 300, 70, "channels_last"),  # grad_p without staging (HW > 256), 2 stages; grad_z passes of 32
    (2, 36, 196, 70, "contiguous"),  # 16-byte copies of z (14 x 14) and p (D % 4 == 0)
    (2, 40, 67, 20, "padded_k"),  # 16-byte copies of z with a partial last chunk (67 = 16 x 4 + 3)
    (2, 36, 196, 30, "misaligned"),  # 4-byte fallback for z, 16-byte copies of p
    (1, 8, 2000, 50, "channels_last"),  # grad_z sorted by patch in 8 passes; the scan's runs on all 8 warps
]


RANDOM_CASES = 18  # run()'s random cases: seeds 0..17, every kind twice
LAYOUTS = ("contiguous", "channels_last", "strided_k", "strided_d", "padded_k", "misaligned")


def check_random(lib, seed: int, kind: str | None = None) -> str | None:
    """reference.random_case(seed, kind) in a random make_z3 layout: every precision and plan bit-identical in
    (similarity, min_distances, patch_index); the contract's exact winner where fp32 distances are exact, else
    a float64 minimiser up to fp32 rounding; where everything is finite, the backward against float64 at the
    kernel's winners, in both block orders to the same bits. None if all hold, else what failed."""
    z, p, exact = reference.random_case(seed, kind)
    (B, D, HW), M = z.shape, p.shape[0]
    z3 = make_z3(B, D, HW, LAYOUTS[seed % len(LAYOUTS)])
    z3.copy_(z)
    outs = {}
    for precision in PRECISIONS:
        outs[precision] = emu_forward(lib, z3, p, precision=precision)
        for name, plan in plans(B, D, precision).items():
            outs[f"{precision} {name}"] = emu_forward(lib, z3, p, precision=precision, plan=plan)
    sim, dist, idx = outs["highest"]
    err = check_contract(outs, z3, p) if exact else check_same_bits(outs)
    if err:
        return err
    if not (z.isfinite().all() and p.isfinite().all()):
        return None
    g = torch.Generator().manual_seed(seed)
    w_sim, w_dist = torch.randn(B, M, generator=g), torch.randn(B, M, generator=g)
    gz, gp = emu_backward(lib, w_sim, w_dist, z3, p, idx, dist)
    try:  # a float64 minimiser up to fp32 rounding of the distances (D 2^-24 each), its values, the gradients
        reference.check_winners_and_gradients(z3, p, sim, dist, idx, w_sim, w_dist, gz, gp, search_tol=D * 2.0**-22)
    except AssertionError as e:
        return f"winners or gradients: {e}"
    gz2, gp2 = emu_backward(lib, w_sim, w_dist, z3, p, idx, dist, reverse=True)
    if not (torch.equal(gz, gz2) and torch.equal(gp, gp2)):
        return "gradients depend on the blocks' order"
    return None


def check_launch_shapes(lib) -> str | None:
    """The launcher's forward grid (forward_launch) keeps grid_y within CUDA's 65535 and gives every image to
    exactly one block row, in both plans, for batch sizes around and far beyond that limit. None if so."""
    out = (ctypes.c_longlong * 4)()
    for B in (1, 2, 263, 65535, 65536, 200001, 2 ** 31 - 1):
        for D, M in ((64, 130), (256, 130), (128, 100000)):
            prm = ForwardParams(B=B, D=D, HW=49, M=M)
            lib.emu_forward_launch(ctypes.byref(prm), 264, out)
            gx, gy, ipb, resident = out
            if not (gx == -(-M // 128) and 1 <= gy <= 65535 and (gy - 1) * ipb < B <= gy * ipb
                    and bool(resident) == (D <= 128 and ipb > 1)):
                return f"B={B} D={D} M={M}: grid ({gx}, {gy}), {ipb} images per block, resident={resident}"
    return None


def check_copy_paths(lib) -> str | None:
    """The forward's staging paths: 16-byte cp.async where the alignment allows (z with stride_k == 1, stride_d
    and stride_b multiples of 4, 16-byte aligned; p with D % 4 == 0, 16-byte aligned), 4-byte copies otherwise,
    in both plans, and the same output bits either way. None if so, else what failed."""
    B, D, HW, M = 2, 36, 196, 70
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    z_off = torch.empty(B * D * HW + 1)[1:].view(B, D, HW).copy_(z3)  # same values, misaligned base
    p_off = torch.empty(M * D + 1)[1:].view(M, D).copy_(p)
    n_d, tiles, grid_x = math.ceil(D / 32), math.ceil(HW / 64), math.ceil(M / 128)
    # 16-byte copies of z: 2 per thread per stage (512 per block and stage); of p: 4 per thread per stage
    # (streaming), or 8 per prototype row of 32 channels once per block (p-resident)
    z_vec, p_vec = {"streaming": 512 * B * grid_x * n_d * tiles, "resident": 512 * B * grid_x * n_d * tiles}, \
        {"streaming": 1024 * B * grid_x * n_d * tiles, "resident": 128 * 8 * n_d * grid_x}
    ref = emu_forward(lib, z3, p)
    for precision in PRECISIONS:
        for plan_name, plan in (("streaming", (False, 1)), ("resident", (True, B))):
            for name, (zz, pp, zv, pv) in {"aligned": (z3, p, 1, 1), "z misaligned": (z_off, p, 0, 1),
                                           "p misaligned": (z3, p_off, 1, 0), "both misaligned": (z_off, p_off, 0, 0)
                                           }.items():
                before = lib.emu_vector_copies()
                out = emu_forward(lib, zz, pp, precision=precision, plan=plan)
                vec, expect = lib.emu_vector_copies() - before, zv * z_vec[plan_name] + pv * p_vec[plan_name]
                if vec != expect:
                    return f"{precision} {plan_name} {name}: {vec} 16-byte copies, expected {expect}"
                if not all(torch.equal(a, b) for a, b in zip(out, ref)):
                    return f"{precision} {plan_name} {name}: outputs differ from the default path's"
    return None


def check_dense_copy_paths(lib) -> str | None:
    """The forward's dense NCHW z path (forward.cuh kZDense) on CUB-like launches: 7x7 maps of contiguous,
    16-byte-aligned z take it at "high" and "medium" (the launcher's forward_z_copy; 2 16-byte copies per thread and
    channel stage: an image's 32-channel run of 32 HW floats in 8 HW chunks, zero-filled past D and past the run;
    in the p-resident plan's z ring only the chunks within a ring buffer, 396 per stage),
    "highest" and a z base one float off alignment take 4-byte copies (no 16-byte z copy); p as check_copy_paths;
    the same output bits on every path, plan and precision. None if so, else what failed."""
    for B, D, HW, M in ((2, 128, 49, 130), (3, 72, 49, 20)):  # the CUB tile configuration; a partial last stage
        z3, p = torch.rand(B, D, HW), torch.rand(M, D)
        z_off = torch.empty(B * D * HW + 1)[1:].view(B, D, HW).copy_(z3)  # same values, misaligned base
        n_d, grid_x = math.ceil(D / 32), math.ceil(M / 128)
        p_vec = {"streaming": 1024 * B * grid_x * n_d, "resident": 128 * 8 * n_d * grid_x}
        ref = emu_forward(lib, z3, p)
        for precision in PRECISIONS:
            for plan_name, plan in (("streaming", (False, 1)), ("resident", (True, B))):
                for name, zz in (("aligned", z3), ("z misaligned", z_off)):
                    dense = name == "aligned" and precision != "highest"
                    prm = ForwardParams(_ptr(zz), *zz.stride(), HW=HW, precision=PRECISIONS[precision])
                    if (path := lib.emu_forward_z_copy(ctypes.byref(prm))) != (3 if dense else 0):
                        return f"{(B, D, HW, M)} {precision} {name}: z copy path {path}"
                    before = lib.emu_vector_copies()
                    out = emu_forward(lib, zz, p, precision=precision, plan=plan)
                    vec = lib.emu_vector_copies() - before
                    per_stage = 396 if plan_name == "resident" else 512  # forward.cuh kRingStage / 4
                    expect = p_vec[plan_name] + (per_stage * B * grid_x * n_d if dense else 0)
                    if vec != expect:
                        return f"{(B, D, HW, M)} {precision} {plan_name} {name}: {vec} 16-byte copies, expected {expect}"
                    if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(out, ref)):
                        return f"{(B, D, HW, M)} {precision} {plan_name} {name}: outputs differ from the launcher's"
    return None


def check_rescoring_rows(lib) -> str | None:
    """The rescoring's z rows (params.h ForwardParams::zr): outside the dense path's z ring the candidates' channels
    come from them, so z's own view (channels_last z), a padded copy (D % 4 != 0, with a partial last chunk of 8
    channels) and rows of a wider buffer (NaN between them: read outside a row, it would show) give the same bits
    in both plans at every precision; the ring (dense 7x7 z, p-resident) reads none (a null zr). None if so, else
    what failed."""
    for B, D, HW, M, layout in ((2, 70, 30, 40, "contiguous"), (2, 72, 196, 130, "channels_last")):
        z3, p = make_z3(B, D, HW, layout), torch.rand(M, D)
        own = channel_rows(z3)
        if (own.data_ptr() == z3.data_ptr()) != (layout == "channels_last"):
            return f"{(B, D, HW, M)} {layout}: channel_rows copied {'no' if own.data_ptr() == z3.data_ptr() else 'a'} z"
        row = (D + 3) // 4 * 4 + 12  # a multiple of 4 (params.h)
        wide = torch.full((B * (HW * row + 8),), math.nan).as_strided((B, HW, D), (HW * row + 8, row, 1))
        wide.copy_(z3.transpose(1, 2))
        ref = emu_forward(lib, z3, p)
        for precision in PRECISIONS:
            for plan in ((False, 1), (True, B)) if D <= 128 else ((False, 1),):
                for name, rows in (("own", own), ("wide", wide)):
                    out = emu_forward(lib, z3, p, precision=precision, plan=plan, rows=rows)
                    if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(out, ref)):
                        return f"{(B, D, HW, M)} {layout} {precision} {plan} rows {name}: outputs differ"
    z3, p = torch.rand(2, 128, 49), torch.rand(130, 128)  # the ring (dense z, MMA search, p-resident)
    ref = emu_forward(lib, z3, p, precision="high", plan=(True, 2))
    sim, dist, idx = torch.empty(2, 130), torch.empty(2, 130), torch.empty(2, 130, dtype=torch.int64)
    errors = lib.emu_errors()
    lib.emu_forward_plan(ctypes.byref(forward_params(z3, None, p, sim, dist, idx, eps=1e-4, precision="high")), 1, 2)
    if lib.emu_errors() != errors or not all(torch.equal(a, b) for a, b in zip((sim, dist, idx), ref)):
        return "the dense path's ring with a null zr: errors or other outputs"
    return None


def check_backward_copy_paths(lib) -> str | None:
    """grad_p's staging paths (backward.cuh): 16-byte cp.async of z as it lies where z is 16-byte aligned with
    NCHW runs (stride_k == 1, stride_d == HW, HW % 8 != 0: an 8x8 map's lane stride of 64 floats would read with
    32-way bank conflicts) or NHWC runs (stride_d == 1, stride_k % 4 == 0), one per 4 floats of every staged
    (image, 32-channel slice) and prototype tile; 4-byte copies otherwise; the same gradient bits on every path.
    None if so, else what failed."""
    for HW in (49, 64):
        B, D, M = 3, 64, 70
        z3 = torch.rand(B, D, HW)
        args = (torch.randn(B, M), torch.randn(B, M))
        p, idx, dist = torch.rand(M, D), torch.randint(0, HW, (B, M)), torch.rand(B, M)
        vec = B * D * HW // 4 * math.ceil(M / 64)  # backward.cuh kGpM = 64 prototypes per grad_p block
        layouts = {"NCHW": (z3, vec if HW % 8 else 0),
                   "NHWC": (torch.empty(B, HW, D).copy_(z3.transpose(1, 2)).transpose(1, 2), vec),
                   "misaligned": (torch.empty(B * D * HW + 1)[1:].view(B, D, HW).copy_(z3), 0),
                   "strided_d": (torch.empty(B, HW, 2 * D)[:, :, ::2].copy_(z3.transpose(1, 2)).transpose(1, 2), 0)}
        ref = None
        for name, (zz, expect) in layouts.items():
            before = lib.emu_vector_copies()
            out = emu_backward(lib, *args, zz, p, idx, dist)
            if (n := lib.emu_vector_copies() - before) != expect:
                return f"HW = {HW}, {name}: {n} 16-byte copies, expected {expect}"
            ref = ref or out
            if not all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(out, ref)):
                return f"HW = {HW}, {name}: gradients differ from the NCHW path's"
    return None


def check_backward_plans(lib) -> str | None:
    """grad_z's plan (backward.cuh backward_launch): the sorted one (winners sorted by patch once per block)
    where the scanning plan would need several passes of patches and the sorted plan's shared memory fits,
    the scanning one otherwise (the CUB shape, many prototypes); grad_p's image parts (64 B / (G M) of them,
    rounded, whole stages each, at most 4 and 16 MiB of partial sums); and the role order (gp_first: grad_p's
    blocks first where they add more pairs than grad_z's, 64 x (images per part) > G M); every CASES backward
    with parts adds them in the order of its blocks and in the reverse order to the same bits (check_case).
    None if the launcher picks as expected."""
    expect = {(80, 128, 49, 2000): (0, 3, 30, 0), (64, 128, 49, 10000): (0, 1, 65, 0),
              (128, 256, 196, 2000): (1, 4, 32, 1), (32, 512, 784, 2000): (1, 1, 32, 1),
              (2, 36, 196, 70): (1, 2, 1, 0), (1, 8, 100, 5000): (0, 1, 2, 0), (2, 4, 100, 70000): (0, 1, 2, 0),
              (40, 8, 16, 2000): (0, 1, 40, 0),  # G = 2 images per grad_z block
              (4096, 1024, 49, 2000): (0, 2, 2050, 1),  # 4 parts would hold 32 MiB of partial sums
              (33, 130, 4, 3): (0, 3, 16, 1), (11, 40, 49, 300): (0, 2, 10, 1), (9, 20, 300, 70): (1, 2, 8, 1)}
    for (B, D, HW, M), want in expect.items():
        got = backward_launch(lib, B, D, HW, M)
        got = (got["gz_sorted"], got["gp_parts"], got["gp_part_images"], got["gp_first"])
        if got != want:
            return f"{(B, D, HW, M)}: (gz_sorted, gp_parts, gp_part_images, gp_first) = {got}, expected {want}"
    # PROTOKERN_CUDA_GRAD_P_PARTS=1 (benchmarks/distance.py's A/B row): the CUB shape's launch before the parts
    one = backward_launch(lib, 80, 128, 49, 2000, max_parts=1)
    if (one["gp_parts"], one["gp_part_images"], one["gp_first"], one["blocks"]) != (1, 80, 1, 448):
        return f"CUB shape, one part: {one}"
    return None


def backward_error(lib, gs, gd, z3, p, idx, dist, eps: float = 1e-4) -> float:
    """The backward alone (no forward to emulate) from the given winners (emu_backward's arguments), against
    float64: the larger relative error of grad_z and grad_p; NaN (which no `<=` passes) where either holds one."""
    gz, gp = emu_backward(lib, gs, gd, z3, p, idx, dist, eps=eps)
    d = dist.double()
    g = gd.double() + gs.double() * ((eps - 1) / ((d + 1) * (d + eps)))  # dL/dd
    ref_z, ref_p = reference.winner_gradients(z3, p, idx, g)
    errs = [rel_err(gz, ref_z), rel_err(gp, ref_p)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)


def check_backward_winners(lib) -> str | None:
    """Both grad_z plans from random winners against float64, where CASES do not reach: the scanning plan in
    two passes of patches (where the sorted plan does not fit); an eps other than the default in both plans
    (distances near 0, where the slope (eps - 1) / ((d + 1)(d + eps)) depends most on it); the sorted plan with
    winners forced onto its last patch (the scan's last run total must count them); and the sorted plan's
    documented order, each patch's sum one fma chain in increasing m across chunks and warps: every prototype
    wins patch 0 with z - p = 1, and three contributions (1e8, -1e8, 1 at some m) give the fp32 chain's value
    in increasing m, which another order of the three changes. None if all hold."""
    # (B, D, HW, M), layout, eps, grad_z plan sorted by patch, winners on the last patch
    cases = [((1, 8, 100, 5000), "contiguous", 1e-4, 0, False), ((2, 40, 35, 130), "channels_last", 0.05, 0, False),
             ((1, 8, 300, 50), "strided_d", 0.05, 1, False), ((1, 8, 2000, 50), "channels_last", 1e-4, 1, True)]
    B, D, HW, M = 1, 8, 100, 600  # the order cases: 96 prototypes a warp (seg), 3 chunks of 32 each
    for shape, _, _, sorted_plan, _ in cases + [((B, D, HW, M), None, None, 1, None)]:
        if backward_launch(lib, *shape)["gz_sorted"] != sorted_plan:
            return f"{shape}: not the {'sorted' if sorted_plan else 'scanning'} plan"
    for (b, d, hw, m), layout, eps, _, last in cases:
        z3, p = make_z3(b, d, hw, layout), torch.rand(m, d)
        idx, dist = torch.randint(0, hw, (b, m)), torch.rand(b, m) * (0.01 if eps > 1e-4 else 1.0)
        if last:
            idx[:, ::7] = hw - 1
        err = backward_error(lib, torch.randn(b, m), torch.randn(b, m), z3, p, idx, dist, eps=eps)
        if not err <= 1e-5:
            return f"{(b, d, hw, m)} {layout} eps={eps}: gradients off (relative error {err:.1e})"
    z3, p, idx = torch.ones(B, D, HW), torch.zeros(M, D), torch.zeros(B, M, dtype=torch.int64)
    for ms in ((0, 1, 2), (0, 1, 40), (0, 1, 100), (0, 40, 100), (2, 1, 0)):  # a chunk, chunks, warps
        gd = torch.zeros(B, M)
        gd[0, list(ms)] = torch.tensor([1e8, -1e8, 1.0])

        def chain(order):  # 2 g_m (z - p) added in fp32 in this order of m
            acc = torch.zeros((), dtype=torch.float32)
            for m in order:
                acc = acc + 2 * gd[0, m]
            return acc.item()

        want = chain(sorted(ms))
        assert any(chain(order) != want for order in itertools.permutations(ms)), ms  # the case has teeth
        gz, _ = emu_backward(lib, torch.zeros(B, M), gd, z3, p, idx, torch.full((B, M), 8.0))
        if not torch.equal(gz[0, :, 0], torch.full((D,), want)):
            return f"sorted plan, contributions at m = {ms}: grad_z {gz[0, 0, 0].item()}, not the chain's {want}"
    return None


def run(verbose: bool = True, precisions=tuple(PRECISIONS), mutation: bool = True) -> bool:
    """Every case at every search precision (gradients once: the backward does not depend on it), the
    adversarial cases, bit-identity across precisions, the certification bound on every searched pair; with
    `mutation`, also that the adversarial cases catch a search whose certification bound is switched off."""
    torch.manual_seed(0)
    ok = True

    def report(name, good, extra=""):
        nonlocal ok
        ok &= good
        if verbose:
            print(f"{name:60} ok={good} {extra}")

    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        for B, D, HW, M, layout in CASES:
            z3, p = make_z3(B, D, HW, layout), torch.rand(M, D)
            outs = {}
            for precision in precisions:
                res = check_case(lib, z3, p, precision=precision, grads=precision == "highest")
                outs[precision] = res.pop("outputs")
                for name, plan in plans(B, D, precision).items():
                    outs[f"{precision} {name}"] = emu_forward(lib, z3, p, precision=precision, plan=plan)
                report(f"{precision:8} {(B, D, HW, M)!s:20} {layout:14}", res["ok"],
                       {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in res.items() if k != "ok"})
            err = check_same_bits(outs)
            report(f"bit-identical across precisions and plans {(B, D, HW, M)!s}", err is None, err or "")
        for name, (z3, p) in adversarial_cases().items():
            outs = {f"{precision} {name}": emu_forward(lib, z3, p, precision=precision, plan=plan)
                    for precision in precisions
                    for name, plan in plans(z3.shape[0], z3.shape[1], precision).items()}
            err = check_contract(outs, z3, p)
            report(name, err is None, err or "")
        for seed in range(RANDOM_CASES):
            kind = reference.RANDOM_KINDS[seed % len(reference.RANDOM_KINDS)]
            err = check_random(lib, seed, kind)
            report(f"random case {seed} ({kind})", err is None, err or "")
        err = check_launch_shapes(lib)
        report("forward grid_y <= 65535 and every image in one block row, any B", err is None, err or "")
        err = check_copy_paths(lib)
        report("16-byte cp.async where aligned, 4-byte fallback, both plans, same bits", err is None, err or "")
        err = check_dense_copy_paths(lib)
        report("dense 7x7 NCHW z staging (MMA), 4-byte when misaligned, same bits", err is None, err or "")
        err = check_rescoring_rows(lib)
        report("rescoring rows: own view, padded copy, wide rows, none in the ring; same bits", err is None, err or "")
        err = check_backward_copy_paths(lib)
        report("backward: 16-byte z staging where aligned, 4-byte fallback, same bits", err is None, err or "")
        err = check_backward_plans(lib)
        report("backward: grad_z sorted by patch where the scan needs passes; scanning fallback", err is None,
               err or "")
        err = check_backward_winners(lib)
        report("backward from given winners: scanning passes, eps, last patches, fma order", err is None, err or "")
        for precision in precisions:
            err = check_bound(lib, precision)
            report(f"{precision:8} certification bound holds in both forms and is tight", err is None, err or "")
        report("no cp.async group left in flight, no partial sum read unwritten, every part counted",
               lib.emu_errors() == 0)
        if {"high", "medium"} <= set(precisions):
            (Path(tmp) / "truncating").mkdir()
            truncating = build(Path(tmp) / "truncating", ("-DPROTOKERN_EMU_HMMA_TRUNCATE",))
            err = check_truncating_model(lib, truncating)
            report("bound holds with tensor cores truncating every aligned term", err is None, err or "")
        if mutation and "medium" in precisions:
            (Path(tmp) / "mutant").mkdir()
            bad = build(Path(tmp) / "mutant", ("-DPROTOKERN_EMU_CERT_SCALE=0.f",))
            z3, p = adversarial_cases()["issue: exact patch vs 1e-6..1.6e-5"]
            caught = check_contract({"medium": emu_forward(bad, z3, p, precision="medium")}, z3, p) is not None
            report("mutation: TF32 search without its bound is caught", caught)
            report("mutation: ... and by a random case (float_pushed)", check_random(bad, 8, "float_pushed") is not None)
            (Path(tmp) / "mutant_lz").mkdir()
            bad = build(Path(tmp) / "mutant_lz", ("-DPROTOKERN_EMU_LZ_SCALE=0.25f",))
            report("mutation: TF32 residual term at a quarter fails the bound check",
                   check_bound(bad, "medium") is not None)
    return ok


def run_random(seconds: float, first_seed: int) -> bool:
    """check_random from first_seed on, for about `seconds` (a longer search than run()'s RANDOM_CASES)."""
    import time

    start, seed, failed = time.monotonic(), first_seed, 0
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        while time.monotonic() - start < seconds:
            err = check_random(lib, seed) or (f"{lib.emu_errors()} emulator errors" if lib.emu_errors() else None)
            if err:
                failed += 1
                print(f"random case {seed}: {err}", flush=True)
            seed += 1
    print(f"random cases {first_seed}..{seed - 1}: {failed} failed")
    return failed == 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--random":  # --random SECONDS [FIRST_SEED]
        sys.exit(0 if run_random(float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else RANDOM_CASES) else 1)
    sys.exit(0 if run() else 1)
