"""ProtoLayer: the drop-in module over the fused op."""

import math

import numpy as np
import pytest
import torch

import protokern
from tests.reference import original_layer, rel_err


def test_parameter_shape_and_init():
    layer = protokern.ProtoLayer(30, 12)
    assert layer.prototypes.shape == (30, 12, 1, 1)
    assert 0 <= layer.prototypes.min().item() and layer.prototypes.max().item() < 1
    assert layer.num_prototypes == 30 and layer.prototype_dim == 12
    assert "num_prototypes=30" in repr(layer)


def test_forward_and_gradients_match_original():
    layer = protokern.ProtoLayer(7, 10, eps=1e-3)
    z = torch.rand(3, 10, 4, 5, requires_grad=True)
    sim, dist = layer(z)
    sim_ref, dist_ref = original_layer(z.detach(), layer.prototypes.detach(), eps=1e-3)
    assert rel_err(dist, dist_ref) < 1e-5 and (sim - sim_ref).abs().max().item() < 1e-4
    (sim.sum() + dist.sum()).backward()
    p_ref = layer.prototypes.detach().double().requires_grad_()
    z_ref = z.detach().double().requires_grad_()
    sum(original_layer(z_ref, p_ref, eps=1e-3)).sum().backward()
    assert rel_err(layer.prototypes.grad, p_ref.grad) < 1e-4 and rel_err(z.grad, z_ref.grad) < 1e-4


def test_in_a_model_and_state_dict_round_trip():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Sigmoid())
    layer = protokern.ProtoLayer(5, 8)
    sim, _ = layer(model(torch.rand(2, 3, 9, 9)))
    assert sim.shape == (2, 5)
    other = protokern.ProtoLayer(5, 8)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.prototypes, layer.prototypes)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (("5", 4), {}, TypeError, "num_prototypes must be an integer"),
        ((2.5, 4), {}, TypeError, "num_prototypes must be an integer"),
        ((True, 4), {}, TypeError, "num_prototypes must be an integer"),
        ((0, 4), {}, ValueError, "num_prototypes must be an integer >= 1"),
        ((4, "5"), {}, TypeError, "prototype_dim must be an integer"),
        ((4, 2.5), {}, TypeError, "prototype_dim must be an integer"),
        ((4, 0), {}, ValueError, "prototype_dim must be an integer >= 1"),
        ((4, 4), {"eps": 0}, ValueError, "eps"),
        ((4, 4), {"eps": -1e-4}, ValueError, "eps"),
        ((4, 4), {"eps": float("inf")}, ValueError, "eps"),
        ((4, 4), {"eps": float("nan")}, ValueError, "eps"),
        ((4, 4), {"eps": "1e-4"}, TypeError, "eps must be a real number"),
        ((4, 4), {"backend": "cudnn"}, ValueError, "unknown backend 'cudnn'"),
        ((4, 4), {"precision": "low"}, ValueError, "precision must be one of"),
    ],
)
def test_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        protokern.ProtoLayer(*args, **kwargs)


def test_numpy_scalars_accepted():
    layer = protokern.ProtoLayer(np.int64(5), np.int32(3), eps=np.float32(1e-3), backend="torch")
    assert layer.num_prototypes == 5 and layer.prototype_dim == 3 and type(layer.eps) is float
    assert layer(torch.rand(2, 3, 4, 4))[0].shape == (2, 5)


def test_the_default_epsilon_is_the_originals():
    """eps = 1e-4 (the original's): a patch equal to a prototype has similarity log(1 / 1e-4) = 9.21, the value
    pushed prototypes are read at."""
    from protokern.models import ProtoPNet

    layer = protokern.ProtoLayer(3, 4, backend="torch")
    assert layer.eps == 1e-4 and ProtoPNet("tiny", num_classes=2, prototypes_per_class=1).prototype_layer.eps == 1e-4
    z = layer.prototypes.detach()[1].reshape(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    similarity, distances = layer(z)
    assert distances[0, 1] == 0 and similarity[0, 1].item() == pytest.approx(math.log(1e4), rel=1e-6)


def test_precision_is_passed_to_the_op(monkeypatch):
    """The layer's precision reaches the op; results are the same at every precision (certified search)."""
    from protokern import torch_backend

    seen = []
    forward = torch_backend.forward
    monkeypatch.setattr(torch_backend, "forward", lambda *args: seen.append(args[3]) or forward(*args))
    z = torch.rand(2, 6, 3, 3)
    layers = [protokern.ProtoLayer(4, 6, precision=precision) for precision in ("highest", "high", "medium")]
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    outs = [layer(z) for layer in layers]
    assert "precision='medium'" in repr(layers[2]) and seen == ["highest", "high", "medium"]
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(out, outs[0]))


def test_default_precision_is_auto(monkeypatch):
    """precision="auto" (the default) searches with the backend's entry of AUTO_PRECISION: "highest" on torch
    today; a changed entry reaches the backend, with the same outputs (certified search)."""
    from protokern import backends, torch_backend

    seen = []
    forward = torch_backend.forward
    monkeypatch.setattr(torch_backend, "forward", lambda *args: seen.append(args[3]) or forward(*args))
    layer = protokern.ProtoLayer(4, 6)
    z = torch.rand(2, 6, 3, 3)
    assert layer.precision == "auto" and "precision='auto'" in repr(layer)
    first = layer(z)
    monkeypatch.setitem(backends.AUTO_PRECISION, "torch", "high")
    second = layer(z)
    layer.nearest(z)
    assert seen == ["highest", "high", "high"]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_wrong_feature_channels():
    with pytest.raises(ValueError, match="channel mismatch"):
        protokern.ProtoLayer(4, 8)(torch.rand(1, 6, 3, 3))


def test_nearest_follows_the_forward_search_in_float64():
    """A float64 layer searches in float64 in forward, nearest and distance_maps alike: 1 + 1e-12 and 1 are
    one float32 value, but not one float64 value."""
    layer = protokern.ProtoLayer(1, 1, backend="torch").double()
    with torch.no_grad():
        layer.prototypes.zero_()
    z = torch.tensor([1 + 1e-12, 1.0], dtype=torch.float64).view(1, 1, 1, 2).requires_grad_()
    (grad,) = torch.autograd.grad(layer(z)[0].sum(), z)
    assert grad[0, 0, 0, 0] == 0 and grad[0, 0, 0, 1] != 0  # forward's winner: patch 1
    dist, index = layer.nearest(z)
    assert index.item() == 1 and dist.dtype == torch.float64
    assert layer.distance_maps(z).dtype == torch.float64


@pytest.mark.parametrize("similarity, window", [("log", (1, 1)), ("linear", (2, 2)), ("cosine", (1, 1))])
def test_jit_trace_and_fx_record_the_op_as_one_call(similarity, window):
    """torch.jit.trace records one protokern op (it traced the torch backend's data-dependent branches and hit
    an internal assert) and torch.fx.symbolic_trace calls the op (its input checks refused the proxies): both
    graphs compute eager's values and gradients on other inputs."""
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Sigmoid(),
                              protokern.ProtoLayer(5, 6, prototype_size=window, similarity=similarity))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings, and torch.jit.trace's deprecation
        jitted = torch.jit.trace(net, (torch.rand(2, 3, 8, 8),), check_trace=False)
    assert sum(n.kind().startswith("protokern::") for n in jitted.inlined_graph.nodes()) == 1
    fx = torch.fx.symbolic_trace(net)
    assert any(n.op == "call_function" and n.target is protokern.layer.prototype_similarity for n in fx.graph.nodes)
    for graph in (jitted, fx):
        x = torch.rand(3, 3, 9, 7, requires_grad=True)
        want = net(x)
        got = graph(x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        g = torch.rand_like(want[0])
        (gx,) = torch.autograd.grad(got[0], x, g)
        torch.testing.assert_close(gx, torch.autograd.grad(net(x)[0], x, g)[0], rtol=0, atol=0)


def test_reset_parameters_initialises_a_layer_built_on_the_meta_device():
    torch.manual_seed(0)
    want = protokern.ProtoLayer(4, 3).prototypes
    with torch.device("meta"):
        layer = protokern.ProtoLayer(4, 3)
    layer = layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    assert torch.equal(layer.prototypes, want) and bool(((want >= 0) & (want < 1)).all())
    torch.manual_seed(0)
    assert torch.equal(want, torch.rand(4, 3, 1, 1))  # the values of the original's torch.rand


def test_distance_maps_detach_the_layers_own_prototypes():
    """distance_maps (heatmaps) uses this layer's prototypes detached; prototypes passed in are used as given."""
    layer = protokern.ProtoLayer(3, 4, backend="torch")
    z = torch.rand(2, 4, 5, 5)
    assert not layer.distance_maps(z).requires_grad
    assert layer.distance_maps(z, layer.prototypes).requires_grad
