"""benchmarks/distance.py: its original-formulation rows compute the op's function for every variant, a
--quick CPU run writes a row per variant and method (plus the harness's null op), and its fwd+bwd is op-only:
the gradients of fixed upstream gradients, no loss kernels."""
import json

import pytest
import torch

import protokern
from benchmarks import distance


@pytest.mark.parametrize("variant", list(distance.VARIANTS))
def test_original_formulation_of_each_variant_is_the_op(variant):
    window, similarity = distance.VARIANTS[variant]
    g = torch.Generator().manual_seed(0)
    z, p = torch.rand(3, 6, 5, 4, generator=g), torch.rand(7, 6, *window, generator=g)
    ref_sim, ref_d = distance.original_layer(z.double(), p.double(), similarity)
    sim, d = protokern.prototype_similarity(z, p, similarity=similarity, backend="torch")
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sim.double(), ref_sim, rtol=1e-4, atol=1e-4)


def test_quick_run_has_every_variant(tmp_path):
    distance.main(["--quick", "--device", "cpu", "--shape", "2,8,4,4,6", "--shape", "1,8,3,3,5",
                   "--out", str(tmp_path)])
    (result,) = tmp_path.glob("distance-*-cpu-quick.json")
    rows = json.loads(result.read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    first = {(r["variant"], r["method"]) for r in rows if r["shape"] == [2, 8, 4, 4, 6]}
    assert first == {(v, m) for v in ("log", "2x2", "cosine", "nhwc") for m in ("original eager", "torch")} | {
        ("log", "null op")}
    assert {r["variant"] for r in rows if r["shape"] == [1, 8, 3, 3, 5]} == {"log"}
    assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows)
    assert "| 2x2 | torch |" in next(tmp_path.glob("*.md")).read_text()
    with pytest.raises(SystemExit):
        distance.main(["--quick", "--variants", "3x3", "--out", str(tmp_path)])


@pytest.mark.parametrize("variant", list(distance.VARIANTS))
def test_variants_time_the_layout_they_name(monkeypatch, variant):
    """``nhwc`` times the op on channels_last features, the others on contiguous ones."""
    seen = []

    def spy(z, p):
        seen.append(z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous())
        return torch.zeros(z.shape[0], p.shape[0]), torch.zeros(z.shape[0], p.shape[0])

    monkeypatch.setattr(distance, "methods", lambda *a, **k: [("spy", spy, {})])
    distance.bench_shape((2, 8, 4, 4, 6), torch.device("cpu"), True, lambda fn: fn() or 1.0, variant)
    assert seen and all(s == (variant in distance.CHANNELS_LAST) for s in seen)


def test_fwd_bwd_is_op_only(monkeypatch):
    """The timed backward is autograd.grad of both outputs with fixed grad_outputs (no loss reduction)."""
    calls = []
    real = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kw):
        calls.append((outputs, grad_outputs))
        return real(outputs, inputs, grad_outputs=grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    rows = distance.bench_shape((1, 4, 3, 3, 5), torch.device("cpu"), True, lambda fn: (fn(), 1.0)[1])
    assert calls and all(len(out) == 2 and out[0].shape == (1, 5) and grads is not None and len(grads) == 2
                         for out, grads in calls)
    assert {r["method"] for r in rows} == {"original eager", "torch", "null op"}


def test_fastest_precision_per_backend():
    """The summary picks each backend's fastest precision per shape from graph times when every row has
    them, from launched times otherwise, and leaves out backends timed at one precision only."""
    default = protokern.backends.AUTO_PRECISION["cuda"]
    others = [q for q in ("highest", "high", "medium") if q != default]

    def row(backend, precision, us, graph=None, shape=(80, 128, 7, 7, 2000)):
        r = {"method": backend, "shape": list(shape), "variant": "log", "backend": backend, "precision": precision,
             "fwd_us": us, "fwd_bwd_us": us}
        if graph is not None:
            r["fwd_bwd_graph_us"] = graph
        return r

    rows = [row("cuda", default, 100.0, 90.0), row("cuda", others[0], 50.0, 60.0), row("cuda", others[1], 70.0, 40.0),
            row("triton", "medium", 10.0, 8.0, shape=(1, 2, 3, 3, 4)), row("triton", "high", 5.0, shape=(1, 2, 3, 3, 4)),
            row("torch", "highest", 1.0), {"method": "original eager", "shape": [80, 128, 7, 7, 2000],
                                            "variant": "log", "fwd_us": 1.0, "fwd_bwd_us": 1.0}]
    fastest = {f["backend"]: f for f in distance.fastest_precisions(rows)}
    assert set(fastest) == {"cuda", "triton"}
    assert (fastest["cuda"]["fastest"], fastest["cuda"]["fastest_us"], fastest["cuda"]["timing"]) == (
        others[1], 40.0, "fwd_bwd_graph_us")
    assert (fastest["cuda"]["default"], fastest["cuda"]["default_us"]) == (default, 90.0)
    assert (fastest["triton"]["fastest"], fastest["triton"]["timing"]) == ("high", "fwd_bwd_us")
    text = distance.markdown({"device": "card", "date": "today", "torch": "t", "triton": "x"}, rows)
    assert f"| (80, 128, 7x7, 2000) | log | cuda | graph | {others[1]} | 40.0 | {default} | 90.0 |" in text


def test_ab_rows_run_under_their_environment(monkeypatch):
    """An A/B row's forward and backward run with its switch set (and the environment restored after); the rows
    exist only on a GPU, at AB_SHAPE, for an available backend."""
    import os

    seen = []

    def fwd_bwd_of(fn):
        def record():
            seen.append({k: os.environ.get(k) for k in env})
        return record, record

    (name, (backend, env)), = distance.AB_ROWS.items()
    for key in env:
        monkeypatch.delenv(key, raising=False)
    assert distance.ab_cases(torch.device("cpu"), distance.AB_SHAPE, "log", fwd_bwd_of) == []
    monkeypatch.setattr(protokern, "available_backends", lambda device: {backend: None})
    gpu = torch.device("cuda")
    assert distance.ab_cases(gpu, (1, 2, 3, 3, 4), "log", fwd_bwd_of) == []
    assert distance.ab_cases(gpu, distance.AB_SHAPE, "nhwc", fwd_bwd_of) == []
    (case,) = distance.ab_cases(gpu, distance.AB_SHAPE, "log", fwd_bwd_of)
    assert case[0] == name and case[3] == {"backend": backend, "environment": env}
    case[1]()
    case[2]()
    assert seen == [env, env] and all(os.environ.get(k) is None for k in env)
    monkeypatch.setattr(protokern, "available_backends", lambda device: {backend: "no toolkit"})
    assert distance.ab_cases(gpu, distance.AB_SHAPE, "log", fwd_bwd_of) == []
