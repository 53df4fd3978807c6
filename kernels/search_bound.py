"""The certified patch search's error bound of the torch and Triton backends (pure Python: no triton import; the
cuda kernel derives its own for its HMMA accumulation in csrc/forward.cuh, with the same 2^100 separable limit).

Each backend searches with the expansion ``a~ = |z|^2 + |p|^2 - 2 z.p`` (one GEMM) and then rescores
exactly, in the difference form ``e = sum_d (z_d - p_d)^2``, every patch i with
``a~_i - delta_i <= min_j (a~_j + delta_j)`` (and every patch whose a~ is not finite). If
``|a~_i - e_i| <= delta_i`` for every i, the exact minimiser is always among the rescored patches, so the
result does not depend on the search precision. This module gives ``delta``:

    delta(z, p) = coefficient(level, D, u) * ((|z| + |p|)^2 + TINY)      (|.| the L2 norm)

Derivation (u the unit roundoff of the arithmetic, 2^-24 for fp32; gamma(n, v) = n v / (1 - n v); E the
real value sum_d (z_d - p_d)^2 = |z|^2 + |p|^2 - 2 z.p; note E, |z|^2 + |p|^2 and 2 |z| |p| are all
<= (|z| + |p|)^2, and sum_d |z_d p_d| <= |z| |p| by Cauchy-Schwarz):

* norms: the computed |z|^2 and |p|^2 (any summation order, FMA or not) are within gamma(D, u) relative;
  their sum adds one rounding: |S - (|z|^2 + |p|^2)| <= gamma(D + 1, u) (|z| + |p|)^2.
* products z.p (``dot_error``), relative to |z| |p|, accumulation with v = 2u per addition (tensor cores
  may truncate instead of rounding):
  - "ieee" (exact fp32 products, FFMA): gamma(D, 2u).
  - "tf32" (operands truncated to 10 mantissa bits, t = 2^-10; products of two TF32 values are exact in
    fp32): (2t + t^2) operand error + gamma(D, 2u) (1 + t)^2 accumulation.
  - "tf32x3" (x = hi + lo + r with hi = tf32(x), lo = tf32(x - hi), |r| <= t^2 |x|; the three products
    hi.hi + hi.lo + lo.hi are exact): the dropped terms lo.lo + (hi + lo) r' + r (hi' + lo') + r r' are at
    most (3 t^2 + t^4) |z_d p_d|; 3D exact products accumulate with gamma(3D, 2u) (1 + t)^2.
  - "bf16" (operands rounded to 7 mantissa bits, t = 2^-7; what torch's "medium" matmul precision may do):
    as "tf32" with that t.
* epilogue: a~ = fl(S - 2 dot) adds u (1 + small) (|z| + |p|)^2 (an FMA only removes roundings).
* the exact e itself: each difference, square and addition rounds once: |e - E| <= gamma(D + 2, u) E.

Summing: |a~ - e| <= (gamma(D + 1) + dot_error + 2u + gamma(D + 2)) (|z| + |p|)^2. ``coefficient`` returns
twice that: the factor 2 covers the fp32 evaluation of delta itself (the norms it uses are computed ones,
within gamma(D) + 4u relative; sqrt may be approximate on GPUs) and, through TINY = 2^-100, the absolute
error of underflowing products and flushed subnormals (at most (3D + 8) 2^-126, below
coefficient * TINY since coefficient >= 4 gamma(D, u)). Overflowing norms give delta = inf: such patches are
always rescored. The comparisons are exact-safe because rounding is monotone: a~_w - delta_w <= e_w <=
e_j <= a~_j + delta_j for the true winner w implies fl(a~_w - delta_w) <= fl(a~_j + delta_j).

A TF32 search whose kernel truncates the operands itself (hi = tf32(x) by masking the 13 low mantissa bits,
so |hi_d| <= |x_d| and the MMA's own conversion cannot change them) knows its operand error better than
"tf32"'s 2^-9 |z| |p|: with x_lo = x - hi (exact in fp32),

    z.p - z_hi.p_hi = z_lo.p + z_hi.p_lo,   so   |z.p - z_hi.p_hi| <= |z_lo| |p| + |z| |p_lo|   (Cauchy-Schwarz),

and the products z_hi_d p_hi_d are exact with sum_d |z_hi_d p_hi_d| <= |z| |p|, so the rest of the error is
the "ieee" search's. ``truncated_tf32_bound`` gives (c, r, tiny) with

    delta(z, p) = c ((|z| + |p|)^2 + tiny) + r (|z_lo| |p| + |z| |p_lo|),   c = coefficient("ieee", D), r = 4

(2 for the 2 z.p of a~, times the same factor 2 for evaluating delta in fp32). The residual norms are
computed ones, and a square x_lo_d^2 below fp32's normal range may be flushed to 0: that loses at most
rho = sqrt(D) 2^-63 of |x_lo| (each flushed |x_lo_d| < 2^-63), so the bound needs 4 rho (|z| + |p|) more,
which c ((|z| + |p|)^2 + tiny) covers for every norm once tiny >= (2 rho / c)^2 (a quadratic in |z| + |p|
without real roots). A kernel may relax |p_lo| to rho_p |p| with rho_p the largest |p_lo| / |p| of its
prototype tile. On uniform [0, 1) data |x_lo| is about 0.38 2^-10 |x|, and the bound is about 5x tighter
than "tf32"'s in its operand term: 1.4 instead of 4.0 candidates per (b, m) at (D, HW) = (128, 49), 2.8
instead of 38 at (512, 784) (benchmarks/NOTES.md).

A TF32 search that leaves the conversion to the MMA (fp32 operands straight from memory; the hardware
truncates them or rounds them to nearest) has operand parts h = conv(x) with x - h no larger than the
truncation residual, element by element: |x - h| <= |x_lo| (the nearest TF32 value is at least as close as
the truncated one), and |h| <= |x| + |x_lo| <= (1 + t) |x| (t = 2^-10). Then

    |z.p - z_h.p_h| = |(z - z_h).p + z_h.(p - p_h)| <= |z_lo| |p| + (1 + t) |z| |p_lo|,

the products z_h,d p_h,d are exact with sum_d |z_h,d p_h,d| <= (1 + t)^2 |z| |p|, and ``converted_tf32_bound``
gives (c, r, tiny) of the same form with the accumulation term scaled by (1 + t)^2 and r = 4 (1 + t); its
tiny also covers operands the MMA flushes to 0 (each below 2^-126: at most 2^-125 sqrt(D) (|z| + |p|) in a~,
covered once tiny >= (2^-124 D / c)^2 by the argument above).
"""

from __future__ import annotations

import math

TINY = 2.0 ** -100
SEPARABLE_MAX_NORM2 = 2.0 ** 100  # the separable form (``separable``) applies where every |z|^2, |p|^2 is at most this
LEVELS = ("ieee", "tf32x3", "tf32", "bf16")  # increasing search error
# the op's search precisions and their levels (Triton's input_precision names too): "highest" exact fp32 products,
# "high" 3xTF32, "medium" TF32
PRECISION_LEVELS = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}
FP32_UNIT = 2.0 ** -24
FP64_UNIT = 2.0 ** -53


def _gamma(n: int, v: float) -> float:
    if n * v >= 0.5:
        raise ValueError(f"D = {n} is too large for a certified search bound")
    return n * v / (1 - n * v)


def dot_error(level: str, D: int, unit: float = FP32_UNIT) -> float:
    """Bound on |computed z.p - z.p| / (|z| |p|) for the search's products at ``level`` (see module doc)."""
    if level == "ieee":
        return _gamma(D, 2 * unit)
    if level in ("tf32", "bf16"):
        t = 2.0 ** -10 if level == "tf32" else 2.0 ** -7
        return 2 * t + t * t + _gamma(D, 2 * unit) * (1 + t) ** 2
    if level == "tf32x3":
        t = 2.0 ** -10
        return 3 * t * t + t ** 4 + _gamma(3 * D, 2 * unit) * (1 + t) ** 2
    raise ValueError(f"unknown search level {level!r}; choose from {LEVELS}")


def coefficient(level: str, D: int, unit: float = FP32_UNIT) -> float:
    """c such that |a~ - e| <= c * ((|z| + |p|)^2 + TINY) for every patch (see module doc)."""
    return 2 * (_gamma(D + 1, unit) + dot_error(level, D, unit) + 2 * unit + _gamma(D + 2, unit))


def truncated_tf32_bound(D: int) -> tuple[float, float, float]:
    """(c, r, tiny) of a fp32 TF32 search on operands the kernel truncated itself (see module doc):
    delta = c ((|z| + |p|)^2 + tiny) + r (|z_lo| |p| + |z| |p_lo|), x_lo = x - tf32(x)."""
    c = coefficient("ieee", D)
    rho = math.sqrt(D) * 2.0 ** -63
    return c, 4.0, max(TINY, (2 * rho / c) ** 2)


def converted_tf32_bound(D: int) -> tuple[float, float, float]:
    """(c, r, tiny) of a fp32 TF32 search whose MMA converts the operands itself, by truncation or to nearest
    (see module doc): delta = c ((|z| + |p|)^2 + tiny) + r (|z_lo| |p| + |z| |p_lo|), x_lo = x - tf32(x)
    the truncation residual. Covers ``truncated_tf32_bound``'s case too."""
    t = 2.0 ** -10
    c = 2 * (_gamma(D + 1, FP32_UNIT) + _gamma(D, 2 * FP32_UNIT) * (1 + t) ** 2 + 2 * FP32_UNIT
             + _gamma(D + 2, FP32_UNIT))
    rho = math.sqrt(D) * 2.0 ** -63
    return c, 4.0 * (1 + t), max(TINY, (2 * rho / c) ** 2, (D * 2.0 ** -124 / c) ** 2)


def separable(c: float, unit: float = FP32_UNIT) -> float:
    """c_s of the separable form of a bound c ((|z| + |p|)^2 + tiny) (+ a TF32 residual term, unchanged): as
    (|z| + |p|)^2 <= 2 (|z|^2 + |p|^2),

        delta_s = A_k + B_m,   A_k = c_s |z_k|^2,   B_m = c_s |p_m|^2 + c tiny,   c_s = 2 c + 32 u,

    is a bound wherever the per-pair one is (equal to it where |z| = |p|, at most twice it otherwise), and B_m,
    the same for every patch of a prototype, goes to the prototype's threshold: a kernel adds A_k and subtracts
    2 z.p per pair (two fmas and a min, against a square, sums and finite tests). The 32 u (|z|^2 + |p|^2) >=
    16 u (|z| + |p|)^2 pays for the form's own fp32 evaluation, about 8 roundings of relative u on values below
    about (|z| + |p|)^2 (|z|^2 (1 +- c_s), the two fmas, the row minimum + B_m, the lower end - B_m), which the
    monotone-rounding argument above no longer covers. Kernels use it where every norm is finite and <= 2^100,
    so that no value overflows."""
    return 2 * c + 32 * unit


def worst(*levels: str) -> str:
    """The least accurate of several search levels."""
    return max(levels, key=LEVELS.index)
