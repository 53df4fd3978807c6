"""The fused op, every backend, against the float64 original formulation (forward and both gradients)."""

import pytest
import torch

import protokern
from protokern import torch_backend
from tests.reference import check_against_reference, check_winners_and_gradients, original_layer, rel_err

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
    p[2, 7] = float("nan")
    sim, dist = protokern.prototype_similarity(z, p, backend=backend)
    nan = torch.zeros(3, 5, dtype=torch.bool)
    nan[0, :] = True
    nan[:, 2] = True
    assert torch.equal(dist.isnan().cpu(), nan) and torch.equal(sim.isnan().cpu(), nan)


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
    device, backend = case
    z = torch.rand(2, 16, 3, 5, device=device, requires_grad=True)
    p = torch.rand(4, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.protokern.prototype_similarity.default, (z, p, 1e-4, backend, "highest"))


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


def test_gradcheck_float64_torch_backend():
    z = torch.rand(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: protokern.prototype_similarity(a, b, backend="torch"), (z, p))


def test_torch_backend_memory_is_bounded(monkeypatch):
    """Slabs cover the (B, M, HW) map exactly once, each within SLAB elements; results do not depend on it."""
    B, M, HW = 64, 10000, 28 * 28
    seen = torch.zeros(B, M, dtype=torch.int32)
    for bs, ms in torch_backend._slabs(B, M, HW):
        assert len(range(B)[bs]) * len(range(M)[ms]) * HW <= torch_backend.SLAB
        seen[bs, ms] += 1
    assert bool((seen == 1).all())
    z = torch.rand(3, 10, 4, 4, requires_grad=True)
    p = torch.rand(9, 10, requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, backend="torch")
    grads = torch.autograd.grad((sim + dist).sum(), (z, p))
    monkeypatch.setattr(torch_backend, "SLAB", 40)  # force many slabs
    sim2, dist2 = protokern.prototype_similarity(z, p, backend="torch")
    grads2 = torch.autograd.grad((sim2 + dist2).sum(), (z, p))
    assert torch.allclose(dist, dist2) and torch.allclose(sim, sim2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads2))


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


def test_compile_fullgraph_cpu(monkeypatch):
    monkeypatch.setattr(protokern.backends, "_RESOLVED", {})  # the first call of the process is compiled
    z = torch.rand(2, 8, 3, 4, requires_grad=True)
    p = torch.rand(5, 8, 1, 1, requires_grad=True)

    def f(z, p):
        sim, dist = protokern.prototype_similarity(z, p)
        return (sim * 2).sum() + dist.mean()

    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(z, p), (z, p))
    eager = torch.autograd.grad(f(z, p), (z, p))
    assert all(torch.allclose(a, b) for a, b in zip(eager, compiled))


@pytest.mark.parametrize(
    "z_shape, p_shape, kwargs, exc, match",
    [
        ((2, 8, 3), (4, 8), {}, ValueError, "4-D"),
        ((2, 8, 3, 3), (4, 8, 2, 2), {}, ValueError, r"\(M, D\)"),
        ((2, 8, 3, 3), (4, 7), {}, ValueError, "channel mismatch"),
        ((2, 8, 3, 3), (4, 8), {"eps": 0.0}, ValueError, "eps"),
        ((2, 8, 3, 3), (4, 8), {"eps": -1.0}, ValueError, "eps"),
        ((2, 8, 3, 3), (4, 8), {"backend": "cudnn"}, ValueError, "unknown backend"),
        ((2, 8, 3, 3), (4, 8), {"backend": "cuda"}, RuntimeError, "not available"),
        ((2, 8, 3, 3), (4, 8), {"precision": "low"}, ValueError, "precision"),
        ((2, 8, 0, 3), (4, 8), {}, ValueError, "empty"),
    ],
)
def test_bad_input(z_shape, p_shape, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        protokern.prototype_similarity(torch.rand(z_shape), torch.rand(p_shape), **kwargs)


def test_bad_dtype_and_device():
    with pytest.raises(TypeError, match="float"):
        protokern.prototype_similarity(torch.ones(1, 2, 2, 2, dtype=torch.int64), torch.rand(3, 2))
    with pytest.raises(ValueError, match="device mismatch"):
        protokern.prototype_similarity(torch.rand(1, 2, 2, 2), torch.rand(3, 2, device="meta"))


def test_available_backends_explains():
    avail = protokern.available_backends("cpu")
    assert set(avail) == {"torch", "triton", "cuda"}
    assert avail["torch"] is None
    assert isinstance(avail["cuda"], str) and "CUDA" in avail["cuda"]


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
