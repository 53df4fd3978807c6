"""Where the time of one forward+backward of the fused op goes, per GPU backend, search precision and layout.

Prints, for each case, the wall time per iteration (with a synchronize: shows CPU-bound launches), the GPU
time per iteration, and the torch.profiler table of the kernels by GPU time.

    python benchmarks/profile_op.py [--shape 80,128,7,7,2000]

With ``--ncu`` it runs each backend x precision (contiguous z) once after a warm-up, between
cudaProfilerStart/Stop and inside an NVTX range named after the case, for Nsight Compute's
``--profile-from-start off`` (benchmarks/gpu_check.sh, steps ``ncu`` and ``stalls``): no timing, no torch.profiler;
``--cases cuda:high,triton:medium`` keeps only those backend:precision cases.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import protokern


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="80,128,7,7,2000", help="B,D,H,W,M")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ncu", action="store_true", help="one profiled fwd+bwd per case, for ncu (see above)")
    ap.add_argument("--cases", default=None,
                    help="with --ncu: only these backend:precision cases, comma-separated (e.g. cuda:high,triton:medium)")
    args = ap.parse_args(argv)
    B, D, H, W, M = (int(x) for x in args.shape.split(","))
    p = torch.rand(M, D, device="cuda", requires_grad=True)
    w = torch.randn(B, M, device="cuda")
    cases = []
    for backend, reason in protokern.available_backends("cuda").items():
        if reason is not None or backend == "torch":
            continue
        if args.ncu:
            wanted = None if args.cases is None else {tuple(c.split(":")) for c in args.cases.split(",")}
            cases += [(backend, precision, "contiguous") for precision in ("highest", "high", "medium")
                      if wanted is None or (backend, precision) in wanted]
        else:
            cases += [(backend, "highest", "contiguous"), (backend, "highest", "channels_last"),
                      (backend, "high", "channels_last"), (backend, "medium", "channels_last")]
    for backend, precision, layout in cases:
        z = torch.rand(B, D, H, W, device="cuda")
        if layout == "channels_last":
            z = z.contiguous(memory_format=torch.channels_last)
        z.requires_grad_()

        def step():
            sim, dist = protokern.prototype_similarity(z, p, backend=backend, precision=precision)
            torch.autograd.grad((sim * w).sum() + (dist * w).sum(), (z, p))

        for _ in range(2 if args.ncu else 5):
            step()
        torch.cuda.synchronize()
        if args.ncu:
            name = f"{backend} ({precision})"
            print(f"=== ncu case: {name}, {layout} z, shape {(B, D, H, W, M)}", flush=True)
            torch.cuda.profiler.start()
            with torch.cuda.nvtx.range(name):
                step()
                torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            continue
        t = time.perf_counter()
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.iters * 1e6
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sum(e.device_time_total for e in events if e.device_type.name == "CUDA") / 5
        print(f"\n=== {backend} ({precision}), {layout} z, shape {(B, D, H, W, M)}: wall {wall:.1f} us/iter, "
              f"GPU kernels {gpu:.1f} us/iter")
        print(events.table(sort_by="device_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
