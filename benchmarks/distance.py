"""Benchmark the fused prototype op against the original ProtoPNet layer.

For each shape (B, D, HxW, M) and each method (the original layer eager and torch.compile'd, each available
protokern backend and precision), measures forward and forward+backward time (median; on GPU with
``triton.testing.do_bench``) and the peak extra memory of forward+backward (GPU only). Prints a Markdown table
and writes JSON + Markdown under ``--out``.

Variants (``--variants``): ``log`` (1 x 1 prototypes, the log similarity: the ProtoPNet layer), ``2x2``
(2 x 2 prototypes, log similarity; protokern runs them as a 1 x 1 call on the unfolded map, the original as its
conv2d over windows) and ``cosine`` (1 x 1 prototypes; protokern on unit vectors, the original's formulation
with cosines from the same convolutions), ``nhwc`` (``log`` on channels_last features, as a channels_last trunk
gives them: the backends' other z paths, e.g. cuda's rescoring from z's own rows instead of its dense 7x7
staging). By default ``log`` runs at every shape and ``2x2``, ``cosine`` and ``nhwc`` at the first (the CUB
shape), at each backend's default precision.

On GPU each method is timed twice: as launched from Python (what a training loop sees; on a slow host this is
bound by launch overhead) and as the replay of a captured CUDA graph of the same work (the GPU time alone).
fwd+bwd is op-only: the forward, then the backward from fixed upstream gradients of both outputs
(``torch.autograd.grad`` with ``grad_outputs``; no loss kernels). Reference rows (``log`` variant): ``null op``
(the harness alone: a method doing nothing) and, on GPU, ``matmul fp32`` / ``matmul tf32``, the cuBLAS time of
the search's GEMM (M, D) x (D, B*H*W) in fp32 and in TF32, a floor for a GEMM-shaped forward. A/B rows
(``AB_ROWS``, GPU, the CUB shape): a backend's default with an environment switch that selects the code before a
change (e.g. ``cuda (grad_p one part)``: the backward before grad_p's image parts), timed in the same run.

    python benchmarks/distance.py                 # default shapes, on the GPU
    python benchmarks/distance.py --quick         # small shapes, runs anywhere (CPU: torch backend only)
    python benchmarks/distance.py --shape 80,128,7,7,2000 --shape 16,64,5,5,300
    python benchmarks/distance.py --variants 2x2,cosine  # the prototype-kind rows at every shape
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import protokern

DEFAULT_SHAPES = [(80, 128, 7, 7, 2000), (128, 256, 14, 14, 2000), (64, 128, 7, 7, 10000), (32, 512, 28, 28, 2000)]
QUICK_SHAPES = [(8, 64, 7, 7, 200), (4, 128, 14, 14, 100)]
EPS = 1e-4
# variant -> (prototype window, similarity); the variants in CHANNELS_LAST take channels_last z
VARIANTS = {"log": ((1, 1), "log"), "2x2": ((2, 2), "log"), "cosine": ((1, 1), "cosine"), "nhwc": ((1, 1), "log")}
CHANNELS_LAST = {"nhwc"}
FIRST_SHAPE_VARIANTS = ["log", "2x2", "cosine", "nhwc"]
# A/B rows (GPU, ``log`` variant, at AB_SHAPE): a backend at its default precision with an environment switch
# set while its forward and backward run (graph captures included), to time a change against the code before it
# in the same run. name -> (backend, environment).
AB_SHAPE = (80, 128, 7, 7, 2000)
AB_ROWS = {"cuda (grad_p one part)": ("cuda", {"PROTOKERN_CUDA_GRAD_P_PARTS": "1"})}  # NOTES.md v20 against v19


def original_layer(z, p, similarity="log"):
    """The original formulation in the input precision: conv2d expansion over the prototype's window, ReLU,
    -max_pool2d(-d), then log ('log'), -d ('linear'); for 'cosine' the same convolutions give
    d = 2 - 2 z.p / (|z| |p|) (the norms floored at 1e-8 as ``protokern.ops.COSINE_EPS``)."""
    p = p.view(p.shape[0], -1, 1, 1) if p.dim() == 2 else p
    zz, zp = F.conv2d(z * z, torch.ones_like(p)), F.conv2d(z, p)
    pp = (p * p).sum((1, 2, 3)).view(1, -1, 1, 1)
    if similarity == "cosine":
        d = 2 - 2 * zp / (zz.sqrt().clamp_min(1e-8) * pp.sqrt().clamp_min(1e-8))
    else:
        d = F.relu(zz - 2 * zp + pp)
    min_d = -F.max_pool2d(-d, kernel_size=d.shape[2:]).flatten(1)
    if similarity == "cosine":
        return 1 - min_d / 2, min_d
    return (torch.log((min_d + 1) / (min_d + EPS)) if similarity == "log" else -min_d), min_d


def methods(device: torch.device, quick: bool, variant: str = "log"):
    """(name, fn(z, p) -> (sim, dist), row fields) for every method that runs on ``device``; a backend's row
    fields name its backend and search precision. For the ``2x2`` and ``cosine`` variants each backend at its
    default precision only."""
    similarity = VARIANTS[variant][1]
    out = [("original eager", lambda z, p: original_layer(z, p, similarity), {})]
    if device.type == "cuda" or not quick:
        out.append(("original compiled", torch.compile(lambda z, p: original_layer(z, p, similarity)), {}))
    avail = protokern.available_backends(device)
    for backend, reason in avail.items():
        if reason is not None or (backend == "triton" and device.type == "cpu"):
            continue  # the Triton interpreter is a correctness tool, not a benchmark target
        # A backend's plain row is its default, precision="auto" (protokern.backends.AUTO_PRECISION); on GPU the
        # other search precisions get rows of their own, named after the precision.
        default = protokern.backends.AUTO_PRECISION[backend]
        all_precisions = backend != "torch" and device.type == "cuda" and variant == "log"
        for prec in [default] + [q for q in ("highest", "high", "medium") if q != default and all_precisions]:
            name = backend if prec == default else f"{backend} ({prec})"
            out.append((name, lambda z, p, b=backend, pr=prec: protokern.prototype_similarity(
                z, p, similarity=similarity, backend=b, precision=pr), {"backend": backend, "precision": prec}))
    return out


def timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    def cpu_time(fn, n=5):
        fn()
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1e6
    return cpu_time


def graphed(fn):
    """Capture fn (after a warm-up on a side stream) in a CUDA graph; return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def reference_rows(device: torch.device, z, p):
    """(name, fwd, fwd_bwd) of the reference rows: the harness alone and the cuBLAS GEMM of the search."""
    def nothing():
        pass

    rows = [("null op", nothing, nothing)]
    if device.type == "cuda":
        zt = z.detach().flatten(2).transpose(0, 1).reshape(z.shape[1], -1)  # (D, B*H*W)
        pm = p.detach().flatten(1)  # (M, D)
        for name, level in (("matmul fp32", "highest"), ("matmul tf32", "high")):
            def gemm(level=level):
                previous = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision(level)
                try:
                    torch.mm(pm, zt)
                finally:
                    torch.set_float32_matmul_precision(previous)

            rows.append((name, gemm, gemm))
    return rows


@contextlib.contextmanager
def environment_set(env: dict[str, str]):
    """os.environ with ``env`` set (restored after)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ab_cases(device: torch.device, shape, variant: str, fwd_bwd_of) -> list[tuple]:
    """The AB_ROWS cases that run here: (name, fwd, fwd_bwd, fields), each call under its environment."""
    if device.type != "cuda" or variant != "log" or tuple(shape) != AB_SHAPE:
        return []
    avail = protokern.available_backends(device)
    out = []
    for name, (backend, env) in AB_ROWS.items():
        if avail.get(backend, "unknown") is not None:
            continue
        fwd, fwd_bwd = fwd_bwd_of(lambda z, p, b=backend: protokern.prototype_similarity(z, p, backend=b))

        def under(fn, env=env):
            def run():
                with environment_set(env):
                    fn()
            return run
        out.append((name, under(fwd), under(fwd_bwd), {"backend": backend, "environment": env}))
    return out


def bench_shape(shape, device, quick, measure, variant="log"):
    B, D, H, W, M = shape
    window = VARIANTS[variant][0]
    z = torch.rand(B, D, H, W, device=device)
    if variant in CHANNELS_LAST:
        z = z.contiguous(memory_format=torch.channels_last)
    z.requires_grad_()
    p = torch.rand(M, D, *window, device=device).requires_grad_()
    w_sim, w_dist = torch.randn(B, M, device=device), torch.randn(B, M, device=device)

    def fwd_bwd_of(fn):
        def fwd():
            with torch.no_grad():
                fn(z, p)

        def fwd_bwd():
            sim, dist = fn(z, p)
            torch.autograd.grad((sim, dist), (z, p), grad_outputs=(w_sim, w_dist))
        return fwd, fwd_bwd

    cases = [(name, *fwd_bwd_of(fn), fields) for name, fn, fields in methods(device, quick, variant)]
    cases += ab_cases(device, shape, variant, fwd_bwd_of)
    if variant == "log":
        cases += [(*ref, {}) for ref in reference_rows(device, z, p)]
    rows = []
    for name, fwd, fwd_bwd, fields in cases:
        row = {"method": name, "shape": list(shape), "variant": variant, **fields}
        try:
            row["fwd_us"] = measure(fwd)
            row["fwd_bwd_us"] = measure(fwd_bwd)
            if device.type == "cuda":
                try:
                    row["fwd_graph_us"] = measure(graphed(fwd))
                    row["fwd_bwd_graph_us"] = measure(graphed(fwd_bwd))
                except Exception as exc:  # noqa: BLE001 - a method that cannot be captured still has its times
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fwd_bwd()
                torch.cuda.synchronize()
                row["extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as exc:  # noqa: BLE001 - report the failure in the table, go on with other methods
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print(f"  {variant:6s} {name:24s} " + (row.get("error") or f"fwd {row['fwd_us']:9.1f} us  fwd+bwd {row['fwd_bwd_us']:9.1f} us"),
              flush=True)
    base = next((r for r in rows if r["method"] == "original eager" and "fwd_bwd_us" in r), None)
    for r in rows:
        if base and "fwd_bwd_us" in r:
            r["speedup_fwd_bwd_vs_eager"] = base["fwd_bwd_us"] / r["fwd_bwd_us"]
        if base and "fwd_bwd_graph_us" in r and "fwd_bwd_graph_us" in base:
            r["speedup_fwd_bwd_graph"] = base["fwd_bwd_graph_us"] / r["fwd_bwd_graph_us"]
    return rows


def fastest_precisions(rows: list[dict]) -> list[dict]:
    """Per (shape, variant, backend) timed at more than one search precision: the precision of the fastest
    fwd+bwd (graph replays where every row has them, else as launched) beside the default's. Outputs are the
    same at every precision (certified search), so the fastest one is the candidate for
    ``protokern.backends.AUTO_PRECISION`` once the GPU tests of that backend pass."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "precision" in r and "fwd_bwd_us" in r:
            groups.setdefault((tuple(r["shape"]), r["variant"], r["backend"]), []).append(r)
    out = []
    for (shape, variant, backend), group in groups.items():
        if len(group) < 2:
            continue
        key = "fwd_bwd_graph_us" if all("fwd_bwd_graph_us" in r for r in group) else "fwd_bwd_us"
        best = min(group, key=lambda r: r[key])
        default = protokern.backends.AUTO_PRECISION[backend]
        current = next((r for r in group if r["precision"] == default), None)
        out.append({"shape": list(shape), "variant": variant, "backend": backend, "timing": key,
                    "fastest": best["precision"], "fastest_us": best[key], "default": default,
                    "default_us": current[key] if current else None})
    return out


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


def shape_cell(shape) -> str:
    """A table's shape cell: (B, D, HxW, M)."""
    B, D, H, W, M = shape
    return f"({B}, {D}, {H}x{W}, {M})"


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Fused prototype op benchmark: {env['device']}", "",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, fp32 inputs, "
             "medians; fwd+bwd = the forward, then the backward from fixed upstream gradients of both outputs (op only, "
             "no loss kernels); extra = peak memory of fwd+bwd "
             "above the inputs.", "",
             "Graph columns: replays of a captured CUDA graph of the same work (GPU time without Python launch cost).",
             "",
             "Variant: log = 1x1 prototypes, log similarity (the ProtoPNet layer); 2x2 = 2x2 prototypes, log "
             "(protokern: a 1x1 call on the unfolded map); cosine = 1x1 prototypes, cosine similarity.", "",
             "A backend's plain row is its default search precision (precision=\"auto\": "
             + ", ".join(f"{b} {p}" for b, p in protokern.backends.AUTO_PRECISION.items())
             + "); rows named `backend (precision)` search with that one. Outputs are the same at every precision.",
             "",
             "| shape (B, D, HxW, M) | variant | method | fwd (us) | fwd+bwd (us) | speed-up fwd+bwd vs original eager "
             "| fwd graph (us) | fwd+bwd graph (us) | speed-up fwd+bwd graph | extra memory (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {shape_cell(r['shape'])} | {r.get('variant', 'log')} | {r['method']}"
        if "error" in r:
            lines.append(f"{head} | error: {r['error']} | | | | | | |")
            continue
        extra = f"{r['extra_mib']:.1f}" if "extra_mib" in r else "-"
        def fmt(key, spec=".1f", suffix=""):
            return f"{r[key]:{spec}}{suffix}" if key in r else ("capture failed" if "graph_error" in r and "graph" in key else "-")
        lines.append(f"{head} | {r['fwd_us']:.1f} | {r['fwd_bwd_us']:.1f} "
                     f"| {fmt('speedup_fwd_bwd_vs_eager', '.1f', 'x')} | {fmt('fwd_graph_us')} | {fmt('fwd_bwd_graph_us')} "
                     f"| {fmt('speedup_fwd_bwd_graph', '.1f', 'x')} | {extra} |")
    fastest = fastest_precisions(rows)
    if fastest:
        lines += ["", "Fastest search precision per backend (same outputs at every precision; the candidate for "
                  "`protokern.backends.AUTO_PRECISION` once that backend's GPU tests pass):", "",
                  "| shape (B, D, HxW, M) | variant | backend | timing | fastest | fwd+bwd (us) | default | "
                  "default fwd+bwd (us) |", "|---|---|---|---|---|---|---|---|"]
        for f in fastest:
            default_us = "-" if f["default_us"] is None else f"{f['default_us']:.1f}"
            timing = "graph" if f["timing"] == "fwd_bwd_graph_us" else "launched"
            lines.append(f"| {shape_cell(f['shape'])} | {f['variant']} | {f['backend']} | {timing} | {f['fastest']} "
                         f"| {f['fastest_us']:.1f} | {f['default']} | {default_us} |")
    return "\n".join(lines) + "\n"


def parse_shape(text: str) -> tuple[int, ...]:
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) != 5 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be B,D,H,W,M with positive integers, got {text!r}")
    return parts


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"variants must be a comma list of {', '.join(VARIANTS)}, got {text!r}")
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", type=parse_shape, help="B,D,H,W,M (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small shapes: runs on a CPU in seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", type=parse_variants, default=None,
                    help="comma list of log, 2x2, cosine, nhwc to run at every shape (default: log at every "
                         "shape, plus 2x2, cosine and nhwc at the first)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for JSON + Markdown")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shape or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    env = environment(device)
    print(f"protokern distance benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    rows = []
    measure = timer(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"distance-{env['date']}-{device.type}{'-quick' if args.quick else ''}"
    for i, shape in enumerate(shapes):
        print(f"shape {shape}:", flush=True)
        for variant in args.variants or (FIRST_SHAPE_VARIANTS if i == 0 else ["log"]):
            rows += bench_shape(shape, device, args.quick, measure, variant)
        text = markdown(env, rows)  # written after every shape: an interrupted run keeps what it measured
        (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows, "fastest": fastest_precisions(rows)}, indent=1))
        (args.out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
