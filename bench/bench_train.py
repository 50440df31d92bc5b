"""Benchmark: one BAO training step as train_bao.py does it, against the same step done the
published way.

Ours is the step train_bao.py runs, the very functions its engine calls:
:func:`engine.step.train_step` (backward, the non-finite guard, the AdamW step) around
:func:`tool.training.bao_batch_losses` (the batch to the device in the training layout of
:func:`core.device.memory_layout`, then the losses), then the teacher EMA update. A speed
change, or a regression, of the engine's step is what this measures.

Both variants run the same model (Conformer ``sm`` by default, 21 classes), the same
input batch, the same losses, AdamW step and teacher EMA update. The published way, a
reimplementation of the published loop, adds what the published script does on top:

- ``torch.autograd.set_detect_anomaly(True)`` for the whole run;
- the teacher forward with gradients enabled (a plain copy of the student whose parameters
  require grad; its outputs are detached afterwards), so autograd records its graph;
- reading each batch's original images from disk only to get their size, which is unused.

Each variant runs in its own process, so that its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the resident size after building the
models and the optimizer and before the first step is reported as the baseline, and the
difference is the memory the steps themselves need. torch allocates CPU tensors with
malloc, so the RSS peak is what the machine had to provide (tracemalloc cannot see it).

    python bench/bench_train.py                          # sm, batch 2, 320x320, CPU
    python bench/bench_train.py --steps 2 --warmup 1     # shorter
    python bench/bench_train.py --device cuda            # GPU: sm, batch 8, 512x512, fp32 vs bf16

Results go to the training section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from apps.cli import run_cli
from bench.report import RESULTS_FILE, cpu_name, write_section
from core.device import memory_layout
from core.errors import UserError
from data.images import read_image
from data.synthetic import generate
from engine.step import train_step
from network.factory import DEFAULT_NETWORK, build_network
from tool.losses import class_balanced_ce, classification_loss, smooth_targets, teacher_pseudo_label
from tool.teacher import make_teacher, update_teacher
from tool.training import bao_batch_losses

NUM_CLASSES = 21
# One section per device, so that a GPU run does not replace the CPU figures.
CPU_VARIANTS = ("ours", "published")
GPU_VARIANTS = ("fp32", "bf16")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time one BAO training step: ours vs the published way "
                                                 "(CPU), or fp32 vs bf16 (GPU).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: ours vs published at --batch_size 2, 320x320; cuda: images/s of our step "
                             "in fp32 and bf16 at batch 8, 512x512 (the sizes below override these)")
    parser.add_argument("--arch", default="sm", help="model size")
    parser.add_argument("--batch_size", type=int, default=None, help="images per step (default: 2 cpu, 8 cuda)")
    parser.add_argument("--crop_size", type=int, default=None, help="input side (default: 320 cpu, 512 cuda)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per variant")
    parser.add_argument("--results", default=str(RESULTS_FILE),
                        help="markdown file whose training section is replaced by this run ('' to skip)")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images_dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _published_losses(student, teacher, images, labels, image_paths, eps: float, l_pcl: float):
    """The same losses computed the published way: the images' files read for their size
    (unused), the teacher run with autograd recording (outputs detached afterwards)."""
    for path in image_paths:
        _ = read_image(path).shape  # the published loop opens every original image of the batch
    cams_t = teacher(images).cams.detach()
    out = student(images, labels)
    loss_cls = classification_loss(out.conv_logits, out.trans_logits, labels)
    pseudo = teacher_pseudo_label(cams_t, labels)
    loss_pcl = class_balanced_ce(out.am, smooth_targets(pseudo, out.am.shape[1], eps), pseudo)
    return loss_cls + l_pcl * loss_pcl


def _variant(args: argparse.Namespace) -> None:
    """Run one variant in this process and write its measurements to ``--out`` (JSON)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    published = args.variant == "published"
    # The published loop ran NCHW; ours runs the layout train_bao.py gives the model.
    layout = torch.preserve_format if published else memory_layout(device, "training")
    student = build_network(DEFAULT_NETWORK, args.arch, NUM_CLASSES).to(device, memory_format=layout).train()
    # A plain deep copy keeps requires_grad (the published teacher); ours turns it off.
    teacher = copy.deepcopy(student) if published else make_teacher(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=5e-4, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # train_bao.py's: enabled for fp16 only
    amp = torch.bfloat16 if args.variant == "bf16" else None
    # A loader batch in host memory (pinned on CUDA, as the training loader's), moved by the step.
    batch = {"img": torch.randn(args.batch_size, 3, args.crop_size, args.crop_size),
             "label": torch.zeros(args.batch_size, NUM_CLASSES - 1)}
    batch["label"][torch.arange(args.batch_size), torch.arange(args.batch_size) % (NUM_CLASSES - 1)] = 1.0
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    images, labels = batch["img"].to(device), batch["label"].to(device)  # the published loop's, moved once
    paths = sorted(Path(args.images_dir).glob("*.jpg"))[:args.batch_size] if args.images_dir else []
    # The published loop's anomaly detection, switched back off when the run ends (the benchmark
    # also runs in-process, where it would slow and change every later backward).
    with torch.autograd.set_detect_anomaly(published):
        _timed_steps(args, device, published, student, teacher, optimizer, scaler, amp, batch, images, labels, paths)


def _timed_steps(args, device, published, student, teacher, optimizer, scaler, amp, batch, images, labels,
                 paths) -> None:
    """Time ``args.warmup + args.steps`` steps of one variant; write the measurements to ``--out`` (JSON)."""
    baseline = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times = []
    for it in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        if published:
            loss = _published_losses(student, teacher, images, labels, paths, 0.4, 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss = float(loss.detach())
        else:
            loss = train_step(lambda: bao_batch_losses(student, teacher, batch, device, 0.4, 1.0, amp), optimizer,
                              scaler)["loss"]
        # an EMA epoch (the first epoch's copy costs about the same)
        update_teacher(teacher, student, epoch=1, it=it, iters_per_epoch=args.warmup + args.steps,
                       base_momentum=0.9995)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it >= args.warmup:
            times.append(time.perf_counter() - tic)
    result = {
        "variant": args.variant,
        "step_s": statistics.median(times),
        "step_times_s": times,
        "images_per_s": args.batch_size / statistics.median(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mib": baseline,
        "loss": loss,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    Path(args.out).write_text(json.dumps(result))


def _run_variant(args: argparse.Namespace, variant: str, work: Path, images_dir: Path | None) -> dict:
    out = work / f"{variant}.json"
    cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--arch", args.arch,
           "--batch_size", str(args.batch_size), "--crop_size", str(args.crop_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--out", str(out)]
    if images_dir is not None:
        cmd += ["--images_dir", str(images_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"running {variant} ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"the {variant} run failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def _cpu_report(args: argparse.Namespace, res: dict[str, dict], load: float, command: str) -> str:
    ours, pub = res["ours"], res["published"]
    rows = []
    for name, r in (("ours (train_bao.py)", ours), ("published way", pub)):
        spread = f"{1000 * min(r['step_times_s']):.0f}-{1000 * max(r['step_times_s']):.0f}"
        rows.append(f"| {name} | {1000 * r['step_s']:.0f} ({spread}) | {r['peak_rss_mib']:.0f} | "
                    f"{r['peak_rss_mib'] - r['baseline_rss_mib']:.0f} |")
    step_ratio = pub["step_s"] / ours["step_s"]
    mem_ratio = (pub["peak_rss_mib"] - pub["baseline_rss_mib"]) / (ours["peak_rss_mib"] - ours["baseline_rss_mib"])
    return "\n".join([
        "## Training step (bench/bench_train.py)",
        "",
        f"Run {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {cpu_name()}, {os.cpu_count()} cores, "
        f"{args.threads} threads (1-min load average {load:.2f} at start; the machine is shared), "
        f"Python {platform.python_version()}, torch {torch.__version__}. " + (
            "GPU figures (sm, batch 8, 512x512, fp32 vs bf16): `--device cuda`." if torch.cuda.is_available() else
            "No GPU was available for this run: the GPU figures (sm, batch 8, 512x512, fp32 vs bf16; "
            "`--device cuda`) are not measured."),
        f"Command: `{command}`",
        "",
        f"One BAO step of Conformer-{args.arch}, batch {args.batch_size}, {args.crop_size}x{args.crop_size}, "
        f"21 classes, CPU float32: teacher forward, student forward, losses, backward, AdamW, teacher EMA. "
        f"Median of {args.steps} timed steps after {args.warmup} warm-up step(s); each variant in its own "
        "process. Published way = autograd anomaly detection on, teacher forward recording a graph "
        "(outputs detached), each batch image re-read from disk for its unused size.",
        "",
        "| variant | ms / step, median (min-max) | peak RSS (MiB) | peak RSS above the pre-step baseline (MiB) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Ratio published / ours: step time {step_ratio:.2f}x, memory used by the steps {mem_ratio:.2f}x.",
    ])


def _gpu_report(args: argparse.Namespace, res: dict[str, dict], command: str) -> str:
    rows = [f"| {v} | {res[v]['images_per_s']:.1f} | {1000 * res[v]['step_s']:.0f} | {res[v]['peak_cuda_mib']:.0f} |"
            for v in GPU_VARIANTS]
    return "\n".join([
        "## Training step on GPU (bench/bench_train.py --device cuda)",
        "",
        f"Run {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {res['fp32']['gpu']}, "
        f"torch {torch.__version__}. Command: `{command}`",
        "",
        f"Our BAO step, Conformer-{args.arch}, batch {args.batch_size}, {args.crop_size}x{args.crop_size}; "
        f"median of {args.steps} timed steps after {args.warmup} warm-up step(s).",
        "",
        "| precision | images / s | ms / step | peak CUDA memory (MiB) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"bf16 / fp32 throughput: {res['bf16']['images_per_s'] / res['fp32']['images_per_s']:.2f}x.",
    ])


def main(args: argparse.Namespace) -> None:
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (8 if cuda else 2)
    args.crop_size = args.crop_size or (512 if cuda else 320)
    if args.variant:
        _variant(args)
        return
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.crop_size % 16:
        raise UserError("need --steps >= 1, --warmup >= 0, --batch_size >= 1 and --crop_size a multiple of 16")
    command = "python bench/bench_train.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        if cuda:
            res = {v: _run_variant(args, v, work, None) for v in GPU_VARIANTS}
            body = _gpu_report(args, res, command.strip())
        else:
            # VOC-size originals (about 375-625 px a side) for the published per-batch image reads.
            generate(work / "VOC", num_train=args.batch_size, num_val=0, size=500, seed=0)
            res = {v: _run_variant(args, v, work, work / "VOC" / "JPEGImages") for v in CPU_VARIANTS}
            body = _cpu_report(args, res, load, command.strip())
    print(body)
    if args.results:
        write_section(args.results, f"bench_train_{args.device}", body)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
