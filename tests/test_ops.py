"""The fused op, every backend, against the float64 original formulation (forward and both gradients)."""

import math
import subprocess
import sys

import pytest
import torch

import protokern
from protokern import torch_backend
from tests.reference import (
    RANDOM_KINDS,
    bound_cases,
    check_against_reference,
    check_winners_and_gradients,
    contract_result,
    float64_distances,
    huge_prototype_case,
    issue_case,
    near_tie_case,
    original_layer,
    random_case,
    rel_err,
    residual_case,
)

gpu = pytest.mark.gpu
CASES = [
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cpu", "triton"), id="cpu-triton"),
    pytest.param(("cuda", "torch"), id="cuda-torch", marks=gpu),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=gpu),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=gpu),
]
# (B, D, H, W, M): H=W=1; B=1 with HW=35 (not a power of two) and D=37 (not a multiple of the block);
# M=1 with HW=81 (more than one patch tile); D=130 (more than one channel tile); B=10, M=70 (several image
# runs and prototype tiles).
SHAPES = [(2, 16, 1, 1, 5), (1, 37, 5, 7, 19), (2, 24, 9, 9, 1), (2, 130, 4, 4, 3), (10, 20, 6, 6, 70)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.fixture(params=CASES)
def case(request):
    device, backend = request.param
    reason = protokern.available_backends(device)[backend]
    if reason is not None:
        pytest.skip(reason)
    return device, backend


def make_z(B, D, H, W, layout, device, dtype=torch.float32):
    if layout == "strided":  # a non-contiguous slice of a bigger tensor
        return torch.rand(B, 2 * D, H, W + 3, device=device, dtype=dtype)[:, ::2, :, 2:-1]
    z = torch.rand(B, D, H, W, device=device, dtype=dtype)
    return z.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else z


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_original(case, shape, layout):
    device, backend = case
    B, D, H, W, M = shape
    z = make_z(B, D, H, W, layout, device)
    p = torch.rand(M, D, 1, 1, device=device)
    check_against_reference(z, p, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(case, dtype):
    device, backend = case
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter has no bfloat16")
    z = torch.rand(2, 40, 5, 6, device=device).to(dtype)
    p = torch.rand(9, 40, device=device).to(dtype)
    # Values are exact; gradients are rounded back to the input dtype (8 and 11 bits of mantissa).
    check_against_reference(z, p, backend, grad_tol={torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype])


def test_prototype_equal_to_patch(case):
    device, backend = case
    z = torch.rand(2, 33, 4, 5, device=device)
    p = torch.rand(6, 33, device=device)
    p[3] = z[1, :, 2, 4]
    sim, dist = protokern.prototype_similarity(z, p, backend=backend)
    d, idx = protokern.nearest_patches(z, p, backend=backend)
    assert dist[1, 3].item() == 0.0 and d[1, 3].item() == 0.0
    assert abs(sim[1, 3].item() - torch.log(torch.tensor(1 / 1e-4, dtype=torch.float64)).item()) < 1e-4
    assert idx[1, 3].item() == 2 * 5 + 4
    check_against_reference(z, p, backend)


def test_ties_go_to_lowest_index(case):
    device, backend = case
    z = torch.randint(0, 8, (2, 6, 3, 4), device=device).float() / 8  # dyadic: every sum exact
    z[:, :, 2, 3] = z[:, :, 0, 1]  # patch 11 duplicates patch 1
    p = z[:, :, 0, 1].clone()
    p[:, 0] += 0.125  # same distance 1/64 to both
    sim, dist = protokern.prototype_similarity(z.requires_grad_(), p, backend=backend)
    _, idx = protokern.nearest_patches(z, p, backend=backend)
    assert idx.diagonal().tolist() == [1, 1]
    dist.diagonal().sum().backward()
    assert z.grad[:, :, 2, 3].abs().sum().item() == 0.0
    assert z.grad[:, :, 0, 1].abs().sum().item() > 0.0


def test_nan_propagates(case):
    device, backend = case
    z = torch.rand(3, 20, 4, 4, device=device)
    p = torch.rand(5, 20, device=device)
    z[0, 3, 1, 2] = float("nan")
    z[1, 0, 3, 3] = float("nan")  # the last patch only
    p[2, 7] = float("nan")
    sim, dist = protokern.prototype_similarity(z, p, backend=backend)
    nan = torch.zeros(3, 5, dtype=torch.bool)
    nan[:2, :] = True
    nan[:, 2] = True
    assert torch.equal(dist.isnan().cpu(), nan) and torch.equal(sim.isnan().cpu(), nan)
    _, idx = protokern.nearest_patches(z, p, backend=backend)  # the first NaN patch wins
    assert idx[:2, [0, 1, 3, 4]].tolist() == [[6] * 4, [15] * 4] and (idx[:, 2] == 0).all()


def test_backward_is_deterministic(case):
    device, backend = case
    z = torch.rand(4, 24, 5, 5, device=device, requires_grad=True)
    p = torch.rand(40, 24, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        sim, dist = protokern.prototype_similarity(z, p, backend=backend)
        grads.append(torch.autograd.grad((sim.sin() + dist).sum(), (z, p)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_opcheck(case):
    """torch.library.opcheck of both custom ops (schema, fake implementations, autograd registration, AOT
    dispatch with dynamic shapes), as the graphs of torch.compile and torch.export use them."""
    device, backend = case
    z = torch.rand(2, 16, 3, 5, device=device, requires_grad=True)
    p = torch.rand(4, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.protokern.prototype_similarity.default, (z, p, 1e-4, backend, "highest"))
    with torch.no_grad():
        sim, dist, idx = torch.ops.protokern.prototype_similarity(z, p, 1e-4, backend, "highest")
    grads = (torch.randn_like(sim), torch.randn_like(dist))
    torch.library.opcheck(torch.ops.protokern.prototype_similarity_backward.default,
                          (*grads, z.detach(), p.detach(), idx, dist, 1e-4, backend))


def test_single_output_gradients(case):
    """Only one output used: the other's gradient arrives as None."""
    device, backend = case
    z = torch.rand(2, 16, 3, 3, device=device, requires_grad=True)
    p = torch.rand(4, 16, device=device, requires_grad=True)
    sim, _ = protokern.prototype_similarity(z, p, backend=backend)
    sim.sum().backward()
    zr, pr = z.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    original_layer(zr, pr)[0].sum().backward()
    assert rel_err(z.grad, zr.grad) < 1e-4 and rel_err(p.grad, pr.grad) < 1e-4


def test_nearest_patches_matches_full_map():
    z = torch.rand(3, 12, 5, 6)
    p = torch.rand(7, 12)
    full = protokern.prototype_distances(z, p)
    assert full.shape == (3, 7, 5, 6)
    ref = original_layer(z, p)[1]
    d, idx = protokern.nearest_patches(z, p)
    assert idx.dtype == torch.int64 and not d.requires_grad
    assert torch.equal(idx, full.flatten(2).argmin(-1))
    assert rel_err(d, ref) < 1e-5 and rel_err(full.flatten(2).amin(-1), ref) < 1e-5


def test_full_map_is_never_negative():
    """The heatmaps' full map (expanded |z|^2 + |p|^2 - 2 p.z) is clamped at 0: with every patch of large values
    a prototype, some self-distances come out a rounding error below 0 unclamped (checked here, so the test
    keeps its teeth), and are 0 in the map."""
    g = torch.Generator().manual_seed(0)
    z = torch.rand(1, 16, 8, 8, generator=g) * 100
    p = z[0].flatten(1).t().contiguous()  # (64, 16): every patch
    raw = (z.flatten(2).square().sum(1)[:, None] + p.square().sum(1)[None, :, None]
           - 2 * torch.matmul(p, z.flatten(2)))
    assert (raw < 0).any()
    full = protokern.prototype_distances(z, p).flatten(2)
    assert (full >= 0).all() and (full[raw < 0] == 0).all()


def test_full_map_recomputes_entries_the_expanded_form_overflows():
    """|z|^2 + |p|^2 = 4e38 is +inf in float32 while 2 p.z = 3.2e38 is not: the expanded form says +inf where
    the distance is 8e37, and the map holds the difference form's value (NaN alone recomputed is not enough)."""
    z = torch.tensor([1.4142e19, 0.0]).view(1, 2, 1, 1)
    p = torch.tensor([[1.1314e19, 0.8485e19]])
    full = protokern.prototype_distances(z, p)
    ref = float64_distances(z, p)
    assert full.isfinite().all() and abs(full.item() / ref.item() - 1) < 1e-5


def test_full_map_recomputed_entries_pass_no_gradient():
    """In a traced graph the map's fix-up is one op (torch_backend._recompute_nonfinite_op): gradient flows
    through its finite entries only, none through the recomputed +inf / NaN ones."""
    d = torch.tensor([[[1.0, float("inf"), float("nan")]]], requires_grad=True)
    out = torch_backend._recompute_nonfinite_op(d, torch.rand(1, 2, 3), torch.rand(1, 2))
    assert out[0, 0, 0].item() == 1.0 and out.isfinite().all()
    out.sum().backward()
    assert d.grad.tolist() == [[[1.0, 0.0, 0.0]]]


def test_mixed_precision_inputs_compute_in_float32():
    """float64 only when every input is float64: float64 z with float32 prototypes (and the reverse) compute
    and return float32."""
    z, p = torch.rand(2, 4, 3, 3, dtype=torch.float64), torch.rand(5, 4)
    for a, b in ((z, p), (z.float(), p.double())):
        sim, dist = protokern.prototype_similarity(a, b, backend="torch")
        assert sim.dtype == dist.dtype == torch.float32
        assert protokern.prototype_distances(a, b).dtype == torch.float32
    assert protokern.prototype_similarity(z, p.double(), backend="torch")[1].dtype == torch.float64


def test_gradcheck_float64_torch_backend():
    z = torch.rand(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: protokern.prototype_similarity(a, b, backend="torch"), (z, p))


def penalty_gradients(layer, z, p, w):
    """Gradients (z, p) of sum(w * sim) + |d sum(sim) / dz|^2: a gradient penalty, through create_graph=True."""
    sim, _ = layer(z, p)
    gz, = torch.autograd.grad(sim.sum(), z, create_graph=True)
    return torch.autograd.grad((w * sim).sum() + (gz * gz).sum(), (z, p))


def test_second_order_matches_original(case):
    """Double backward through every backend: the kernels' gradients are not differentiable themselves, so
    the op must not hand them to autograd as constants (that would drop every second-order term silently)."""
    device, backend = case
    z = torch.rand(2, 6, 3, 4, device=device, requires_grad=True)
    p = torch.rand(5, 6, device=device, requires_grad=True)
    w = torch.randn(2, 5, device=device)
    got = penalty_gradients(lambda a, b: protokern.prototype_similarity(a, b, backend=backend), z, p, w)
    zr, pr = (t.detach().double().requires_grad_() for t in (z, p))
    want = penalty_gradients(original_layer, zr, pr, w.double())
    assert rel_err(got[0], want[0]) < 1e-4 and rel_err(got[1], want[1]) < 1e-4
    sim, _ = protokern.prototype_similarity(z, p, backend=backend)  # first order, no create_graph: unchanged
    gz, = torch.autograd.grad(sim.sum(), z)
    assert not gz.requires_grad


def test_second_order_through_an_exported_graph_says_it_is_eager_only():
    """An exported (or traced) graph holds the op's first derivatives only: its double backward is one line saying
    so (torch's 'no autograd formula ... use register_autograd' told the op's user to write one)."""
    layer = protokern.ProtoLayer(5, 4)
    z = torch.rand(2, 4, 3, 3, requires_grad=True)
    exported = torch.export.export(layer, (z,)).module()
    sim, _ = exported(z)
    gz, = torch.autograd.grad(sim.sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of protokern's op are computed in eager mode only"):
        gz.sum().backward()
    z.grad = None
    exported(z)[0].sum().backward()  # first order as before
    assert torch.allclose(z.grad, torch.autograd.grad(layer(z)[0].sum(), z)[0])


def test_torch_func_transforms(case):
    """torch.func: vmap (z batched, prototypes batched, both; nearest_patches too), per-sample gradients vmap(grad), and
    forward mode (jacfwd over grad: the Hessian in p), each against the float64 original layer."""
    device, backend = case
    zs = torch.rand(4, 2, 6, 3, 3, device=device)
    ps = torch.rand(4, 5, 6, device=device)
    layer = lambda z, p: protokern.prototype_similarity(z, p, backend=backend)
    fused = lambda z, p: torch.stack(layer(z, p))
    orig = lambda z, p: torch.stack(original_layer(z, p))
    for in_dims, args in [((0, None), (zs, ps[0])), ((None, 0), (zs[0], ps)), ((0, 0), (zs, ps)),
                          ((2, None), (zs.movedim(0, 2), ps[0]))]:
        got = torch.vmap(fused, in_dims=in_dims)(*args)
        want = torch.vmap(orig, in_dims=in_dims)(*(a.double() for a in args))
        assert got.shape == want.shape == (4, 2, 2, 5) and rel_err(got, want) < 1e-5
    d, i = torch.vmap(lambda z: protokern.nearest_patches(z, ps[0], backend=backend))(zs)
    want_d, want_i = protokern.nearest_patches(zs.flatten(0, 1), ps[0], backend=backend)
    assert torch.equal(d.flatten(0, 1), want_d) and torch.equal(i.flatten(0, 1), want_i)

    w = torch.randn(5, device=device)

    def loss(layer, p, x):
        sim, dist = layer(x[None], p)
        return (w.to(sim.dtype) * sim).sum() + dist.sum()

    for argnums in (0, 1):
        per_sample = torch.func.grad(lambda p, x: loss(layer, p, x), argnums)
        got = torch.vmap(per_sample, in_dims=(None, 0))(ps[0], zs[:, 0])
        want = torch.vmap(torch.func.grad(lambda p, x: loss(original_layer, p, x), argnums), in_dims=(None, 0))(
            ps[0].double(), zs[:, 0].double())
        assert rel_err(got, want) < 1e-5
    got = torch.func.hessian(lambda p: loss(layer, p, zs[0, 0]))(ps[0])
    want = torch.func.hessian(lambda p: loss(original_layer, p, zs[0, 0].double()))(ps[0].double())
    assert got.shape == (5, 6, 5, 6) and rel_err(got, want) < 1e-5


def test_torch_backend_memory_is_bounded(monkeypatch):
    """Slabs cover the (B, M, HW) map exactly once, each within SLAB elements; results do not depend on it."""
    for B, M, width in [(64, 10000, 28 * 28), (80, 2000, 128), (3, 5, 1 << 23)]:  # the last: one pair each
        for slab, first in ((torch_backend.SLAB, False), (torch_backend.CPU_SLAB, True)):
            seen = torch.zeros(B, M, dtype=torch.int32)
            for bs, ms in torch_backend._slabs(B, M, width, slab, first):
                pairs = len(range(B)[bs]) * len(range(M)[ms])
                assert pairs * width <= slab or pairs == 1
                seen[bs, ms] += 1
            assert bool((seen == 1).all())
    # a CPU's slabs take as many prototypes as fit, then images; others as many images, then prototypes
    assert next(torch_backend._slabs(80, 2000, 128, 1 << 21, True)) == (slice(0, 8), slice(0, 2000))
    assert next(torch_backend._slabs(80, 2000, 128, 1 << 22, False)) == (slice(0, 80), slice(0, 409))
    seen = []
    original = torch_backend._slabs
    monkeypatch.setattr(torch_backend, "_slabs", lambda *a: seen.append(a[3:]) or original(*a))
    z = torch.rand(2, 8, 3, 3, requires_grad=True)
    sim, _ = protokern.prototype_similarity(z, torch.rand(5, 8), backend="torch")
    sim.sum().backward()
    assert seen == [(min(torch_backend.SLAB, torch_backend.CPU_SLAB), True)] * 2  # forward and backward
    monkeypatch.setattr(torch_backend, "_slabs", original)
    z = torch.rand(3, 10, 4, 4, requires_grad=True)
    p = torch.rand(9, 10, requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, backend="torch")
    grads = torch.autograd.grad((sim + dist).sum(), (z, p))
    monkeypatch.setattr(torch_backend, "SLAB", 40)  # force many slabs
    sim2, dist2 = protokern.prototype_similarity(z, p, backend="torch")
    grads2 = torch.autograd.grad((sim2 + dist2).sum(), (z, p))
    assert torch.allclose(dist, dist2) and torch.allclose(sim, sim2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads2))


@pytest.mark.parametrize("serial", [True, False])
def test_torch_patch_sums(serial):
    """Both ways of summing the won pairs into their patches (CPU index_add, elsewhere a 0/1 matrix product)
    against an explicit loop, each winner list with repeats, and inside the backward."""
    b, m, D, HW = 3, 11, 5, 7
    contrib = torch.randn(b, m, D, dtype=torch.float64)
    ids = torch.randint(0, HW, (b, m))
    want = torch.zeros(b, HW, D, dtype=torch.float64)
    for i in range(b):
        for j in range(m):
            want[i, ids[i, j]] += contrib[i, j]
    got = torch_backend.patch_sums(contrib, ids, HW, serial)
    assert torch.allclose(got, want.view(b * HW, D), rtol=1e-12, atol=1e-12)


def test_torch_backward_either_patch_sum(monkeypatch):
    z = torch.rand(4, 9, 3, 5, requires_grad=True)
    p = torch.rand(13, 9, requires_grad=True)
    w = torch.randn(2, 4, 13)

    def grads():
        sim, dist = protokern.prototype_similarity(z, p, backend="torch")
        return torch.autograd.grad((w[0] * sim + w[1] * dist).sum(), (z, p))

    serial = grads()
    patch_sums = torch_backend.patch_sums
    monkeypatch.setattr(torch_backend, "patch_sums", lambda *a, serial: patch_sums(*a, serial=False))
    product = grads()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(serial, product))
    zr, pr = z.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    sim, dist = original_layer(zr, pr)
    want = torch.autograd.grad((w[0] * sim + w[1] * dist).sum(), (zr, pr))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(product, want))


def test_autocast_cpu():
    z = torch.rand(2, 8, 3, 3)
    layer = protokern.ProtoLayer(4, 8)
    conv = torch.nn.Conv2d(8, 8, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = conv(z)
        assert f.dtype == torch.bfloat16
        sim, dist = layer(f)
    assert sim.dtype == dist.dtype == torch.float32
    sim.sum().backward()
    assert layer.prototypes.grad is not None and conv.weight.grad is not None


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fullgraph_cpu(monkeypatch, backend):
    reason = protokern.available_backends("cpu")[backend] if backend != "auto" else None
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(protokern.backends, "_RESOLVED", {})  # the first call of the process is compiled
    z = torch.rand(2, 8, 3, 4, requires_grad=True)
    p = torch.rand(5, 8, 1, 1, requires_grad=True)

    def f(z, p):
        sim, dist = protokern.prototype_similarity(z, p, backend=backend)
        return (sim * 2).sum() + dist.mean()

    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(z, p), (z, p))
    eager = torch.autograd.grad(f(z, p), (z, p))
    assert all(torch.allclose(a, b) for a, b in zip(eager, compiled))


def test_compile_fullgraph_with_changing_eps():
    """Dynamo makes a float that changes between calls symbolic: its range is checked with comparisons."""
    z = torch.rand(2, 3, 4, 5, requires_grad=True)
    p = torch.rand(4, 3, requires_grad=True)
    compiled = torch.compile(lambda z, p, eps: protokern.prototype_similarity(z, p, eps=eps)[0].sum(),
                             fullgraph=True, backend="aot_eager")
    for eps in (1e-4, 1e-3, 0.5):
        got = torch.autograd.grad(compiled(z, p, eps), (z, p))
        want = torch.autograd.grad(protokern.prototype_similarity(z, p, eps=eps)[0].sum(), (z, p))
        assert all(torch.allclose(a, b) for a, b in zip(got, want))
    refused = (ValueError, torch._dynamo.exc.Unsupported)  # fullgraph: Dynamo reports the raise as unsupported
    for bad in (-1.0, 0.0, math.nan, 1e-31, 1.0, 2.0):
        with pytest.raises(refused, match=r"eps must be in \[1e-30, 1\)"):
            compiled(z, p, bad)
    similarity = torch.compile(lambda d, eps: protokern.log_similarity(d, eps), fullgraph=True, backend="eager")
    d = torch.rand(5)
    for eps in (1e-4, 1e-3):
        torch.testing.assert_close(similarity(d, eps), protokern.log_similarity(d, eps))
    for bad in (-1.0, math.inf, 1e-31, 5.0):
        with pytest.raises(refused, match=r"eps must be in \[1e-30, 1\)"):
            similarity(d, bad)
    layers = [protokern.ProtoLayer(4, 3, eps=eps) for eps in (1e-4, 1e-2)]
    for dynamic in (None, True):
        call = torch.compile(lambda layer, z: layer(z)[0], fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for layer in layers:
            torch.testing.assert_close(call(layer, z), layer(z)[0])


def test_smallest_eps_keeps_gradients_finite_at_d_0(case):
    """eps = 1e-30 (the floor): at an exact match the slope is ~-1e30, and 2 g (z - p) must stay finite for
    large upstream gradients (at eps = 1e-38 an upstream gradient of 2 made a row of grad_p NaN)."""
    device, backend = case
    z = torch.rand(2, 5, 3, 3, device=device, requires_grad=True)
    p = torch.rand(4, 5, device=device)
    p[1] = z[1, :, 2, 0].detach()
    p.requires_grad_(True)
    sim, dist = protokern.prototype_similarity(z, p, backend=backend, eps=1e-30)
    assert dist[1, 1].item() == 0.0 and sim[1, 1].item() == pytest.approx(math.log(1e30), rel=1e-6)
    gz, gp = torch.autograd.grad((sim * 1e6).sum() + dist.sum(), (z, p))
    assert gz.isfinite().all() and gp.isfinite().all()


def test_log_similarity_checks_eps():
    with pytest.raises(ValueError, match="eps must be"):
        protokern.log_similarity(torch.rand(3), 0.0)
    with pytest.raises(ValueError, match="eps must be"):
        protokern.distance_to_similarity(torch.rand(3), "log", eps=-1)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_triton_features_are_laid_out_once(case, monkeypatch, layout):
    """The op hands triton channels_last features, made once inside the autograd graph: the forward and the
    backward share that copy (each made its own before); test_matches_original checks the values."""
    device, backend = case
    if backend != "triton":
        pytest.skip("triton lays out its features; the other backends read any strides")
    from protokern.kernels import prototype_distance as kernels

    copies = []
    original = kernels.channels_innermost

    def counting(z):
        out = original(z)
        copies.append(out is not z)
        return out

    monkeypatch.setattr(kernels, "channels_innermost", counting)
    z = make_z(2, 24, 5, 6, layout, device).requires_grad_()
    p = torch.rand(7, 24, device=device, requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, backend="triton")
    grad_z, _ = torch.autograd.grad(sim.sum() + dist.sum(), (z, p))
    assert sum(copies) == 1, copies
    assert grad_z.shape == z.shape


@pytest.mark.parametrize(
    "z_shape, p_shape, kwargs, exc, match",
    [
        ((2, 8, 3), (4, 8), {}, ValueError, "4-D"),
        ((2, 8, 3, 3, 1), (4, 8), {}, ValueError, "4-D"),
        ((2, 8, 3, 3), (4, 8, 2), {}, ValueError, r"\(M, D\)"),
        ((2, 8, 3, 3), (4, 7), {}, ValueError, "channel mismatch"),
        ((2, 8, 3, 3), (4, 8), {"eps": 0.0}, ValueError, "eps"),
        ((2, 8, 3, 3), (4, 8), {"eps": -1.0}, ValueError, "eps"),
        ((2, 8, 3, 3), (4, 8), {"eps": float("inf")}, ValueError, "eps"),
        ((2, 8, 3, 3), (4, 8), {"eps": float("nan")}, ValueError, "eps"),
        ((2, 8, 3, 3), (4, 8), {"eps": 1e-50}, ValueError, r"eps must be in \[1e-30, 1\)"),  # 0 in float32
        ((2, 8, 3, 3), (4, 8), {"eps": 1e-31}, ValueError, r"gradient at d = 0"),  # slope -1/eps ~ 1e31
        ((2, 8, 3, 3), (4, 8), {"eps": 1.0}, ValueError, r"falls with the distance only for eps < 1"),
        ((2, 8, 3, 3), (4, 8), {"eps": 1e8}, ValueError, r"eps must be in \[1e-30, 1\)"),
        ((2, 8, 3, 3), (4, 8), {"eps": "1e-4"}, TypeError, "eps must be a real number"),
        ((2, 8, 3, 3), (4, 8), {"backend": "cudnn"}, ValueError, "unknown backend"),
        ((2, 8, 3, 3), (4, 8), {"backend": ["torch"]}, ValueError, r"unknown backend \['torch'\]"),
        ((2, 8, 3, 3), (4, 8), {"backend": "cuda"}, RuntimeError, "not available"),
        ((2, 8, 3, 3), (4, 8), {"precision": "low"}, ValueError, "precision"),
        ((2, 8, 0, 3), (4, 8), {}, ValueError, "empty"),
    ],
)
def test_bad_input(z_shape, p_shape, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        protokern.prototype_similarity(torch.rand(z_shape), torch.rand(p_shape), **kwargs)


def test_similarity_keeps_its_relative_accuracy_near_and_far(case):
    """log((d + 1) / (d + eps)) ~ 1/d for large d: computed as log(1 + x) it loses x's digits (2.7e-4 relative
    error at d = 1e4, 19% at 1e7, 0 from 3e7); near d = 0 a numerator 1 for 1 - eps is 1e-5 off. Every
    backend keeps it to a few ulp of the fp32 result."""
    device, backend = case
    d = torch.tensor([0.0, 1e-4, 1e-3, 1e2, 1e3, 1e4, 1e6, 1e7, 3e7, 1e8, 1e12], dtype=torch.float64)
    z = torch.zeros(2, 1, 2, 3, device=device)
    p = d.sqrt().float()[:, None].to(device)  # (11, 1): squared distance ~ d from every (zero) patch
    for eps in (1e-4, 1e-6):
        sim, dist = protokern.prototype_similarity(z, p, eps=eps, backend=backend)
        want = torch.log1p((1 - eps) / (dist.double() + eps))  # of the distance the op returns
        assert (sim.double() - want).abs().le(4e-7 * want).all(), (backend, eps, sim, want)
        assert dist.double().sub(d.to(device)).abs().le(1e-6 * d.to(device)).all()


def test_an_empty_batch_on_every_backend(case):
    """B = 0 (e.g. a last, empty shard): (0, M) outputs and zero prototype gradients."""
    device, backend = case
    z = torch.rand(0, 3, 4, 5, device=device, requires_grad=True)
    p = torch.rand(4, 3, device=device, requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, backend=backend)
    assert sim.shape == dist.shape == (0, 4)
    (sim.sum() + dist.sum()).backward()
    assert torch.equal(p.grad, torch.zeros_like(p)) and z.grad.shape == z.shape
    d, i = protokern.nearest_patches(z.detach(), p.detach(), backend=backend)
    assert d.shape == i.shape == (0, 4)


def test_bad_dtype_and_device():
    with pytest.raises(TypeError, match="float"):
        protokern.prototype_similarity(torch.ones(1, 2, 2, 2, dtype=torch.int64), torch.rand(3, 2))
    with pytest.raises(TypeError, match="^prototypes must be float16, bfloat16, float32 or float64, got torch.int64$"):
        protokern.prototype_similarity(torch.rand(1, 2, 2, 2), torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="device mismatch"):
        protokern.prototype_similarity(torch.rand(1, 2, 2, 2), torch.rand(3, 2, device="meta"))


def test_available_backends_explains():
    avail = protokern.available_backends("cpu")
    assert set(avail) == {"torch", "triton", "cuda"}
    assert avail["torch"] is None
    assert isinstance(avail["cuda"], str) and "CUDA" in avail["cuda"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs on this machine's GPU tensors")
def test_a_graph_holding_another_devices_backend_says_so():
    """Traced and exported graphs hold the backend resolved where they were traced: the op checks it against the
    tensors it gets (a GPU export run on CPU tensors reached Triton's '0 active drivers' or the cuda module's
    'rebuild with CUDA_HOME'; any unknown name went to the cuda module)."""
    z, p = torch.rand(2, 4, 3, 3), torch.rand(5, 4)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        torch.ops.protokern.prototype_similarity(z, p, 1e-4, "cuda", "high")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        torch.ops.protokern.prototype_similarity(z, p, 1e-4, "bogus", "high")
    dist, idx = torch.rand(2, 5), torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        torch.ops.protokern.prototype_similarity_backward(torch.ones(2, 5), torch.ones(2, 5), z, p, idx, dist, 1e-4,
                                                          "cuda")


def test_many_pairs_winners_and_gradients(case):
    """M = 300 prototypes: near-ties between patches occur; any minimiser up to rounding is valid."""
    device, backend = case
    z = torch.rand(6, 64, 5, 5, device=device, requires_grad=True)
    p = torch.rand(300, 64, device=device, requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, backend=backend)
    _, idx = protokern.nearest_patches(z, p, backend=backend)
    w_sim, w_dist = torch.randn_like(sim), torch.randn_like(sim)
    gz, gp = torch.autograd.grad((sim * w_sim).sum() + (dist * w_dist).sum(), (z, p))
    check_winners_and_gradients(z, p, sim, dist, idx, w_sim, w_dist, gz, gp)


def test_auto_precision_per_backend(monkeypatch):
    """precision="auto" resolves after the backend, to its AUTO_PRECISION entry (cuda: "high", triton: "medium",
    torch: "highest"); explicit precisions pass through; anything else is a one-line error naming the choices."""
    from protokern import backends

    assert backends.AUTO_PRECISION == {"torch": "highest", "triton": "medium", "cuda": "high"}
    for name in backends.BACKENDS:
        assert backends.search_precision(name, "auto") == backends.AUTO_PRECISION[name]
        for precision in backends.SEARCH_PRECISIONS:
            assert backends.search_precision(name, precision) == precision
    seen = []
    module = backends.get("torch")
    monkeypatch.setattr(backends, "get", lambda name: seen.append(name) or module)
    monkeypatch.setattr(backends, "resolve", lambda backend, device_type: "triton")  # as if on a GPU
    forward = module.forward
    monkeypatch.setattr(module, "forward", lambda *args: seen.append(args[3]) or forward(*args))
    z, p = torch.rand(2, 8, 3, 3), torch.rand(5, 8)
    protokern.prototype_similarity(z, p)
    protokern.nearest_patches(z, p, precision="high")
    assert seen == ["triton", "medium", "triton", "high"]
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'highest', 'high', 'medium'\)"):
        protokern.prototype_similarity(z, p, precision="fast")


# ---- The result contract (docs/design.md): certified search, NaN and inf rules, every precision ----
PRECISIONS = ("highest", "high", "medium")


def run_all_precisions(z, p, backend, eps=1e-4):
    """{precision: (similarity, min_distances, patch_index)} for every precision, checking that
    prototype_similarity and nearest_patches agree."""
    out = {}
    for precision in PRECISIONS:
        sim, dist = protokern.prototype_similarity(z, p, backend=backend, precision=precision, eps=eps)
        dist2, idx = protokern.nearest_patches(z, p, backend=backend, precision=precision)
        assert torch.equal(dist.isnan(), dist2.isnan()) and torch.equal(dist.nan_to_num(), dist2.nan_to_num())
        out[precision] = (sim.cpu(), dist.cpu(), idx.cpu())
    return out


def same_at_every_precision(out):
    """out: run_all_precisions's. Asserts that every precision gives "highest"'s outputs; returns them."""
    sim, dist, idx = out["highest"]
    for precision, (s, d, i) in out.items():
        assert torch.equal(i, idx), f"{precision}: winners differ from 'highest'"
        assert torch.equal(d.nan_to_num(), dist.nan_to_num()) and torch.equal(d.isnan(), dist.isnan()), precision
        assert torch.equal(s.nan_to_num(), sim.nan_to_num()), precision
    return sim, dist, idx


def check_contract(z, p, backend):
    """Every precision returns the float64 contract's winners and distances, bit-identical across precisions.
    Returns the "highest" (similarity, min_distances, patch_index)."""
    ref_dist, ref_idx = contract_result(z, p)
    sim, dist, idx = same_at_every_precision(run_all_precisions(z, p, backend))
    assert torch.equal(idx, ref_idx), f"winners {idx[idx != ref_idx]} instead of {ref_idx[idx != ref_idx]}"
    assert torch.equal(dist.isnan(), ref_dist.isnan()) and torch.equal(dist.isinf(), ref_dist.isinf())
    finite = ref_dist.isfinite()
    assert ((dist.double() - ref_dist)[finite].abs() <= 1e-6 * (1 + ref_dist[finite])).all()
    ref_sim = torch.log1p((1 - 1e-4) / (ref_dist + 1e-4))
    assert ((sim.double() - ref_sim)[finite].abs() <= 1e-5 * (1 + ref_sim[finite].abs())).all()
    return sim, dist, idx


@pytest.mark.parametrize("kind", ["zero", "small", "one", "duplicates", "equal", "last"])
def test_near_ties_pick_the_exact_winner(case, kind):
    """Exact distances 1e-6 apart near d = 0 and d = 1, exact duplicates, all-equal patches, every patch a
    near-tie of the last: the lowest index of the exact minimum wins, at every precision."""
    device, backend = case
    z, p, winners = near_tie_case(kind, B=4, D=64 if device == "cpu" and backend == "triton" else 128)
    _, dist, idx = check_contract(z.to(device), p.to(device), backend)
    assert torch.equal(idx.diagonal(), winners)
    assert dist.diagonal().tolist() == [{"zero": 0.0, "small": 2.0 ** -20, "one": 1.0}.get(kind, 0.0)] * 4


def test_issue_case_exact_patch_wins(case):
    """Issue 9: prototypes equal to a patch of their image, a lower patch 1e-6..1.6e-5 away: similarity 9.21."""
    device, backend = case
    z, p, winners = issue_case()
    sim, dist, idx = check_contract(z.to(device), p.to(device), backend)
    assert torch.equal(idx.diagonal(), winners)
    assert (dist.diagonal() == 0).all()
    assert (sim.diagonal() - math.log(1e4)).abs().max().item() < 1e-4  # 9.2103


def test_largest_tf32_residuals_pick_the_exact_winner(case):
    """Operands whose TF32 truncation loses the most (search_bound.truncated_tf32_bound's worst case): the
    search alone ranks the truncated copy r_b first at "medium", the rescoring still returns w_b (d = 0)."""
    device, backend = case
    z, p, winners = residual_case()
    approx, _ = torch_backend.search(z.flatten(2), p, "medium")
    assert (approx.argmin(-1).diagonal() != winners).all()  # the case is adversarial
    _, dist, idx = check_contract(z.to(device), p.to(device), backend)
    assert torch.equal(idx.diagonal(), winners) and (dist.diagonal() == 0).all()


def test_prototypes_whose_norm_overflows_fp32(case):
    """|p|^2 = inf over TF32-exact features (reference.huge_prototype_case): the search bound is inf * 0 = NaN
    for some pairs, which must leave them candidates (Triton's "medium" missed the nearest patch, a finite
    distance, and returned one at +inf). A prototype at +inf from every patch gets patch 0, similarity 0."""
    device, backend = case
    z, p, winners = huge_prototype_case()
    ref_dist, ref_idx = contract_result(z, p)
    sim, dist, idx = same_at_every_precision(run_all_precisions(z.to(device), p.to(device), backend))
    assert torch.equal(idx, ref_idx)
    assert torch.equal(idx[:, 0], winners) and torch.equal(idx[:, 1], winners - 2) and (idx[:, 2] == 0).all()
    torch.testing.assert_close(dist[:, :2].double(), ref_dist[:, :2], rtol=1e-6, atol=0)
    assert dist[:, 2].isinf().all() and (sim[:, 2] == 0).all()


def test_nan_rule(case):
    """A NaN distance makes (b, m) NaN with the lowest NaN patch as index; other pairs are unaffected."""
    device, backend = case
    z = torch.rand(3, 12, 3, 4)
    p = torch.rand(5, 12)
    z[0, 3, 2, 1] = float("nan")  # patch 9
    z[0, 7, 1, 0] = float("nan")  # patch 4: the lowest NaN patch of image 0
    p[2, 5] = float("nan")  # every patch NaN for prototype 2: patch 0
    sim, dist, idx = check_contract(z.to(device), p.to(device), backend)
    nan = torch.zeros(3, 5, dtype=torch.bool)
    nan[0, :] = nan[:, 2] = True
    assert torch.equal(dist.isnan(), nan) and torch.equal(sim.isnan(), nan)
    assert idx[0].tolist() == [4, 4, 0, 4, 4] and idx[:, 2].tolist() == [0, 0, 0]


def test_inf_rule(case):
    """A patch holding +-inf is at distance +inf: it never wins unless every patch is inf (then patch 0,
    similarity 0); the other patches' results stay finite, and so do the gradients."""
    device, backend = case
    z = torch.rand(4, 12, 3, 4)
    p = torch.rand(5, 12)
    z[0, 3, 0, 0] = float("inf")  # patch 0 of image 0
    z[1, 0, 1, 1] = float("-inf")  # patch 5 of image 1
    z[2, 4, :, :] = float("inf")  # every patch of image 2
    p[1] = z[0, :, 0, 0].nan_to_num(posinf=0.5)  # prototype 1 is nearly patch 0 of image 0, which is at +inf
    z, p = z.to(device).requires_grad_(), p.to(device).requires_grad_()
    sim, dist, idx = check_contract(z, p, backend)
    assert dist[[0, 1, 3]].isfinite().all() and sim[[0, 1, 3]].isfinite().all()
    assert (idx[0] != 0).all() and (idx[1] != 5).all()
    assert dist[2].isinf().all() and (sim[2] == 0).all() and (idx[2] == 0).all()
    z = z.detach()[[0, 1, 3]].requires_grad_()  # (an all-inf winner has an inf - p gradient: not these)
    s, d = protokern.prototype_similarity(z, p, backend=backend)
    gz, gp = torch.autograd.grad(s.sum() + d.sum(), (z, p))
    assert gz.isfinite().all() and gp.isfinite().all()


@pytest.mark.parametrize("seed", range(len(RANDOM_KINDS)))
def test_random_cases(case, seed):
    """reference.random_case (odd and tile-edge shapes; grid values, near-ties, duplicates, scales, NaN and inf,
    floats with 1e-6 rivals), one of each kind: every precision bit-identical; the contract's exact winners
    where fp32 distances are exact, else float64 minimisers up to fp32 rounding; where all is finite, both
    gradients against float64 at the backend's winners. Any seed by hand: csrc/emu/check.py --random does
    the same for the CUDA kernels on the emulator."""
    device, backend = case
    small = device == "cpu" and backend == "triton"  # the interpreter: keep it quick
    z3, p, exact = random_case(seed, RANDOM_KINDS[seed], **(dict(max_d=65, max_hw=65, max_m=65) if small else {}))
    (B, D, HW), M = z3.shape, p.shape[0]
    z = z3.view(B, D, 1, HW)
    if seed % 2:
        z = z.contiguous(memory_format=torch.channels_last)
    z, p = z.to(device), p.to(device)
    if exact:
        sim, dist, idx = check_contract(z, p, backend)
    else:
        sim, dist, idx = same_at_every_precision(run_all_precisions(z, p, backend))
    if not (z3.isfinite().all() and p.isfinite().all()):
        return
    zg, pg = z.detach().requires_grad_(), p.detach().requires_grad_()
    s, d = protokern.prototype_similarity(zg, pg, backend=backend)
    g = torch.Generator().manual_seed(seed)
    w_sim, w_dist = torch.randn(B, M, generator=g), torch.randn(B, M, generator=g)
    ((s * w_sim.to(device)).sum() + (d * w_dist.to(device)).sum()).backward()
    # a float64 minimiser up to fp32 rounding of the distances (D 2^-24 each), its values, the gradients
    check_winners_and_gradients(z3, p.cpu(), sim, dist, idx, w_sim, w_dist, zg.grad.cpu(), pg.grad.cpu(),
                                search_tol=D * 2.0**-22)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
def test_matches_original_every_precision(case, shape):
    """The tensor-core precisions give the original's values and gradients too, bit-identical to "highest"
    (the search is certified)."""
    device, backend = case
    B, D, H, W, M = shape
    z, p = make_z(B, D, H, W, "contiguous", device), torch.rand(M, D, device=device)
    sim, dist = check_against_reference(z, p, backend)
    for precision in ("high", "medium"):
        s, d = check_against_reference(z, p, backend, precision=precision)
        assert torch.equal(s, sim) and torch.equal(d, dist), precision


# ---- The search bound (protokern/kernels/search_bound.py) ----


@pytest.mark.parametrize("precision", PRECISIONS)
def test_search_bound_holds(precision):
    """|a~ - e| <= delta for every pair, with e the fp32 exact distance, at every emulated precision."""
    for z3, p in bound_cases():
        approx, delta = torch_backend.search(z3, p, precision)
        e = torch_backend.exact_distances(z3.transpose(1, 2)[:, None], p[None, :, None])
        e64 = float64_distances(z3, p)
        assert ((approx - e).abs() <= delta).all() and ((approx.double() - e64).abs() <= delta.double()).all()
        radius = (z3.norm(dim=1)[:, None, :] + p.norm(dim=1)[None, :, None]).square()
        assert (delta <= {"highest": 1e-4, "high": 1e-4, "medium": 1e-2}[precision] * radius + 1e-30).all()


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_separable_candidates_hold(precision):
    """The separable form's candidates hold every exact minimiser of every row (so the lowest one wins) and the
    lead patch, on the bound cases and the random contract cases; it declines NaN, huge norms and "medium"."""
    cases = list(bound_cases()) + [random_case(seed, kind)[:2] for seed, kind in enumerate(RANDOM_KINDS * 3)]
    declined = 0
    for z3, p in cases:
        got = torch_backend.separable_candidates(z3, p, precision)
        if got is None:
            declined += 1
            continue
        cand, lead = got
        e = torch_backend.exact_distances(z3.transpose(1, 2)[:, None], p[None, :, None])
        minimisers = e == e.amin(-1, keepdim=True)
        assert not (minimisers & ~cand).any() and cand.gather(-1, lead).all()
    assert declined == 3  # the nonfinite random cases
    z3, p = bound_cases()[0]
    rows = z3.shape[0] * p.shape[0]
    assert torch_backend.separable_candidates(z3, p, precision)[0].sum().item() < 1.5 * rows  # a tight bound
    assert torch_backend.separable_candidates(z3, p, "medium") is None
    assert torch_backend.separable_candidates(z3 * 2.0 ** 48, p, precision) is None  # |z|^2 > 2^100
    assert torch_backend.separable_candidates(z3, p * 2.0 ** 48, precision) is None  # |p|^2 > 2^100


@pytest.mark.parametrize("scale", [1e-19, 1e-21, 1e-22])
def test_bounds_hold_where_products_underflow(scale):
    """Features so small that their products are fp32 subnormals or flush to 0: the bound's absolute term
    (coefficient * TINY) covers what relative errors cannot, in the search's bound and the separable form's."""
    g = torch.Generator().manual_seed(0)
    z3, p = torch.rand(4, 8, 64, generator=g) * scale, torch.rand(5, 8, generator=g) * scale
    e64 = float64_distances(z3, p)
    e = torch_backend.exact_distances(z3.transpose(1, 2)[:, None], p[None, :, None])
    for precision in ("highest", "high"):
        approx, delta = torch_backend.search(z3, p, precision)
        assert ((approx.double() - e64).abs() <= delta.double()).all()
        cand, _ = torch_backend.separable_candidates(z3, p, precision)
        assert cand[e == e.amin(-1, keepdim=True)].all()  # every exact minimiser a candidate


def test_tf32_emulation_keeps_ten_mantissa_bits():
    """The torch backend's TF32 operands (torch_backend._tf32): the 10th mantissa bit kept, the 11th dropped,
    truncation toward zero, NaN kept (also one whose payload lies only in the dropped bits: masked, +inf)."""
    nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([1 + 2.0 ** -10, 1 + 2.0 ** -11, -(1 + 2.0 ** -10 + 2.0 ** -11)]), nan])
    got = torch_backend._tf32(x)
    assert got[:3].tolist() == [1 + 2.0 ** -10, 1.0, -(1 + 2.0 ** -10)] and got[3].isnan()


def test_search_bound_is_needed():
    """The emulated TF32 search really errs beyond the fp32 bound (so the bound test can fail), and the
    levels order as documented."""
    from protokern.kernels import search_bound

    z3, p = bound_cases()[1]
    approx, _ = torch_backend.search(z3, p, "medium")
    _, delta_fp32 = torch_backend.search(z3, p, "highest")
    e = torch_backend.exact_distances(z3.transpose(1, 2)[:, None], p[None, :, None])
    assert ((approx - e).abs() > delta_fp32).any()
    coefs = [search_bound.coefficient(level, 128) for level in search_bound.LEVELS]
    assert coefs == sorted(coefs) and coefs[0] < 1e-4


def test_truncated_tf32_bound_holds_and_is_tight():
    """"medium"'s bound from its operands' truncation residuals: it holds where they are largest and aligned,
    the residual term is needed there (the error exceeds the rest of the bound) and within 4x of the error,
    and on uniform features it is several times tighter than the generic "tf32" bound."""
    from protokern.kernels import search_bound

    z, p, _ = residual_case(B=2, D=64)
    z3 = z.flatten(2)
    approx, delta = torch_backend.search(z3, p, "medium")
    e64 = float64_distances(z3, p)
    err = (approx.double() - e64).abs()
    radius = (z3.norm(dim=1)[:, None, :] + p.norm(dim=1)[None, :, None]).square().double()
    assert (err <= delta.double()).all()
    assert (err > search_bound.coefficient("ieee", 64) * radius).all()  # the operand term is what covers it
    assert (delta.double() < 4 * err).all()
    g = torch.Generator().manual_seed(5)
    z3, p = torch.rand(2, 128, 49, generator=g), torch.rand(50, 128, generator=g)
    _, delta = torch_backend.search(z3, p, "medium")
    radius = (z3.norm(dim=1)[:, None, :] + p.norm(dim=1)[None, :, None]).square()
    assert (delta < search_bound.coefficient("tf32", 128) * radius / 4).all()


def test_converted_tf32_bound_holds_for_truncating_and_rounding_mmas():
    """The Triton "medium" search leaves the TF32 conversion to the MMA: its bound (truncation residuals, with
    (1 + 2^-10) for operands rounded up in magnitude) holds whether the MMA truncates or rounds to nearest,
    on the operands whose truncation loses the most and on uniform features."""
    from protokern.kernels import search_bound

    def nearest(x):  # round to the nearest TF32 value (ties away from zero, as cvt.rna.tf32.f32)
        return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)

    def below_half(x):  # in [1, 2), 0x0fff in the 13 low mantissa bits: both conversions lose ~half a TF32 ulp
        return ((x.view(torch.int32) & -8192) | 0x0FFF).view(torch.float32)

    g = torch.Generator().manual_seed(8)
    z_worst, p_worst, _ = residual_case(B=2, D=64, generator=g)  # p equal to patches of z: one call
    cases = [(z_worst.flatten(2), p_worst),
             (torch.rand(2, 128, 49, generator=g), torch.rand(40, 128, generator=g)),
             (below_half(torch.rand(2, 64, 25, generator=g) + 1), below_half(torch.rand(30, 64, generator=g) + 1))]
    for case, (z3, p) in enumerate(cases):
        D = z3.shape[1]
        c, r, tiny = search_bound.converted_tf32_bound(D)
        z_norm, p_norm = (z3 * z3).sum(1), (p * p).sum(1)
        z_len, p_len = z_norm.sqrt()[:, None, :], p_norm.sqrt()[None, :, None]
        z_lo = (z3 - torch_backend._tf32(z3)).square().sum(1).sqrt()[:, None, :]
        p_lo = (p - torch_backend._tf32(p)).square().sum(1).sqrt()[None, :, None]
        delta = c * ((z_len + p_len).square() + tiny) + r * (z_lo * p_len + z_len * p_lo)
        e64 = float64_distances(z3, p)
        for convert in (torch_backend._tf32, nearest):
            approx = z_norm[:, None, :] + p_norm[None, :, None] - 2 * (convert(p) @ convert(z3))
            err = (approx.double() - e64).abs()
            assert (err <= delta.double()).all()
            if case == 2:  # the residual term is what covers it, and the bound is within 4x of the error
                assert (err > c * (z_len + p_len).square().double()).all() and (err > delta.double() / 4).any()
    assert (nearest(torch.tensor([1 + 2.0 ** -11])) > 1 + 2.0 ** -11).all()  # rounds up: |h| > |x|


def test_search_bound_formulas_are_the_documented_ones():
    """kernels/search_bound.py's constants as its docstring derives them, recomputed here: the bound tests above
    compute delta from the same module, so a halved margin (r = 2 (1 + t), a coefficient without its factor 2,
    c_s without its 32 u) passed them while no longer covering the fp32 evaluation the derivation pays for."""
    from protokern.kernels import search_bound

    u, t = 2.0 ** -24, 2.0 ** -10

    def gamma(n, v):
        return n * v / (1 - n * v)

    for D in (1, 64, 128, 2000):
        fp32_dot = gamma(D, 2 * u)
        rest = gamma(D + 1, u) + 2 * u + gamma(D + 2, u)  # |z|^2 and |p|^2, the sum's roundings
        assert search_bound.coefficient("ieee", D) == pytest.approx(2 * (rest + fp32_dot), rel=1e-12)
        assert search_bound.coefficient("tf32x3", D) == pytest.approx(
            2 * (rest + 3 * t * t + t ** 4 + gamma(3 * D, 2 * u) * (1 + t) ** 2), rel=1e-12)
        assert search_bound.coefficient("tf32", D) == pytest.approx(
            2 * (rest + 2 * t + t * t + fp32_dot * (1 + t) ** 2), rel=1e-12)
        assert search_bound.coefficient("bf16", D) == pytest.approx(
            2 * (rest + 2 * 2.0 ** -7 + 2.0 ** -14 + fp32_dot * (1 + 2.0 ** -7) ** 2), rel=1e-12)
        c, r, tiny = search_bound.truncated_tf32_bound(D)
        assert c == search_bound.coefficient("ieee", D) and r == 4.0 and tiny >= 2.0 ** -100
        c, r, tiny = search_bound.converted_tf32_bound(D)
        assert c == pytest.approx(2 * (rest + fp32_dot * (1 + t) ** 2), rel=1e-12) and r == 4 * (1 + t)
        assert tiny >= (D * 2.0 ** -124 / c) ** 2
    assert search_bound.separable(1e-5) == 2e-5 + 32 * u


def test_search_level_follows_torch_matmul_precision():
    """A TF32/bf16 matmul setting can only loosen the torch backend's bound, never tighten it."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch_backend.search_level("highest", torch.float32, torch.device("cpu")) == "bf16"
        torch.set_float32_matmul_precision("high")
        assert torch_backend.search_level("high", torch.float32, torch.device("cpu")) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch_backend.search_level("highest", torch.float32, torch.device("cpu")) == "ieee"
    assert torch_backend.search_level("medium", torch.float64, torch.device("cpu")) == "ieee"


NEWER_PRECISION_API = """
import sys, torch, protokern
from protokern import torch_backend
exec(sys.argv[1])
z, p = torch.rand(2, 8, 3, 3), torch.rand(5, 8)
sim, dist = protokern.prototype_similarity(z, p, backend="torch")
assert protokern.nearest_patches(z, p, backend="torch", precision="medium")[1].shape == (2, 5)
print(torch_backend.search_level("highest", torch.float32, torch.device("cpu")),
      torch_backend.search_level("highest", torch.float32, torch.device("cuda")))
"""


@pytest.mark.parametrize("setting, levels", [
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "ieee tf32"),
    ("torch.backends.fp32_precision = 'tf32'", "tf32 tf32"),
    ("torch.backends.mkldnn.matmul.fp32_precision = 'bf16'", "bf16 ieee"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32 tf32"),  # the older API still counts
])
def test_search_level_under_the_newer_precision_api(setting, levels):
    """torch's per-backend fp32_precision (the API its docs recommend) makes the older getters raise a
    RuntimeError for the rest of the process: the op still runs, and the setting still loosens the bound.
    In a fresh process, as such a setting cannot be undone."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision") and "allow_tf32" not in setting:
        pytest.skip("this torch has no fp32_precision API")
    out = subprocess.run([sys.executable, "-c", NEWER_PRECISION_API, setting], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == levels.split()


def test_torch_rescoring_memory_is_bounded(monkeypatch):
    """Every patch a candidate (all equal): the rescoring runs in chunks and still returns patch 0."""
    monkeypatch.setattr(torch_backend, "SLAB", 64)
    z = torch.rand(2, 16, 1, 1).expand(2, 16, 5, 6).contiguous()
    p = torch.rand(7, 16)
    dist, idx = protokern.nearest_patches(z, p, backend="torch")
    assert (idx == 0).all() and rel_err(dist, contract_result(z, p)[0]) < 1e-6


def test_log_similarity_is_the_original_formula_and_zero_at_inf():
    d = torch.tensor([0.0, 1e-6, 0.5, 3.0, 1e6], dtype=torch.float64)
    torch.testing.assert_close(protokern.log_similarity(d, 1e-4), torch.log((d + 1) / (d + 1e-4)))
    assert protokern.log_similarity(torch.tensor([math.inf]), 1e-4).item() == 0.0
    sim, dist = protokern.prototype_similarity(torch.rand(2, 3, 4, 4), torch.rand(5, 3), backend="torch")
    torch.testing.assert_close(protokern.log_similarity(dist, 1e-4), sim)


def test_similarity_gradient_is_accurate_at_large_distances(case):
    """d sim / d d = (eps - 1) / ((d + 1)(d + eps)): the difference 1/(d+1) - 1/(d+eps) cancels to 0 by d ~ 1e8."""
    device, backend = case
    scale = torch.tensor([1.0, 3e1, 1e3, 1e4, 3e4], device=device)  # d = D * scale^2: up to ~4e9
    z = (torch.rand(5, 4, 2, 3, device=device) * scale[:, None, None, None]).requires_grad_()
    p = torch.rand(3, 4, device=device).requires_grad_()
    sim, _ = protokern.prototype_similarity(z, p, backend=backend)
    grads = torch.autograd.grad(sim.sum(), (z, p))
    z64, p64 = z.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    ref = torch.autograd.grad(original_layer(z64, p64)[0].sum(), (z64, p64))
    for got, want in zip(grads, ref):
        scale = want.abs().amax(dim=tuple(range(1, want.dim())), keepdim=True).clamp_min(1e-30)
        assert ((got.double() - want).abs() / scale).max() < 1e-4


@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_shapes_only_inputs(mode):
    """Meta tensors and FakeTensorMode (shape propagation, memory planning) get the op's shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() if mode == "fake" else torch.device("meta"):
        z = torch.rand(3, 8, 4, 5, dtype=torch.float16).requires_grad_()
        p = torch.rand(6, 8, 2, 2).requires_grad_()
        for similarity in ("log", "linear", "cosine"):
            sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend="torch")
            grad_z, grad_p = torch.autograd.grad(sim.sum() + dist.sum(), (z, p))
            assert sim.shape == dist.shape == (3, 6) and sim.dtype == dist.dtype == torch.float32
            assert grad_z.shape == z.shape and grad_z.dtype == z.dtype and grad_p.shape == p.shape
        dist, index = protokern.nearest_patches(z, p)
        assert dist.shape == index.shape == (3, 6) and index.dtype == torch.int64
        assert protokern.prototype_distances(z, p).shape == (3, 6, 3, 4)
        layer = protokern.ProtoLayer(10, 8)
        assert layer(z)[0].shape == (3, 10)


@pytest.mark.parametrize("tracer", ["make_fx-fake", "make_fx-symbolic", "make_fx-real", "aot_function",
                                    "compile"])
def test_traced_graphs_compute_what_eager_does(tracer):
    """The tracers torch.compile builds on (make_fx, aot_function) also run from eager code: the op is recorded
    as its registered custom op (one node), so the graph computes the values and gradients of an eager call;
    an inlined autograd.Function recorded the fake inputs' placeholders (uninitialised memory) as results. The
    non-finite recompute of prototype_distances is one node too (+inf for a window holding inf, not NaN)."""
    from functorch.compile import aot_function, nop
    from torch.fx.experimental.proxy_tensor import make_fx

    z, p = torch.rand(2, 4, 3, 3), torch.rand(3, 4)
    z[1, 2, 0, 1] = math.inf

    def f(z, p):
        sim, dist = protokern.prototype_similarity(z, p)
        dist_n, index = protokern.nearest_patches(z, p)
        return sim, dist, dist_n, index, protokern.prototype_distances(z, p)

    if tracer == "aot_function":
        traced = aot_function(f, fw_compiler=nop, bw_compiler=nop)
    elif tracer == "compile":
        traced = torch.compile(f, fullgraph=True, backend="aot_eager")
    else:
        traced = make_fx(f, tracing_mode=tracer.split("-")[1])(z, p)
        assert "protokern.prototype_similarity.default" in {str(n.target) for n in traced.graph.nodes}
    z2, p2 = torch.rand(2, 4, 3, 3), torch.rand(3, 4)  # fresh values: the graph is not a record of the first call
    z2[0, 1, 2, 2] = math.inf
    for got, want in zip(traced(z2, p2), f(z2, p2)):
        assert torch.equal(got, want)
    assert protokern.prototype_distances(z2, p2)[0, :, 2, 2].eq(math.inf).all()
    if tracer in ("aot_function", "compile"):
        def loss(z, p):
            sim, dist = protokern.prototype_similarity(z, p)
            return sim.sum() + dist.square().sum()

        traced = (aot_function(loss, fw_compiler=nop, bw_compiler=nop) if tracer == "aot_function" else
                  torch.compile(loss, fullgraph=True, backend="aot_eager"))
        zg, pg = z2.clone().requires_grad_(), p2.clone().requires_grad_()
        got = torch.autograd.grad(traced(zg, pg), (zg, pg))
        want = torch.autograd.grad(loss(zg, pg), (zg, pg))
        assert all(torch.equal(a, b) for a, b in zip(got, want))

def test_batched_gradients(case):
    """autograd.grad(is_grads_batched=True) (torch's older vmap hands the backward BatchedTensors): equal to one
    backward per gradient, for every backend (their kernels cannot read those: the torch backend's ops run)."""
    device, backend = case
    z = torch.rand(2, 5, 3, 4, device=device, requires_grad=True)
    p = torch.rand(6, 5, device=device, requires_grad=True)
    for similarity in ("log", "cosine"):
        sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend=backend)
        v = torch.randn(3, *sim.shape, device=device)
        got = torch.autograd.grad((sim, dist), (z, p), (v, v.flip(0)), is_grads_batched=True, retain_graph=True)
        one = [torch.autograd.grad((sim, dist), (z, p), (v[i], v.flip(0)[i]), retain_graph=True) for i in range(3)]
        for g, want in zip(got, zip(*one)):
            torch.testing.assert_close(g, torch.stack(want))


def test_gradcheck_batched_and_forward_mode_torch_backend():
    z = torch.rand(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    p = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    f = lambda z, p: protokern.prototype_similarity(z, p, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, p), check_batched_grad=True, check_forward_ad=True,
                                    check_batched_forward_grad=True)


def test_nested_forward_mode_is_refused_and_one_forward_level_is_exact():
    """jacfwd(jacfwd(f)) and a jvp of a jvp gave zero second derivatives (PyTorch's autograd.Function forward rule
    under nested forward mode): refused in one line; hessian (forward over reverse) stays exact: -2 I for
    "linear"."""
    from torch.func import hessian, jacfwd, jvp

    z = torch.randn(1, 2, 1, 3, dtype=torch.float64)
    p = torch.randn(1, 2, dtype=torch.float64)

    def loss(p):
        return protokern.prototype_similarity(z, p, similarity="linear", backend="torch")[0].sum()

    torch.testing.assert_close(hessian(loss)(p).reshape(2, 2), -2 * torch.eye(2, dtype=torch.float64))
    v = torch.ones_like(p)
    for nested in (lambda: jacfwd(jacfwd(loss))(p), lambda: jvp(lambda q: jvp(loss, (q,), (v,))[1], (p,), (v,))):
        with pytest.raises(NotImplementedError, match=r"^nested forward mode .* \(pytorch/pytorch#197867\)"):
            nested()
