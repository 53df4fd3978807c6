"""Benchmark of push (prototype projection): images/s over a synthetic push set fed from the device.

Default: 6000 random 224x224 images (as CUB's train split), a randomly initialised ResNet34 trunk,
200 classes x 10 prototypes of depth 128, no image saving. Target: under 10 s on an H100.

    python benchmarks/push.py                      # GPU, the defaults above
    python benchmarks/push.py --quick              # CPU smoke run (small N and size)
    python benchmarks/push.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from protokern import backends  # noqa: E402
from protokern.models import ProtoPNet  # noqa: E402
from protokern.push import push_prototypes  # noqa: E402


class DeviceBatches:
    """Iterable of ``(images, labels)`` already on the device: a small pool of random batches, cycled.

    Labels cover every class in turn so each prototype has candidates.
    """

    def __init__(self, n: int, batch_size: int, image_size: int, num_classes: int, device: torch.device,
                 pool: int = 4):
        g = torch.Generator(device=device).manual_seed(0)
        self.n, self.batch_size = n, batch_size
        self.images = [torch.rand(batch_size, 3, image_size, image_size, device=device, generator=g)
                       for _ in range(pool)]
        self.labels = torch.arange(n, device=device) % num_classes

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        for i, start in enumerate(range(0, self.n, self.batch_size)):
            size = min(self.batch_size, self.n - start)
            yield self.images[i % len(self.images)][:size], self.labels[start:start + size]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = ProtoPNet(backbone=args.backbone, num_classes=args.classes, prototypes_per_class=args.per_class,
                      prototype_dim=args.dim).to(device)
    if args.channels_last:
        model.features.to(memory_format=torch.channels_last)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    data = DeviceBatches(args.n, args.batch_size, args.image_size, args.classes, device)
    warm = DeviceBatches(min(args.n, 2 * args.batch_size), args.batch_size, args.image_size, args.classes, device)
    push_prototypes(model, warm, device=device, save_images=False, progress=False, autocast_dtype=amp)

    times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        push_prototypes(model, data, device=device, save_images=False, progress=False, autocast_dtype=amp)
        _sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "benchmark": "push",
        "n_images": args.n, "image_size": args.image_size, "batch_size": args.batch_size,
        "backbone": args.backbone, "classes": args.classes, "prototypes": args.classes * args.per_class,
        "prototype_dim": args.dim, "amp": args.amp, "channels_last": args.channels_last,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "op_backend": backends.resolve("auto", device.type),
        "torch": torch.__version__,
        "seconds": times, "best_s": best, "median_s": statistics.median(times),
        "images_per_s": args.n / best,
        "target_s": 10.0 if not args.quick else None,
    }


def _markdown(result: dict) -> str:
    rows = [("images", result["n_images"]), ("image size", result["image_size"]),
            ("batch size", result["batch_size"]), ("backbone", result["backbone"]),
            ("prototypes", f"{result['prototypes']} x {result['prototype_dim']}"), ("amp", result["amp"]),
            ("channels last", result["channels_last"]), ("device", result["device"]),
            ("op backend", result["op_backend"]), ("torch", result["torch"]),
            ("best time (s)", f"{result['best_s']:.3f}"), ("median time (s)", f"{result['median_s']:.3f}"),
            ("images/s", f"{result['images_per_s']:.0f}")]
    lines = ["# Push benchmark", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="images in the push set (default 6000; quick 64)")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; quick 64")
    parser.add_argument("--batch-size", type=int, default=None, help="default 250; quick 16")
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--classes", type=int, default=None, help="default 200; quick 10")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--device", default=None, help="default cuda (cpu with --quick)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small CPU run")
    parser.add_argument("--out", default=None, help="folder for push.json and push.md")
    args = parser.parse_args(argv)
    quick = {"n": 64, "image_size": 64, "batch_size": 16, "classes": 10, "device": "cpu"}
    full = {"n": 6000, "image_size": 224, "batch_size": 250, "classes": 200, "device": "cuda"}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: use --quick or --device cpu")

    result = run(args)
    print(f"push: {result['n_images']} images {result['image_size']}px, {result['prototypes']} prototypes, "
          f"{result['backbone']} on {result['device']}: {result['best_s']:.3f} s "
          f"({result['images_per_s']:.0f} images/s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        suffix = "_quick" if args.quick else ""
        with open(os.path.join(args.out, f"push{suffix}.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        with open(os.path.join(args.out, f"push{suffix}.md"), "w") as fh:
            fh.write(_markdown(result))
    return result


if __name__ == "__main__":
    main()
