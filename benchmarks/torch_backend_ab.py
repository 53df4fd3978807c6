"""A/B of the torch backend against an earlier commit's, in one process (CPU by default).

The two versions of ``protokern/torch_backend.py`` (this checkout's and ``--base``'s, read with ``git show``)
run interleaved, forward then backward from fixed upstream gradients, and each keeps its fastest time of
``--rounds``: on a noisy shared machine interleaving exposes both to the same conditions. Also checks that the
forward outputs are bit-identical and reports the backward's largest relative difference.

    python benchmarks/torch_backend_ab.py --base 21bb67d
    python benchmarks/torch_backend_ab.py --base HEAD~1 --shape 80,128,7,2000 --rounds 21
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protokern import torch_backend as new  # noqa: E402

SHAPES = [(80, 128, 7, 2000), (16, 128, 7, 2000), (8, 128, 28, 200), (32, 64, 14, 200)]


def load_base(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:protokern/torch_backend.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "torch_backend_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("torch_backend_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision of the other torch_backend.py")
    parser.add_argument("--shape", action="append", help="B,D,HW_side,M (H = W); default: four shapes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    base = load_base(args.base)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"base {args.base}, fastest of {args.rounds} interleaved rounds (ms)")
    print("| shape (B, D, H=W, M) | base fwd | base bwd | new fwd | new bwd | fwd+bwd speed-up | forward bit-identical "
          "| backward max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for B, D, H, M in shapes:
        z3 = torch.rand(B, D, H * H, device=args.device)
        p = torch.rand(M, D, device=args.device)
        grads = torch.rand(B, M, device=args.device), torch.rand(B, M, device=args.device)
        best, outs = {}, {}
        for _ in range(args.rounds):
            for name, module in (("base", base), ("new", new)):
                t0 = time.perf_counter()
                sim, dist, idx = module.forward(z3, p, 1e-4, "highest")
                t1 = time.perf_counter()
                gz, gp = module.backward(*grads, z3, p, idx, dist, 1e-4)
                t2 = time.perf_counter()
                f, b = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(f, t1 - t0), min(b, t2 - t1))
                outs[name] = (sim, dist, idx, gz, gp)
        same = all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(outs["base"][:3], outs["new"][:3]))
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                   for a, b in zip(outs["new"][3:], outs["base"][3:]))
        (bf, bb), (nf, nb) = best["base"], best["new"]
        print(f"| ({B}, {D}, {H}x{H}, {M}) | {bf * 1e3:.1f} | {bb * 1e3:.1f} | {nf * 1e3:.1f} | {nb * 1e3:.1f} "
              f"| {(bf + bb) / (nf + nb):.2f}x | {same} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
