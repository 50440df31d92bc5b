"""Benchmark: our evaluation against the published way of computing the same numbers.

Generates VOC-size ground-truth masks (objects with 255 borders), predicted label maps
and CAM files in a temporary folder, then times

- PNG evaluation: tool.metrics.evaluate_labels (the code path of evaluation_bao.py) against
  a per-class loop over images with boolean masks (the published approach);
- a threshold sweep of CAM files: tool.metrics.evaluate_cams (each file read once) against
  thresholding and scoring per threshold, re-reading the whole folder every time (published).

Both must give identical pixel counts. The ratios are printed and written to the
evaluation section of bench/RESULTS.md.

    python bench/bench_eval.py                    # 1,464 images (VOC train), 40 thresholds
    python bench/bench_eval.py --num_sweep 150    # fewer files for the slow reference sweep
    python bench/bench_eval.py --quick            # smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_name, write_section  # noqa: E402
from tool.camio import load_cams, save_cams  # noqa: E402
from tool.errors import UserError, run_cli  # noqa: E402
from tool.metrics import default_workers, evaluate_cams, evaluate_labels, threshold_range  # noqa: E402
from tool.palette import IGNORE_INDEX, save_label_png  # noqa: E402

NUM_CLASSES = 21


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time evaluation_bao's evaluation against the published approach.")
    parser.add_argument("--num", type=int, default=1464, help="images for the PNG benchmark (VOC train has 1,464)")
    parser.add_argument("--num_sweep", type=int, default=None,
                        help="images for the CAM sweep benchmark (default: --num); the reference re-reads "
                             "every file per threshold, so a smaller number keeps it to minutes")
    parser.add_argument("--thresholds", type=int, default=40, help="background scores in the sweep (0.20 + 0.01 i)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="reader processes for our evaluation (also timed with 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images, 10 for the sweep")
    parser.add_argument("--work_dir", default=None, help="folder for the generated files (default: a temporary one)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")),
                        help="markdown file whose evaluation section is replaced by this run ('' to skip)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated data")
    return parser


# ---------------------------------------------------------------- synthetic VOC-like data


def _objects(rng: np.random.Generator, h: int, w: int) -> list[tuple[int, float, float, float, float]]:
    """1-3 elliptic objects (class, cy, cx, ry, rx); VOC train images hold ~1.5 classes."""
    count = int(rng.choice([1, 1, 2, 3]))
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=count, replace=False)
    return [(int(c), rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w,
             rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.4) * w) for c in classes]


def _make_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """gt (H, W) uint8 with 255 borders, pred (H, W) uint8, CAM keys (K,) and maps (K, H, W) float16."""
    h, w = [(375, 500), (500, 375), (333, 500), (500, 333), (366, 500)][rng.integers(5)]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    gt = np.zeros((h, w), np.uint8)
    pred = np.zeros((h, w), np.uint8)
    objects = _objects(rng, h, w)
    cams = {}
    for c, cy, cx, ry, rx in objects:
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        gt[(d > 0.85) & (d < 1.15)] = IGNORE_INDEX  # the VOC "void" outline
        gt[d <= 0.85] = c
        # the prediction and the CAM see a shifted, rescaled object
        py, px, s = cy + rng.normal(0, 0.1) * ry, cx + rng.normal(0, 0.1) * rx, rng.uniform(0.8, 1.2)
        dp = ((yy - py) / (s * ry)) ** 2 + ((xx - px) / (s * rx)) ** 2
        pred[dp <= 1.0] = c if rng.random() > 0.1 else int(rng.integers(1, NUM_CLASSES))
        cams[c] = np.exp(-dp) + rng.normal(0, 0.05, (h, w)).astype(np.float32)
    keys = np.array([0] + sorted(cams), np.int64)
    fg = np.stack([cams[k] for k in keys[1:]])
    fg = (fg - fg.min(axis=(1, 2), keepdims=True)) / np.ptp(fg, axis=(1, 2), keepdims=True)
    maps = np.concatenate([1 - fg.max(axis=0, keepdims=True), fg]).astype(np.float16)
    return gt, pred, keys, maps


def generate(root: Path, num: int, seed: int) -> list[str]:
    """Write gt/, pred/ (PNG) and cam/ (npz) for ``num`` images under ``root``; return the names."""
    rng = np.random.default_rng(seed)
    names = [f"{2008 + i // 10000}_{i % 10000:06d}" for i in range(num)]
    for name in tqdm(names, desc="generate", unit="img"):
        gt, pred, keys, maps = _make_image(rng)
        save_label_png(root / "gt" / f"{name}.png", gt)
        save_label_png(root / "pred" / f"{name}.png", pred)
        save_cams(root / "cam" / f"{name}.npz", keys, maps)
    return names


# ---------------------------------------------------------------- the published approach


def _per_class_counts(pred: np.ndarray, gt: np.ndarray, tp: np.ndarray, p: np.ndarray, t: np.ndarray) -> None:
    """Add one image's per-class counts, one boolean mask per class (the published loop)."""
    cal = gt < IGNORE_INDEX
    hit = (pred == gt) * cal
    for i in range(NUM_CLASSES):
        p[i] += np.sum((pred == i) * cal)
        t[i] += np.sum((gt == i) * cal)
        tp[i] += np.sum((gt == i) * hit)


def reference_png(names: list[str], root: Path) -> np.ndarray:
    """(3, C) int64 rows TP, P, T of the PNG label maps."""
    counts = np.zeros((3, NUM_CLASSES), np.int64)
    for name in tqdm(names, desc="reference png", unit="img"):
        pred = np.array(Image.open(root / "pred" / f"{name}.png"))
        gt = np.array(Image.open(root / "gt" / f"{name}.png"))
        _per_class_counts(pred, gt, *counts)
    return counts


def reference_sweep(names: list[str], root: Path, thresholds: np.ndarray) -> np.ndarray:
    """(T, 3, C) int64: per threshold, read every file again, threshold all maps, count per class."""
    out = np.zeros((thresholds.size, 3, NUM_CLASSES), np.int64)
    for j, th in enumerate(tqdm(thresholds, desc="reference sweep", unit="t")):
        for name in names:
            keys, maps = load_cams(root / "cam" / f"{name}.npz")
            tensor = np.zeros((NUM_CLASSES,) + maps.shape[1:], np.float32)
            tensor[keys[1:]] = maps[1:]
            tensor[0] = th
            pred = np.argmax(tensor, axis=0).astype(np.uint8)
            gt = np.array(Image.open(root / "gt" / f"{name}.png"))
            _per_class_counts(pred, gt, *out[j])
    return out


def _counts(conf: np.ndarray) -> np.ndarray:
    """(..., 3, C) rows TP, P, T of confusion matrices (..., C, C)."""
    return np.stack([np.diagonal(conf, axis1=-2, axis2=-1), conf.sum(axis=-2), conf.sum(axis=-1)], axis=-2)


def _miou(counts: np.ndarray) -> np.ndarray:
    tp, p, t = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    with np.errstate(invalid="ignore"):
        return np.nanmean(tp / (t + p - tp), axis=-1)


def _timed(fn, *args) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


# ---------------------------------------------------------------- report


def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.num, args.num_sweep = 40, 10
    num_sweep = args.num if args.num_sweep is None else args.num_sweep
    if args.num < 1 or not 1 <= num_sweep <= args.num or args.thresholds < 2:
        raise UserError("need --num >= 1, 1 <= --num_sweep <= --num and --thresholds >= 2")
    thresholds = threshold_range(0.20, 0.20 + 0.01 * (args.thresholds - 1), 0.01)
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    load = os.getloadavg()[0]
    try:
        names = generate(root, args.num, args.seed)
        gt_dir = root / "gt"
        ref_png, t_ref_png = _timed(reference_png, names, root)
        conf1, t_png1 = _timed(evaluate_labels, names, root / "pred", gt_dir, NUM_CLASSES, 1, False)
        confw, t_pngw = _timed(evaluate_labels, names, root / "pred", gt_dir, NUM_CLASSES, args.workers, False)
        if not (np.array_equal(_counts(conf1), ref_png) and np.array_equal(_counts(confw), ref_png)):
            raise AssertionError("PNG evaluation differs from the reference")
        sweep_names = names[:num_sweep]
        ref_sweep, t_ref_sweep = _timed(reference_sweep, sweep_names, root, thresholds)
        (sw1, _), t_sw1 = _timed(evaluate_cams, sweep_names, root / "cam", gt_dir, NUM_CLASSES, thresholds,
                                 False, 1, False)
        (sww, _), t_sww = _timed(evaluate_cams, sweep_names, root / "cam", gt_dir, NUM_CLASSES, thresholds,
                                 False, args.workers, False)
        if not (np.array_equal(_counts(sw1), ref_sweep) and np.array_equal(_counts(sww), ref_sweep)):
            raise AssertionError("threshold sweep differs from the reference")
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    miou = _miou(ref_png)
    best = int(np.nanargmax(_miou(ref_sweep)))
    rows = [
        ("PNG label maps", args.num, t_ref_png, t_png1, t_pngw, "x5"),
        (f"CAM sweep, {thresholds.size} thresholds", num_sweep, t_ref_sweep, t_sw1, t_sww, "x20"),
    ]
    table = ["| task | images | published approach | ours, 1 process | ours, "
             f"{args.workers} processes | speed-up, 1 / {args.workers} processes | target |",
             "|---|---|---|---|---|---|---|"]
    for task, n, ref, one, many, target in rows:
        table.append(f"| {task} | {n} | {ref:.2f} s | {one:.2f} s | {many:.2f} s | "
                     f"{ref / one:.1f}x / {ref / many:.1f}x | >= {target[1:]}x |")
    body = "\n".join([
        "## Evaluation (bench/bench_eval.py)",
        "",
        f"Run {datetime.now().astimezone().isoformat(timespec='seconds')} on {cpu_name()}, "
        f"{os.cpu_count()} cores (1-min load average {load:.2f} at start; the machine is shared), "
        f"Python {platform.python_version()}, NumPy {np.__version__}, Pillow {PIL.__version__}.",
        f"Command: `python bench/bench_eval.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Synthetic VOC-size data (333-500 x 333-500 pixels, 1-3 objects with 255 outlines, {NUM_CLASSES} "
        "classes, CAM files float16 with a background map). Both sides read the same files from the "
        "page cache; the published approach runs in one process (per class: boolean masks and sums; "
        "the sweep re-reads every file per threshold). All pixel counts (TP, P, T per class and "
        "threshold) are identical.",
        "",
        *table,
        "",
        f"PNG mIoU {100 * miou:.2f}; sweep best t {thresholds[best]:.2f}. "
        + (f"The sweep used the first {num_sweep} of the {args.num} images (the reference takes "
           f"{t_ref_sweep / num_sweep / thresholds.size * 1000:.1f} ms per image and threshold)."
           if num_sweep < args.num else ""),
    ])
    print("\n" + body)
    if args.results:
        write_section(args.results, "bench_eval", body)
        print(f"\nresults written to {args.results}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
