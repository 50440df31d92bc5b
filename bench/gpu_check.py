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
losses read on the host before each backward, inference with batch 1 and one forward per view, as the
published infer_bao.py), ``fp32`` (this version's defaults: the published float32 numerics; the
reference of every comparison), ``tf32`` (``--tf32``), ``bf16`` (``--amp bf16``) and ``compile``
(``--compile default``). For each it measures:

- training (:mod:`bench.gpu_train`): the BAO step of train_bao.py, the very functions its
  engine runs (:func:`engine.step.train_step` around :func:`tool.training.bao_batch_losses`;
  teacher forward without gradients, student forward, losses, backward, AdamW, teacher EMA),
  on random normalised images and random multi-hot labels: images/s and peak GPU memory
  (model, teacher and optimizer included), whether the losses stayed finite and whether the
  weights it would save are float32;
- inference (:mod:`bench.gpu_infer`): infer_bao.py's multi-scale path (scales with flips,
  then the pseudo-label argmax) on generated images: images/s, peak GPU memory, and the share of pseudo-label
  pixels that differ from fp32's on the same weights and images;
- the segmentation stage (``--skip_seg`` to leave it out): train_seg.py's DeepLab-V2 step,
  its engine's functions with :func:`tool.training.seg_batch_losses` (ResNet-101, frozen
  batch norm, SGD, batch 10, crop 321) and infer_seg.py's inference (scales
  0.5-1.5 with flips, probabilities averaged) on 500 x 375 images: images/s and peak memory;
- end to end (``--e2e_images``, :mod:`bench.e2e`): infer_bao.py and infer_seg.py themselves on
  generated 500 x 375 JPEGs, decoding and PNG writing included, each variant as its flags;
- distributed training: with two or more GPUs, a two-process ``torch.distributed.run`` of
  train_bao.py (tiny model, generated data, 2 steps) must finish with identical ranks.

It prints the throughput of each variant over the published loop's and over fp32's. The
Markdown report (:mod:`bench.gpu_report`) is printed and written to the ``gpu_check``
section of bench/RESULTS.md (``--section`` for another name, ``--no_write`` to skip). The section
is also written after each measurement, its missing parts marked "not reached", so that a run
cut off (a time limit, a lost machine) leaves what it measured. ``--e2e_only`` runs the end-to-end
part alone (bench/gpu_suite.py runs it as a later part of its own). A measurement that fails (for
instance out of memory) is reported as failed, the others still run, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from apps.cli import non_negative_int, parse_scales, positive_int, run_cli
from bench.e2e import BAO_VARIANTS, SEG_VARIANTS, VOC_SIZE, run_e2e
from bench.gpu_common import NOT_REACHED, VARIANTS, Variant, release, say
from bench.gpu_infer import infer_bao, infer_seg, inference_data, inference_model
from bench.gpu_report import cell, device_lines, report, seg_report
from bench.gpu_train import train_bao, train_batch, train_seg
from bench.report import RESULTS_FILE, machine_line, write_section
from core.device import resolve_device
from core.errors import UserError
from data.layout import REPO_ROOT
from data.synthetic import generate
from network.deeplab import BACKBONES
from tool.predict import DEFAULT_FORWARD_PIXELS, DEFAULT_SCALES

T = TypeVar("T")


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
    parser.add_argument("--section", default="gpu_check",
                        help="name of the section of --out that the report replaces (default: gpu_check)")
    parser.add_argument("--no_write", action="store_true", help="print the report only, do not write --out")
    parser.add_argument("--e2e_only", action="store_true",
                        help="only the end-to-end runs of the scripts (--e2e_images of them), no model measurement")
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


def _guarded(what: str, fn: Callable[[], T]) -> T | str:
    """``fn()``, or a one-line failure text (traceback on stderr) so that the other checks still run."""
    try:
        return fn()
    except UserError:
        raise
    except Exception as err:  # an out-of-memory or kernel error of one precision must not lose the rest
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        say(f"  {what} FAILED: {first}")
        return f"failed: {type(err).__name__}: {first[:120]}"


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
    say("ddp: " + shlex.join(cmd[1:]))
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


def _write(args: argparse.Namespace, body: str, partial: bool) -> None:
    """Replace the --section of --out with ``body`` (unless --no_write); a partial body says so."""
    if args.no_write:
        return
    note = ("\n\n**Partial:** written while the run went on; the parts marked not reached had not run when "
            "it was written, and a run cut off leaves this." if partial else "")
    write_section(args.out, args.section, body + note)


def _end_to_end(args: argparse.Namespace, device: torch.device, variants: dict[str, Variant],
                work: Path) -> tuple[list[str], bool]:
    """The end-to-end lines of the report (with a blank line first) and whether every run ran."""
    if not args.e2e_images:
        return ["", "End to end: skipped (--e2e_images 0)."], True
    lines, ok = run_e2e(work / "e2e", str(device), args.arch, args.seg_backbone, args.e2e_images, args.seed,
                        args.e2e_timeout, say, *e2e_variants(variants), size=tuple(args.e2e_size),
                        scales=",".join(map(str, args.scales)))
    return ["", *lines], ok


def e2e_only(args: argparse.Namespace, device: torch.device, variants: dict[str, Variant]) -> None:
    """``--e2e_only``: the end-to-end runs alone, in their own section."""
    command = "python -m bench.gpu_check" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    head = ["## GPU check, end to end (bench/gpu_check.py --e2e_only)", "", machine_line(), *device_lines(device),
            f"Command: `{command}`"]
    _write(args, "\n".join([*head, "", "End to end: not reached."]), partial=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        lines, ok = _end_to_end(args, device, variants, Path(tmp))
    body = "\n".join([*head, *lines])
    say("\n" + body)
    _write(args, body, partial=False)
    if not ok:
        sys.exit(1)


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.crop_size % 16:
        raise UserError(f"--crop_size must be a multiple of 16 (the network's stride), got {args.crop_size}")
    if args.infer_size < 32:
        raise UserError(f"--infer_size must be at least 32, got {args.infer_size}")
    variants = {name: VARIANTS[name] for name in VARIANTS if name in args.variants}
    if "fp32" not in variants:
        raise UserError("--variants must include fp32: the other variants are compared with it")
    if args.e2e_only:
        return e2e_only(args, device, variants)
    say(f"gpu_check on {device}: Conformer-{args.arch}, variants {', '.join(variants)}")
    model = inference_model(args)
    results: dict[str, dict[str, Any]] = {v: {"train": NOT_REACHED, "infer": NOT_REACHED} for v in variants}
    seg: dict[str, dict[str, Any]] = {} if args.skip_seg else \
        {v: {"train": NOT_REACHED, "infer": NOT_REACHED} for v in variants}
    sizes, ddp = "not generated yet", "not reached"
    e2e_lines = ["", "End to end: " + ("not reached." if args.e2e_images else "skipped (--e2e_images 0).")]

    def body() -> str:
        return "\n".join([report(args, device, results, sizes, ddp), *seg_report(args, seg), *e2e_lines])

    _write(args, body(), partial=True)
    batch = train_batch(args, device)
    for name, variant in variants.items():
        say(f"training {name}: {args.warmup} + {args.train_steps} steps of batch {args.batch_size} at "
             f"{args.crop_size}x{args.crop_size} ...")
        res = _guarded(f"training {name}", lambda: train_bao(args, device, variant, batch))
        results[name]["train"] = res
        if not isinstance(res, str):
            say(f"  {res.images_per_s:.2f} img/s, peak memory {cell(res, 'peak_gib', '.2f')} GiB")
        _write(args, body(), partial=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        say(f"generating {args.infer_images} images for inference ...")
        batches, sizes = inference_data(args, work, device, args.infer_batch_size)
        singles = inference_data(args, work, device, 1)[0] if "published" in variants else []
        scales = ",".join(map(str, args.scales))
        model = model.to(device=device)
        for name, variant in variants.items():
            say(f"inference {name}: {args.infer_images} images, scales {scales} with flips ...")
            res = _guarded(f"inference {name}",
                           lambda: infer_bao(args, model, device, variant, singles if variant.published else batches))
            results[name]["infer"] = res
            if not isinstance(res, str):
                say(f"  {res.images_per_s:.2f} img/s, peak memory {cell(res, 'peak_gib', '.2f')} GiB")
            _write(args, body(), partial=True)
        del model, batches, singles
        release(device)
        ddp = _ddp_smoke(args, device, work)
        say(f"ddp: {ddp}")
        for name, variant in variants.items():
            if args.skip_seg:
                break
            say(f"segmentation {name}: training and inference ({args.seg_backbone}) ...")
            seg[name]["train"] = _guarded(f"segmentation training {name}", lambda: train_seg(args, device, variant))
            seg[name]["infer"] = _guarded(f"segmentation inference {name}", lambda: infer_seg(args, device, variant))
            _write(args, body(), partial=True)
        e2e_lines, e2e_ok = _end_to_end(args, device, variants, work)
    say("")
    say(body())
    _write(args, body(), partial=False)
    if not args.no_write:
        say(f"\nwritten to the {args.section} section of {args.out}")
    if _failed(results, ddp) or (seg and _failed(seg, "")) or not e2e_ok:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
