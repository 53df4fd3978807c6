"""Benchmark of whole training steps: images/s of forward, ProtoPNet loss, backward and optimiser step.

For each backbone (default VGG19, ResNet34, DenseNet121; random init, 224x224, batch 80, 200 classes x 10
prototypes of depth 128) three settings from one run:

- ``original``: the original recipe: fp32, the original layer formulation (conv2d expansion, ReLU,
  -max_pool2d(-d), log; ``benchmarks/distance.py``), eager;
- ``default``: protokern's defaults: fp32, the fused op (``backend="auto"``, ``precision="auto"``), eager;
- ``fastest``: bf16 autocast of the trunk, channels_last, ``torch.compile`` of the trunk and, on CUDA, the
  whole step captured as a CUDA graph where capture works (else the failure is recorded and the step runs
  without it).

Each is timed twice: ``step``, on a batch already on the device (normalised once), and ``step + input``, with the
input pipeline of the trainer in front of it: batches gathered from the uint8 image cache
(``protokern.data.cache``, ``--cache``: auto picks the GPU when it fits), copied and converted on the device,
augmented there (``GpuAugment``, the paper's rotate / skew / shear / flip) and normalised. The loss terms are
not read back per step (the trainer reads them once per step for its log). Steps are timed between device
synchronisations after warm-up steps (compilation happens there).

    python benchmarks/train_step.py                        # GPU, the defaults above -> benchmarks/results/
    python benchmarks/train_step.py --quick                # CPU smoke run: tiny images, batch 2, no compile
    python benchmarks/train_step.py --backbones resnet34 --steps 50

Status: run on an H200 (``benchmarks/gpu_check.sh`` runs ResNet34; its figures are in
benchmarks/results/gpu-check-2026-11-30-h200-v12.txt) and on the CPU (``--quick``,
tests/test_train_step_benchmark.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distance import original_layer  # noqa: E402

from protokern import backends  # noqa: E402
from protokern.data import GpuAugment, imagenet_normalize  # noqa: E402
from protokern.data.cache import CachedBatches, ImageView, choose_cache  # noqa: E402
from protokern.losses import protopnet_loss_terms  # noqa: E402
from protokern.models import ProtoPNet  # noqa: E402
from protokern.train.loop import TrainForward  # noqa: E402

SETTINGS = ("original", "default", "fastest")
WEIGHTS = {"ce": 1.0, "cluster": 0.8, "separation": -0.08, "l1": 1e-4}  # the original's coefficients


class OriginalLayer(nn.Module):
    """The original ProtoPNet layer formulation over a ProtoLayer's prototypes: ``(similarity, min_distances)``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.prototypes = layer.prototypes

    def forward(self, z):
        return original_layer(z.float(), self.prototypes)


class MemoryImages(torch.utils.data.Dataset):
    """Random uint8 images standing in for a decoded dataset (what the cache holds after its one decode pass)."""

    def __init__(self, n: int, size: int, classes: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        self.targets = (torch.arange(n) % classes).tolist()
        self.image_size = size

    def __len__(self):
        return len(self.targets)

    def decode(self, index):
        return self.images[index]


def input_batches(data: MemoryImages, batch: int, device: torch.device, cache: str):
    """Endless ``(images, labels)`` on ``device`` from the cache (a fresh shuffle each pass); the cache's place."""
    mode = choose_cache(data, cache, device)
    images = data.images.to(device) if mode == "gpu" else data.images
    view = ImageView(data, list(range(len(data))), [], images)

    def batches():
        epoch = 0
        while True:
            order = torch.randperm(len(view), generator=torch.Generator().manual_seed(epoch)).tolist()
            yield from CachedBatches(view, order, batch, device, drop_last=True)
            epoch += 1
    return batches(), mode


def build(backbone: str, setting: str, args, device: torch.device):
    """(model, step forward, optimizer, whether the trunk is compiled) of one setting."""
    torch.manual_seed(0)
    model = ProtoPNet(backbone=backbone, num_classes=args.classes, prototypes_per_class=args.per_class,
                      prototype_dim=args.dim).to(device)
    fast = setting == "fastest"
    if fast:
        model.features.to(memory_format=torch.channels_last)
    compile_trunk = fast and (device.type == "cuda" or args.compile_on_cpu)
    forward = TrainForward(model, torch.bfloat16 if fast else None, compile_trunk=compile_trunk)
    if setting == "original":
        layer = OriginalLayer(model.prototype_layer)

        def original_forward(x):
            f = forward._trunk(x)
            similarity, min_distances = layer(model.add_on(f.float()))
            return model.last_layer(similarity), min_distances
        step_forward = original_forward
    else:
        step_forward = forward
    capturable = fast and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=capturable)
    return model, step_forward, optimizer, compile_trunk


def make_step(model, step_forward, optimizer):
    def step(x, y):
        logits, min_distances = step_forward(x)
        terms = protopnet_loss_terms(logits, min_distances, y, model.prototype_class_identity,
                                     model.last_layer.weight, max_dist=model.prototype_layer.max_distance)
        loss = sum(w * terms[k] for k, w in WEIGHTS.items())
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        return loss
    return step


def capture(step, x, y, device):
    """``(replay(x, y), None)`` with the step captured as a CUDA graph, or ``(None, reason)``."""
    static_x, static_y = x.clone(), y.clone()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step(static_x, static_y)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static_x, static_y)
    except Exception as err:  # noqa: BLE001 - any failure means "no graph here", recorded in the results
        torch.cuda.synchronize(device)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"

    def replay(x, y):
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        graph.replay()
    return replay, None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run_one, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        run_one()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_one()
    _sync(device)
    return time.perf_counter() - start


def bench(backbone: str, setting: str, args, device, data) -> dict:
    model, step_forward, optimizer, compiled = build(backbone, setting, args, device)
    model.train()
    fast = setting == "fastest"
    fmt = torch.channels_last if fast else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    x = imagenet_normalize(torch.rand(args.batch, 3, args.image_size, args.image_size, device=device, generator=g))
    x = x.contiguous(memory_format=fmt)
    y = torch.arange(args.batch, device=device) % args.classes
    step = make_step(model, step_forward, optimizer)
    run, note = step, None
    if fast and device.type == "cuda" and not args.no_graph:
        replay, note = capture(step, x, y, device)
        run = replay or step
    result = {"backbone": backbone, "setting": setting, "compiled": compiled,
              "cuda_graph": note is None and fast and device.type == "cuda" and not args.no_graph,
              "graph_failure": note}
    seconds = time_steps(lambda: run(x, y), args.warmup, args.steps, device)
    result["step_images_per_s"] = args.batch * args.steps / seconds

    augment = GpuAugment().to(device).train()
    batches, result["cache"] = input_batches(data, args.batch, device, args.cache)

    def with_input():
        images, labels = next(batches)
        images = imagenet_normalize(augment(images, generator=g)).contiguous(memory_format=fmt)
        run(images, labels)
    seconds = time_steps(with_input, args.warmup, args.steps, device)
    result["input_images_per_s"] = args.batch * args.steps / seconds
    return result


def environment(device: torch.device) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "op_backend": backends.resolve("auto", device.type),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Training step benchmark", "",
             f"{meta['device']}, torch {meta['torch']}, op backend {meta['op_backend']}, {meta['date']}; batch "
             f"{meta['batch']}, {meta['image_size']}x{meta['image_size']}, {meta['classes']} classes x "
             f"{meta['per_class']} prototypes of depth {meta['dim']}; {meta['steps']} timed steps after "
             f"{meta['warmup']} warm-up steps. images/s (higher is better).", "",
             "| backbone | measured | original | default | fastest | fastest / original | notes |",
             "|---|---|---|---|---|---|---|"]
    for backbone in meta["backbones"]:
        by = {r["setting"]: r for r in rows if r["backbone"] == backbone}
        fast = by.get("fastest", {})
        notes = [f"cache: {fast.get('cache')}"]
        notes.append("fastest: compiled" if fast.get("compiled") else "fastest: not compiled")
        graph = "CUDA graph" if fast.get("cuda_graph") else f"no CUDA graph ({fast.get('graph_failure') or 'off'})"
        notes.append(graph)
        for key, label in (("step_images_per_s", "step"), ("input_images_per_s", "step + input")):
            vals = [by[s][key] if s in by else None for s in SETTINGS]
            ratio = f"{vals[2] / vals[0]:.2f}x" if vals[0] and vals[2] else "-"
            cells = " | ".join("-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in vals)
            lines.append(f"| {backbone} | {label} | {cells} | {ratio} | {'; '.join(notes) if key[0] == 's' else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="vgg19,resnet34,densenet121")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="any of " + ", ".join(SETTINGS))
    parser.add_argument("--batch", type=int, default=None, help="default 80; quick 2")
    parser.add_argument("--image-size", type=int, default=None, help="default 224; quick 32")
    parser.add_argument("--classes", type=int, default=None, help="default 200; quick 4")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; quick 1)")
    parser.add_argument("--images", type=int, default=None, help="images in the cache (default 5994, CUB's train "
                                                                  "split; quick 8)")
    parser.add_argument("--cache", choices=("auto", "memory", "gpu"), default="auto")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --quick)")
    parser.add_argument("--no-graph", action="store_true", help="no CUDA graph capture in the fastest setting")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also compile on the CPU (slow to start)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny sizes")
    parser.add_argument("--out", default=None, help="folder for the JSON and Markdown results "
                                                    "(default benchmarks/results; none for --quick)")
    args = parser.parse_args(argv)
    quick = {"batch": 2, "image_size": 32, "classes": 4, "steps": 2, "warmup": 1, "images": 8, "device": "cpu"}
    full = {"batch": 80, "image_size": 224, "classes": 200, "steps": 30, "warmup": 10, "images": 5994,
            "device": "cuda"}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.per_class, args.dim = min(args.per_class, 2), min(args.dim, 16)
    if args.out is None and not args.quick:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    settings = [s for s in args.settings.split(",") if s]
    if not settings or any(s not in SETTINGS for s in settings):
        parser.error(f"--settings takes names from {SETTINGS}, got {args.settings!r}")
    backbones = [b for b in args.backbones.split(",") if b]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --quick or --device cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = MemoryImages(args.images, args.image_size, args.classes)
    rows = []
    for backbone in backbones:
        for setting in settings:
            row = bench(backbone, setting, args, device, data)
            rows.append(row)
            print(f"{backbone:12s} {setting:8s} step {row['step_images_per_s']:8.1f} img/s   step + input "
                  f"{row['input_images_per_s']:8.1f} img/s" + (f"   (no CUDA graph: {row['graph_failure']})"
                                                                 if row["graph_failure"] else ""), flush=True)
    meta = {**environment(device), "backbones": backbones, "settings": settings, "quick": args.quick,
            **{k: getattr(args, k) for k in ("batch", "image_size", "classes", "per_class", "dim", "steps",
                                             "warmup", "images", "cache")}}
    result = {"benchmark": "train_step", **meta, "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "train_step_quick" if args.quick else f"train_step-{meta['date']}-{_slug(meta['device'])}"
        with open(os.path.join(args.out, name + ".json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
        with open(os.path.join(args.out, name + ".md"), "w", encoding="utf-8") as fh:
            fh.write(markdown(meta, rows))
        print(f"wrote {os.path.join(args.out, name)}.json / .md")
    print(markdown(meta, rows), end="")
    return result


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40] or "device"


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
