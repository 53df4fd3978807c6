"""The CUDA C++ extension backend ("cuda", csrc/ + protokern/_cuda.py).

GPU tests (marked ``gpu``) check the public API with backend="cuda" and the raw ops
``torch.ops.protokern_C.forward/backward`` against the float64 original formulation
(tests/reference.py) on fresh random inputs. They skip without a GPU or without the built extension.
Tolerances: min_distances norm-wise relative 1e-5, similarity 1e-4 absolute, float32 gradients
norm-wise relative 1e-4.

One CPU test runs the same CUDA kernel headers on the CPU emulator of csrc/emu (needs g++); the CPU gates
(ptxas, sanitizers) are in tests/test_cuda_gates.py.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import protokern
from protokern import _cuda
from tests import reference
from tests.reference import check_winners_and_gradients, rel_err

gpu = pytest.mark.gpu
LOG_1_OVER_EPS = math.log(1 / 1e-4)


@pytest.fixture
def cuda_backend():
    reason = _cuda.available()
    if reason is not None:
        pytest.skip(reason)


def make_z(B, D, H, W, layout, dtype=torch.float32):
    """z (B, D, H, W) on the GPU; every layout keeps z.flatten(2) a view, so the kernel sees the strides."""
    dev = "cuda"
    if layout == "contiguous":
        z = torch.rand(B, D, H, W, device=dev)
    elif layout == "channels_last":
        z = torch.rand(B, D, H, W, device=dev).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other channel of a bigger tensor: stride_d = 2 H W
        z = torch.rand(B, 2 * D + 1, H, W, device=dev)[:, 1::2]
    elif layout == "sliced_channels_last":  # stride_d = 2, stride_hw = 2 D
        z = torch.rand(B, H, W, 2 * D, device=dev).permute(0, 3, 1, 2)[:, ::2]
    else:
        raise ValueError(layout)
    return z.to(dtype)


def check_against_reference(z, p, *, grad_tol=1e-4, grad_tol_z=None):
    """Forward values and both gradients of backend="cuda" vs the float64 original, and its winning patches."""
    _, dist = reference.check_against_reference(z, p, "cuda", grad_tol=grad_tol, grad_tol_z=grad_tol_z)
    d, idx = protokern.nearest_patches(z.detach(), p.detach(), backend="cuda")
    assert idx.dtype == torch.int64 and torch.equal(d, dist)
    full = reference.float64_distances(z, p)
    at_idx = full.gather(2, idx[..., None])[..., 0]
    # fp32 search: the winner may differ from the exact argmin only by rounding (near-ties)
    assert bool((at_idx <= full.amin(2) * (1 + 2e-5) + 1e-5).all()), "a non-minimal patch won"


# (B, D, H, W, M): H=W=1; 7x7; 14x14; 17x19 (HW = 323: several patch tiles, not a power of two) with
# D=67 (not a multiple of the channel stage); 28x28 (grad_z sorted by patch in 4 passes, grad_p gathering z
# from its channels-innermost copy); D=512; M=1; B=1 with M=2000.
SHAPES = [
    (2, 128, 1, 1, 10),
    (3, 128, 7, 7, 200),
    (2, 128, 14, 14, 100),
    (2, 67, 17, 19, 150),
    (2, 64, 28, 28, 300),
    (2, 512, 7, 7, 130),
    (4, 32, 7, 7, 1),
    (1, 128, 7, 7, 2000),
]
LAYOUTS = ["contiguous", "channels_last", "sliced", "sliced_channels_last"]


@gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_original(cuda_backend, shape, layout):
    B, D, H, W, M = shape
    check_against_reference(make_z(B, D, H, W, layout), torch.rand(M, D, device="cuda"))


@gpu
def test_large_cub_shape(cuda_backend):
    """The CUB/VGG19 training shape (80, 128, 7x7, 2000), channels_last as from a channels_last trunk."""
    z = make_z(80, 128, 7, 7, "channels_last")
    check_against_reference(z, torch.rand(2000, 128, device="cuda"))


@gpu
@pytest.mark.parametrize("D", [64, 256], ids=["p-resident", "streaming"])
def test_batch_beyond_grid_limit(cuda_backend, D):
    """B > 65535 (CUDA's grid_y): the streaming plan takes 2 images per block, the p-resident plan its usual
    spread; outputs and gradients equal the torch backend's. Small integer features: every distance is exact in
    fp32, so both backends must pick the same patch (lowest index on ties) with the same distance."""
    B, M = 70001, 3
    z = torch.randint(0, 4, (B, D, 1, 2), device="cuda").float().requires_grad_()
    p = torch.randint(0, 4, (M, D), device="cuda").float().requires_grad_()
    w = torch.randn(B, M, device="cuda")
    out = {}
    for backend in ("cuda", "torch"):
        sim, dist = protokern.prototype_similarity(z, p, backend=backend)
        _, idx = protokern.nearest_patches(z.detach(), p.detach(), backend=backend)
        out[backend] = (sim, dist, idx, torch.autograd.grad(((sim + dist) * w).sum(), (z, p)))
    (sim_c, dist_c, idx_c, g_c), (sim_t, dist_t, idx_t, g_t) = out["cuda"], out["torch"]
    assert torch.equal(idx_c, idx_t) and torch.equal(dist_c, dist_t)
    assert (sim_c - sim_t).abs().max().item() < 1e-4
    assert rel_err(g_c[0], g_t[0]) < 1e-4 and rel_err(g_c[1], g_t[1]) < 1e-4


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(cuda_backend, dtype):
    """Compared on the same rounded values; z's gradient comes back rounded to z's dtype."""
    z = make_z(3, 64, 7, 7, "channels_last", dtype)
    p = torch.rand(50, 64, device="cuda")
    check_against_reference(z, p, grad_tol_z={torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype])


@gpu
@pytest.mark.parametrize("precision, search_tol", [("high", 1e-5), ("medium", 1e-5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(2, 128, 1, 1, 10), (3, 128, 7, 7, 200), (2, 67, 17, 19, 150),
                                   (80, 128, 7, 7, 2000)], ids=str)
def test_tensor_core_search(cuda_backend, shape, layout, precision, search_tol):
    """3xTF32 / TF32 search on the tensor cores, certified: the picked patch is an exact minimiser (up to fp32
    rounding of the exact distance), the outputs are bit-identical to the FFMA search's, and the distance,
    similarity and both gradients are exact (fp32) at the picked patch."""
    B, D, H, W, M = shape
    z = make_z(B, D, H, W, layout).requires_grad_()
    p = torch.rand(M, D, device="cuda")
    p[0] = z.detach()[-1, :, H // 2, W // 2]  # a prototype equal to a patch
    p.requires_grad_()
    sim, dist = protokern.prototype_similarity(z, p, backend="cuda", precision=precision)
    _, idx = protokern.nearest_patches(z.detach(), p.detach(), backend="cuda", precision=precision)
    assert dist[-1, 0].item() == 0.0 and idx[-1, 0].item() == (H // 2) * W + W // 2
    d_ffma, idx_ffma = protokern.nearest_patches(z.detach(), p.detach(), backend="cuda", precision="highest")
    assert torch.equal(idx, idx_ffma) and torch.equal(dist.detach(), d_ffma)
    w_sim, w_dist = torch.randn_like(sim), torch.randn_like(sim)
    gz, gp = torch.autograd.grad((sim * w_sim).sum() + (dist * w_dist).sum(), (z, p))
    check_winners_and_gradients(z, p, sim, dist, idx, w_sim, w_dist, gz, gp, search_tol=search_tol)


@gpu
def test_prototype_equal_to_patch(cuda_backend):
    z = make_z(3, 128, 7, 7, "contiguous")
    p = torch.rand(300, 128, device="cuda")
    p[17] = z[2, :, 4, 5]  # patch 4*7+5 = 33 of image 2
    p[250] = z[0, :, 0, 0]
    sim, dist = protokern.prototype_similarity(z, p, backend="cuda")
    _, idx = protokern.nearest_patches(z, p, backend="cuda")
    assert dist[2, 17].item() == 0.0 and dist[0, 250].item() == 0.0
    assert abs(sim[2, 17].item() - LOG_1_OVER_EPS) < 1e-4 and abs(sim[0, 250].item() - LOG_1_OVER_EPS) < 1e-4
    assert idx[2, 17].item() == 33 and idx[0, 250].item() == 0
    check_against_reference(z, p)


PRECISIONS = ["highest", "high", "medium"]


@gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_go_to_lowest_index(cuda_backend, precision):
    """Duplicated patches (also in another patch tile, and all patches equal): the lowest index wins."""
    z = torch.rand(2, 40, 10, 10, device="cuda")
    z[:, :, 9, 9] = z[:, :, 0, 3]  # patch 99 duplicates patch 3 (another 64-patch tile)
    z[:, :, 1, 0] = z[:, :, 0, 3]  # patch 10 too
    p = z[:, :, 0, 3].clone() + 0.01  # same distance to patches 3, 10, 99
    p = torch.cat([p, torch.rand(5, 40, device="cuda")])
    z.requires_grad_()
    sim, dist = protokern.prototype_similarity(z, p, backend="cuda", precision=precision)
    _, idx = protokern.nearest_patches(z.detach(), p, backend="cuda", precision=precision)
    assert idx[0, 0].item() == 3 and idx[1, 1].item() == 3
    dist[0, 0].backward()
    g = z.grad.flatten(2)[0]
    assert g[:, 10].abs().sum().item() == 0.0 and g[:, 99].abs().sum().item() == 0.0
    assert g[:, 3].abs().sum().item() > 0.0

    flat = torch.ones(2, 8, 9, 11, device="cuda")  # every patch ties
    _, idx = protokern.nearest_patches(flat, torch.rand(130, 8, device="cuda"), backend="cuda", precision=precision)
    assert bool((idx == 0).all())


@gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_nan_propagates(cuda_backend, precision):
    z = make_z(3, 70, 9, 9, "channels_last")
    p = torch.rand(140, 70, device="cuda")
    z[0, 3, 8, 8] = float("nan")  # the last patch: a NaN anywhere in z[b] poisons every prototype
    z[0, 5, 6, 0] = float("nan")  # patch 54: the lowest NaN patch is the index
    p[130, 69] = float("nan")     # every patch NaN for prototype 130: index 0
    sim, dist = protokern.prototype_similarity(z, p, backend="cuda", precision=precision)
    _, idx = protokern.nearest_patches(z, p, backend="cuda", precision=precision)
    nan = torch.zeros(3, 140, dtype=torch.bool, device="cuda")
    nan[0, :] = True
    nan[:, 130] = True
    assert torch.equal(dist.isnan(), nan) and torch.equal(sim.isnan(), nan)
    assert bool((idx[0, :130] == 54).all() and (idx[0, 131:] == 54).all() and (idx[:, 130] == 0).all())
    assert bool(((idx >= 0) & (idx < 81)).all())


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("hw,batch", [(7, 16), (28, 16), (7, 80)], ids=["7x7", "28x28", "7x7-cub"])
def test_backward_is_deterministic(cuda_backend, layout, hw, batch):
    """Many prototypes share each winning patch: any float atomics would show as bit differences (7x7: the
    scanning grad_z; 28x28: the sorted one; the CUB shape's 80 images: grad_p in 3 image parts, added by
    whichever block of a tile finishes last)."""
    z = make_z(batch, 128, hw, hw, layout).requires_grad_()
    p = torch.rand(2000, 128, device="cuda", requires_grad=True)
    grads = []
    for _ in range(3):
        sim, dist = protokern.prototype_similarity(z, p, backend="cuda")
        grads.append(torch.autograd.grad((sim.sin() + dist).sum(), (z, p)))
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


@gpu
@pytest.mark.parametrize("shape", [(3, 128, 7, 7, 300), (24, 128, 7, 7, 4000), (2, 36, 14, 14, 70),
                                   (2, 40, 17, 19, 70)], ids=str)
def test_layout_and_alignment_free(cuda_backend, shape):
    """Same values, different memory: the forward's 16-byte cp.async path (aligned z with stride_k == 1, p with
    D % 4 == 0), its 4-byte fallback (views one float past alignment), the dense 7x7 path's z ring (contiguous z
    of a p-resident launch: the 24-image shape at "high" and "medium") and the rescoring's z rows (z's own for
    channels_last z, a copy otherwise) give the same bits at every precision; the one-launch backward, which
    stages z with its own strides (above 256 patches: gathers it from a channels-innermost copy), gives the same
    gradient bits for every layout."""
    B, D, H, W, M = shape
    z3 = torch.rand(B, D, H * W, device="cuda")
    p = torch.rand(M, D, device="cuda")
    z_off = torch.empty(B * D * H * W + 1, device="cuda")[1:].view(B, D, H * W).copy_(z3)
    p_off = torch.empty(M * D + 1, device="cuda")[1:].view(M, D).copy_(p)
    layouts = {}
    for layout in ("channels_last", "sliced", "sliced_channels_last"):
        zl = make_z(B, D, H, W, layout)
        zl.copy_(z3.view(B, D, H, W))
        layouts[layout] = zl.flatten(2)
    for precision in PRECISIONS:
        ref = torch.ops.protokern_C.forward(z3, p, 1e-4, precision)
        for zz, pp in ((z_off, p), (z3, p_off), (z_off, p_off), *((zl, p) for zl in layouts.values())):
            out = torch.ops.protokern_C.forward(zz, pp, 1e-4, precision)
            assert all(torch.equal(a, b) for a, b in zip(out, ref)), precision
    _, dist, idx = ref
    gs, gd = torch.randn(B, M, device="cuda"), torch.randn(B, M, device="cuda")
    grads = torch.ops.protokern_C.backward(gs, gd, z3, p, idx, dist, 1e-4)
    for layout, zl in layouts.items():
        other = torch.ops.protokern_C.backward(gs, gd, zl, p, idx, dist, 1e-4)
        assert torch.equal(other[0], grads[0]) and torch.equal(other[1], grads[1]), layout


@gpu
def test_raw_ops_contract(cuda_backend):
    """torch.ops.protokern_C.* directly: output shapes, dtypes, layouts; precisions; B = 0."""
    z3 = make_z(4, 96, 5, 6, "sliced_channels_last").flatten(2)
    p = torch.rand(70, 96, device="cuda")
    sim, dist, idx = torch.ops.protokern_C.forward(z3, p, 1e-4, "highest")
    assert sim.shape == dist.shape == idx.shape == (4, 70) and idx.dtype == torch.int64
    assert sim.is_contiguous() and dist.is_contiguous() and idx.is_contiguous()
    ref = reference.float64_distances(z3, p).amin(2)
    assert rel_err(dist, ref) < 1e-5
    for precision in ("high", "medium"):  # certified searches: the same outputs, bit for bit
        s2, d2, i2 = torch.ops.protokern_C.forward(z3, p, 1e-4, precision)
        assert torch.equal(d2, dist) and torch.equal(i2, idx) and torch.equal(s2, sim)
    gs = torch.randn(4, 70, device="cuda")
    gd = torch.randn(1, 1, device="cuda").expand(4, 70)  # non-contiguous incoming gradient
    gz, gp = torch.ops.protokern_C.backward(gs, gd, z3, p, idx, dist, 1e-4)
    assert gz.shape == z3.shape and gz.is_contiguous() and gp.shape == p.shape
    gz2, gp2 = torch.ops.protokern_C.backward(gs, gd.contiguous(), z3.contiguous(), p, idx, dist, 1e-4)
    assert torch.equal(gz, gz2) and torch.equal(gp, gp2)
    empty = torch.ops.protokern_C.forward(z3[:0], p, 1e-4, "highest")
    assert all(t.shape == (0, 70) for t in empty)


# Every input check of the raw ops, run in a child process: these messages once crashed the process on an
# H200 (numbers streamed into the message), which took the rest of the test session with it.
RAW_BAD_INPUT = r"""
import re, sys, torch
import protokern._C

def expect(match, fn):
    try:
        fn()
    except RuntimeError as exc:
        assert re.search(match, str(exc)), f"expected {match!r}, got {exc}"
        print("ok:", match, flush=True)
        return
    sys.exit(f"no error raised, expected {match!r}")

F, B = torch.ops.protokern_C.forward, torch.ops.protokern_C.backward
z, p = torch.rand(2, 8, 5, device="cuda"), torch.rand(3, 8, device="cuda")
expect("z must be Float", lambda: F(z.double(), p, 1e-4, "highest"))
expect("p must be a CUDA tensor, got device cpu", lambda: F(z, p.cpu(), 1e-4, "highest"))
expect(r"channel mismatch: z is \(B, D, HW\) = \(2, 8, 5\) but p is \(M, D\) = \(3, 7\)",
       lambda: F(z, p[:, :-1], 1e-4, "highest"))
expect(r"z must have 3 dimensions, got shape \(8, 5\)", lambda: F(z[0], p, 1e-4, "highest"))
expect("eps must be > 0, got 0", lambda: F(z, p, 0.0, "highest"))
expect("precision must be 'highest', 'high' or 'medium', got 'low'", lambda: F(z, p, 1e-4, "low"))
expect("at least one channel and one patch", lambda: F(z[:, :, :0], p, 1e-4, "highest"))
_, dist, idx = F(z, p, 1e-4, "highest")
g = torch.rand(2, 3, device="cuda")
expect("patch_index must be Long", lambda: B(g, g, z, p, idx.int(), dist, 1e-4))
expect(r"grad_similarity must have shape \(B, M\) = \(2, 3\), got \(2, 2\)",
       lambda: B(g[:, :2], g, z, p, idx, dist, 1e-4))
expect("min_distances must be a CUDA tensor", lambda: B(g, g, z, p, idx, dist.cpu(), 1e-4))
expect("eps must be > 0, got -1", lambda: B(g, g, z, p, idx, dist, -1.0))
expect("eps must be finite and give a finite similarity", lambda: F(z, p, float("inf"), "highest"))
expect("eps must be finite and give a finite similarity", lambda: F(z, p, 1e-60, "highest"))
expect("eps must be finite and give a finite similarity", lambda: B(g, g, z, p, idx, dist, 1e40))
print("all raised", flush=True)
"""


@gpu
def test_raw_ops_reject_bad_input(cuda_backend):
    """Clear RuntimeErrors from the C++ input checks of both raw ops (in a child process, see above)."""
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", RAW_BAD_INPUT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "all raised" in out.stdout, (
        f"exit status {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr[-3000:]}")


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(cuda_backend, layout):
    z3 = make_z(2, 24, 3, 5, layout).flatten(2)
    p = torch.rand(7, 24, device="cuda")
    torch.library.opcheck(torch.ops.protokern_C.forward.default, (z3, p, 1e-4, "highest"))
    sim, dist, idx = torch.ops.protokern_C.forward(z3, p, 1e-4, "highest")
    g = torch.randn_like(sim)
    torch.library.opcheck(torch.ops.protokern_C.backward.default, (g, torch.randn_like(g), z3, p, idx, dist, 1e-4))


@gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("shape", [(3, 128, 7, 7, 500), (2, 67, 17, 19, 150)], ids=str)
def test_agrees_with_triton(cuda_backend, shape, precision):
    if protokern.available_backends("cuda")["triton"] is not None:
        pytest.skip(protokern.available_backends("cuda")["triton"])
    B, D, H, W, M = shape
    z = make_z(B, D, H, W, "channels_last").requires_grad_()
    p = torch.rand(M, D, device="cuda", requires_grad=True)
    w = torch.randn(B, M, device="cuda")
    out = {}
    for backend in ("cuda", "triton"):
        sim, dist = protokern.prototype_similarity(z, p, backend=backend, precision=precision)
        _, idx = protokern.nearest_patches(z.detach(), p.detach(), backend=backend, precision=precision)
        grads = torch.autograd.grad(((sim + dist) * w).sum(), (z, p))
        out[backend] = (sim, dist, idx, grads)
    (sim_c, dist_c, idx_c, g_c), (sim_t, dist_t, idx_t, g_t) = out["cuda"], out["triton"]
    assert rel_err(dist_c, dist_t) < 1e-5 and (sim_c - sim_t).abs().max().item() < 1e-4
    differ = idx_c != idx_t
    if differ.any():  # only where both patches are (numerically) tied
        full = reference.float64_distances(z, p)
        d_c, d_t = full.gather(2, idx_c[..., None])[..., 0], full.gather(2, idx_t[..., None])[..., 0]
        assert torch.allclose(d_c[differ], d_t[differ], rtol=1e-6, atol=1e-6)
    else:
        assert rel_err(g_c[0], g_t[0]) < 1e-4 and rel_err(g_c[1], g_t[1]) < 1e-4


def _emu_check():
    """csrc/emu/check.py as a module (its adversarial cases and contract check serve the GPU tests too)."""
    path = Path(__file__).resolve().parents[1] / "csrc" / "emu" / "check.py"
    spec = importlib.util.spec_from_file_location("protokern_emu_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check


@gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_contract_adversarial(cuda_backend, layout):
    """The op's result contract on the GPU at every precision: near-ties at d = 0 and d = 1, the issue's
    16-prototype case (similarity 9.21 at the exact patch), duplicates, equal patches, NaN and inf rules;
    (min_distances, patch_index) bit-identical across precisions."""
    check = _emu_check()
    for name, (z3, p) in check.adversarial_cases().items():
        zc = z3.cuda() if layout == "contiguous" else z3.transpose(1, 2).contiguous().cuda().transpose(1, 2)
        outs = {prec: tuple(t.cpu() for t in torch.ops.protokern_C.forward(zc, p.cuda(), 1e-4, prec))
                for prec in PRECISIONS}
        err = check.check_contract(outs, z3, p)
        assert err is None, f"{name}: {err}"
    z3, p = check.adversarial_cases()["issue: exact patch vs 1e-6..1.6e-5"]
    sim, _, _ = torch.ops.protokern_C.forward(z3.cuda(), p.cuda(), 1e-4, "high")
    assert torch.allclose(sim.diagonal().cpu(), torch.full((16,), LOG_1_OVER_EPS), atol=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("emulator")  # beside test_emulator_under_sanitizer: one start of the sanitizer jobs
def test_kernels_on_cpu_emulator(sanitizer_jobs):
    """The kernel headers (csrc/forward.cuh, backward.cuh) compiled for the CPU emulator (csrc/emu) at every
    search precision: the float64 original on the shape matrix, the op's contract on the adversarial cases,
    bit-identity across precisions, asynchronous cp.async, and a mutant without the certification bound that
    the adversarial cases must catch. No GPU. About 2 minutes of one core; ``sanitizer_jobs`` starts the
    sanitizer builds of tests/test_cuda_gates.py on the other core meanwhile."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    version = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout
    if int(version.split(".")[0] or 0) < 11:
        pytest.skip(f"needs g++ >= 11 for <barrier>, found {version.strip()}")
    assert _emu_check().run(verbose=True)
