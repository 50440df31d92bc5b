"""Evaluate pseudo-labels (PNG label maps) or CAM files (threshold sweep) against ground truth.

    python evaluation_bao.py --comment bao --predict_dir out/pseudo_labels
    python evaluation_bao.py --type npy --predict_dir out/cams --bg_from_file --plot sweep.png
    python evaluation_bao.py --predict_dir out/coco_pseudo --gt_dir COCO/SegmentationClass --list coco14/val.txt

The number of classes and their names come from, in this order: the ``convention.json``
that coco14/prepare_coco.py writes beside COCO masks (81 classes for contiguous ids, 91 for
raw category ids), ``--label_file``, ``--num_classes``; without any, 21 (VOC). Flags that
contradict the recorded convention are refused.

Prints the per-class IoU / FP / FN / precision / recall table and the means, appends one
line to the log file, and optionally writes JSON and a plot of the sweep.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np

from data.classes import CONVENTION_FILE, class_names
from data.labels import ImageLabels, read_list
from tool.errors import UserError, run_cli
from tool.fileio import atomic_path, prepare_output_dir
from tool.metrics import (
    MAX_CLASSES, default_workers, evaluate_cams, evaluate_labels, format_table, read_mask_convention, scores,
    scores_to_json, threshold_range,
)

DEFAULT_T_RANGE = (0.05, 0.95, 0.01)
DEFAULT_NUM_CLASSES = 21  # VOC, when neither the masks nor the flags say otherwise
COCO_CONVENTIONS = (
    "COCO masks come in two conventions: contiguous ids (0 background, 1..80 in sorted category-id order; "
    "81 classes) and raw category ids (0 background, 1..90, the ten unused ids skipped; 91 classes)"
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate label maps (--type png) or CAM files (--type npy) against ground truth: "
                    "per-class IoU, mIoU, FP, FN, precision, recall. Ground-truth 255 is ignored.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--predict_dir", required=True,
                        help="folder of predictions: <name>.png label maps (class ids, palette or grayscale) "
                             "or, with --type npy, <name>.npz CAM files written by infer_bao.py")
    parser.add_argument("--type", default="png", choices=("png", "npy", "npz"),
                        help="png: evaluate label maps as they are; npy (or its synonym npz): read the CAM "
                             "files <name>.npz and sweep the background score t (label = argmax over "
                             "[t, foreground maps], ties to background). The published pickled .npy "
                             "dictionaries are not read; regenerate them with infer_bao.py")
    parser.add_argument("--voc12_root", default="VOCdevkit/VOC2012",
                        help="VOC 2012 folder; the ground truth is its SegmentationClassAug if present, "
                             "else SegmentationClass")
    parser.add_argument("--gt_dir", default=None,
                        help="folder of ground-truth <name>.png masks; overrides --voc12_root (e.g. COCO masks)")
    parser.add_argument("--list", default="voc12/train.txt",
                        help="list file of the images to evaluate (bare names or published lines)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classes including background: 21 VOC, 81 COCO with contiguous ids 1..80, "
                             "91 COCO with raw category ids (the ten unused ids are skipped). Default: the "
                             "count recorded in <gt_dir>/convention.json (COCO masks), else that of "
                             f"--label_file, else {DEFAULT_NUM_CLASSES}; a value contradicting either is refused")
    parser.add_argument("--label_file", default=None,
                        help="image-level label JSON (e.g. coco14/cls_labels.json, or the cls_labels.json of a "
                             "generated dataset): its class names label the table, and its class count "
                             "+ 1 is the default --num_classes")
    parser.add_argument("--t", type=float, default=None,
                        help="--type npy: evaluate this single background score instead of a sweep")
    parser.add_argument("--t_range", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=None,
                        help="--type npy: sweep background scores START..STOP (STOP included) by STEP; "
                             f"default {' '.join(map(str, DEFAULT_T_RANGE))} when --t is not given. Every "
                             "file is read once for the whole sweep")
    parser.add_argument("--bg_from_file", action="store_true",
                        help="--type npy: also score the threshold-free argmax over all maps including "
                             "the learned background map (key 0, BAO maps); shown as the plot's reference line")
    parser.add_argument("--comment", default="",
                        help="free text recorded with the result in the log file")
    parser.add_argument("--logfile", default="eval_log.txt",
                        help="log file (relative to the current directory) to which one timestamped line "
                             "per run is appended; '' to disable")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the full result (per class, per threshold) as JSON to PATH")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="--type npy with a sweep: save a PNG of mIoU, FP and FN against the background score")
    parser.add_argument("--ref_miou", type=float, default=None,
                        help="mIoU in percent drawn as the plot's reference line (default: the --bg_from_file result)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes reading files in parallel (1: no extra processes)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def _gt_dir(args: argparse.Namespace) -> Path:
    if args.gt_dir:
        return Path(args.gt_dir)
    root = Path(args.voc12_root)
    aug = root / "SegmentationClassAug"
    return aug if aug.is_dir() else root / "SegmentationClass"


def _check_args(args: argparse.Namespace) -> bool:
    """Validate flag combinations; return True for CAM (npy/npz) evaluation."""
    cams = args.type in ("npy", "npz")
    if args.num_classes is not None and not 2 <= args.num_classes <= MAX_CLASSES:
        raise UserError(f"--num_classes {args.num_classes}: must be between 2 and {MAX_CLASSES}")
    if not cams:
        for flag, value in (("--t", args.t), ("--t_range", args.t_range), ("--plot", args.plot)):
            if value is not None:
                raise UserError(f"{flag} applies to --type npy (CAM files) only")
        if args.bg_from_file:
            raise UserError("--bg_from_file applies to --type npy (CAM files) only")
    if args.t is not None and args.t_range is not None:
        raise UserError("give either --t or --t_range, not both")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    for output in (args.json, args.plot):
        if output:  # fail now rather than after scoring every file
            prepare_output_dir(Path(output).resolve().parent, target=output)
    return cams


def resolve_classes(args: argparse.Namespace, gt_dir: Path) -> tuple[int, tuple[str, ...]]:
    """The class count and names (background first) to evaluate with; see the module docstring.

    Raises :class:`UserError` when ``--num_classes`` or ``--label_file`` contradicts the
    convention recorded beside the masks, or ``--num_classes`` contradicts ``--label_file``.
    """
    record = read_mask_convention(gt_dir)
    label_names = None
    if args.label_file:
        label_names = ("background",) + tuple(ImageLabels.load(args.label_file).classes)
    if record is not None:
        count, where = record["num_classes"], gt_dir / CONVENTION_FILE
        says = f"{where} says the masks use the {record['convention']!r} convention, evaluated with {count} classes"
        if args.num_classes is not None and args.num_classes != count:
            raise UserError(f"--num_classes {args.num_classes} contradicts the ground truth: {says}. "
                            f"{COCO_CONVENTIONS}. Drop --num_classes, or evaluate against masks of the other "
                            "convention (python -m coco14.prepare_coco --convention ... --mask_dir DIR, then "
                            "--gt_dir DIR)")
        if label_names is not None and len(label_names) != count:
            raise UserError(f"--label_file {args.label_file} names {len(label_names)} classes (background "
                            f"included) but {says}. {COCO_CONVENTIONS}; the label file holds contiguous "
                            "classes. Drop --label_file: the class names come from convention.json")
        names = record.get("class_names") or class_names(count)
        return count, tuple(names)
    if label_names is not None:
        if args.num_classes is not None and args.num_classes != len(label_names):
            raise UserError(f"--num_classes {args.num_classes} contradicts --label_file {args.label_file}, which "
                            f"has {len(label_names) - 1} foreground classes ({len(label_names)} with background); "
                            "drop one of the two flags")
        return len(label_names), label_names
    count = args.num_classes if args.num_classes is not None else DEFAULT_NUM_CLASSES
    return count, class_names(count)


def main(args: argparse.Namespace) -> dict:
    cams = _check_args(args)
    names = read_list(args.list)
    gt_dir = _gt_dir(args)
    args.num_classes, classes = resolve_classes(args, gt_dir)
    report = {
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "comment": args.comment, "type": "npy" if cams else "png", "predict_dir": str(args.predict_dir),
        "gt_dir": str(gt_dir), "list": str(args.list), "num_images": len(names), "num_classes": args.num_classes,
    }
    if not cams:
        result = scores(evaluate_labels(names, args.predict_dir, gt_dir, args.num_classes,
                                        args.workers, not args.no_progress))
        print(format_table(result, args.num_classes, classes))
        print(f"mIoU = {100 * result['miou']:.2f} on {len(names)} images")
        report["result"] = scores_to_json(result, args.num_classes, classes)
        fields = [f"mIoU={100 * result['miou']:.2f}", "best_t=-"]
    else:
        fields = _evaluate_cams(args, names, classes, gt_dir, report)
    _append_log(args.logfile, report, fields)
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _evaluate_cams(args: argparse.Namespace, names: list[str], classes: tuple[str, ...], gt_dir: Path,
                   report: dict) -> list[str]:
    """Sweep the CAM files of images ``names``, print the results with class names ``classes``,
    fill ``report``; return the log fields."""
    if args.t is not None:
        thresholds = np.asarray([args.t], np.float32)
    else:
        thresholds = threshold_range(*(args.t_range or DEFAULT_T_RANGE))
    if args.plot and thresholds.size < 2:
        raise UserError("--plot needs a sweep of at least two thresholds (use --t_range, not --t)")
    confs, free_conf = evaluate_cams(names, args.predict_dir, gt_dir, args.num_classes, thresholds,
                                     args.bg_from_file, args.workers, not args.no_progress)
    results = [scores(c) for c in confs]
    print(f"{'t':>6}{'mIoU':>8}{'FP':>8}{'FN':>8}{'prec':>8}{'recall':>8}")
    for t, r in zip(thresholds, results):
        print(f"{t:6.2f}" + "".join(f"{100 * r[k]:8.2f}" for k in ("miou", "mean_fp", "mean_fn",
                                                                  "mean_precision", "mean_recall")))
    mious = np.array([r["miou"] for r in results])
    if np.all(np.isnan(mious)):
        raise UserError("no class has ground truth or predictions in these images; nothing to score")
    best = int(np.nanargmax(mious))
    best_t = float(round(float(thresholds[best]), 6))
    print(f"\nper-class scores at the best background score t = {best_t:.2f}:")
    print(format_table(results[best], args.num_classes, classes))
    print(f"best: t = {best_t:.2f}, mIoU = {100 * mious[best]:.2f} on {len(names)} images")
    report["sweep"] = [
        {"t": float(round(float(t), 6)), **{k: _num(r[k]) for k in ("miou", "mean_fp", "mean_fn",
                                                                     "mean_precision", "mean_recall")}}
        for t, r in zip(thresholds, results)
    ]
    report["best"] = {"t": best_t, **scores_to_json(results[best], args.num_classes, classes)}
    fields = [f"mIoU={100 * mious[best]:.2f}", f"best_t={best_t:.2f}"]
    ref = (args.ref_miou, "reference") if args.ref_miou is not None else None
    if free_conf is not None:
        free = scores(free_conf)
        print("\nthreshold-free (argmax with the learned background map):")
        print(format_table(free, args.num_classes, classes))
        print(f"threshold-free: mIoU = {100 * free['miou']:.2f}")
        report["bg_from_file"] = scores_to_json(free, args.num_classes, classes)
        fields.append(f"bg_from_file_mIoU={100 * free['miou']:.2f}")
        ref = ref or (100 * free["miou"], "threshold-free (learned background)")
    if args.plot:
        _plot(args.plot, thresholds, results, ref, args.comment)
    return fields


def _num(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _append_log(logfile: str, report: dict, fields: list[str]) -> None:
    """Append one tab-separated line: timestamp, comment, type, scores, images, prediction folder."""
    if not logfile:
        return
    comment = " ".join(report["comment"].split())  # keep the record on one line
    line = "\t".join([report["timestamp"], comment, report["type"], *fields,
                      f"n={report['num_images']}", f"predict_dir={report['predict_dir']}"]) + "\n"
    # A single O_APPEND write of one line: concurrent runs cannot overwrite each other's lines
    # (rewriting the file atomically could), and an interruption cannot leave half a line.
    try:
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise UserError(f"cannot append to the log file {logfile}: {err.strerror or err}; set --logfile") from None


def _plot(path: str, thresholds: np.ndarray, results: list[dict], ref: tuple[float, str] | None,
          comment: str) -> None:
    """Save mIoU, FP and FN (%) against the background score, with an optional reference mIoU
    line ``ref`` = (mIoU in %, legend label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("miou", "mIoU", "-"), ("mean_fp", "FP", "--"), ("mean_fn", "FN", ":")):
        ax.plot(thresholds, [100 * r[key] for r in results], style, label=label)
    mious = np.array([100 * r["miou"] for r in results])
    best = int(np.nanargmax(mious))
    ax.plot([thresholds[best]], [mious[best]], "o", color="C0",
            label=f"best t = {thresholds[best]:.2f} ({mious[best]:.2f})")
    if ref is not None:
        ax.axhline(ref[0], color="k", linewidth=1, linestyle="-.", label=f"{ref[1]} ({ref[0]:.2f})")
    ax.set_xlabel("background score t")
    ax.set_ylabel("%")
    ax.set_title(comment or "threshold sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"plot saved to {path}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
