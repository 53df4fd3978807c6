"""benchmarks/triton_sweep.py on the CPU (Triton interpreter): candidates replace one kernel's configuration
at a time, outputs are checked against the launcher's own, and the launcher is restored afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import triton_sweep  # noqa: E402

from protokern.kernels import prototype_distance as pd  # noqa: E402
from tests.kernels import needs_triton_cpu  # noqa: E402


@needs_triton_cpu
def test_quick_sweep_checks_outputs_and_restores_the_launcher(tmp_path):
    before = (pd.forward_config, pd.rescore_config, pd.forward_images_per_program, pd.rescore_images_per_program,
              pd.backward_configs)
    rows = triton_sweep.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    assert (pd.forward_config, pd.rescore_config, pd.forward_images_per_program, pd.rescore_images_per_program,
            pd.backward_configs) == before
    assert [(r["kernel"], r["candidate"]) for r in rows] == [
        (k, name) for k, names in triton_sweep.QUICK_CANDIDATES.items() for name in names]
    assert all("error" not in r and r["same_outputs"] and r["us"] > 0 for r in rows), rows
    (md,) = tmp_path.glob("triton-sweep-*.md")
    assert "| (3, 40, 6x6, 20) | forward | unpaired |" in md.read_text()
    assert len(json.loads(next(tmp_path.glob("triton-sweep-*.json")).read_text())["rows"]) == len(rows)


def test_a_candidate_changes_only_its_kernel():
    forward = pd.forward_config(128, 49, 2000, "medium")
    grad_p = pd.backward_configs(128, 49)["_grad_prototypes_kernel"]
    with triton_sweep.configured("_grad_features_segments_kernel", {"options": {"num_warps": 2}, "meta": {"ROWS": 32}}):
        meta, options = pd.backward_configs(128, 49)["_grad_features_segments_kernel"]
        assert options["num_warps"] == 2 and meta["ROWS"] == 32
        assert pd.forward_config(128, 49, 2000, "medium") == forward
        assert pd.backward_configs(128, 49)["_grad_prototypes_kernel"] == grad_p
    rescore = pd.rescore_config(128, 49, 2000, "medium")
    with triton_sweep.configured("_rescore_kernel", {"meta": {"BLOCK_M": 16}, "images": 1}):
        assert pd.rescore_config(128, 49, 2000, "medium")[0]["BLOCK_M"] == 16
        assert pd.rescore_images_per_program(80, 2000, 32) == 1
        assert pd.forward_config(128, 49, 2000, "medium") == forward
        assert pd.forward_images_per_program(80, 2000, 64) == 2
    assert pd.rescore_config(128, 49, 2000, "medium") == rescore
    with triton_sweep.configured("forward", {"images": 4, "options": {"num_warps": 4}}):
        assert pd.forward_images_per_program(80, 2000, 64) == 4
        assert pd.forward_config(128, 49, 2000, "medium")[1]["num_warps"] == 4
    assert pd.backward_configs(128, 49)["_grad_features_segments_kernel"][1]["num_warps"] == pd.SEGMENT_WARPS
    assert pd.forward_config(128, 49, 2000, "medium")[1]["num_warps"] == 8


@needs_triton_cpu
def test_every_candidate_runs_in_bounds_with_the_default_outputs():
    """Each candidate of every kernel, once, at a small shape with unmasked channel loads (D = 32) and partial
    prototype tiles, under the interpreter's memory checker (tests/triton_memcheck.py; an out-of-bounds access
    would be the row's error): the forward's outputs bit for bit, the gradients to the sweep's tolerance."""
    import torch

    rows = triton_sweep.sweep_shape((3, 32, 6, 6, 40), "medium", torch.device("cpu"), None, lambda fn: (fn(), 1.0)[1])
    assert [(r["kernel"], r["candidate"]) for r in rows] == [
        (k, name) for k, names in triton_sweep.CANDIDATES.items() for name in names]
    failed = [r for r in rows if "error" in r or not r["same_outputs"]]
    assert not failed, failed
