"""GPU check: what this version's loops, the published ones and each opt-in speed flag cost and
change on this machine, side by side in one command.

Run from the repository root on a CUDA machine (several minutes with the defaults)::

    python -m bench.gpu_check                          # Conformer-S, seeded random weights
    python -m bench.gpu_check --weights bao_modelt.pth # label changes on trained weights
    python -m bench.gpu_check --device cpu --arch tiny --batch_size 2 --crop_size 64 \\
        --train_steps 1 --warmup 1 --infer_images 2 --infer_size 64 --scales 32,64 \\
        --no_write --skip_ddp --seg_backbone tiny --seg_batch_size 2 --seg_crop_size 64 \\
        --seg_images 1 --variants published fp32 tf32 --e2e_images 6 --e2e_size 80 60  # CPU smoke run

Variants (``--variants``): ``published`` (the published loops: NCHW, no cuDNN autotuner, the
losses read on the host every step, inference with batch 1 and one forward per view, as the
published infer_bao.py), ``fp32`` (this version's defaults: the published float32 numerics; the
reference of every comparison), ``tf32`` (``--tf32``), ``bf16`` (``--amp bf16``) and ``compile``
(``--compile default``). For each it measures:

- training: the real BAO step of train_bao.py (teacher forward without gradients, student
  forward, losses, backward, AdamW, teacher EMA) on random normalised images and random
  multi-hot labels: images/s and peak GPU memory (model, teacher and optimizer included),
  whether the losses stayed finite and whether the weights it would save are float32;
- inference: infer_bao.py's multi-scale path (scales with flips, then the pseudo-label
  argmax) on generated images: images/s, peak GPU memory, and the share of pseudo-label
  pixels that differ from fp32's on the same weights and images;
- the segmentation stage (``--skip_seg`` to leave it out): train_seg.py's DeepLab-V2 step
  (ResNet-101, frozen batch norm, SGD, batch 10, crop 321) and infer_seg.py's inference (scales
  0.5-1.5 with flips, probabilities averaged) on 500 x 375 images: images/s and peak memory;
- end to end (``--e2e_images``, :mod:`bench.e2e`): infer_bao.py and infer_seg.py themselves on
  generated 500 x 375 JPEGs, decoding and PNG writing included, each variant as its flags;
- distributed training: with two or more GPUs, a two-process ``torch.distributed.run`` of
  train_bao.py (tiny model, generated data, 2 steps) must finish with identical ranks.

It prints the throughput of each variant over the published loop's and over fp32's. The
Markdown report is printed and written to the ``gpu_check`` section of bench/RESULTS.md
(``--no_write`` to skip). A measurement that fails (for instance out of memory) is reported as
failed, the others still run, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.nn as nn

from apps.cli import non_negative_int, parse_scales, positive_int, run_cli
from apps.report import RESULTS_FILE, machine_line, write_section
from bench.e2e import BAO_VARIANTS, SEG_VARIANTS, VOC_SIZE, run_e2e
from core.errors import UserError
from data.classes import VOC_CLASSES
from data.datasets import InferenceDataset
from data.images import read_image
from data.labels import ImageLabels, read_list
from data.layout import REPO_ROOT, DatasetLayout
from data.synthetic import generate, generate_once
from data.transforms import scaled_input
from network.checkpoint import load_weights
from network.deeplab import BACKBONES, build_segmentation_model
from network.factory import DEFAULT_NETWORK, build_network
from tool.cam import pseudo_labels
from core.device import AMP_DTYPES, compile_model, configure_math, resolve_device
from tool.predict import DEFAULT_FORWARD_PIXELS, DEFAULT_SCALES, MultiScalePredictor, iterate_batches, to_host
from tool.segmentation import (DEFAULT_SEG_SCALES, argmax_labels, batch_probs, multiscale_probs,
                               segmentation_loss)
from tool.teacher import make_teacher, update_teacher
from tool.training import bao_losses

NUM_CLASSES = len(VOC_CLASSES)  # PASCAL VOC, background included: the published checkpoints' heads


@dataclass(frozen=True)
class Variant:
    """One way of running the same work: precision, opt-in flags, or the published loop."""

    dtype: torch.dtype | None = None  # autocast dtype; None = float32
    tf32: bool = False  # --tf32
    compile: str = "off"  # --compile mode
    published: bool = False  # the published loops: NCHW, no cuDNN autotuner, batch 1, a host sync per step


# "fp32" is this version's defaults and the reference every other variant is compared with.
VARIANTS: dict[str, Variant] = {
    "published": Variant(published=True),
    "fp32": Variant(),
    "tf32": Variant(tf32=True),
    "bf16": Variant(dtype=AMP_DTYPES["bf16"]),
    "compile": Variant(compile="default"),
}
# train_bao.py's defaults: label smoothing, pseudo-label loss weight, AdamW, EMA base momentum.
EPS, L_PCL, LR, WT_DEC, ADAM_EPS, MOMENTUM = 0.4, 1.0, 5e-5, 5e-4, 1e-8, 0.9995

T = TypeVar("T")


@dataclass
class TrainResult:
    images_per_s: float
    peak_gib: float | None  # None off CUDA
    finite: bool  # every loss term of every step
    first_loss: float  # total loss of the first step: same seed and batch in both precisions
    float32_state: bool  # every floating tensor of the student's and teacher's state_dicts


@dataclass
class InferResult:
    images_per_s: float
    peak_gib: float | None
    labels: list[torch.Tensor]  # (H, W) uint8 pseudo-labels per image, on the CPU


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure fp32 vs bf16 BAO training and inference (speed, peak memory, pseudo-label "
                    "change) and a two-GPU DistributedDataParallel smoke run. Run as: python -m bench.gpu_check")
    parser.add_argument("--device", default="cuda",
                        help="cuda, cuda:N, or cpu for a smoke run of this script (memory columns then "
                             "read n/a) (default: cuda)")
    parser.add_argument("--arch", default="sm", help="Conformer size: sm (published weights), ti, bs, tiny "
                                                      "(default: sm)")
    parser.add_argument("--batch_size", type=positive_int, default=8,
                        help="training images per step (default: 8, as published)")
    parser.add_argument("--crop_size", type=positive_int, default=512,
                        help="training crop side, a multiple of 16 (default: 512, as published)")
    parser.add_argument("--train_steps", type=positive_int, default=10,
                        help="timed training steps per precision (default: 10)")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed training steps before timing, per precision (default: 3)")
    parser.add_argument("--infer_images", type=positive_int, default=16,
                        help="generated images for inference (default: 16)")
    parser.add_argument("--infer_size", type=positive_int, default=448,
                        help="nominal side of the generated images, each side drawn in [0.75, 1.25] x this "
                             "(default: 448, about VOC's 500 x 375); at least 32")
    parser.add_argument("--infer_batch_size", type=positive_int, default=4,
                        help="images per inference batch, as infer_bao.py --batch_size (default: 4)")
    parser.add_argument("--forward_pixels", type=positive_int, default=DEFAULT_FORWARD_PIXELS,
                        help="most input pixels per forward pass, as infer_bao.py --forward_pixels "
                             f"(default: {DEFAULT_FORWARD_PIXELS})")
    parser.add_argument("--scales", type=parse_scales, default=DEFAULT_SCALES,
                        help="inference scales, each also flipped (default: 256,512,768)")
    parser.add_argument("--weights", default=None,
                        help="BAO checkpoint (e.g. *_modelt.pth) for the inference model, so that the bf16 "
                             "label change is measured on trained weights (default: seeded random "
                             "initialisation, whose near-tied maps overstate the change)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and images (default: 0)")
    parser.add_argument("--out", default=str(RESULTS_FILE),
                        help="results file whose gpu_check section is replaced (default: bench/RESULTS.md)")
    parser.add_argument("--no_write", action="store_true", help="print the report only, do not write --out")
    parser.add_argument("--skip_ddp", action="store_true", help="skip the two-process distributed training run")
    parser.add_argument("--ddp_timeout", type=positive_int, default=180,
                        help="seconds allowed for the distributed run (default: 180)")
    parser.add_argument("--skip_seg", action="store_true", help="skip the segmentation-stage measurements")
    parser.add_argument("--seg_backbone", choices=sorted(BACKBONES), default="resnet101",
                        help="backbone of the DeepLab-V2 measured (default: resnet101)")
    parser.add_argument("--seg_batch_size", type=positive_int, default=10,
                        help="segmentation training images per step (default: 10, train_seg.py's)")
    parser.add_argument("--seg_crop_size", type=positive_int, default=321,
                        help="segmentation training crop side (default: 321, train_seg.py's)")
    parser.add_argument("--seg_images", type=positive_int, default=8,
                        help="500 x 375 images timed in segmentation inference (default: 8)")
    parser.add_argument("--seg_infer_batch", type=positive_int, default=1,
                        help="images per forward in this version's segmentation inference, as infer_seg.py "
                             "--batch_size (default: 1, its default)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="what to time: published (the published loops), fp32 (this version's defaults, "
                             "the reference), tf32, bf16, compile (default: all)")
    parser.add_argument("--e2e_images", type=non_negative_int, default=48,
                        help="generated 500 x 375 JPEGs for the end-to-end runs of infer_bao.py and infer_seg.py "
                             "(0 skips them; default: 48)")
    parser.add_argument("--e2e_size", type=positive_int, nargs=2, default=list(VOC_SIZE), metavar=("W", "H"),
                        help="width and height of the end-to-end JPEGs (default: 500 375, VOC's commonest size)")
    parser.add_argument("--e2e_timeout", type=positive_int, default=600,
                        help="seconds allowed for each end-to-end command (default: 600)")
    return parser


def _say(text: str) -> None:
    print(text, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    """Free what the previous measurement left, so that the next peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _guarded(what: str, fn: Callable[[], T]) -> T | str:
    """``fn()``, or a one-line failure text (traceback on stderr) so that the other checks still run."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as err:  # an out-of-memory or kernel error of one precision must not lose the rest
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        _say(f"  {what} FAILED: {first}")
        return f"failed: {type(err).__name__}: {first[:120]}"


def _train_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images and multi-hot labels with at least one class per image."""
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, generator=gen)
    labels = (torch.rand(args.batch_size, NUM_CLASSES - 1, generator=gen) < 0.1).float()
    labels[torch.arange(args.batch_size), torch.randint(NUM_CLASSES - 1, (args.batch_size,), generator=gen)] = 1.0
    return images, labels


def _set_math(device: torch.device, variant: Variant) -> None:
    """The math backends of ``variant``: the published loops ran with PyTorch's defaults (no
    cuDNN autotuner, full float32 matmuls), this version's with :func:`core.device.configure_math`."""
    if variant.published:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = False
        return
    configure_math(device, variant.tf32)


def _layout(device: torch.device, variant: Variant) -> torch.memory_format:
    """channels_last where this version's scripts use it (CUDA), NCHW for the published loops."""
    return torch.channels_last if device.type == "cuda" and not variant.published else torch.contiguous_format


def _train(args: argparse.Namespace, device: torch.device, variant: Variant,
           batch: tuple[torch.Tensor, torch.Tensor]) -> TrainResult:
    """Time the BAO step of train_bao.py in a fresh model, teacher and optimizer.

    The published step reads its losses on the host every step (a synchronisation before the
    next step can be queued); this version's keeps them on the device between log lines.
    """
    _release(device)
    _set_math(device, variant)
    torch.manual_seed(args.seed)  # same initial weights and drop-path draws in every variant
    memory_format = _layout(device, variant)
    student = build_network(DEFAULT_NETWORK, args.arch, NUM_CLASSES).to(device, memory_format=memory_format).train()
    teacher = make_teacher(student)
    compile_model(student, variant.compile)
    compile_model(teacher, variant.compile)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WT_DEC, eps=ADAM_EPS)
    images, labels = (t.to(device) for t in batch)
    images = images.contiguous(memory_format=memory_format)
    total = args.warmup + args.train_steps
    losses = []
    start = 0.0
    for it in range(total):
        if it == args.warmup:
            _sync(device)
            start = time.perf_counter()
        terms = bao_losses(student, teacher, images, labels, eps=EPS, l_pcl=L_PCL, amp_dtype=variant.dtype)
        if variant.published:
            losses.append(torch.tensor([terms[k].item() for k in ("loss", "loss_cls", "loss_pcl")]))
        else:
            losses.append(torch.stack([terms[k].detach().float() for k in ("loss", "loss_cls", "loss_pcl")]))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        # epoch 1: the EMA update of every epoch after the first (epoch 0 copies the student)
        update_teacher(teacher, student, epoch=1, it=it, iters_per_epoch=total, base_momentum=MOMENTUM)
    _sync(device)
    seconds = time.perf_counter() - start
    values = torch.stack([v.cpu() for v in losses])
    state = [*student.state_dict().values(), *teacher.state_dict().values()]
    return TrainResult(
        images_per_s=args.batch_size * args.train_steps / seconds,
        peak_gib=_peak_gib(device),
        finite=bool(torch.isfinite(values).all()),
        first_loss=float(values[0, 0]),
        float32_state=all(t.dtype == torch.float32 for t in state if t.is_floating_point()),
    )


def _inference_data(args: argparse.Namespace, work: Path, device: torch.device,
                    batch_size: int) -> tuple[list[dict[str, Any]], str]:
    """All inference batches of ``batch_size`` images, read and resized once (so that only the
    model's work is timed), and a description of the image sizes."""
    root = work / "VOC2012"
    generate_once(root, num_train=args.infer_images, num_val=0, size=args.infer_size, seed=args.seed)
    names = read_list(root / "ImageSets" / "Segmentation" / "train.txt")
    # The generated classes' ids 1..6 reused as VOC ids: any present-class set will do for timing.
    labels = ImageLabels(list(VOC_CLASSES[1:]), ImageLabels.load(root / "cls_labels.json").ids)
    layout = DatasetLayout.voc(root)
    dataset = InferenceDataset(layout, names, labels, scales=args.scales, flip=True)
    batches = list(iterate_batches(dataset, batch_size, 0, device))
    shapes = [read_image(layout.image_path(n)).shape[:2] for n in names]
    sizes = (f"{min(h for h, _ in shapes)}-{max(h for h, _ in shapes)} x "
             f"{min(w for _, w in shapes)}-{max(w for _, w in shapes)}")
    return batches, sizes


def _inference_model(args: argparse.Namespace) -> nn.Module:
    """The inference model on the CPU, in eval mode: built first, so that a wrong --weights file
    is refused before the training measurements, but moved to the GPU only after them."""
    torch.manual_seed(args.seed)
    model = build_network(DEFAULT_NETWORK, args.arch, NUM_CLASSES)
    if args.weights:
        report = load_weights(model, args.weights, purpose="bao")
        _say(f"weights {args.weights}: {report.summary()}")
    return model.eval()


def _infer(args: argparse.Namespace, model: nn.Module, device: torch.device, variant: Variant,
           batches: list[dict[str, Any]]) -> InferResult:
    """Time multi-scale prediction and pseudo-labels over all batches, after one untimed batch.

    The published loop (``batches`` of one image) runs one forward per view; this version's
    runs each scale's views together, chunked by --forward_pixels.
    """
    _set_math(device, variant)
    model = model.to(memory_format=_layout(device, variant))
    if variant.compile != "off":
        model = compile_model(copy.deepcopy(model), variant.compile)
    forward_pixels = 1 if variant.published else args.forward_pixels
    predictor = MultiScalePredictor(model, "bao", device, variant.dtype, forward_pixels)
    predictor(batches[0])  # kernel selection, compilation and allocator warm-up stay out of the timing
    _release(device)
    labels = []
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        if variant.published:  # per image: its maps, its labels, its copy to the host
            for keys, maps in predictor(batch):
                labels.append(pseudo_labels(maps, keys, num_classes=NUM_CLASSES).to(torch.uint8).cpu())
        else:  # infer_bao.py's path: labels made on the device, one copy to the host per batch
            for out in to_host(predictor.predict(batch), labels=True, maps=False, num_classes=NUM_CLASSES):
                labels.append(torch.from_numpy(out.label))
    _sync(device)
    seconds = time.perf_counter() - start
    return InferResult(images_per_s=len(labels) / seconds, peak_gib=_peak_gib(device), labels=labels)


def _label_change(reference: InferResult | str, other: InferResult | str) -> str:
    if isinstance(reference, str) or isinstance(other, str):
        return "not measured (an inference run failed)"
    changed = sum(int((a != b).sum()) for a, b in zip(reference.labels, other.labels))
    total = sum(a.numel() for a in reference.labels)
    images = sum(bool((a != b).any()) for a, b in zip(reference.labels, other.labels))
    return (f"{100 * changed / total:.4f}% of pixels ({changed} of {total}), in {images} of "
            f"{len(reference.labels)} images")


def _ddp_smoke(args: argparse.Namespace, device: torch.device, work: Path) -> str:
    """Two-process train_bao.py run on generated data; 'passed ...', 'FAILED ...' or 'skipped ...'."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if args.skip_ddp:
        return "skipped (--skip_ddp)"
    if gpus < 2:
        return f"skipped: {gpus} GPU(s)"
    root = work / "ddp" / "VOC2012"
    # 8 images, global batch 4 (2 per process): the 2 steps make one full epoch.
    generate(root, num_train=8, num_val=0, size=64, seed=args.seed)
    save = work / "ddp" / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_bao.py",
           "--from_scratch", "--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0",
           "--max_steps", "2", "--device", "cuda", "--voc12_root", str(root),
           "--label_file", str(root / "cls_labels.json"),
           "--train_list", str(root / "ImageSets" / "Segmentation" / "train.txt"), "--save_dir", str(save)]
    _say("ddp: " + shlex.join(cmd[1:]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.ddp_timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return f"FAILED: no result within --ddp_timeout {args.ddp_timeout} s"
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"FAILED (exit {proc.returncode}): {tail[:200]}"
    log = save / "bao" / "log.jsonl"
    ranks = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "ranks"]
    if not ranks or ranks[-1]["world_size"] != 2 or not ranks[-1]["identical"]:
        return f"FAILED: the ranks did not report identical models ({ranks[-1] if ranks else 'no ranks record'})"
    return (f"passed: 2 processes ({gpus} GPUs visible), train_bao.py --arch tiny, 2 steps, NCCL, both ranks "
            f"ended with identical student and teacher ({seconds:.0f} s with start-up)")


def _cell(result: TrainResult | InferResult | str, field: str, fmt: str) -> str:
    if isinstance(result, str):
        return "failed"
    value = getattr(result, field)
    return "n/a" if value is None else format(value, fmt)


def _ratios(results: dict[str, dict[str, Any]], part: str) -> str:
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


def _device_lines(device: torch.device) -> list[str]:
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
    "published": "the published loops (NCHW, no cuDNN autotuner, losses read on the host every step, inference "
                 "with batch 1 and one forward per view)",
    "fp32": "this version's defaults (float32, channels_last and the cuDNN autotuner on CUDA, losses kept on "
            "the device, batched views)",
    "tf32": "the defaults + --tf32", "bf16": "the defaults + --amp bf16", "compile": "the defaults + --compile default",
}


def _report(args: argparse.Namespace, device: torch.device, results: dict[str, dict[str, Any]], sizes: str,
            ddp: str) -> str:
    rows = [f"| {v} | {_cell(r['train'], 'images_per_s', '.2f')} | {_cell(r['train'], 'peak_gib', '.2f')} | "
            f"{_cell(r['infer'], 'images_per_s', '.2f')} | {_cell(r['infer'], 'peak_gib', '.2f')} |"
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
                          f"{_label_change(results['fp32']['infer'], r['infer'])}")
    weights = (f"weights `{args.weights}`" if args.weights else
               "seeded random weights: their maps are nearly flat, with near ties that any rounding flips, so "
               "the label changes are upper bounds of what trained weights show; pass --weights for those")
    scales = ",".join(map(str, args.scales))
    command = "python -m bench.gpu_check" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    return "\n".join([
        "## GPU check (bench/gpu_check.py)",
        "",
        machine_line(),
        *_device_lines(device),
        f"Command: `{command}`",
        "",
        "Variants: " + "; ".join(f"{v} = {VARIANT_WORDS[v]}" for v in results) + ".",
        f"Training: the BAO step of train_bao.py (teacher forward without gradients, student forward, losses, "
        f"backward, AdamW, teacher EMA), Conformer-{args.arch}, 21 classes, batch {args.batch_size}, "
        f"{args.crop_size}x{args.crop_size}, random normalised images and labels; {args.train_steps} timed step(s) "
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
        f"Throughput ratios: training: {_ratios(results, 'train')}. Inference: {_ratios(results, 'infer')}.",
        "",
        *checks,
        f"- label changes measured with {weights}.",
        f"- DistributedDataParallel smoke run: {ddp}.",
    ])


def _seg_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """DeepLab-V2 with frozen batch norm whose statistics fit its own random weights.

    Frozen batch norm keeps the statistics it is given; a randomly initialised ResNet-101 with
    the identity statistics (mean 0, variance 1) grows its activations through 100 layers until
    the loss is in the tens of thousands and SGD turns it to NaN, which real ImageNet weights
    never do. So the statistics are first estimated in training mode (a cumulative average over
    a few batches of random images), as ImageNet training would have left them.
    """
    torch.manual_seed(args.seed)
    calibrating = build_segmentation_model("deeplabv2", args.seg_backbone, NUM_CLASSES, "train").to(device).train()
    for module in calibrating.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for _ in range(4):
            calibrating(torch.randn(2, 3, args.seg_crop_size, args.seg_crop_size, generator=gen).to(device))
    model = build_segmentation_model("deeplabv2", args.seg_backbone, NUM_CLASSES, "frozen").to(device)
    model.load_state_dict(calibrating.state_dict())
    del calibrating
    _release(device)
    return model


def _seg_train(args: argparse.Namespace, device: torch.device, variant: Variant) -> TrainResult:
    """Time train_seg.py's step: DeepLab-V2, frozen batch norm, SGD, cross-entropy on upsampled logits."""
    _release(device)
    _set_math(device, variant)
    memory_format = _layout(device, variant)
    model = compile_model(_seg_model(args, device).to(memory_format=memory_format).train(), variant.compile)
    dtype = variant.dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    size = args.seg_crop_size
    images = torch.randn(args.seg_batch_size, 3, size, size, generator=gen).to(device).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (args.seg_batch_size, size, size), generator=gen).to(device)
    losses = []
    start = 0.0
    for it in range(args.warmup + args.train_steps):
        if it == args.warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(images)
        loss = segmentation_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(torch.tensor(loss.item()) if variant.published else loss.detach().float())
    _sync(device)
    seconds = time.perf_counter() - start
    values = torch.stack([v.cpu() for v in losses])
    return TrainResult(images_per_s=args.seg_batch_size * args.train_steps / seconds, peak_gib=_peak_gib(device),
                       finite=bool(torch.isfinite(values).all()), first_loss=float(values[0]),
                       float32_state=all(t.dtype == torch.float32 for t in model.state_dict().values()
                                         if t.is_floating_point()))


def _seg_infer(args: argparse.Namespace, device: torch.device, variant: Variant) -> InferResult:
    """Time infer_seg.py's multi-scale, flipped probabilities and labels on 500 x 375 images.

    The published loop: one image at a time, NCHW, its probabilities brought to the host for the
    argmax; this version's: infer_seg.py's path, --seg_infer_batch images per forward (the
    script's --batch_size), the scaled inputs prepared beforehand (as its loader workers do),
    the argmax on the device and uint8 labels to the host.
    """
    _release(device)
    _set_math(device, variant)
    model = compile_model(_seg_model(args, device).to(memory_format=_layout(device, variant)).eval(), variant.compile)
    rng = np.random.default_rng(args.seed)
    batch = 1 if variant.published else args.seg_infer_batch
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.seg_images + batch)]
    size = images[0].shape[:2]
    groups = [images[i:i + batch] for i in range(0, len(images), batch)]
    inputs = [[torch.stack([scaled_input(image, scale) for image in group]) for scale in DEFAULT_SEG_SCALES]
              for group in groups]
    labels = []
    for i, (group, scaled) in enumerate(zip(groups, inputs)):
        if i == 1:  # the first group (kernel selection, compilation) stays out of the timing
            _sync(device)
            start = time.perf_counter()
        if variant.published:
            probs = multiscale_probs(model, group[0], DEFAULT_SEG_SCALES, True, device, variant.dtype)
            found = [probs.cpu().argmax(0)]
        else:
            probs = batch_probs(model, scaled, size, True, device, variant.dtype)
            found = list(argmax_labels(probs).cpu())
        if i:
            labels += found
    _sync(device)
    return InferResult(images_per_s=len(labels) / (time.perf_counter() - start), peak_gib=_peak_gib(device),
                       labels=[label.to(torch.uint8) for label in labels])


def _seg_report(args: argparse.Namespace, seg: dict[str, dict[str, Any]]) -> list[str]:
    if not seg:
        return ["", "Segmentation stage: skipped (--skip_seg)."]
    rows = [f"| {v} | {_cell(r['train'], 'images_per_s', '.2f')} | {_cell(r['train'], 'peak_gib', '.2f')} | "
            f"{_cell(r['infer'], 'images_per_s', '.2f')} | {_cell(r['infer'], 'peak_gib', '.2f')} |"
            for v, r in seg.items()]
    checks = [f"- segmentation training {v}: " + (r["train"] if isinstance(r["train"], str) else
              f"losses finite: {'yes' if r['train'].finite else 'NO'}; weights all float32: "
              f"{'yes' if r['train'].float32_state else 'NO'}") for v, r in seg.items()]
    checks += [f"- segmentation labels of {v} that differ from fp32's: "
               f"{_label_change(seg['fp32']['infer'], r['infer'])}"
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
        f"Throughput ratios: segmentation training: {_ratios(seg, 'train')}. Inference: {_ratios(seg, 'infer')}.",
        *checks,
    ]


E2E_NAMES = {"published": "published loop", "fp32": "defaults", "tf32": "--tf32", "bf16": "--amp bf16",
             "compile": "--compile default"}
E2E_ALWAYS = {"--batch_size 4"}  # infer_seg.py's opt-in batching, timed with the defaults


def e2e_variants(variants: dict[str, Variant]):
    """The end-to-end variants of both scripts that match the selected ``variants``."""
    wanted = {E2E_NAMES[name] for name in variants} | E2E_ALWAYS
    return (tuple(v for v in BAO_VARIANTS if v.name in wanted), tuple(v for v in SEG_VARIANTS if v.name in wanted))


def _failed(results: dict[str, dict[str, Any]], ddp: str) -> bool:
    bad_train = any(isinstance(r["train"], str) or not (r["train"].finite and r["train"].float32_state)
                    for r in results.values())
    return bad_train or any(isinstance(r["infer"], str) for r in results.values()) or ddp.startswith("FAILED")


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.crop_size % 16:
        raise UserError(f"--crop_size must be a multiple of 16 (the network's stride), got {args.crop_size}")
    if args.infer_size < 32:
        raise UserError(f"--infer_size must be at least 32, got {args.infer_size}")
    variants = {name: VARIANTS[name] for name in VARIANTS if name in args.variants}
    if "fp32" not in variants:
        raise UserError("--variants must include fp32: the other variants are compared with it")
    _say(f"gpu_check on {device}: Conformer-{args.arch}, variants {', '.join(variants)}")
    model = _inference_model(args)
    results: dict[str, dict[str, Any]] = {v: {} for v in variants}
    batch = _train_batch(args)
    for name, variant in variants.items():
        _say(f"training {name}: {args.warmup} + {args.train_steps} steps of batch {args.batch_size} at "
             f"{args.crop_size}x{args.crop_size} ...")
        res = _guarded(f"training {name}", lambda: _train(args, device, variant, batch))
        results[name]["train"] = res
        if not isinstance(res, str):
            _say(f"  {res.images_per_s:.2f} img/s, peak memory {_cell(res, 'peak_gib', '.2f')} GiB")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        _say(f"generating {args.infer_images} images for inference ...")
        batches, sizes = _inference_data(args, work, device, args.infer_batch_size)
        singles = _inference_data(args, work, device, 1)[0] if "published" in variants else []
        scales = ",".join(map(str, args.scales))
        model = model.to(device=device)
        for name, variant in variants.items():
            _say(f"inference {name}: {args.infer_images} images, scales {scales} with flips ...")
            res = _guarded(f"inference {name}",
                           lambda: _infer(args, model, device, variant, singles if variant.published else batches))
            results[name]["infer"] = res
            if not isinstance(res, str):
                _say(f"  {res.images_per_s:.2f} img/s, peak memory {_cell(res, 'peak_gib', '.2f')} GiB")
        del model, batches, singles
        _release(device)
        ddp = _ddp_smoke(args, device, work)
        _say(f"ddp: {ddp}")
        seg: dict[str, dict[str, Any]] = {}
        if not args.skip_seg:
            for name, variant in variants.items():
                _say(f"segmentation {name}: training and inference ({args.seg_backbone}) ...")
                seg[name] = {"train": _guarded(f"segmentation training {name}",
                                               lambda: _seg_train(args, device, variant)),
                             "infer": _guarded(f"segmentation inference {name}",
                                               lambda: _seg_infer(args, device, variant))}
        e2e_lines, e2e_ok = ["", "End to end: skipped (--e2e_images 0)."], True
        if args.e2e_images:
            lines, e2e_ok = run_e2e(work / "e2e", str(device), args.arch, args.seg_backbone, args.e2e_images, args.seed,
                                    args.e2e_timeout, _say, *e2e_variants(variants), size=tuple(args.e2e_size),
                                    scales=",".join(map(str, args.scales)))
            e2e_lines = ["", *lines]
    body = "\n".join([_report(args, device, results, sizes, ddp), *_seg_report(args, seg), *e2e_lines])
    _say("")
    _say(body)
    if not args.no_write:
        write_section(args.out, "gpu_check", body)
        _say(f"\nwritten to the gpu_check section of {args.out}")
    if _failed(results, ddp) or (seg and _failed(seg, "")) or not e2e_ok:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
