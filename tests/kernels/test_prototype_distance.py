"""Triton kernels of the fused op, called through their launchers: layouts, dtypes, GPU shapes, precisions."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import protokern
from protokern import torch_backend
from protokern.kernels import prototype_distance as K
from tests.reference import check_winners_and_gradients, float64_distances, original_layer, rel_err
from tests.kernels import needs_triton_cpu, sm90_gate

GRAD_Z_KERNELS = {"_won_histogram_kernel", "_won_starts_kernel", "_won_order_kernel", "_grad_features_segments_kernel"}


@needs_triton_cpu
def test_launcher_matches_torch_backend_on_strided_views():
    """The launchers take any (B, D, HW) strides, including D-innermost (channels_last) views, and any (M, D)
    strides of p (the op passes it contiguous; a transposed view here)."""
    z = torch.rand(2, 5, 6, 21)  # (B, H, W, D) storage
    z3 = z.permute(0, 3, 1, 2).flatten(2)  # (B, D, HW) view with stride_d = 1
    p = torch.rand(21, 11).T  # (M, D) view with stride_m = 1
    sim, dist, idx = K.forward(z3, p, 1e-4)
    sim_t, dist_t, idx_t = torch_backend.forward(z3, p, 1e-4)
    assert torch.equal(idx, idx_t) and rel_err(dist, dist_t) < 1e-6
    g_sim, g_dist = torch.randn(2, 11), torch.randn(2, 11)
    gz, gp = K.backward(g_sim, g_dist, z3, p, idx, dist, 1e-4)
    gz_t, gp_t = torch_backend.backward(g_sim, g_dist, z3, p, idx_t, dist_t, 1e-4)
    assert gz.is_contiguous() and gz.shape == z3.shape
    assert rel_err(gz, gz_t) < 1e-5 and rel_err(gp, gp_t) < 1e-5


@needs_triton_cpu
def test_every_output_written():
    """Outputs are allocated with torch.empty: poison-free check that every (b, m) is written."""
    z3 = torch.rand(3, 9, 50)
    p = torch.rand(70, 9)  # M not a multiple of the prototype tile
    sim, dist, idx = K.forward(z3, p, 1e-4)
    assert torch.isfinite(sim).all() and torch.isfinite(dist).all()
    assert int(idx.min()) >= 0 and int(idx.max()) < 50


# ---- GPU ----
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("shape", [(80, 128, 7, 7, 2000), (16, 512, 28, 28, 300), (4, 256, 14, 14, 10000)], ids=str)
def test_large_shapes(shape):
    B, D, H, W, M = shape
    z = torch.rand(B, D, H, W, device="cuda", requires_grad=True)
    p = torch.rand(M, D, device="cuda", requires_grad=True)
    sim, dist = protokern.prototype_similarity(z, p, backend="triton")
    _, idx = protokern.nearest_patches(z, p, backend="triton")
    w_sim, w_dist = torch.randn_like(sim), torch.randn_like(sim)
    gz, gp = torch.autograd.grad((sim * w_sim).sum() + (dist * w_dist).sum(), (z, p))
    check_winners_and_gradients(z, p, sim, dist, idx, w_sim, w_dist, gz, gp)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_inputs_on_a_gpu_that_is_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current (no torch.cuda.set_device): the launchers run on the inputs'
    GPU and agree with the torch backend there."""
    assert torch.cuda.current_device() == 0
    z3, p = torch.rand(3, 64, 49, device="cuda:1"), torch.rand(40, 64, device="cuda:1")
    sim, dist, idx = K.forward(z3, p, 1e-4)
    _, dist_t, idx_t = torch_backend.forward(z3, p, 1e-4)
    assert torch.equal(idx, idx_t) and rel_err(dist, dist_t) < 1e-6
    g_sim, g_dist = torch.randn_like(sim), torch.randn_like(sim)
    gz, gp = K.backward(g_sim, g_dist, z3, p, idx, dist, 1e-4)
    gz_t, gp_t = torch_backend.backward(g_sim, g_dist, z3, p, idx_t, dist_t, 1e-4)
    assert gz.device == z3.device and rel_err(gz, gz_t) < 1e-5 and rel_err(gp, gp_t) < 1e-5
    assert torch.cuda.current_device() == 0


@gpu
@pytest.mark.parametrize("precision", ["high", "medium"])
def test_tensor_core_precisions_recompute_winner(precision):
    z = torch.rand(32, 128, 7, 7, device="cuda")
    p = torch.rand(500, 128, device="cuda")
    p[7] = z[3, :, 4, 2]
    sim, dist = protokern.prototype_similarity(z, p, backend="triton", precision=precision)
    sim_ref, dist_ref = original_layer(z, p)
    assert dist[3, 7].item() == 0.0 and abs(sim[3, 7].item() - sim_ref[3, 7].item()) < 1e-4
    # The search may pick a near-tie under TF32; the reported distance is the exact one of the picked patch.
    assert rel_err(dist, dist_ref) < (1e-5 if precision == "high" else 1e-3)


@gpu
def test_compile_fullgraph_cuda_fresh_process():
    code = (
        "import torch, protokern\n"
        "z = torch.rand(4, 16, 5, 5, device='cuda', requires_grad=True)\n"
        "p = torch.rand(9, 16, 1, 1, device='cuda', requires_grad=True)\n"
        "f = torch.compile(lambda z, p: sum(t.sum() for t in protokern.prototype_similarity(z, p)), fullgraph=True)\n"
        "g = torch.autograd.grad(f(z, p), (z, p))\n"
        "e = torch.autograd.grad(sum(t.sum() for t in protokern.prototype_similarity(z, p)), (z, p))\n"
        "assert all(torch.allclose(a, b) for a, b in zip(g, e))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---- The sort-free backward and the multi-image forward, against float64 references ----
def _reference_backward(z3, p, idx, g_sim, g_dist, eps=1e-4):
    """Float64 gradients at the given winners: each pair's 2 g (z - p) reaches its winning patch only
    (scatter_add: a NaN or inf pair leaves the other patches alone)."""
    z64, p64 = z3.double(), p.double()
    gather = idx[:, None, :].expand(-1, z3.shape[1], -1)
    diff = z64.gather(2, gather) - p64.T[None]  # (B, D, M)
    d = (diff * diff).sum(1)
    g = g_dist.double() + g_sim.double() * (1 / (d + 1) - 1 / (d + eps))
    contrib = 2 * g[:, None, :] * diff
    return torch.zeros_like(z64).scatter_add_(2, gather, contrib), -contrib.sum(0).T


def _check_backward(z3, p, idx, dist, tol=1e-6, eps=1e-4):
    g_sim, g_dist = torch.randn(dist.shape), torch.randn(dist.shape)
    gz, gp = K.backward(g_sim, g_dist, z3, p, idx, dist, eps)
    ref_gz, ref_gp = _reference_backward(z3, p, idx, g_sim, g_dist, eps)
    assert gz.shape == z3.shape and gp.shape == p.shape and gz.is_contiguous()
    for got, ref in ((gz, ref_gz), (gp, ref_gp)):
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
        assert torch.equal(got[got.isinf()], ref[ref.isinf()].float())
        finite = ref.isfinite()
        assert rel_err(got[finite], ref[finite]) < tol
    again = K.backward(g_sim, g_dist, z3, p, idx, dist, eps)
    assert torch.equal(again[0].nan_to_num(), gz.nan_to_num()) and torch.equal(again[1].nan_to_num(), gp.nan_to_num())
    return gz, gp


@needs_triton_cpu
@pytest.mark.parametrize("D", [32, 40])  # the rescoring's unmasked channel loads (D % 32 == 0) and masked ones
@pytest.mark.parametrize("B, HW, M", [(1, 1, 1), (3, 33, 33), (2, 65, 70)], ids=str)
def test_every_access_in_bounds_at_tile_edges(D, B, HW, M):
    """At the edges of the tiles (one patch and one prototype; one past a 32-patch tile and a 32-prototype program;
    one past a 64-patch step and over several prototype tiles), at every precision: the interpreter's memory
    checker (tests/triton_memcheck.py) sees every load and store inside the launch's tensors, and the forward and
    the backward are the float64 reference's."""
    from tests import triton_memcheck

    assert triton_memcheck.install()  # tests/conftest.py installed it: the checks below run
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    exact = float64_distances(z3, p)  # (B, M, HW)
    for precision in ("highest", "high", "medium"):
        _, dist, idx = K.forward(z3, p, 1e-4, precision)
        assert torch.equal(idx, exact.argmin(2)) and rel_err(dist, exact.min(2).values) < 1e-6
    _check_backward(z3, p, idx, dist)


@needs_triton_cpu
@pytest.mark.parametrize("shape", [
    (1, 20, 35, 1),  # B = 1, M = 1: one pair, 63 empty rows of grad_z's list
    (3, 40, 70, 9),  # two forward patch tiles per image; grad_z's channel tiles 32 + 8 (D % 32 != 0)
    (5, 8, 3, 70),  # HW = 3: segments across rows; a partial 16-channel tile
    (19, 12, 1, 6),  # 1 x 1 maps: one segment per image
    (2, 33, 9, 130),  # HW = 9: three pairs a row, M over 5 ordering chunks
    (2, 20, 70, 300),  # 70 patches (128 bins), five pairs a row
    (2, 48, 9, 20),  # grad_z's channel tiles 32 + 16: unmasked loads only where D % 32 == 0 (EVEN_D)
], ids=str)
def test_backward_matches_float64_reference(shape):
    """grad_z and grad_p at the forward's winners equal the float64 scatter reference (products exact, only
    fp32 accumulation rounds), and repeat bit for bit."""
    B, D, HW, M = shape
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    _, dist, idx = K.forward(z3, p, 1e-4)
    _check_backward(z3, p, idx, dist)


@needs_triton_cpu
def test_backward_at_another_eps():
    """eps reaches every pair's slope g_dist + g_sim (eps - 1) / ((d + 1)(d + eps)): at eps = 0.05 (and
    distances near 0, where it matters most) the gradients are the float64 reference's at that eps."""
    B, D, HW, M = 2, 20, 30, 40
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    p[:10] = z3[0, :, :10].T + 1e-3 * torch.randn(10, D)  # d ~ 2e-5
    _, dist, idx = K.forward(z3, p, 0.05)
    assert dist[0, :10].max().item() < 1e-4
    _check_backward(z3, p, idx, dist, eps=0.05)


@needs_triton_cpu
@pytest.mark.parametrize("HW", [12, 70])
def test_backward_many_pairs_on_one_patch(HW):
    """Every prototype of a tile (and of several tiles) picks the same patch: its gradient sums them all, in
    the difference form even where g ~ 1/eps (prototypes 1e-3 from the patch)."""
    B, D, M = 2, 24, 150
    z3 = torch.rand(B, D, HW)
    p = z3[0, :, 5][None] + 1e-3 * torch.randn(M, D)
    z3[1] = z3[0]
    _, dist, idx = K.forward(z3, p, 1e-4)
    assert (idx == 5).all()
    gz, _ = _check_backward(z3, p, idx, dist)
    assert gz[:, :, 5].abs().sum() > 0 and gz[:, :, :5].abs().sum() == 0 and gz[:, :, 6:].abs().sum() == 0


@needs_triton_cpu
@pytest.mark.parametrize("HW", [1, 6, 40, 70])
def test_backward_non_finite_pairs_reach_only_their_patch(HW):
    """A NaN pair (NaN distance) and +-inf pairs (an image whose every patch holds inf) put NaN / inf in
    their winning patch only; +inf and -inf contributions to one patch give NaN, as any summation order."""
    B, D, M = 4, 10, 40
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    z3[1, 3, HW // 2] = float("nan")  # image 1: every pair wins the NaN patch
    z3[2, 0, :] = float("inf")  # image 2: every patch at +inf, patch 0 wins with +-inf contributions
    p[7, 2] = float("nan")  # prototype 7: NaN in every image
    _, dist, idx = K.forward(z3, p, 1e-4)
    assert dist[1].isnan().all() and dist[2, torch.arange(M) != 7].isinf().all()
    assert (idx[:, 7] == 0).all()  # prototype 7's lowest NaN patch
    gz, gp = _check_backward(z3, p, idx, dist)
    assert gz[0, :, 1:].isfinite().all() and gz[3, :, 1:].isfinite().all()
    others = (torch.arange(HW) != HW // 2) & (torch.arange(HW) != 0)
    assert gz[1, :, others].isfinite().all() and gz[2, :, 1:].isfinite().all()
    assert gz[1, :, HW // 2].isnan().all()


@needs_triton_cpu
@pytest.mark.parametrize("HW", [40, 70])
def test_backward_infinite_pairs_in_the_first_and_last_prototype_steps(HW):
    """An infinite pair at each end of the prototypes (both winning patch 0: the first segment of the list, over
    several rows) gives that patch's channel exactly +-inf (the sign of g); every other value stays finite and
    accurate."""
    B, D, M = 2, 24, 150
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    p[3, 1] = float("inf")  # every patch at +inf for prototypes 3 and 140: patch 0 wins
    p[140, 0] = float("-inf")
    _, dist, idx = K.forward(z3, p, 1e-4)
    assert (idx[:, [3, 140]] == 0).all() and dist[:, [3, 140]].isinf().all()
    gz, _ = _check_backward(z3, p, idx, dist)
    assert gz[:, :2, 0].isinf().all()
    gz[:, :2, 0] = 0
    assert gz.isfinite().all()


@needs_triton_cpu
@pytest.mark.parametrize("HW", [1, 3, 49])
def test_backward_segments_across_many_rows(HW):
    """grad_z's rows of the pair list: on a map of one patch every pair of an image is one segment over all 64 rows
    (joined by the scan); with HW 3 and 49 long segments cross rows next to short ones inside rows, patches
    that no pair won get zeros, and the result is the float64 reference's, repeated bit for bit."""
    B, D, M = 3, 40, 700  # RUN = 11 pairs a row
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    if HW > 1:
        z3[1, :, 0] = p[:400].mean(0)  # image 1: patch 0 wins most prototypes
    _, dist, idx = K.forward(z3, p, 1e-4)
    gz, _ = _check_backward(z3, p, idx, dist)
    lost = torch.ones(B, HW, dtype=torch.bool).scatter_(1, idx, False)  # patches no prototype won
    assert torch.equal(gz.abs().sum(1) == 0, lost)
    if HW > 1:
        assert (idx[1] == 0).sum() > 2 * triton.cdiv(M, K.SEGMENT_ROWS)  # a segment over several rows


@needs_triton_cpu
@pytest.mark.parametrize("gather", [True, False])
def test_segment_scans_both_formulations(monkeypatch, gather):
    """grad_z's cross-row scan as GPUs run it (``tl.associative_scan``: slow under the interpreter, so one small
    program here) and as the interpreter runs it (gathers): both the float64 reference's values, with segments
    across rows, a lone infinite pair and a NaN pair."""
    monkeypatch.setattr(K, "gather_scan", lambda device: gather)
    B, D, HW, M = 1, 24, 5, 300  # one program; 64 rows of 5 pairs
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    p[7, 3], p[200, 1] = float("inf"), float("nan")
    _, dist, idx = K.forward(z3, p, 1e-4)
    gz, _ = _check_backward(z3, p, idx, dist)  # NaN and inf exactly where the reference has them
    assert gz[0, :, idx[0, 200]].isnan().all() and not gz.isfinite().all()


@needs_triton_cpu
def test_counting_sort_lists_pairs_by_patch_then_prototype(monkeypatch):
    """The counting sort behind grad_z (histograms of 32-prototype chunks, their places, then each chunk's
    pairs) lists every image's prototypes by (winning patch, m), here with 16 patches a step over a 70-patch map
    (five steps) and indices outside the map clamped as every gather clamps them."""
    monkeypatch.setattr(K, "ORDER_BINS", 16)
    B, HW, M = 3, 70, 300
    idx = torch.randint(0, HW, (B, M))
    idx[1, :150] = 69  # a long run in the last step's bins
    idx[2, 5], idx[2, 6] = -3, HW + 4
    configs = K.backward_configs(8, HW)
    chunk = configs["_won_order_kernel"][0]["CHUNK"]
    chunks = triton.cdiv(M, chunk)
    starts = torch.empty((B, chunks, HW), dtype=torch.int32)
    order = torch.empty((2, B, M), dtype=torch.int32)
    count = torch.empty((B, HW), dtype=torch.int32)
    K._won_histogram_kernel[(B, chunks)](idx, starts, M, HW, chunks, **configs["_won_histogram_kernel"][0])
    K._won_starts_kernel[(B,)](starts, count, HW, chunks, **configs["_won_starts_kernel"][0])
    K._won_order_kernel[(B, chunks)](idx, starts, order, B, M, HW, chunks, **configs["_won_order_kernel"][0])
    k = idx.clamp(0, HW - 1)
    key = k * M + torch.arange(M)
    expect = key.argsort(dim=1)
    assert torch.equal(order[0].long(), expect) and torch.equal(order[1].long(), k.gather(1, expect))
    assert torch.equal(count.long(), torch.zeros(B, HW, dtype=torch.long).scatter_add_(1, k, torch.ones_like(k)))


@needs_triton_cpu
@pytest.mark.parametrize("D", [20, 40])  # p tile resident in registers, and read per slice
def test_forward_images_per_program(monkeypatch, D):
    """Several images per forward program (a partial last block) give the same bits as one image each,
    and the contract's winners."""
    from tests.reference import contract_result

    z3, p = torch.rand(11, D, 30), torch.rand(37, D)
    z3[4, :, 7] = p[3]  # an exact hit
    one = K.forward(z3, p, 1e-4)
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 1)
    assert K.forward_images_per_program(11, 37, 64) == 8
    packed = K.forward(z3, p, 1e-4)
    assert all(torch.equal(a, b) for a, b in zip(one, packed))
    ref_dist, ref_idx = contract_result(z3, p)
    assert torch.equal(packed[2], ref_idx) and rel_err(packed[1], ref_dist) < 1e-6
    assert packed[1][4, 3].item() == 0.0


def test_forward_images_per_program_keeps_the_grid_full():
    """Images are packed only while TARGET_PROGRAMS programs remain (CUB shape: 2 images, 40 x 32 programs)."""
    assert K.forward_images_per_program(80, 2000, 64) == 2
    assert K.forward_images_per_program(1, 2000, 64) == 1
    assert K.forward_images_per_program(10 ** 6, 10, 16) == 8


# ---- Launch limits, the rescoring paths, and the sm_90 compile gate ----
class _GridSpy:
    """Stands in for a triton kernel: records each launch grid and launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@needs_triton_cpu
@pytest.mark.parametrize("M", [40, 70])  # one and two prototype tiles
@pytest.mark.parametrize("images", [1, 2])  # images per program
def test_forward_folds_images_into_grid_axis_0(monkeypatch, M, images):
    """Image blocks and prototype tiles share grid axis 0 (no 65535 limit on B); beyond MAX_PROGRAMS programs
    the launcher splits the batch into runs of image blocks, with the same results."""
    z3, p = torch.rand(9, 8, 6), torch.rand(M, 8)
    expected = K.forward(z3, p, 1e-4)
    spy = _GridSpy(K._forward_kernel)
    monkeypatch.setattr(K, "_forward_kernel", spy)
    monkeypatch.setattr(K, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(K, "forward_images_per_program", lambda B, M, block_m: images)
    got = K.forward(z3, p, 1e-4)
    assert all(len(grid) == 1 and grid[0] <= 3 for grid in spy.grids)
    m_tiles = -(-M // K.forward_config(8, 6, M, "highest")[0]["BLOCK_M"])
    runs = [-(-(min(9, b0 + 3 // m_tiles * images) - b0) // images) for b0 in range(0, 9, 3 // m_tiles * images)]
    assert [grid[0] for grid in spy.grids] == [r * m_tiles for r in runs] and len(runs) > 1
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@needs_triton_cpu
@pytest.mark.parametrize("B", [1, 11])
def test_grad_p_walks_every_image_in_one_program(monkeypatch, B):
    """grad_p's programs (prototype tile, channel tile) sum all images, GRAD_P_IMAGES at a time (no third grid
    axis, B not a multiple of it): the float64 reference's values; an infinite prototype's gradient over one
    image is +-inf, not NaN (the slots past the last image add no 0 * inf)."""
    D, HW, M = 20, 6, 9
    z3, p = torch.rand(B, D, HW), torch.rand(M, D)
    p[2, 0] = float("inf")
    _, dist, idx = K.forward(z3, p, 1e-4)
    spy = _GridSpy(K._grad_prototypes_kernel)
    monkeypatch.setattr(K, "_grad_prototypes_kernel", spy)
    _, gp = _check_backward(z3, p, idx, dist)
    assert len(spy.grids[0]) == 2 and B % K.GRAD_P_IMAGES != 0
    if B == 1:
        assert gp[2, 0].isinf() and not gp.isnan().any()


def _rescoring_order(z3, p, idx):
    """The forward's exact distance of each (b, m) at patch idx, in the documented order (fp32): lane e of 32
    sums (z_d - p_d)^2 over d = e, e + 32, ... in order, then a pairwise tree adds the lanes."""
    B, D, _ = z3.shape
    diff = z3.float().gather(2, idx[:, None, :].expand(-1, D, -1)).transpose(1, 2) - p.float()[None]  # (B, M, D)
    diff = torch.nn.functional.pad(diff, (0, -D % 32))
    lanes = torch.zeros(diff.shape[:2] + (32,))
    for d0 in range(0, diff.shape[-1], 32):
        lanes = lanes + diff[..., d0:d0 + 32] * diff[..., d0:d0 + 32]
    while lanes.shape[-1] > 1:
        lanes = lanes[..., 0::2] + lanes[..., 1::2]
    return lanes[..., 0]


@needs_triton_cpu
@pytest.mark.parametrize("kind", ["issue", "small", "equal"])
@pytest.mark.parametrize("D", [40, 100])  # a partial last lane slice; four slices
def test_rescoring_sums_in_the_documented_order(kind, D):
    """The exact distances are the fixed-order sums of the contract (lanes over channels, then a pairwise
    tree), bit for bit, at every precision and tile size; the winners are the float64 contract's."""
    from tests.reference import contract_result, issue_case, near_tie_case

    z, p, winners = issue_case(B=3, D=D, H=3, W=5) if kind == "issue" else near_tie_case(kind, 3, D, 3, 5)
    z3 = z.flatten(2)
    ref_dist, ref_idx = contract_result(z, p)
    results = [K.forward(z3, p, 1e-4, precision) for precision in K.INPUT_PRECISION]
    results.append(K.forward(z3, torch.cat([p] * 11), 1e-4))  # 33 prototypes: a 64-prototype tile
    for _, dist, idx in results:
        copies = dist.shape[1] // p.shape[0]
        assert torch.equal(idx, ref_idx.repeat(1, copies))
        assert torch.equal(dist, _rescoring_order(z3, torch.cat([p] * copies), idx))
    assert torch.equal(results[0][2].diagonal(), winners) and rel_err(results[0][1], ref_dist) < 1e-6


@triton.jit
def _search_dot_probe(p_ptr, z_ptr, out_ptr, PRECISION: tl.constexpr, TRUNCATE: tl.constexpr):
    offs16, offs32 = tl.arange(0, 16), tl.arange(0, 32)
    p = tl.load(p_ptr + offs16[:, None] * 32 + offs32[None, :])
    z = tl.load(z_ptr + offs32[:, None] * 16 + offs16[None, :])
    acc = K._search_dot(p, z, tl.zeros((16, 16), dtype=tl.float32), PRECISION, TRUNCATE)
    tl.store(out_ptr + offs16[:, None] * 16 + offs16[None, :], acc)


@needs_triton_cpu
@pytest.mark.parametrize("precision", list(K.INPUT_PRECISION))
def test_certification_as_the_kernel_ran_it(precision):
    """The forward's certification as it ran (forward's search_log: each pair's v~ and the upper and lower ends the
    threshold and the candidate test used): both ends hold the search error |a~ - t| (a~ = v~ + |p|^2, t the
    float64 distance) and are at least search_bound's per-pair bound (what the separable form claims; a bound
    looser than the real errors would let a missing row term B_m pass every contract case), on
    tests/reference.bound_cases (norms <= 2^100: the separable form at "medium", K.SEPARABLE_LEVELS) and on norms of
    ~2^104-2^110 (always the per-pair form); and the delta of each end is its form's, to 2^-10: which form ran."""
    from protokern.kernels import search_bound
    from tests import reference

    g = torch.Generator().manual_seed(2)
    huge = (torch.rand(2, 64, 20, generator=g) * 2.0 ** 52, torch.rand(30, 64, generator=g) * 2.0 ** 50)
    huge[1][:10] = huge[0][0, :, :10].T * (1 + 1e-4 * torch.randn(10, 64, generator=g))
    cases = reference.bound_cases(batch=2) + [huge]
    level = K.INPUT_PRECISION[precision]
    for i, (z3, p) in enumerate(cases):
        B, D, HW = z3.shape
        assert p.shape[0] <= K.forward_config(D, HW, p.shape[0], precision)[0]["BLOCK_M"]  # one tile: rho_p below
        log = torch.full((B, p.shape[0], HW, 3), float("nan"))
        K.forward(z3, p, 1e-4, precision, search_log=log)
        v, hi, lo = log.double().unbind(3)
        zz, pp = (z3.double() ** 2).sum(1)[:, None, :], (p.double() ** 2).sum(1)[None, :, None]
        t = float64_distances(z3, p)
        term = ref_term = 0.0  # "tf32": the operand term, the kernel's (rho_p |p|) and the bound's (|p_lo|)
        if level == "tf32":
            c, r, tiny = search_bound.converted_tf32_bound(D)
            z_lo, p_lo = (x.double() - (x.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32).double()
                          for x in (z3, p))
            z_lo, p_lo = z_lo.norm(dim=1)[:, None, :], p_lo.norm(dim=1)[None, :, None]
            rho_p = (p_lo / pp.sqrt()).max()
            term = r * pp.sqrt() * (z_lo + rho_p * zz.sqrt())
            ref_term = r * (z_lo * pp.sqrt() + zz.sqrt() * p_lo)
        else:
            c, tiny = search_bound.coefficient(level, D), search_bound.TINY
        per_pair = c * ((zz.sqrt() + pp.sqrt()) ** 2 + tiny)
        separable = precision == "medium" and i < len(cases) - 1  # (the default; the others: per-pair)
        form = (search_bound.separable(c) * (zz + pp) + c * tiny if separable else per_pair) + term
        radius = 2 * (zz + pp)
        for name, delta in (("upper", hi - v), ("lower", v - lo)):
            err = (v + pp - t).abs()
            assert (err <= delta).all(), (i, name, (err / delta).max().item())
            # (the form's own fp32 evaluation may take a few u off the bound and off (|z| + |p|)^2)
            ref = per_pair + ref_term
            assert (delta >= ref * (1 - 2.0 ** -20) - 2.0 ** -20 * radius).all(), (i, name, (delta / ref).min().item())
            # which form ran: its delta, to 2^-10 (and the fp32 roundings of v~ and its ends)
            assert ((delta - form).abs() <= 2.0 ** -10 * form + 2.0 ** -22 * radius).all(), (i, name, separable)


@needs_triton_cpu
@pytest.mark.parametrize("change", [{"MASK_ROWS": True}, {"BLOCK_M": 16}, {"EVEN_D": False}])
def test_rescoring_configurations_give_the_same_bits(monkeypatch, change):
    """_rescore_kernel's configurations (the sweep's candidates: idle rows masked or not, 16 or 32 rows, the masked
    loads of D % 32 != 0 at D = 64) return the default's outputs bit for bit, near ties and NaN included."""
    g = torch.Generator().manual_seed(8)
    z3, p = torch.rand(3, 64, 40, generator=g), torch.rand(45, 64, generator=g)
    p[:8] = z3[0, :, :8].T + 1e-4 * torch.rand(8, 64, generator=g)
    z3[1, :, 39] = z3[1, :, 2]
    p[8] = z3[1, :, 2]
    z3[2, 5, 7] = float("nan")
    expected = K.forward(z3, p, 1e-4, "medium")
    config = K.rescore_config
    monkeypatch.setattr(K, "rescore_config", lambda *a: ({**config(*a)[0], **change}, config(*a)[1]))
    got = K.forward(z3, p, 1e-4, "medium")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert expected[2][1, 8] == 2 and torch.isnan(expected[1][2]).all()


@triton.jit
def _popcount_probe(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, K._popcount(tl.load(x_ptr + offs)))


@needs_triton_cpu
def test_popcount_counts_every_bit_of_int32():
    """_rescore_kernel's round count: the set bits of int32 words, sign bit included."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor([0, -1, -2**31, 2**31 - 1, 1, 0x55555555], dtype=torch.int32),
                   torch.randint(-2**31, 2**31 - 1, (58,), dtype=torch.int32, generator=g)])
    out = torch.empty_like(x)
    _popcount_probe[(1,)](x, out, N=64)
    assert out.tolist() == [bin(v & 0xFFFFFFFF).count("1") for v in x.tolist()]


class _WordsSpy:
    """Records the candidate words _rescore_kernel receives (its third argument)."""

    def __init__(self, kernel):
        self.kernel, self.words = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.words.append(args[2].clone())
            return self.kernel[grid](*args, **kwargs)
        return launch


@needs_triton_cpu
@pytest.mark.parametrize("precision", list(K.INPUT_PRECISION))
@pytest.mark.parametrize("HW", [20, 100])  # one tile of <= 32 patches; two steps of 64 (the second partial)
def test_candidate_words_are_the_steps_certified_patches(monkeypatch, precision, HW):
    """What the search hands the rescoring (_forward_kernel's words, bit j of a step's low word = patch k0 + j, of
    its high word = patch k0 + 32 + j): each step's patches whose lower end is at most the running threshold
    after the step (the search_log's ends, on the scale of v~), no others, and no bits past HW; so every patch of
    the final certified set (lower end <= the final threshold) is rescored. Prototypes near patches make rows with
    several candidates; ties within the fp32 rounding of the log's scale are not asked either way."""
    g = torch.Generator().manual_seed(5)
    B, D, M = 3, 40, 33
    z3, p = torch.rand(B, D, HW, generator=g), torch.rand(M, D, generator=g)
    p[:12] = z3[0, :, :12].T + 1e-3 * torch.rand(12, D, generator=g)
    p[12:16] = z3[1, :, 30:34].T if HW > 34 else p[12:16]
    z3[2, :, HW - 1] = z3[2, :, 3]  # an exact duplicate of a patch (in the second step at HW = 100) ...
    p[16] = z3[2, :, 3]  # ... that a prototype equals: two candidates at every precision
    spy = _WordsSpy(K._rescore_kernel)
    monkeypatch.setattr(K, "_rescore_kernel", spy)
    log = torch.full((B, M, HW, 3), float("nan"))
    K.forward(z3, p, 1e-4, precision, search_log=log)
    (words,) = spy.words
    meta = K.forward_config(D, HW, M, precision)[0]
    step = 2 * meta["BLOCK_K"] if meta["PAIRED"] else meta["BLOCK_K"]
    assert words.shape == (B, M, -(-HW // step), 2)
    bits = torch.zeros(B, M, HW, dtype=torch.bool)
    for s in range(words.shape[2]):
        for half in range(2):
            w = words[:, :, s, half].to(torch.int64) & 0xFFFFFFFF
            for j in range(32):
                k = s * step + 32 * half + j
                on = (w >> j) & 1 == 1
                assert k < HW or not on.any(), (s, half, j)
                if k < HW:
                    bits[:, :, k] = on
    _, hi, lo = log.double().unbind(3)
    margin = 2.0 ** -20 * (hi.abs() + lo.abs())  # the log subtracts the row's scale in fp32
    thr = torch.stack([hi[:, :, :min(HW, s0 + step)].min(2).values for s0 in range(0, HW, step)], 2)
    thr_at = thr.repeat_interleave(step, 2)[:, :, :HW]  # each patch's step's running threshold
    assert (bits | ~(lo < thr_at - margin)).all()  # every certified patch of its step
    assert (~bits | (lo <= thr_at + margin)).all()  # and no other
    assert (bits | ~(lo < thr[:, :, -1:] - margin)).all()  # the final certified set is rescored
    assert (bits.sum(2) >= 1).all() and bits[2, 16, 3] and bits[2, 16, HW - 1]  # every row a candidate; ties


@needs_triton_cpu
def test_search_dot_3xtf32_split_is_within_its_bound():
    """The "high" search's product (``_search_dot``: three TF32 dots of the truncated parts of p and z) is
    within search_bound's tf32x3 error of the float64 product, on data where each of its three partial
    products is larger than that bound (a dropped or repeated part fails)."""
    from protokern.kernels import search_bound

    g = torch.Generator().manual_seed(5)
    p = torch.rand(16, 32, generator=g) * 2 - 1
    z = torch.rand(32, 16, generator=g) * 2 - 1
    out = torch.empty(16, 16)
    _search_dot_probe[(1,)](p, z, out, PRECISION="tf32x3", TRUNCATE=False)
    scale = p.double().norm(dim=1)[:, None] * z.double().norm(dim=0)[None, :]
    bound = search_bound.dot_error("tf32x3", 32) * scale
    assert ((out.double() - p.double() @ z.double()).abs() <= bound).all()
    tf32 = torch_backend._tf32  # the truncation the kernels' operands get
    p_hi, z_hi = tf32(p), tf32(z)
    p_lo, z_lo = tf32(p - p_hi), tf32(z - z_hi)
    for a, b in ((p_lo, z_hi), (p_hi, z_lo), (p_hi, z_hi)):
        assert ((a.double() @ b.double()).abs() > bound).any()
    # "tf32" with TRUNCATE (the interpreter's and other vendors' path): the product of the truncated parts,
    # whose distance from the exact product is what converted_tf32_bound's residual term covers
    _search_dot_probe[(1,)](p, z, out, PRECISION="tf32", TRUNCATE=True)
    gamma = search_bound.dot_error("ieee", 32) * scale
    assert ((out.double() - p_hi.double() @ z_hi.double()).abs() <= gamma).all()
    assert ((out.double() - p.double() @ z.double()).abs() > 10 * gamma).any()


@needs_triton_cpu
@pytest.mark.parametrize("HW", [49, 70])
def test_tensor_core_tiles_give_the_same_bits(HW):
    """Where "highest" takes 64 x 64 tiles, the tensor-core searches take 64 x 32 under the 128-register cap
    (candidates rescored against the threshold of the patches searched so far: one tile, or two when PAIRED):
    the same bits as "highest", the contract's winners."""
    from tests.reference import contract_result

    g = torch.Generator().manual_seed(6)
    z3, p = torch.rand(3, 40, HW, generator=g), torch.rand(70, 40, generator=g)
    z3[1, :, 45] = p[9]  # an exact hit in the second 32-patch tile
    z3[2, :, 40] = p[60] + 1e-3
    z3[2, :, 3] = p[60] + 1e-3  # a tie across the two 32-patch tiles: the lower patch wins
    assert K.forward_config(40, HW, 70, "highest")[0]["BLOCK_K"] == 64
    results = {}
    for precision in K.INPUT_PRECISION:
        meta, options = K.forward_config(40, HW, 70, precision)
        if precision != "highest":
            assert (meta["BLOCK_M"], meta["BLOCK_K"], options["maxnreg"]) == (64, 32, 128)
        results[precision] = K.forward(z3, p, 1e-4, precision)
    for precision in ("high", "medium"):
        assert all(torch.equal(a, b) for a, b in zip(results[precision], results["highest"]))
    ref_dist, ref_idx = contract_result(z3, p)
    _, dist, idx = results["medium"]
    assert torch.equal(idx, ref_idx) and rel_err(dist, ref_dist) < 1e-6
    assert idx[1, 9].item() == 45 and dist[1, 9].item() == 0.0 and idx[2, 60].item() == 3


@needs_triton_cpu
@pytest.mark.parametrize("HW, M", [(33, 20), (64, 70), (70, 40)], ids=str)
def test_paired_tiles_and_candidate_bits_give_the_contract_winners(monkeypatch, HW, M):
    """Tensor-core searches take two 32-patch tiles a step (PAIRED) and each row's candidates as the bits of two
    int32 words; paired or not (one tile a step, one word), every precision gives the contract's winners,
    bit for bit the same. Every patch a candidate (all equal: 64 rounds, patch 0 wins), ties across bit 31 of
    the low word and bit 0 of the high word, an exact hit on the last bit, a NaN patch."""
    from tests.reference import contract_result

    g = torch.Generator().manual_seed(7)
    z3, p = torch.rand(4, 24, HW, generator=g), torch.rand(M, 24, generator=g)
    z3[0] = p[1][:, None]  # image 0: every patch is prototype 1
    z3[1, :, 31] = p[2]
    z3[1, :, 32] = p[2]  # a tie between bit 31 of the low word and bit 0 of the high word: 31 wins
    z3[2, :, min(HW, 64) - 1] = p[3]  # the last bit of the step
    z3[3, 5, HW - 2] = float("nan")  # every prototype's winner in image 3: the NaN patch
    ref_dist, ref_idx = contract_result(z3, p)
    results = []
    config = K.forward_config
    for paired in (True, False):
        monkeypatch.setattr(K, "forward_config", lambda *a: ({**config(*a)[0], "PAIRED": paired}, config(*a)[1]))
        for precision in ("high", "medium"):
            assert config(24, HW, M, precision)[0]["BLOCK_K"] == 32 and config(24, HW, M, precision)[0]["PAIRED"]
            results.append(K.forward(z3, p, 1e-4, precision))
    _, dist, idx = results[0]
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist.isnan(), ref_dist.isnan()) and rel_err(dist[:3], ref_dist[:3]) < 1e-6
    assert (idx[0] == 0).all() and idx[1, 2].item() == 31 and idx[2, 3].item() == min(HW, 64) - 1
    assert (idx[3] == HW - 2).all() and dist[3].isnan().all()
    for other in results[1:]:  # the same bits (NaN where NaN)
        assert torch.equal(other[2], idx)
        assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(other[:2], results[0][:2]))


@functools.cache  # one compile per distinct argument list and test session
def _run_gate(*args: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "tests.kernels.sm90_gate"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    probe = subprocess.run(cmd + ["--probe"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("triton cannot compile for sm_90 offline here: " + probe.stderr.strip().splitlines()[-1])
    run = subprocess.run(cmd + list(args), env=env, cwd=root, capture_output=True, text=True, timeout=3000)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    if "--sass" in args:
        return results
    assert all(r["spill_bytes"] == 0 and r["registers"] <= 255 for r in results)
    assert all(r["shared_bytes"] <= 227 * 1024 for r in results)
    return results


@pytest.mark.slow
def test_every_triton_launch_configuration_compiles_for_sm90_without_spills():
    """Issue 10's CPU gate: every configuration in ``launch_configs()`` (every tile size, precision and both
    backward kernel) compiled offline for sm_90 (no GPU) spills nothing and fits the SM's shared memory.
    Prints registers and shared memory per configuration (pytest -s). About 2 minutes on 2 CPU cores.
    The tensor-core forward configurations hold 2 blocks of 256 threads per SM (<= 128 registers)."""
    results = _run_gate("--all")
    assert len(results) == len(K.launch_configs())
    assert {r["kernel"] for r in results} == {"_forward_kernel", "_rescore_kernel", "_patch_norms_kernel",
                                              "_grad_prototypes_kernel", *GRAD_Z_KERNELS}
    assert {r.get("PRECISION") for r in results} >= {"ieee", "tf32x3", "tf32"}
    assert {r.get("P_RESIDENT") for r in results} >= {True, False}
    # 2 blocks of 256 threads per SM for every tensor-core search ("high", "medium"), on Triton 3.6 and 3.8
    tensor_core = [r for r in results if r.get("PRECISION") in ("tf32x3", "tf32")]
    assert tensor_core and all(r["maxnreg"] == 128 and r["registers"] <= 128 for r in tensor_core)
    # grad_z's segments at every bin count (16 .. ORDER_BINS patches a step), both channel tiles, D % 32 or not
    segments = [r for r in results if r["kernel"] == "_grad_features_segments_kernel"]
    assert {r["BLOCK_Q"] for r in segments} == {16, 32, 64, 128, 256, 512, K.ORDER_BINS}
    assert {(r["BLOCK_D"], r["EVEN_D"]) for r in segments} == {(16, True), (16, False), (32, True), (32, False)}
    if K.TRITON_VERSION >= (3, 8):  # and the "highest" forward with p streamed; Triton 3.6 takes more there
        capped = [r for r in results if r.get("maxnreg") == 128]
        assert capped and all(r["registers"] <= 128 for r in capped)


def test_sass_mix_of_grad_z_at_the_cub_shape():
    """``sm90_gate --sass --runtime``: grad_z's segments at the CUB shape, as launched: the walk over the list
    holds no MMA, no barrier and no shared memory (the dot-based kernel it replaced had 24 warp-group MMAs and
    its barriers in every step), and issues at most half a warp-instruction per (pair, channel): loop
    instructions x warps / (ROWS x BLOCK_D), 125 x 8 / (64 x 32) on Triton 3.6 and 3.8; per image, with 32 steps
    and 4 channel tiles, 128k warp-instructions against the replaced kernel's 447k (NOTES.md "Triton v14")."""
    (mix,) = _run_gate("--sass", "--runtime", "_grad_features_segments_kernel")
    walk = max(mix["loops"], key=lambda loop: loop["ldg_stg"])
    assert walk["mma"] == 0 and walk["bar"] == 0 and walk["shared"] == 0
    assert walk["total"] == sum(v for k, v in walk.items() if k in sm90_gate.SASS_CLASSES or k == "other")
    assert mix["ROWS"] == K.SEGMENT_ROWS and mix["num_warps"] == K.SEGMENT_WARPS and mix["EVEN_D"]
    assert walk["total"] * mix["num_warps"] <= 0.5 * mix["ROWS"] * mix["BLOCK_D"]


def test_kernels_as_launched_at_the_cub_shape_do_not_spill():
    """``sm90_gate --sass --runtime``: every kernel the launchers pick at the CUB shape (the forward's search at
    each precision and its rescoring, grad_p, grad_z), compiled as the JIT specialises it for that shape's
    arguments (unit channel strides as constants, multiples of 16), spills nothing, on Triton 3.6 and 3.8 (an
    earlier grad_z spilled 24 bytes so on 3.8 while its generic compile, the one ``--all`` checks, did not; the
    rescoring left to ptxas's choice spills 52 bytes on 3.6); the tensor-core forwards (2 blocks of 256 threads)
    stay within 128 registers, the one-warp rescoring within 168 (12 warps per SM), grad_z's segments within 80
    (3 blocks of 256), and its walk over the list is no longer than the generic compile's."""
    launched = _run_gate("--sass", "--runtime")
    assert {m["kernel"] for m in launched} == {"_forward_kernel", "_rescore_kernel", "_patch_norms_kernel",
                                               "_grad_prototypes_kernel", *GRAD_Z_KERNELS}
    assert all(m["runtime"] and m["spill_bytes"] == 0 for m in launched), launched
    assert all(m["registers"] <= 128 for m in launched
               if m.get("PRECISION", "tf32") != "ieee" and m["kernel"] != "_rescore_kernel")
    (rescore,) = [m for m in launched if m["kernel"] == "_rescore_kernel"]  # one warp: 12 per SM at <= 168
    assert rescore["num_warps"] == 1 and rescore["registers"] <= 168 and rescore["EVEN_D"]
    (mix,) = [m for m in launched if m["kernel"] == "_grad_features_segments_kernel"]
    (generic,) = _run_gate("--sass", "_grad_features_segments_kernel")
    assert not generic["runtime"] and mix["registers"] <= 80  # 3 programs of 256 threads per SM
    walk = max(mix["loops"], key=lambda loop: loop["ldg_stg"])
    assert walk["total"] <= max(generic["loops"], key=lambda loop: loop["ldg_stg"])["total"]


def test_forward_search_loops_at_the_cub_shape_only_load_and_dot():
    """``sm90_gate --sass --runtime``: the forward as launched at the CUB shape searches two 32-patch tiles a
    step (PAIRED: two channel-slice loops with MMAs), and at "medium" those loops hold no fp32 arithmetic (the
    patch norms come from the pre-pass, the MMA converts the operands: loads, shared-memory stores and MMAs,
    NOTES.md "Triton v11")."""
    launched = [m for m in _run_gate("--sass", "--runtime") if m["kernel"] == "_forward_kernel"]
    for mix in launched:
        loops = mix["loops"]
        inner = [lp for lp in loops if not any(o is not lp and lp["first"] <= o["first"] and o["last"] <= lp["last"]
                                                for o in loops)]
        searches = [lp for lp in inner if lp["mma"] > 0]
        if mix["PRECISION"] == "ieee":
            assert not mix["PAIRED"]
            continue
        assert mix["PAIRED"] and len(searches) == 2
        if mix["PRECISION"] == "tf32":
            assert all(lp["fp32"] == 0 and lp["total"] <= 64 for lp in searches), searches


@pytest.mark.parametrize("precision", list(K.INPUT_PRECISION))
def test_launchers_pick_only_enumerated_configurations(precision):
    """Whatever the shape, the launchers' choices are among ``launch_configs()`` (what the gate compiles)."""
    configs = K.launch_configs()
    g = torch.Generator().manual_seed(2)
    shapes = [(1, 1, 1), (128, 49, 2000), (512, 784, 2000), (3, 5000, 7)]
    shapes += [tuple(int(x) for x in torch.randint(1, 3000, (3,), generator=g)) for _ in range(30)]
    for D, HW, M in shapes:
        meta, options = K.forward_config(D, HW, M, precision)
        assert ("_forward_kernel", meta, options) in configs
        assert ("_rescore_kernel", *K.rescore_config(D, HW, M, precision)) in configs
        if precision != "highest":
            assert meta["BLOCK_K"] <= K.TENSOR_CORE_MAX_PATCHES
            assert meta["BLOCK_M"] == min(64, max(16, triton.next_power_of_2(M)))
        for name, (meta, options) in K.backward_configs(D, HW).items():
            assert (name, meta, options) in configs
            if name == "_grad_features_segments_kernel":
                assert meta["BLOCK_Q"] == min(K.ORDER_BINS, max(16, triton.next_power_of_2(HW)))
