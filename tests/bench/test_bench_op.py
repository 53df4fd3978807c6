"""CPU benchmarks of the op: the torch backend next to the original formulation (conv2d expansion, ReLU,
-max_pool2d(-d), log), forward and forward+backward, at a few shapes.

Marked ``bench``: the default test run skips them. Run and compare (see the README)::

    python -m pytest -m bench --benchmark-autosave      # saves .benchmarks/<machine>/NNNN_*.json
    python -m pytest -m bench --benchmark-compare       # the same, next to the last saved run

Each benchmark group holds one shape and pass, so the table shows the two formulations side by side. Every
test first checks that the two agree: a benchmark of a wrong result fails.
"""

import pytest
import torch

import protokern
from benchmarks.distance import original_layer

pytestmark = pytest.mark.bench

# (B, D, H, W, M): a small layer, the CUB layer at a CPU-sized batch, a larger feature map
SHAPES = [(8, 64, 7, 7, 200), (8, 128, 7, 7, 2000), (4, 128, 14, 14, 500)]
METHODS = {
    "torch": lambda z, p: protokern.prototype_similarity(z, p, backend="torch"),
    "original": original_layer,
}


def _inputs(shape):
    B, D, H, W, M = shape
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, D, H, W, generator=g), torch.rand(M, D, generator=g)


def _name(shape):
    return "x".join(map(str, shape))


@pytest.fixture(params=SHAPES, ids=_name)
def inputs(request):
    z, p = _inputs(request.param)
    sim, dist = protokern.prototype_similarity(z, p, backend="torch")
    ref_sim, ref_dist = original_layer(z.double(), p.double())
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sim.double(), ref_sim, rtol=1e-4, atol=1e-3)
    return request.param, z, p


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward(benchmark, inputs, method):
    shape, z, p = inputs
    fn = METHODS[method]
    benchmark.group = f"op forward {_name(shape)}"
    benchmark.extra_info.update(shape=list(shape), method=method, threads=torch.get_num_threads())
    with torch.no_grad():
        sim, dist = benchmark(fn, z, p)
    assert sim.shape == dist.shape == (shape[0], shape[4]) and torch.isfinite(sim).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_backward(benchmark, inputs, method):
    shape, z, p = inputs
    fn = METHODS[method]
    z, p = z.clone().requires_grad_(), p.clone().requires_grad_()
    w = torch.randn(shape[0], shape[4], generator=torch.Generator().manual_seed(1))

    def step():
        z.grad = p.grad = None
        sim, dist = fn(z, p)
        ((sim + dist) * w).sum().backward()
        return z.grad, p.grad

    benchmark.group = f"op forward+backward {_name(shape)}"
    benchmark.extra_info.update(shape=list(shape), method=method, threads=torch.get_num_threads())
    grad_z, grad_p = benchmark(step)
    assert grad_z.shape == z.shape and grad_p.shape == p.shape
    assert torch.isfinite(grad_z).all() and torch.isfinite(grad_p).all() and grad_p.abs().sum() > 0
