"""k x k prototypes and the 'linear' and 'cosine' similarities of the fused op (issue 14, op level).

References in float64: the original ProtoPNet's conv formulation (``_l2_convolution``: conv2d of z with the
prototypes, |z|^2 window sums by conv2d with ones, ReLU, min over the map) for 'log' and 'linear', and an
explicit cosine formula (conv2d dot products over the norms, each floored at COSINE_EPS) for 'cosine'.
"""

import pytest
import torch
import torch.nn.functional as F

import protokern
from protokern import ops
from protokern.ops import COSINE_EPS
from tests.reference import float64_distances, rel_err

SIMILARITIES = ("log", "linear", "cosine")
EPS = 1e-4

# (z shape, prototype shape): kh != kw, a window as large as the map, 1 x 1, a 1-wide map
SHAPES = [
    ((2, 3, 5, 6), (4, 3, 2, 2)),
    ((2, 3, 5, 6), (4, 3, 2, 3)),
    ((1, 4, 4, 7), (3, 4, 3, 1)),
    ((2, 3, 3, 4), (5, 3, 3, 4)),  # the window is the whole map: one position
    ((2, 5, 4, 3), (3, 5, 1, 1)),
    ((2, 2, 1, 6), (3, 2, 1, 4)),
]
TINY = [((1, 3, 4, 5), (2, 3, 2, 3)), ((2, 2, 3, 3), (2, 2, 3, 3)), ((1, 3, 3, 4), (2, 3, 1, 2))]


def _needs_triton():
    reason = protokern.available_backends("cpu")["triton"]
    if reason is not None and not torch.cuda.is_available():
        pytest.skip(reason)


def _device(backend):
    """Where ``backend`` runs here (skipping the test when Triton cannot run at all)."""
    if backend == "triton":
        _needs_triton()
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def distance_map(z, p):
    """The original's _l2_convolution in float64: (B, M, Hout, Wout) squared distances, ReLU'd."""
    z, p = z.double(), p.double()
    p = p if p.dim() == 4 else p[..., None, None]
    x2_patch_sum = F.conv2d(z * z, torch.ones_like(p))
    p2 = (p * p).sum((1, 2, 3)).view(-1, 1, 1)
    return F.relu(x2_patch_sum - 2 * F.conv2d(z, p) + p2)


def cosine_map(z, p, eps=COSINE_EPS):
    """Explicit cosine (B, M, Hout, Wout) in float64: window . p / (max(|window|, eps) max(|p|, eps))."""
    z, p = z.double(), p.double()
    p = p if p.dim() == 4 else p[..., None, None]
    window_norm = F.conv2d(z * z, torch.ones_like(p[:1])).clamp_min(eps * eps).sqrt()  # max(|window|, eps)
    p_norm = torch.linalg.vector_norm(p.flatten(1), dim=1).clamp_min(eps).view(-1, 1, 1)
    return F.conv2d(z, p) / (window_norm * p_norm)


def reference(z, p, similarity, eps=EPS):
    """(similarity, min_distances) (B, M) float64, differentiable, as the original layer / cosine formula."""
    if similarity == "cosine":
        cos = cosine_map(z, p)
        sim = F.max_pool2d(cos, kernel_size=cos.shape[2:]).flatten(1)
        return sim, 2 - 2 * sim
    d = distance_map(z, p)
    min_d = -F.max_pool2d(-d, kernel_size=d.shape[2:]).flatten(1)
    sim = torch.log((min_d + 1) / (min_d + eps)) if similarity == "log" else -min_d
    return sim, min_d


def reference_map(z, p, similarity):
    return 2 - 2 * cosine_map(z, p) if similarity == "cosine" else distance_map(z, p)


def check_against_reference(z, p, similarity, backend, tol=1e-5, grad_tol=1e-4):
    z = z.detach().requires_grad_()
    p = p.detach().requires_grad_()
    sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend=backend, eps=EPS)
    assert sim.shape == dist.shape == (z.shape[0], p.shape[0])
    zr = z.detach().cpu().double().requires_grad_()
    pr = p.detach().cpu().double().requires_grad_()
    sim_ref, dist_ref = reference(zr, pr, similarity)
    assert (dist.cpu().double() - dist_ref).abs().max().item() < tol * (1 + dist_ref.abs().max().item())
    assert (sim.cpu().double() - sim_ref).abs().max().item() < 10 * tol * (1 + sim_ref.abs().max().item())
    w_sim, w_dist = torch.randn_like(sim_ref), torch.randn_like(sim_ref)
    ((sim * w_sim.to(sim)).sum() + (dist * w_dist.to(dist)).sum()).backward()
    ((sim_ref * w_sim).sum() + (dist_ref * w_dist).sum()).backward()
    assert z.grad.dtype == z.dtype and p.grad.dtype == p.dtype and p.grad.shape == p.shape
    assert rel_err(z.grad.cpu(), zr.grad) < grad_tol
    assert rel_err(p.grad.cpu(), pr.grad) < grad_tol
    return sim.detach(), dist.detach()


# ---- forward and both gradients against the float64 references ----


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("z_shape, p_shape", SHAPES)
def test_torch_backend_matches_reference(z_shape, p_shape, similarity):
    z, p = torch.randn(z_shape), torch.randn(p_shape)
    if similarity != "cosine":
        z, p = z.abs(), p.abs()  # ReLU-like features, as in ProtoPNet
    check_against_reference(z, p, similarity, "torch")


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("z_shape, p_shape", TINY)
def test_triton_backend_matches_reference(z_shape, p_shape, similarity):
    _needs_triton()
    device = _device("triton")
    z, p = torch.randn(z_shape, device=device), torch.randn(p_shape, device=device)
    check_against_reference(z, p, similarity, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("z_shape, p_shape", SHAPES)
def test_fused_gpu_backends_match_reference(z_shape, p_shape, similarity, backend):
    """Every window shape and similarity through the fused GPU backends (the CUDA extension too), forward and
    both gradients against the float64 references."""
    reason = protokern.available_backends("cuda")[backend]
    if reason is not None:
        pytest.skip(reason)
    z, p = torch.randn(z_shape, device="cuda"), torch.randn(p_shape, device="cuda")
    if similarity != "cosine":
        z, p = z.abs(), p.abs()
    check_against_reference(z, p, similarity, backend)


@pytest.mark.parametrize("window", [(1, 1), (2, 3)])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_float64_gradcheck_torch_backend(similarity, window):
    """First order in reverse and forward mode (jvp), second order reverse-over-reverse and
    forward-over-reverse (create_graph=True, torch.func.hessian): all against finite differences."""
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 3, *window, dtype=torch.float64, requires_grad=True)

    def f(z, p):
        return protokern.prototype_similarity(z, p, similarity=similarity, backend="torch", eps=0.1)

    assert f(z, p)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (z, p), eps=1e-6, atol=1e-6, rtol=1e-4, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (z, p), eps=1e-6, atol=1e-5, rtol=1e-4, check_fwd_over_rev=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [(1, 1), (2, 2)])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_vmap_and_per_sample_gradients(similarity, window, backend):
    """torch.vmap over the images and per-sample prototype gradients (vmap(grad)) for every similarity and
    window, against the float64 reference under the same transforms."""
    device = _device(backend)
    g = torch.Generator().manual_seed(2)
    zs = (torch.rand(4, 2, 3, 5, 4, generator=g) - 0.3).to(device)
    p = (torch.rand(5, 3, *window, generator=g) - 0.3).to(device)

    def fused(z, q):
        return protokern.prototype_similarity(z, q, similarity=similarity, backend=backend)

    def ref(z, q):
        return reference(z, q, similarity)

    got = torch.vmap(lambda z: torch.stack(fused(z, p)))(zs)
    want = torch.vmap(lambda z: torch.stack(ref(z, p.double())))(zs.double())
    assert (got.double() - want).abs().max() < 1e-5 * (1 + want.abs().max())
    per_sample = torch.vmap(torch.func.grad(lambda q, x: fused(x[None], q)[0].sum()), in_dims=(None, 0))
    per_sample_ref = torch.vmap(torch.func.grad(lambda q, x: ref(x[None], q)[0].sum()), in_dims=(None, 0))
    assert rel_err(per_sample(p, zs[:, 0]), per_sample_ref(p.double(), zs[:, 0].double())) < 1e-5


def test_unit_vectors_derivatives_in_every_branch():
    """The cosine's unit-vector map: first and second order in the eps ball (zero and tiny vectors) and
    outside it, and forward mode against reverse mode (<v, J t> both ways) also on vectors holding inf."""
    y = torch.randn(6, 4, 2, dtype=torch.float64)
    y[0] = 0  # a zero vector: |x| = 0
    y[1:3] *= 0.5 / y[1:3].norm(dim=1, keepdim=True)  # |x| = 5e-9 after the scale: inside the ball
    y[3:] *= 1e3  # |x| ~ 1e-6: outside
    for slot in (0, 1):
        def f(y):
            return ops._UnitVectorsEager.apply(y * 1e-8, slot)

        y = y.detach().requires_grad_()
        assert torch.autograd.gradcheck(f, (y,), eps=1e-7, atol=1e-6, check_forward_ad=True)
        assert torch.autograd.gradgradcheck(f, (y,), eps=1e-7, atol=1e-5, check_fwd_over_rev=True)
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    x[0, 1, 0] = float("inf")
    x[1, :, 1] = 0
    x[2] *= 1e-10
    t, v = torch.randn_like(x), torch.randn(4, 5, 2, dtype=torch.float64)
    for slot in (0, 1):
        _, jt = torch.func.jvp(lambda x: ops._UnitVectorsEager.apply(x, slot), (x,), (t,))
        _, vjp = torch.func.vjp(lambda x: ops._UnitVectors.apply(x, slot), x)
        lhs, rhs = (v * jt).sum(), (vjp(v)[0] * t).sum()
        assert torch.isfinite(lhs) and abs(lhs - rhs) < 1e-9 * (1 + abs(rhs))


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_half_inputs(similarity):
    z = torch.rand(2, 4, 5, 5).half().requires_grad_()
    p = torch.rand(3, 4, 2, 2).half().requires_grad_()
    sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend="torch")
    assert sim.dtype == dist.dtype == torch.float32
    sim_ref, dist_ref = reference(z.detach(), p.detach(), similarity)
    assert (dist.double() - dist_ref).abs().max() < 1e-4 * (1 + dist_ref.abs().max())
    (sim.sum() + dist.sum()).backward()
    assert z.grad.dtype == p.grad.dtype == torch.float16


# ---- the window's winner, the 1 x 1 path, equivalence with the unfolded call ----


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_winner_is_the_top_left_index(similarity, backend):
    device = _device(backend)
    z, p = torch.randn(2, 3, 5, 6), torch.randn(4, 3, 2, 3)
    dist, idx = protokern.nearest_patches(z.to(device), p.to(device), similarity=similarity, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == (2, 4)
    ref = reference_map(z, p, similarity)  # (B, M, 4, 4)
    assert torch.equal(idx.cpu(), ref.flatten(2).argmin(-1))
    assert (dist.cpu().double() - ref.flatten(2).amin(-1)).abs().max() < 1e-5
    # a prototype copied from the window at (h, w) = (3, 1) of image 1: distance 0 there, index h * Wout + w
    p[2] = z[1, :, 3:5, 1:4]
    dist, idx = protokern.nearest_patches(z.to(device), p.to(device), similarity=similarity, backend=backend)
    assert idx[1, 2].item() == 3 * 4 + 1 and dist[1, 2].item() < 1e-5
    sim, _ = protokern.prototype_similarity(z.to(device), p.to(device), similarity=similarity, backend=backend)
    if similarity == "cosine":
        assert abs(sim[1, 2].item() - 1) < 1e-5


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_window_is_the_fused_op_on_the_unfolded_map(similarity):
    z = torch.rand(2, 3, 5, 6, requires_grad=True)
    p = torch.rand(4, 3, 2, 3, requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend="torch")
    (sim.sum() + dist.sum()).backward()
    z2, p2 = z.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    unfolded = F.unfold(z2, (2, 3)).view(2, 18, 4, 4)
    sim2, dist2 = protokern.prototype_similarity(unfolded, p2.flatten(1), similarity=similarity, backend="torch")
    (sim2.sum() + dist2.sum()).backward()
    for a, b in ((sim, sim2), (dist, dist2), (z.grad, z2.grad), (p.grad, p2.grad)):
        assert torch.equal(a, b)


def test_one_by_one_takes_todays_path(monkeypatch):
    z = torch.rand(2, 4, 3, 5, requires_grad=True)
    p = torch.rand(3, 4, requires_grad=True)
    expected = ops._PrototypeSimilarity.apply(z, p, 1e-4, "torch", "highest")[:2]
    grads = torch.autograd.grad(sum(t.sum() for t in expected), (z, p))

    def no_unfold(*args, **kwargs):
        raise AssertionError("a 1 x 1 call must not unfold")

    monkeypatch.setattr(ops.F, "unfold", no_unfold)
    for proto in (p, p[..., None, None]):
        got = protokern.prototype_similarity(z, proto, backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        got_grads = torch.autograd.grad(sum(t.sum() for t in got), (z, p))
        assert all(torch.equal(a, b) for a, b in zip(got_grads, grads))
    sim, dist = protokern.prototype_similarity(z, p, similarity="linear", backend="torch")
    assert torch.equal(dist, expected[1]) and torch.equal(sim, -expected[1])


def test_deterministic_backward():
    z = torch.randn(3, 8, 7, 7)
    p = torch.randn(6, 8, 3, 2)
    w = torch.randn(3, 6)
    grads = []
    for _ in range(2):
        zr, pr = z.clone().requires_grad_(), p.clone().requires_grad_()
        sim, dist = protokern.prototype_similarity(zr, pr, similarity="cosine", backend="torch")
        ((sim * w).sum() + dist.sum()).backward()
        grads.append((zr.grad, pr.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_prototype_distances_map():
    z, p = torch.rand(2, 3, 5, 6), torch.rand(4, 3, 2, 3)
    for similarity in SIMILARITIES:
        got = protokern.prototype_distances(z, p, similarity=similarity)
        assert got.shape == (2, 4, 4, 4)
        assert (got.double() - reference_map(z, p, similarity).clamp_min(0)).abs().max() < 1e-5


def test_prototype_distances_follow_the_op_on_non_finite_values():
    z = torch.rand(2, 3, 2, 3)
    p = torch.rand(4, 3)
    z[0, 1, 0, 0] = float("inf")  # a patch holding +inf: at +inf, not inf - inf = NaN
    z[0, 2, 1, 2] = float("nan")  # a patch holding NaN: NaN
    z[1] = 1e20  # equal huge vectors: at 0, not NaN
    p[3] = 1e20
    got = protokern.prototype_distances(z, p)
    want = float64_distances(z, p).view(2, 4, 2, 3)
    assert torch.equal(got.isnan(), want.isnan()) and got[0, :, 1, 2].isnan().all()
    assert got[0, :, 0, 0].isinf().all() and (got[1, 3] == 0).all()
    finite = want.isfinite() & (want < 3e38)
    assert ((got.double() - want).abs() <= 1e-5 * want.abs().clamp_min(1))[finite].all()
    assert got.isinf()[~finite & ~want.isnan()].all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prototype_distances_are_float32_for_half_inputs(dtype):
    z = torch.zeros(2, 4, 2, 2, dtype=dtype)
    z[:, :, 0, 0] = 200.0  # 4 * 200^2 = 160000 overflows float16
    p = torch.zeros(2, 4, dtype=dtype)
    for paired in (False, True):
        got = protokern.prototype_distances(z, p, paired=paired)
        assert got.dtype == torch.float32 and (got.flatten(-2)[..., 0] == 160000).all()


def test_empty_batch():
    z = torch.rand(0, 3, 5, 6, requires_grad=True)
    p = torch.rand(4, 3, 2, 2, requires_grad=True)
    for similarity in SIMILARITIES:
        sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend="torch")
        assert sim.shape == dist.shape == (0, 4)
        (sim.sum() + dist.sum()).backward()
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_compile_fullgraph_window_and_cosine():
    z = torch.rand(2, 3, 4, 5, requires_grad=True)
    p = torch.rand(3, 3, 2, 2, requires_grad=True)

    def f(z, p):
        s1, d1 = protokern.prototype_similarity(z, p, backend="torch")
        s2, d2 = protokern.prototype_similarity(z, p, similarity="cosine", backend="torch")
        return s1.sum() + d1.mean() + 3 * s2.sum() + d2.mean()

    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(z, p), (z, p))
    eager = torch.autograd.grad(f(z, p), (z, p))
    assert all(torch.allclose(a, b) for a, b in zip(eager, compiled))
    # dynamic=True: every size symbolic (the cosine's autograd.Function stopped in a Dynamo assertion)
    dynamic = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in ((2, 3, 4, 5), (3, 3, 6, 2)):
        z = torch.rand(shape, requires_grad=True)
        compiled = torch.autograd.grad(dynamic(z, p), (z, p))
        eager = torch.autograd.grad(f(z, p), (z, p))
        assert all(torch.allclose(a, b) for a, b in zip(eager, compiled))


# ---- cosine: zero vectors, the eps ball ----


def test_cosine_zero_window_has_cosine_zero_and_exact_gradient():
    # every window but the zero one has a negative cosine with the (positive) prototype: the zero window wins
    z = -torch.rand(1, 4, 2, 2, dtype=torch.float64) - 0.1
    z[0, :, 0, 1] = 0
    p = torch.rand(2, 4, 1, 1, dtype=torch.float64) + 0.1
    sim, dist = protokern.prototype_similarity(z, p, similarity="cosine", backend="torch")
    _, idx = protokern.nearest_patches(z, p, similarity="cosine", backend="torch")
    assert torch.equal(idx, torch.ones_like(idx)) and torch.equal(sim, torch.zeros_like(sim))
    assert torch.equal(dist, torch.full_like(dist, 2.0))
    check_against_reference(z, p, "cosine", "torch")  # gradients inside the eps ball (x / eps)
    # a zero prototype: cosine 0 with every window (up to the rounding of each window's |unit vector|^2)
    p[1] = 0
    sim, dist = protokern.prototype_similarity(z, p, similarity="cosine", backend="torch")
    assert abs(sim[0, 1].item()) < 1e-12 and abs(dist[0, 1].item() - 2) < 1e-12


def test_cosine_tiny_vectors_inside_the_eps_ball():
    z = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    z[0, :, 1:, 1:] *= 1e-10  # the 2 x 2 window at (1, 1) has |window| < COSINE_EPS
    p = torch.randn(2, 3, 2, 2, dtype=torch.float64) * 1e-10
    check_against_reference(z, p, "cosine", "torch")


def test_cosine_is_scale_free_and_unaffected_by_huge_values():
    z, p = torch.randn(2, 3, 4, 4), torch.randn(3, 3, 2, 2)
    sim, dist = protokern.prototype_similarity(z, p, similarity="cosine", backend="torch")
    for scale in (1e-5, 1e30):  # |z|^2 overflows float32 at 1e30 unless the norm is scaled
        sim2, dist2 = protokern.prototype_similarity(z * scale, p * scale, similarity="cosine", backend="torch")
        assert torch.allclose(sim, sim2, atol=1e-6) and torch.allclose(dist, dist2, atol=1e-6)


# ---- NaN and inf rules through a window ----


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_nan_through_a_window(similarity, backend):
    device = _device(backend)
    z = torch.rand(2, 3, 4, 5, device=device)
    p = torch.rand(3, 3, 2, 2, device=device)
    z[1, 1, 2, 3] = float("nan")  # covered by the windows at h in {1, 2}, w in {2, 3}; Wout = 4
    sim, dist = protokern.prototype_similarity(z, p, similarity=similarity, backend=backend)
    _, idx = protokern.nearest_patches(z, p, similarity=similarity, backend=backend)
    assert dist[1].isnan().all() and sim[1].isnan().all() and (idx[1] == 1 * 4 + 2).all()
    assert dist[0].isfinite().all() and sim[0].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_inf_through_a_window(similarity, backend):
    device = _device(backend)
    z, p = torch.rand(2, 3, 4, 5), torch.rand(3, 3, 2, 2)
    ref = reference_map(z, p, similarity)  # (2, 3, 3, 4)
    z[1, 1, 2, 3] = float("inf")
    ref[1, :, 1:3, 2:4] = float("inf")  # the windows holding the inf are at distance +inf
    dist, idx = protokern.nearest_patches(z.to(device), p.to(device), similarity=similarity, backend=backend)
    assert torch.equal(idx.cpu(), ref.flatten(2).argmin(-1))
    assert (dist.cpu().double() - ref.flatten(2).amin(-1)).abs().max() < 1e-5
    # every window holds an inf (one window, the whole map): distance +inf, window 0
    sim, dist = protokern.prototype_similarity(z.to(device), torch.rand(3, 3, 4, 5, device=device),
                                               similarity=similarity, backend=backend)
    assert (dist[1] == float("inf")).all()
    assert (sim[1] == {"log": 0.0, "linear": float("-inf"), "cosine": float("-inf")}[similarity]).all()


# ---- argument checks, one clear error each ----


@pytest.mark.parametrize(
    "z_shape, p_shape, kwargs, exc, match",
    [
        ((2, 3, 4, 5), (4, 3, 2, 2), {"similarity": "cos"}, ValueError, "similarity must be one of"),
        ((2, 3, 4, 5), (4, 3, 2, 2), {"similarity": None}, ValueError, "similarity must be one of"),
        ((2, 3, 4, 5), (4, 3, 5, 2), {}, ValueError, "5 x 2 is larger than the feature map 4 x 5"),
        ((2, 3, 4, 5), (4, 3, 1, 6), {"similarity": "cosine"}, ValueError, "larger than the feature map"),
        ((2, 3, 4, 5), (4, 3, 2), {}, ValueError, r"\(M, D\) or \(M, D, kh, kw\)"),
        ((2, 3, 4, 5), (4, 3, 2, 2, 1), {}, ValueError, r"\(M, D\) or \(M, D, kh, kw\)"),
        ((2, 3, 4, 5), (4, 2, 2, 2), {}, ValueError, "channel mismatch: z has D=3 but prototypes have D=2"),
        ((2, 3, 4, 5), (4, 3, 0, 2), {}, ValueError, "empty"),
    ],
)
def test_bad_input(z_shape, p_shape, kwargs, exc, match):
    z, p = torch.rand(z_shape), torch.rand(p_shape)
    with pytest.raises(exc, match=match):
        protokern.prototype_similarity(z, p, **kwargs)
    if "similarity" in kwargs or len(p_shape) != 4:
        with pytest.raises(exc, match=match):
            protokern.nearest_patches(z, p, **kwargs)
        with pytest.raises(exc, match=match):
            protokern.prototype_distances(z, p, **kwargs)


# ---- ProtoLayer ----


@pytest.mark.parametrize("size, shape", [((1, 1), (1, 1)), (2, (2, 2)), ((1, 3), (1, 3)), ([3, 2], (3, 2))])
def test_proto_layer_prototype_size(size, shape):
    layer = protokern.ProtoLayer(5, 4, prototype_size=size, similarity="linear", backend="torch")
    assert layer.prototypes.shape == (5, 4, *shape) and layer.prototype_size == shape
    assert f"prototype_size={shape}" in repr(layer) and "similarity='linear'" in repr(layer)
    z = torch.rand(2, 4, 4, 5)
    sim, dist = layer(z)
    ref_sim, ref_dist = protokern.prototype_similarity(z, layer.prototypes, similarity="linear", backend="torch")
    assert torch.equal(sim, ref_sim) and torch.equal(dist, ref_dist)


def test_proto_layer_default_is_unchanged():
    torch.manual_seed(1)
    layer = protokern.ProtoLayer(6, 3)
    torch.manual_seed(1)
    assert torch.equal(layer.prototypes, torch.rand(6, 3, 1, 1)) and layer.similarity == "log"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"prototype_size": 0}, ValueError, "prototype_size must be an integer >= 1"),
        ({"prototype_size": 2.5}, TypeError, "prototype_size must be an integer >= 1"),
        ({"prototype_size": "2"}, TypeError, "prototype_size must be an integer >= 1"),
        ({"prototype_size": True}, TypeError, "prototype_size must be an integer >= 1"),
        ({"prototype_size": (2,)}, ValueError, r"pair \(kh, kw\)"),
        ({"prototype_size": (3, 2, 1)}, ValueError, r"pair \(kh, kw\)"),
        ({"prototype_size": (2, 0)}, ValueError, r"prototype_size\[1\] must be an integer >= 1"),
        ({"similarity": "dot"}, ValueError, "similarity must be one of"),
    ],
)
def test_proto_layer_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        protokern.ProtoLayer(5, 4, **kwargs)


# ---------------------------------------------------------------------------------------------- helpers above
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("z_shape, p_shape", SHAPES)
def test_layer_helpers_match_the_reference(z_shape, p_shape, similarity):
    """What push and the explanations use: the layer's nearest windows, its windows' values, the paired
    self-distance maps (exactly 0 at the source window) and its similarity of distances, against the float64
    references."""
    g = torch.Generator().manual_seed(5)
    z = torch.rand(z_shape, generator=g)
    layer = protokern.ProtoLayer(p_shape[0], p_shape[1], prototype_size=p_shape[2:], similarity=similarity)
    with torch.no_grad():
        layer.prototypes.copy_(torch.rand(p_shape, generator=g))
    p = layer.prototypes.detach()
    ref = distance_map(z, p) if similarity != "cosine" else 2 - 2 * cosine_map(z, p)  # (B, M, Hout, Wout)
    assert layer.output_size(z_shape[2:]) == tuple(ref.shape[2:])
    torch.testing.assert_close(layer.distance_maps(z).double(), ref, rtol=1e-5, atol=1e-5)
    dist, idx = layer.nearest(z)
    torch.testing.assert_close(dist.double(), ref.flatten(2).amin(2), rtol=1e-5, atol=1e-5)
    sim, _ = layer(z)
    torch.testing.assert_close(layer.to_similarity(dist), sim)

    # windows: image b's winning window of prototype 0, cut out by hand
    kh, kw = p_shape[2:]
    wout = z_shape[3] - kw + 1
    windows = layer.windows(z, idx[:, 0])
    assert windows.shape == (z_shape[0], z_shape[1], kh, kw)
    for b in range(z_shape[0]):
        h, w = divmod(int(idx[b, 0]), wout)
        assert torch.equal(windows[b], z[b, :, h:h + kh, w:w + kw])
    # paired maps: window b as prototype b on image b; 0 at that window, the reference elsewhere
    paired = layer.distance_maps(z, windows, paired=True)  # (B, Hout, Wout)
    ref_paired = (distance_map if similarity != "cosine" else lambda a, b: 2 - 2 * cosine_map(a, b))(z, windows)
    torch.testing.assert_close(paired.double(), ref_paired.diagonal().permute(2, 0, 1), rtol=1e-5, atol=1e-5)
    at_source = paired.flatten(1).gather(1, idx[:, :1])
    assert at_source.abs().max() <= (1e-6 if similarity == "cosine" else 0)


def test_distance_to_similarity_and_errors():
    d = torch.tensor([0.0, 0.5, 3.0, float("inf")])
    torch.testing.assert_close(protokern.distance_to_similarity(d, "log", 1e-4), protokern.log_similarity(d, 1e-4))
    torch.testing.assert_close(protokern.distance_to_similarity(d, "linear"), -d)
    torch.testing.assert_close(protokern.distance_to_similarity(d[:3], "cosine"), 1 - d[:3] / 2)
    with pytest.raises(ValueError, match="similarity must be one of"):
        protokern.distance_to_similarity(d, "dot")
    with pytest.raises(ValueError, match="one image per prototype"):
        protokern.prototype_distances(torch.rand(2, 3, 4, 4), torch.rand(3, 3), paired=True)
    with pytest.raises(ValueError, match="index must be"):
        protokern.prototype_windows(torch.rand(2, 3, 4, 4), torch.zeros(3, dtype=torch.long), (1, 1))
    for index in ([-1, 0], [0, 4], [0, 9], [16, 0]):  # 3 x 3 windows of a 4 x 4 map: positions 0..3
        with pytest.raises(ValueError, match=r"index must lie in \[0, 4\)"):
            protokern.prototype_windows(torch.rand(2, 3, 4, 4), torch.tensor(index), 3)
    for index in (torch.zeros(2), torch.zeros(2, dtype=torch.bool)):
        with pytest.raises(TypeError, match="index must hold integers"):
            protokern.prototype_windows(torch.rand(2, 3, 4, 4), index, (1, 1))
    with pytest.raises(ValueError, match="chunk must be"):
        protokern.prototype_distances(torch.rand(2, 3, 4, 4), torch.rand(2, 3), paired=True, chunk=0)
    # non-tensor arguments: one TypeError naming them (an AttributeError from inside before)
    with pytest.raises(TypeError, match="z and index must be torch.Tensors, got Tensor and list"):
        protokern.prototype_windows(torch.rand(2, 3, 4, 4), [0, 1])
    with pytest.raises(TypeError, match="z and prototypes must be torch.Tensors"):
        protokern.prototype_distances(torch.rand(2, 3, 4, 4).numpy(), torch.rand(2, 3), paired=True)
    # the layer's window count of a map smaller than its window: the op's error, not a grid of 0 or less
    layer = protokern.ProtoLayer(2, 3, prototype_size=3)
    assert layer.output_size((4, 5)) == (2, 3)
    for size in ((2, 2), (-4, 5)):
        with pytest.raises(ValueError, match="prototype window 3 x 3 is larger than the feature map"):
            layer.output_size(size)
