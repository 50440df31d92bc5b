"""Benchmark: our evaluation against the published way of computing the same numbers.

Generates a VOC-size dataset with data.synthetic (ground-truth masks with 255 bands on the
object boundaries), spreads its class ids over the 20 VOC classes, derives predicted label maps
and CAM files from its objects in a temporary folder, then times

- PNG evaluation: scoring.evaluate.evaluate_labels (the code path of evaluation_bao.py) against
  a per-class loop over images with boolean masks (the published approach);
- a threshold sweep of CAM files: scoring.evaluate.evaluate_cams (each file read once) against
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

import cv2
import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from apps.cli import int_at_least, positive_int
from bench.report import RESULTS_FILE, cpu_name, write_section
from data.camio import load_cams, save_cams
from data.classes import VOC
from core.errors import UserError, run_guarded
from data.synthetic import CLASSES as SHAPES, generate as generate_dataset
from core.workers import default_workers
from scoring.evaluate import evaluate_cams, evaluate_labels
from scoring.metrics import threshold_range
from scoring.sweep import best_threshold
from core.palette import IGNORE_INDEX, read_label_png, save_label_png

NUM_CLASSES = VOC.num_classes
IMAGE_SIZE = 400  # data.synthetic draws sides in [0.75, 1.25] x this: 300..500 pixels, as VOC


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time evaluation_bao's evaluation against the published approach.")
    parser.add_argument("--num", type=positive_int, default=1464,
                        help="images for the PNG benchmark (VOC train has 1,464)")
    parser.add_argument("--num_sweep", type=positive_int, default=None,
                        help="images for the CAM sweep benchmark (default: --num); the reference re-reads "
                             "every file per threshold, so a smaller number keeps it to minutes")
    parser.add_argument("--thresholds", type=int_at_least(2), default=40,
                        help="background scores in the sweep (0.20 + 0.01 i)")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="reader processes for our evaluation (also timed with 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 images, 10 for the sweep")
    parser.add_argument("--work_dir", default=None, help="folder for the generated files (default: a temporary one)")
    parser.add_argument("--results", default=str(RESULTS_FILE),
                        help="markdown file whose evaluation section is replaced by this run ('' to skip)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generated data")
    return parser


# ---------------------------------------------------------------- synthetic VOC-like data


def _prediction(instances: np.ndarray, gt: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prediction of one image from its objects: each object shifted and rescaled, 10 % of
    them with a wrong class. Returns pred (H, W) uint8, CAM keys (K,) and maps (K, H, W) float16
    (a background map first, then one per predicted class)."""
    h, w = gt.shape
    pred = np.zeros((h, w), np.uint8)
    cams: dict[int, np.ndarray] = {}
    for k in range(1, int(instances[instances != IGNORE_INDEX].max(initial=0)) + 1):
        obj = instances == k
        if not obj.any():
            continue
        c = int(gt[obj][0])
        ys, xs = np.nonzero(obj)
        cy, cx, radius = ys.mean(), xs.mean(), np.sqrt(obj.sum() / np.pi)
        s = rng.uniform(0.8, 1.2)
        ty, tx = rng.normal(0, 0.1, 2) * radius
        warp = np.float32([[s, 0, (1 - s) * cx + tx], [0, s, (1 - s) * cy + ty]])
        seen = cv2.warpAffine(obj.astype(np.float32), warp, (w, h), flags=cv2.INTER_LINEAR)
        pred[seen > 0.5] = c if rng.random() > 0.1 else int(rng.integers(1, NUM_CLASSES))
        score = cv2.GaussianBlur(seen, (0, 0), max(1.0, radius / 3))
        cams[c] = np.maximum(cams[c], score) if c in cams else score
    keys = np.array([0] + sorted(cams), np.int64)
    if len(keys) == 1:
        return pred, keys, np.zeros((1, h, w), np.float16)
    fg = np.stack([cams[k] + rng.normal(0, 0.05, (h, w)).astype(np.float32) for k in keys[1:]])
    fg = (fg - fg.min(axis=(1, 2), keepdims=True)) / np.ptp(fg, axis=(1, 2), keepdims=True)
    maps = np.concatenate([1 - fg.max(axis=0, keepdims=True), fg]).astype(np.float16)
    return pred, keys, maps


def generate(root: Path, num: int, seed: int) -> list[str]:
    """Write gt/, pred/ (PNG) and cam/ (npz) for ``num`` images under ``root``; return the names.

    The objects and masks are those of data.synthetic (1-3 objects of 1-2 classes, 255 on
    a band across every boundary); each image's class ids (its six shapes) become distinct VOC
    ids 1..20.
    """
    voc = root / "voc"
    generate_dataset(voc, num_train=num, num_val=0, size=IMAGE_SIZE, seed=seed, overwrite=True, progress=True)
    names = sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png"))
    rng = np.random.default_rng(seed)
    for name in tqdm(names, desc="predictions", unit="img"):
        lut = np.arange(256, dtype=np.uint8)
        lut[1:len(SHAPES) + 1] = rng.choice(np.arange(1, NUM_CLASSES), size=len(SHAPES), replace=False)
        gt = lut[read_label_png(voc / "SegmentationClass" / f"{name}.png")]
        pred, keys, maps = _prediction(read_label_png(voc / "SegmentationObject" / f"{name}.png"), gt, rng)
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
    if num_sweep > args.num:
        raise UserError(f"--num_sweep {num_sweep} exceeds --num {args.num}: the sweep uses the first images")
    thresholds = threshold_range(0.20, 0.20 + 0.01 * (args.thresholds - 1), 0.01)
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_eval_"))
    load = os.getloadavg()[0]
    try:
        names = generate(root, args.num, args.seed)
        gt_dir = root / "gt"
        ref_png, t_ref_png = _timed(reference_png, names, root)
        conf1, t_png1 = _timed(evaluate_labels, names, root / "pred", gt_dir, VOC, 1, False)
        confw, t_pngw = _timed(evaluate_labels, names, root / "pred", gt_dir, VOC, args.workers, False)
        if not (np.array_equal(_counts(conf1), ref_png) and np.array_equal(_counts(confw), ref_png)):
            raise AssertionError("PNG evaluation differs from the reference")
        sweep_names = names[:num_sweep]
        ref_sweep, t_ref_sweep = _timed(reference_sweep, sweep_names, root, thresholds)
        (sw1, _), t_sw1 = _timed(evaluate_cams, sweep_names, root / "cam", gt_dir, VOC, thresholds,
                                 False, 1, False)
        (sww, _), t_sww = _timed(evaluate_cams, sweep_names, root / "cam", gt_dir, VOC, thresholds,
                                 False, args.workers, False)
        if not (np.array_equal(_counts(sw1), ref_sweep) and np.array_equal(_counts(sww), ref_sweep)):
            raise AssertionError("threshold sweep differs from the reference")
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    miou = _miou(ref_png)
    best, _ = best_threshold(thresholds, _miou(ref_sweep))
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
        f"Synthetic VOC-size data from protocol.make_dataset (300-500 x 300-500 pixels, 1-3 objects of 1-2 "
        f"classes with 255 boundary bands, ids spread over the {NUM_CLASSES - 1} VOC classes; evaluated with "
        f"{NUM_CLASSES} classes; CAM files float16 with a background map). Both sides read the same files from the "
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
    run_guarded(main, get_args_parser().parse_args())
