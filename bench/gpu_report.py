"""bench/gpu_check.py's report: the Markdown tables and checks of its measurements."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import torch

from bench.gpu_common import NOT_REACHED
from bench.gpu_infer import InferResult, label_change
from bench.gpu_train import TrainResult
from bench.report import machine_line
from tool.segmentation import DEFAULT_SEG_SCALES


def cell(result: TrainResult | InferResult | str, field: str, fmt: str) -> str:
    """A table cell: ``field`` of a result formatted, "failed", "not reached" or "n/a"."""
    if isinstance(result, str):
        return NOT_REACHED if result == NOT_REACHED else "failed"
    value = getattr(result, field)
    return "n/a" if value is None else format(value, fmt)


def ratios(results: dict[str, dict[str, Any]], part: str) -> str:
    """Each variant's throughput over the published loop's and over this version's defaults'."""
    def rate(name: str) -> float | None:
        result = results.get(name, {}).get(part)
        return None if result is None or isinstance(result, str) else result.images_per_s

    parts = []
    for name in results:
        if name in ("published", "fp32") or rate(name) is None:
            continue
        parts.append(f"{name} {rate(name) / rate('fp32'):.2f}x" if rate("fp32") else f"{name} n/a")
    base = rate("published")
    head = f"fp32 (this version) / published {rate('fp32') / base:.2f}x" if base and rate("fp32") else \
        "fp32 / published n/a"
    return "; ".join([head, *(f"{p} of fp32" for p in parts)])


def device_lines(device: torch.device) -> list[str]:
    """The report's lines on the device and its math."""
    versions = f"torch {torch.__version__}"
    if device.type != "cuda":
        return [f"Device: CPU ({versions}); a smoke run of the script, its figures say nothing about GPUs."]
    props = torch.cuda.get_device_properties(device)
    return [
        f"Device: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
        f"{torch.cuda.device_count()} GPU(s) visible; {versions}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}.",
        "fp32 means the published float32 math: TF32 convolutions (PyTorch's default), full float32 matmuls; "
        "tf32 adds TF32 matmuls (--tf32).",
    ]


VARIANT_WORDS = {
    "published": "the published loops (NCHW, no cuDNN autotuner, losses read on the host before each backward, "
                 "inference with batch 1 and one forward per view)",
    "fp32": "this version's defaults (float32, channels_last and the cuDNN autotuner on CUDA, the training "
            "scripts' own step engine.step.train_step, its losses read while backward runs, batched views)",
    "tf32": "the defaults + --tf32", "bf16": "the defaults + --amp bf16", "compile": "the defaults + --compile default",
}


def report(args: argparse.Namespace, device: torch.device, results: dict[str, dict[str, Any]], sizes: str,
           ddp: str) -> str:
    """The Conformer section: training and inference per variant, their checks and the DDP run."""
    rows = [f"| {v} | {cell(r['train'], 'images_per_s', '.2f')} | {cell(r['train'], 'peak_gib', '.2f')} | "
            f"{cell(r['infer'], 'images_per_s', '.2f')} | {cell(r['infer'], 'peak_gib', '.2f')} |"
            for v, r in results.items()]
    checks = []
    for v, r in results.items():
        t = r["train"]
        if isinstance(t, str):
            checks.append(f"- training {v}: {t}")
        else:
            checks.append(f"- training {v}: losses finite: {'yes' if t.finite else 'NO'}; first-step loss "
                          f"{t.first_loss:.5f}; saved state_dicts (student, teacher) all float32: "
                          f"{'yes' if t.float32_state else 'NO'}")
    for v, r in results.items():
        if isinstance(r["infer"], str):
            checks.append(f"- inference {v}: {r['infer']}")
        elif v != "fp32" and "fp32" in results:
            checks.append(f"- pseudo-labels of {v} that differ from fp32's (same weights and images): "
                          f"{label_change(results['fp32']['infer'], r['infer'])}")
    weights = (f"weights `{args.weights}`" if args.weights else
               "seeded random weights: their maps are nearly flat, with near ties that any rounding flips, so "
               "the label changes are upper bounds of what trained weights show; pass --weights for those")
    scales = ",".join(map(str, args.scales))
    command = "python -m bench.gpu_check" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    return "\n".join([
        "## GPU check (bench/gpu_check.py)",
        "",
        machine_line(),
        *device_lines(device),
        f"Command: `{command}`",
        "",
        "Variants: " + "; ".join(f"{v} = {VARIANT_WORDS[v]}" for v in results) + ".",
        f"Training: the BAO step of train_bao.py, its engine's own functions (teacher forward without gradients, "
        f"student forward, losses, backward, AdamW, teacher EMA), Conformer-{args.arch}, 21 classes, batch "
        f"{args.batch_size}, {args.crop_size}x{args.crop_size}, random normalised images and labels; {args.train_steps} timed step(s) "
        f"after {args.warmup} warm-up step(s), a fresh model and optimizer per variant; peak memory includes "
        "the model, teacher and optimizer state.",
        f"Inference: infer_bao.py's path on {args.infer_images} generated images of {sizes} pixels, scales "
        f"{scales} with flips, batch {args.infer_batch_size}, --forward_pixels {args.forward_pixels}; timed from "
        "the resized inputs in host memory to the pseudo-labels back on the host, after one untimed batch; "
        "peak memory includes the model.",
        "",
        "| variant | train img/s | train peak GiB | infer img/s | infer peak GiB |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Throughput ratios: training: {ratios(results, 'train')}. Inference: {ratios(results, 'infer')}.",
        "",
        *checks,
        f"- label changes measured with {weights}.",
        f"- DistributedDataParallel smoke run: {ddp}.",
    ])


def seg_report(args: argparse.Namespace, seg: dict[str, dict[str, Any]]) -> list[str]:
    """The lines of the segmentation section (empty results: it was skipped)."""
    if not seg:
        return ["", "Segmentation stage: skipped (--skip_seg)."]
    rows = [f"| {v} | {cell(r['train'], 'images_per_s', '.2f')} | {cell(r['train'], 'peak_gib', '.2f')} | "
            f"{cell(r['infer'], 'images_per_s', '.2f')} | {cell(r['infer'], 'peak_gib', '.2f')} |"
            for v, r in seg.items()]
    checks = [f"- segmentation training {v}: " + (r["train"] if isinstance(r["train"], str) else
              f"losses finite: {'yes' if r['train'].finite else 'NO'}; weights all float32: "
              f"{'yes' if r['train'].float32_state else 'NO'}") for v, r in seg.items()]
    checks += [f"- segmentation labels of {v} that differ from fp32's: "
               f"{label_change(seg['fp32']['infer'], r['infer'])}"
               for v, r in seg.items() if v != "fp32" and "fp32" in seg]
    return [
        "",
        f"Segmentation stage: train_seg.py's step (DeepLab-V2, {args.seg_backbone}, frozen batch norm, SGD), batch "
        f"{args.seg_batch_size}, crop {args.seg_crop_size}, {args.train_steps} timed step(s) after {args.warmup}; "
        f"infer_seg.py's inference on {args.seg_images} random 500 x 375 images, scales "
        f"{', '.join(map(str, DEFAULT_SEG_SCALES))} with flips, after one untimed image; seeded random weights.",
        "",
        "| variant | seg train img/s | seg train peak GiB | seg infer img/s | seg infer peak GiB |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Throughput ratios: segmentation training: {ratios(seg, 'train')}. Inference: {ratios(seg, 'infer')}.",
        *checks,
    ]
