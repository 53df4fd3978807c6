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
    assert first == {(v, m) for v in ("log", "2x2", "cosine") for m in ("original eager", "torch")} | {
        ("log", "null op")}
    assert {r["variant"] for r in rows if r["shape"] == [1, 8, 3, 3, 5]} == {"log"}
    assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows)
    assert "| 2x2 | torch |" in next(tmp_path.glob("*.md")).read_text()
    with pytest.raises(SystemExit):
        distance.main(["--quick", "--variants", "3x3", "--out", str(tmp_path)])


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
