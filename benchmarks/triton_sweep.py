"""Measure Triton launch configurations of the fused op against the launcher's own choice.

For each shape, each candidate configuration of the forward's search (at one search precision), its rescoring
and the two backward kernels replaces the launcher's choice for that kernel alone (``kernels/prototype_distance.py``:
``forward_config``, ``rescore_config``, ``forward_images_per_program``, ``backward_configs``), and the op is timed
as CUDA-graph
replays (median of ``triton.testing.do_bench``). Outputs are checked against the default configuration's: the
forward bit for bit (certified search: tile sizes change no result), the gradients to 1e-5 relative (their
fixed-order sums may group differently with the tile). Each compiled kernel's registers and spill bytes are
reported (a configuration that spills is not a candidate for the launcher: tests/kernels/sm90_gate.py).

    python benchmarks/triton_sweep.py                    # default shapes, on the GPU
    python benchmarks/triton_sweep.py --shape 80,128,7,7,2000 --precision medium --out /tmp/sweep
    TRITON_INTERPRET=1 python benchmarks/triton_sweep.py --quick   # a tiny shape on the CPU: checks only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

import torch

from distance import graphed, shape_cell, timer as launched_timer  # benchmarks/ is on sys.path as a script
from protokern.kernels import prototype_distance as pd

DEFAULT_SHAPES = [(80, 128, 7, 7, 2000), (128, 256, 14, 14, 2000)]
QUICK_SHAPES = [(3, 40, 6, 6, 20)]  # HW = 36: two 32-patch tiles a step (PAIRED)
EPS = 1e-4
# name -> overrides: "options" (launch options), "meta" (constexpr arguments), "images" (forward images per
# program), per kernel ("forward": the search, "_rescore_kernel", "_grad_features_segments_kernel",
# "_grad_prototypes_kernel"). Most informative
# first (gpu_check.sh clips the step to its time); measured losers of 2026-11-30 dropped (forward 8 images 0.71x,
# 32 x 32 tiles with 8 warps 0.74x; the grad_p before v14: 32 prototypes / 8 warps 0.99-1.01x).
CANDIDATES = {
    "forward": {
        "default": {},
        # a warp group per 64 rows, z read half as often: since v16 0 spills as the JIT specialises the CUB shape
        # (3.6 and 3.8) and 20-31% fewer instructions, but 24-632 bytes of spills in the generic compile (NOTES v16)
        "128 x 32 tiles": {"meta": {"BLOCK_M": 128}},
        "unpaired": {"meta": {"PAIRED": False}},  # one 32-patch tile a step
        "2 stages": {"options": {"num_stages": 2}},  # spills in the generic compile; the JIT's may not
        "4 warps": {"options": {"num_warps": 4}},  # one warp group: no cross-warp reductions (3.6's JIT: 0 spills)
        "4 images": {"images": 4},
        "32 x 64 tiles": {"meta": {"BLOCK_M": 32, "BLOCK_K": 64, "PAIRED": False}},
        "32 x 32 tiles, 4 warps": {"meta": {"BLOCK_M": 32, "BLOCK_K": 32}, "options": {"num_warps": 4}},
    },
    "_rescore_kernel": {  # new in v16: the forward's exact rescoring, a launch of its own (32 rows, 1 warp)
        "default": {},
        "masked rows": {"meta": {"MASK_ROWS": True}},  # idle rows load nothing: 2.5x fewer bytes at "medium"
        "1 image": {"images": 1},  # 4x the programs (5040 at the CUB shape against 1260: 12 fit an SM)
        "8 images": {"images": 8},  # p rows re-used over more images, fewer programs
        "16 rows": {"meta": {"BLOCK_M": 16}},  # fewer idle rows a round, more instructions a row (NOTES v16)
        "64 rows, 2 warps": {"meta": {"BLOCK_M": 64}, "options": {"num_warps": 2}},
        "32 rows, 4 warps": {"meta": {"BLOCK_M": 32}, "options": {"num_warps": 4}},
        "2 stages": {"options": {"num_stages": 2}},  # the channel loop's loads pipelined
    },
    "_grad_features_segments_kernel": {  # new in v14 (the dot-based grad_z measured 141 us in the backward)
        "default": {},
        "128 rows": {"meta": {"ROWS": 128}},  # half the steps a program (177 registers: 1 program per SM)
        "32 rows": {"meta": {"ROWS": 32}},
        "4 warps": {"options": {"num_warps": 4}},
        "16 channels": {"meta": {"BLOCK_D": 16}},  # twice the programs
    },
    "_grad_prototypes_kernel": {  # new in v14: all images in one program (measured 30 us at v12, with runs)
        "default": {},
        "4 images": {"meta": {"IMAGES": 4}},
        "16 images": {"meta": {"IMAGES": 16}},
        "32 prototypes": {"meta": {"BLOCK_M": 32}},
    },
}
QUICK_CANDIDATES = {"forward": ["default", "unpaired"], "_rescore_kernel": ["default", "masked rows"],
                    "_grad_features_segments_kernel": ["default", "128 rows"], "_grad_prototypes_kernel": ["default"]}


# The forward's kernels: the launcher functions a candidate replaces (configuration, images per program).
FORWARD_LAUNCHERS = {"forward": ("forward_config", "forward_images_per_program"),
                     "_rescore_kernel": ("rescore_config", "rescore_images_per_program")}


def _apply(meta: dict, options: dict, change: dict) -> tuple[dict, dict]:
    meta, options = dict(meta), dict(options)
    meta.update(change.get("meta", {}))
    options.update(change.get("options", {}))
    return meta, options


@contextlib.contextmanager
def configured(kernel: str, change: dict):
    """The launcher with ``change`` applied to ``kernel``'s configuration (module functions patched)."""
    saved = {name: getattr(pd, name) for name in ("forward_config", "rescore_config", "forward_images_per_program",
                                                  "rescore_images_per_program", "backward_configs")}
    if kernel in FORWARD_LAUNCHERS:
        config_name, images_name = FORWARD_LAUNCHERS[kernel]

        def config(D, HW, M, precision):
            return _apply(*saved[config_name](D, HW, M, precision), change)

        setattr(pd, config_name, config)
        if "images" in change:
            setattr(pd, images_name, lambda B, M, block_m: change["images"])
    else:
        def backward_configs(D, HW):
            configs = dict(saved["backward_configs"](D, HW))
            configs[kernel] = _apply(*configs[kernel], change)
            return configs

        pd.backward_configs = backward_configs
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(pd, name, fn)


def compiled_stats(jit_fn) -> dict:
    """{key: (registers, spill bytes, warps)} of every compiled kernel of a Triton JIT function (best effort:
    the cache's layout differs between Triton versions)."""
    out = {}
    try:
        for cache in jit_fn.device_caches.values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for key, k in kernels.items():
                out[str(key)] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None),
                                 getattr(getattr(k, "metadata", None), "num_warps", None))
    except Exception:  # noqa: BLE001 - statistics are a courtesy
        pass
    return out


def timer(device: torch.device):
    """Microseconds of fn: CUDA-graph replays on a GPU, launched calls on the CPU (benchmarks/distance.py's)."""
    measure = launched_timer(device)
    return (lambda fn: measure(graphed(fn))) if device.type == "cuda" else measure


def sweep_shape(shape, precision: str, device: torch.device, names: dict | None, measure) -> list[dict]:
    B, D, H, W, M = shape
    z3 = torch.rand(B, D, H * W, device=device)
    p = torch.rand(M, D, device=device)
    gs, gd = torch.randn(B, M, device=device), torch.randn(B, M, device=device)
    jits = {"forward": pd._forward_kernel, "_rescore_kernel": pd._rescore_kernel,
            "_grad_features_segments_kernel": pd._grad_features_segments_kernel,
            "_grad_prototypes_kernel": pd._grad_prototypes_kernel}
    ref_fwd = pd.forward(z3, p, EPS, precision)
    _, dist, idx = ref_fwd
    ref_bwd = pd.backward(gs, gd, z3, p, idx, dist, EPS)
    rows = []
    for kernel, candidates in CANDIDATES.items():
        for name, change in candidates.items():
            if names is not None and name not in names.get(kernel, ()):
                continue
            row = {"shape": list(shape), "precision": precision, "kernel": kernel, "candidate": name}
            before = compiled_stats(jits[kernel])
            try:
                with configured(kernel, change):
                    if kernel in FORWARD_LAUNCHERS:
                        out = pd.forward(z3, p, EPS, precision)
                        row["same_outputs"] = all(torch.equal(a, b) for a, b in zip(out, ref_fwd))
                        row["us"] = measure(lambda: pd.forward(z3, p, EPS, precision))
                    else:
                        out = pd.backward(gs, gd, z3, p, idx, dist, EPS)
                        errs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(out, ref_bwd)]
                        row["rel_err"] = max(errs)
                        row["bitwise"] = all(torch.equal(a, b) for a, b in zip(out, ref_bwd))
                        row["same_outputs"] = row["rel_err"] <= 1e-5
                        row["us"] = measure(lambda: pd.backward(gs, gd, z3, p, idx, dist, EPS))
                new = {k: v for k, v in compiled_stats(jits[kernel]).items() if k not in before}
                row["compiled"] = list(new.values())
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to compile or run is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(f"  {str(shape):24s} {kernel:24s} {name:20s} "
                  + (row.get("error")
                     or f"{row['us']:9.1f} us  same {row['same_outputs']}  compiled {row['compiled']}"),
                  flush=True)
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Triton launch configurations: {env['device']}", "",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, fp32 inputs, search precision "
             f"{rows[0]['precision'] if rows else '-'}; times are medians of CUDA-graph replays of the whole forward "
             "(kernel forward) or the whole backward (the two backward kernels), one kernel's configuration changed "
             "at a time; compiled = (registers, spill bytes, warps) of the kernels compiled for the candidate.", "",
             "| shape (B, D, HxW, M) | kernel | candidate | time (us) | vs default | same outputs | compiled |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {shape_cell(r['shape'])} | {r['kernel']} | {r['candidate']}"
        if "error" in r:
            lines.append(f"{head} | error: {r['error']} | | | |")
            continue
        base = next((x for x in rows if x["shape"] == r["shape"] and x["kernel"] == r["kernel"]
                     and x["candidate"] == "default" and "us" in x), None)
        ratio = f"{base['us'] / r['us']:.2f}x" if base else "-"
        lines.append(f"{head} | {r['us']:.1f} | {ratio} | {r['same_outputs']} | {r['compiled']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="B,D,H,W,M (repeatable)")
    ap.add_argument("--precision", default="medium", choices=("highest", "high", "medium"))
    ap.add_argument("--quick", action="store_true", help="a tiny shape and two candidates per kernel (CPU checks)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape
              else QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    import triton

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    measure = timer(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"triton-sweep-{env['date']}-{device.type}"
    rows = []
    for shape in shapes:
        rows += sweep_shape(shape, args.precision, device, QUICK_CANDIDATES if args.quick else None, measure)
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        stem.with_suffix(".md").write_text(markdown(env, rows))
    print(markdown(env, rows))
    return rows


if __name__ == "__main__":
    main()
