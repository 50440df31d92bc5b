"""End-to-end timing of infer_bao.py and infer_seg.py, part of bench/gpu_check.py.

Each variant is the real script run as a subprocess on generated 500 x 375 JPEGs (the commonest
VOC size), with its flags: reading and decoding, the model, the label maps and writing the PNGs
are all in the figure. The rate is the steady one, read from the output files' modification
times (the first file left out, so the start-up, the model load and the first batch's kernel
selection do not count); the wall time of the whole command is given beside it.

The "published loop" variants reproduce what the published scripts do per image: infer_bao.py
with batch 1 and one forward per view (``--batch_size 1 --forward_pixels 1``), infer_seg.py one
image at a time. Every other variant is this version's defaults plus one opt-in flag. The
label maps of every variant are compared with the float32 defaults' (share of equal pixels).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from core.palette import read_label_png
from data.labels import ImageLabels
from data.layout import REPO_ROOT
from data.synthetic import generate
from network.deeplab import build_segmentation_model
from network.factory import DEFAULT_NETWORK, build_network

VOC_SIZE = (500, 375)  # width, height


@dataclass
class Variant:
    """One way of running a script: its name and the flags added to the common command."""

    name: str
    flags: tuple[str, ...]


# Variants of each script; "defaults" is the reference of the label comparison.
BAO_VARIANTS = (
    Variant("published loop", ("--batch_size", "1", "--forward_pixels", "1")),
    Variant("defaults", ()),
    Variant("--tf32", ("--tf32",)),
    Variant("--amp bf16", ("--amp", "bf16")),
    Variant("--compile default", ("--compile", "default")),
)
# infer_seg.py's default already goes one image at a time as published; its other changes (inputs
# in the loader workers, the argmax on the device) have no flag to turn them off: no published row.
SEG_VARIANTS = (
    Variant("defaults", ()),
    Variant("--batch_size 4", ("--batch_size", "4")),
    Variant("--tf32", ("--tf32",)),
    Variant("--amp bf16", ("--amp", "bf16")),
    Variant("--compile default", ("--compile", "default")),
)


@dataclass
class Timing:
    variant: str
    images_per_s: float | None  # steady rate from the files' times; None when too few files
    wall_s: float  # the whole command, start-up included
    agreement: str  # pixels equal to the defaults' labels, or what went wrong


def make_images(root: Path, count: int, seed: int, size: tuple[int, int] = VOC_SIZE) -> tuple[Path, int]:
    """``count`` generated images resized to ``size`` (width, height) in a VOC root; returns (list file,
    classes with background)."""
    generate(root, num_train=count, num_val=0, size=max(32, (size[0] + size[1]) // 2), seed=seed)
    for path in (root / "JPEGImages").glob("*.jpg"):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        resized.save(path, quality=90)
    return root / "ImageSets" / "Segmentation" / "train.txt", ImageLabels.load(root / "cls_labels.json").num_fg + 1


def seeded_weights(work: Path, arch: str, seg_backbone: str, num_classes: int, seed: int) -> tuple[Path, Path]:
    """A randomly initialised BAO checkpoint and DeepLab-V2 (frozen batch norm) for the timings."""
    torch.manual_seed(seed)
    bao = work / "bao_random.pth"
    torch.save(build_network(DEFAULT_NETWORK, arch, num_classes).state_dict(), bao)
    seg = work / "seg_random.pth"
    torch.save(build_segmentation_model("deeplabv2", seg_backbone, num_classes, "frozen").state_dict(), seg)
    return bao, seg


def _rate(folder: Path) -> float | None:
    times = sorted(p.stat().st_mtime for p in folder.glob("*.png"))
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def _agreement(folder: Path, reference: Path | None) -> str:
    if reference is None or folder == reference:
        return "reference"
    files = sorted(reference.glob("*.png"))
    equal = total = 0
    for ref in files:
        a, b = read_label_png(ref), read_label_png(folder / ref.name)
        equal += int((a == b).sum())
        total += a.size
    return f"{100 * equal / max(total, 1):.4f}%"


def time_script(script: str, common: list[str], variants: tuple[Variant, ...], work: Path, device: str,
                timeout: int, say) -> list[Timing]:
    """Run ``script`` once per variant into its own folder; the defaults' labels are the reference."""
    folders = {v.name: work / script.removesuffix(".py") / v.name.replace(" ", "_").strip("-") for v in variants}
    done: dict[str, tuple[float | None, float, str | None]] = {}
    for variant in variants:
        cmd = [sys.executable, script, *common, "--device", device, "--out_pred", str(folders[variant.name]),
               *variant.flags]
        say(f"  {script} {variant.name}: {shlex.join(cmd[2:])}")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
            failure = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        except subprocess.TimeoutExpired:
            failure = f"no result within {timeout} s"
        wall = time.perf_counter() - start
        done[variant.name] = (None, wall, f"failed: {failure}") if failure else (_rate(folders[variant.name]), wall,
                                                                                None)
        if failure:
            say(f"    FAILED: {failure}")
    reference = folders["defaults"] if done.get("defaults", (None, 0, "x"))[2] is None else None
    return [Timing(name, rate, wall, failure or _agreement(folders[name], reference))
            for name, (rate, wall, failure) in done.items()]


def table(title: str, timings: list[Timing]) -> list[str]:
    """Markdown rows: rate, ratio to the published loop and to the defaults, wall, label agreement."""
    rates = {t.variant: t.images_per_s for t in timings}

    def ratio(rate: float | None, base: float | None) -> str:
        return f"{rate / base:.2f}x" if rate and base else "n/a"

    rows = [f"| {t.variant} | {f'{t.images_per_s:.2f}' if t.images_per_s else 'n/a'} | "
            f"{ratio(t.images_per_s, rates.get('published loop'))} | {ratio(t.images_per_s, rates.get('defaults'))} | "
            f"{t.wall_s:.1f} | {t.agreement} |" for t in timings]
    return [title, "", "| variant | img/s (steady) | vs published loop | vs defaults | wall s | labels equal to "
                       "the defaults' |", "|---|---|---|---|---|---|", *rows]


def run_e2e(work: Path, device: str, arch: str, seg_backbone: str, images: int, seed: int, timeout: int,
            say, bao_variants: tuple[Variant, ...] = BAO_VARIANTS, seg_variants: tuple[Variant, ...] = SEG_VARIANTS,
            size: tuple[int, int] = VOC_SIZE, scales: str | None = None) -> tuple[list[str], bool]:
    """Time both scripts' variants on ``images`` generated JPEGs of ``size`` (width, height; VOC's
    500 x 375 by default); ``scales``: infer_bao.py's --scales (None: its default); returns (report
    lines, all ran)."""
    root = work / "VOC2012"
    names, num_classes = make_images(root, images, seed, size)
    bao, seg = seeded_weights(work, arch, seg_backbone, num_classes, seed)
    data = ["--voc12_root", str(root), "--label_file", str(root / "cls_labels.json"), "--infer_list", str(names)]
    say(f"end to end: {images} generated {size[0]} x {size[1]} JPEGs")
    bao_flags = [*data, "--weights", str(bao), "--arch", arch, *(["--scales", scales] if scales else [])]
    bao_times = time_script("infer_bao.py", bao_flags, bao_variants, work, device, timeout, say)
    seg_times = time_script("infer_seg.py", [*data, "--weights", str(seg), "--backbone", seg_backbone],
                            seg_variants, work, device, timeout, say)
    lines = [
        f"End to end ({images} generated {size[0]} x {size[1]} JPEGs, seeded random weights, the real scripts "
        "as subprocesses, decoding and PNG writing included; steady img/s from the output files' times, first file "
        "left out; wall = the whole command with start-up):",
        "",
        *table(f"infer_bao.py (BAO pseudo-labels, Conformer-{arch}, scales {scales or 'its default'} with flips):",
               bao_times),
        "",
        *table(f"infer_seg.py (DeepLab-V2 {seg_backbone}, its default scales with flips, no CRF):", seg_times),
    ]
    ok = all(not t.agreement.startswith("failed") for t in bao_times + seg_times)
    return lines, ok
