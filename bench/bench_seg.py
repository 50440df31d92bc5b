"""Benchmark: the segmentation stage's DeepLab-V2 (ResNet-101, output stride 8) on the CPU.

Training: one SGD step as train_seg.py does it, the very functions its engine calls
(:func:`engine.step.train_step` around :func:`tool.training.seg_batch_losses`), with frozen
batch norm (the recipe's default), against the same step with trained batch norm (what a
script that forgets to freeze it does: statistics updated, affine parameters trained), at
batch 2, crop 321.

Inference: seconds per image of a 500 x 375 image (the usual VOC size) at the five scales
0.5-1.5 with flips, ours (each scale's plain and flipped copy in one batched forward)
against one forward per view.

Each variant runs in its own process, so that its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the resident size before the first step
is the baseline, the difference is what the steps need.

    python bench/bench_seg.py                 # batch 2, crop 321, 3 timed steps, 2 images
    python bench/bench_seg.py --steps 1 --images 1
    python bench/bench_seg.py --backbone tiny --crop_size 33 --steps 1 --images 1 --results ''  # smoke run

Results go to the segmentation section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from apps.cli import run_cli
from bench.report import RESULTS_FILE, machine_line, write_section
from bench.bench_train import rss_mib
from core.device import memory_layout
from data.transforms import scaled_input
from engine.step import train_step
from network.deeplab import BACKBONES, build_segmentation_model
from tool.segmentation import DEFAULT_SEG_SCALES, multiscale_probs
from tool.training import seg_batch_losses

NUM_CLASSES = 21
CPU = torch.device("cpu")
VARIANTS = {"train-frozen": "training step, frozen batch norm (ours, the recipe)",
            "train-bn": "training step, trained batch norm",
            "infer-batched": "inference, plain + flip batched per scale (ours)",
            "infer-per-view": "inference, one forward per view"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time DeepLab-V2 ResNet-101 training steps and multi-scale "
                                                 "inference on the CPU.")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet101",
                        help="DeepLab-V2 backbone (tiny: a smoke run of this script)")
    parser.add_argument("--batch_size", type=int, default=2, help="training images per step")
    parser.add_argument("--crop_size", type=int, default=321, help="training crop side")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per variant")
    parser.add_argument("--images", type=int, default=2, help="timed images per inference variant")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per variant")
    parser.add_argument("--results", default=str(RESULTS_FILE),
                        help="markdown file whose segmentation section is replaced ('' to skip)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser


def _per_view_probs(model, image: np.ndarray, scales) -> torch.Tensor:
    """The reference inference: every scale and flip its own forward."""
    h, w = image.shape[:2]
    total = 0
    for scale in scales:
        x = scaled_input(image, scale)[None]
        for flipped in (False, True):
            logits = model(x.flip(-1) if flipped else x)
            probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)[0]
            total = total + (probs.flip(-1) if flipped else probs)
    return total / (2 * len(scales))


def _variant(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    training = args.variant.startswith("train")
    model = build_segmentation_model("deeplabv2", args.backbone, NUM_CLASSES,
                                     "train" if args.variant == "train-bn" else "frozen")
    times = []
    if training:
        model.to(memory_format=memory_layout(CPU, "training")).train()
        opt = torch.optim.SGD(model.parameters(), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # train_seg.py's: on for fp16 (CUDA) only
        batch = {"img": torch.randn(args.batch_size, 3, args.crop_size, args.crop_size),
                 "label": torch.randint(0, NUM_CLASSES, (args.batch_size, args.crop_size, args.crop_size))}
        baseline = rss_mib()
        for i in range(args.steps + 1):  # the first step is a warm-up
            tic = time.perf_counter()
            train_step(lambda: seg_batch_losses(model, batch, CPU), opt, scaler)
            if i:
                times.append(time.perf_counter() - tic)
    else:
        model.to(memory_format=memory_layout(CPU, "seg_inference")).eval()
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        baseline = rss_mib()
        with torch.no_grad():
            for i in range(args.images + 1):
                tic = time.perf_counter()
                if args.variant == "infer-batched":
                    multiscale_probs(model, image, DEFAULT_SEG_SCALES, True)
                else:
                    _per_view_probs(model, image, DEFAULT_SEG_SCALES)
                if i:
                    times.append(time.perf_counter() - tic)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps({"seconds": statistics.median(times), "peak_mib": peak,
                                          "baseline_mib": baseline}))


def main(args: argparse.Namespace) -> None:
    if args.variant:
        _variant(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--variant", name, "--out", str(out), "--backbone", args.backbone,
                   "--batch_size",
                   str(args.batch_size), "--crop_size", str(args.crop_size), "--steps", str(args.steps),
                   "--images", str(args.images), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True)
            results[name] = json.loads(out.read_text())
            print(f"{name}: {results[name]['seconds']:.2f} s, peak {results[name]['peak_mib']:.0f} MiB", flush=True)
    rows = ["| variant | seconds | peak RSS MiB (before the first step) |", "|---|---|---|"]
    for name, what in VARIANTS.items():
        r = results[name]
        unit = "per step" if name.startswith("train") else "per image"
        rows.append(f"| {what} | {r['seconds']:.2f} {unit} | {r['peak_mib']:.0f} ({r['baseline_mib']:.0f}) |")
    backbone = "ResNet-101" if args.backbone == "resnet101" else f"{args.backbone} backbone"
    body = (f"## Segmentation stage, DeepLab-V2 {backbone} (bench/bench_seg.py)\n\n{machine_line()}\n"
            f"Training: batch {args.batch_size}, crop {args.crop_size}, SGD, median of {args.steps} steps after "
            f"one warm-up. Inference: a 500 x 375 image, scales {', '.join(map(str, DEFAULT_SEG_SCALES))} with "
            f"flips, median of {args.images} images after one warm-up. {args.threads} threads.\n\n"
            + "\n".join(rows) + "\n")
    print(body)
    if args.results:
        write_section(args.results, "bench_seg", body)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
