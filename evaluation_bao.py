"""Evaluate pseudo-labels (PNG label maps) or CAM files (threshold sweep) against ground truth.

    python evaluation_bao.py --comment bao --predict_dir out/pseudo_labels
    python evaluation_bao.py --type npy --predict_dir out/cams --bg_from_file --plot sweep.png
    python evaluation_bao.py --predict_dir out/coco_pseudo --gt_dir COCO/SegmentationClass --list coco14/val.txt

The classes (their ids, names and unused ids) are chosen explicitly, never guessed from a
count, in this order: the ``convention.json`` that coco14/prepare_coco.py writes beside COCO
masks (contiguous ids: 81 classes; raw category ids: 91 ids, the ten unused ones no class),
else ``--dataset coco --convention``, else ``--label_file`` (its class list), else
``--dataset`` (voc: the 21 VOC classes, the default; coco: the 81 contiguous COCO classes).
``--num_classes`` must agree with the chosen classes, except that without a convention or a
label file, with ``--dataset voc``, a count other than 21 evaluates that many classes with
generic names (class1, ...).

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

from apps.cli import (
    DefaultsHelpFormatter, add_label_file_arg, add_voc_root_arg, int_at_least, positive_int, voc_layout_from_args,
)
from data.classes import (
    COCO_CONVENTIONS, CONVENTION_FILE, DATASET_CLASSES, ClassSet, convention_classes, from_foreground, generic,
)
from data.labels import ImageLabels, read_list
from core.errors import UserError, run_cli
from core.fileio import atomic_path, prepare_output_dir
from tool.metrics import (
    MAX_CLASSES, default_workers, evaluate_cams, evaluate_labels, format_table, read_mask_convention, scores,
    scores_to_json, threshold_range,
)

DEFAULT_T_RANGE = (0.05, 0.95, 0.01)
CONVENTIONS_TEXT = (
    "COCO masks come in two conventions: contiguous ids (0 background, 1..80 in sorted category-id order; "
    "81 classes) and raw category ids (0 background, 1..90, the ten unused ids skipped; 91 classes)"
)
# What the flags of this script can do about a UserError of tool.metrics (by its ``about``).
FLAG_HINTS = {
    "prediction_folder": "; set --predict_dir",
    "ground_truth_folder": "; set --gt_dir or --voc12_root",
    "predictions": " (--predict_dir, --list)",
    "ground_truth": " (--gt_dir or --voc12_root, --list)",
    "cams_not_labels": "; evaluate them with --type npy",
    "labels_not_cams": "; evaluate them with --type png",
    "coco_contiguous_ids": ("; evaluate contiguous ids against contiguous-id masks (python -m coco14.prepare_coco "
                            "--convention contiguous) or, for masks without convention.json, with --dataset coco "
                            "and --convention contiguous"),
    "coco_raw_ids": ("; evaluate raw category ids against raw-id masks (python -m coco14.prepare_coco --convention "
                     "raw) or, for masks without convention.json, with --dataset coco --convention raw; or "
                     "convert the predictions to contiguous ids"),
    "background_map": "; drop --bg_from_file",
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate label maps (--type png) or CAM files (--type npy) against ground truth: "
                    "per-class IoU, mIoU, FP, FN, precision, recall. Ground-truth 255 is ignored.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--predict_dir", required=True,
                        help="folder of predictions: <name>.png label maps (class ids, palette or grayscale) "
                             "or, with --type npy, <name>.npz CAM files written by infer_bao.py")
    parser.add_argument("--type", default="png", choices=("png", "npy", "npz"),
                        help="png: evaluate label maps as they are; npy (or its synonym npz): read the CAM "
                             "files <name>.npz and sweep the background score t (label = argmax over "
                             "[t, foreground maps], ties to background). The published pickled .npy "
                             "dictionaries are not read; regenerate them with infer_bao.py")
    add_voc_root_arg(parser)
    parser.add_argument("--gt_dir", default=None,
                        help="folder of ground-truth <name>.png masks; overrides --voc12_root, whose ground "
                             "truth is SegmentationClassAug if present, else SegmentationClass (e.g. COCO masks)")
    parser.add_argument("--list", default="voc12/train.txt",
                        help="list file of the images to evaluate (bare names or published lines)")
    parser.add_argument("--dataset", choices=tuple(DATASET_CLASSES), default="voc",
                        help="the classes when neither convention.json beside the masks nor --label_file gives "
                             "them: voc = the 21 VOC classes, coco = the 81 COCO classes with contiguous ids "
                             "1..80 (see --convention)")
    parser.add_argument("--convention", choices=tuple(COCO_CONVENTIONS), default=None,
                        help="--dataset coco, for masks without convention.json (coco14.prepare_coco writes "
                             "one): contiguous = ids 1..80 (81 classes; the default), raw = raw category ids "
                             "(91 ids, the ten unused ones are no class)")
    parser.add_argument("--num_classes", type=int_at_least(2), default=None,
                        help="classes including background; must agree with convention.json, --convention, "
                             "--label_file or --dataset coco when given. Otherwise (--dataset voc) a count "
                             "other than 21 evaluates that many classes with generic names (class1, ...), e.g. "
                             "for a generated dataset without its label file")
    add_label_file_arg(parser, extra_help="; here it names the classes of the table, unless convention.json "
                                          "beside the masks does")
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
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="processes reading files in parallel (1: no extra processes)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def _gt_dir(args: argparse.Namespace) -> Path:
    if args.gt_dir:
        return Path(args.gt_dir)
    return voc_layout_from_args(args, hint=", or give the mask folder as --gt_dir").mask_folder()


def _check_args(args: argparse.Namespace) -> bool:
    """Validate flag combinations; return True for CAM (npy/npz) evaluation."""
    cams = args.type in ("npy", "npz")
    if args.num_classes is not None and args.num_classes > MAX_CLASSES:
        raise UserError(f"--num_classes {args.num_classes}: must be between 2 and {MAX_CLASSES}")
    if args.convention is not None and args.dataset != "coco":
        raise UserError("--convention names a COCO mask convention; add --dataset coco")
    if not cams:
        for flag, value in (("--t", args.t), ("--t_range", args.t_range), ("--plot", args.plot)):
            if value is not None:
                raise UserError(f"{flag} applies to --type npy (CAM files) only")
        if args.bg_from_file:
            raise UserError("--bg_from_file applies to --type npy (CAM files) only")
    if args.t is not None and args.t_range is not None:
        raise UserError("give either --t or --t_range, not both")
    for output in (args.json, args.plot):
        if output:  # fail now rather than after scoring every file
            prepare_output_dir(Path(output).resolve().parent, target=output)
    return cams


def resolve_classes(args: argparse.Namespace, gt_dir: Path) -> tuple[ClassSet, str]:
    """The classes to evaluate with and where they come from (for messages); see the module docstring.

    Raises :class:`UserError` when ``--num_classes``, ``--convention`` or ``--label_file``
    contradicts the convention recorded beside the masks or given by ``--convention``,
    ``--num_classes`` contradicts ``--label_file`` or ``--dataset coco``.
    """
    record = read_mask_convention(gt_dir)
    label = from_foreground(ImageLabels.load(args.label_file).classes) if args.label_file else None
    classes = None
    if record is not None:
        where, convention = gt_dir / CONVENTION_FILE, record["convention"]
        if args.convention is not None and args.convention != convention:
            raise UserError(f"--convention {args.convention} contradicts the ground truth: {where} says the "
                            f"masks use the {convention!r} convention; drop --convention")
        classes, origin, names_from = convention_classes(record), str(where), "convention.json"
        says = (f"the ground truth: {where} says the masks use the {convention!r} convention, evaluated with "
                f"{classes.num_classes} classes")
    elif args.convention is not None:
        classes = COCO_CONVENTIONS[args.convention]
        origin = names_from = f"--convention {args.convention}"
        says = f"{origin}, which means {classes.num_classes} classes"
    if classes is not None:
        if args.num_classes is not None and args.num_classes != classes.num_classes:
            raise UserError(f"--num_classes {args.num_classes} contradicts {says}. "
                            f"{CONVENTIONS_TEXT}. Drop --num_classes, or evaluate against masks of the other "
                            "convention (python -m coco14.prepare_coco --convention ... --mask_dir DIR, then "
                            "--gt_dir DIR)")
        if label is not None and label.num_classes != classes.num_classes:
            raise UserError(f"--label_file {args.label_file} names {label.num_classes} classes (background "
                            f"included), which contradicts {says}. {CONVENTIONS_TEXT}; the label file holds "
                            f"contiguous classes. Drop --label_file: the class names come from {names_from}")
        return classes, origin
    if label is not None:
        if args.num_classes is not None and args.num_classes != label.num_classes:
            raise UserError(f"--num_classes {args.num_classes} contradicts --label_file {args.label_file}, which "
                            f"has {label.num_classes - 1} foreground classes ({label.num_classes} with background); "
                            "drop one of the two flags")
        return label, f"--label_file {args.label_file}"
    classes = DATASET_CLASSES[args.dataset]
    if args.num_classes is None or args.num_classes == classes.num_classes:
        return classes, f"--dataset {args.dataset}"
    if args.dataset == "coco":
        raise UserError(f"--num_classes {args.num_classes} contradicts --dataset coco, whose masks have "
                        f"{classes.num_classes} classes unless --convention says otherwise. {CONVENTIONS_TEXT}: "
                        "drop --num_classes, or add --convention raw for raw category ids")
    return generic(args.num_classes), f"--num_classes {args.num_classes} (generic class names)"


def _with_flag_hint(err: UserError, classes: ClassSet, origin: str) -> UserError:
    """``err`` of tool.metrics with what this script's flags can do about it."""
    if err.about == "class_ids":
        return UserError(f"{err} (here {classes.num_classes} classes, from {origin}; the classes come from "
                         "convention.json beside the masks, --convention, --label_file, --dataset or --num_classes)")
    hint = FLAG_HINTS.get(err.about)
    return UserError(f"{err}{hint}") if hint else err


def main(args: argparse.Namespace) -> dict:
    cams = _check_args(args)
    names = read_list(args.list)
    gt_dir = _gt_dir(args)
    classes, origin = resolve_classes(args, gt_dir)
    args.num_classes = classes.num_classes
    report = {
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "comment": args.comment, "type": "npy" if cams else "png", "predict_dir": str(args.predict_dir),
        "gt_dir": str(gt_dir), "list": str(args.list), "num_images": len(names), "num_classes": args.num_classes,
    }
    try:
        if not cams:
            result = scores(evaluate_labels(names, args.predict_dir, gt_dir, classes, args.workers,
                                            not args.no_progress), classes)
            print(format_table(result, classes))
            print(f"mIoU = {100 * result['miou']:.2f} on {len(names)} images")
            report["result"] = scores_to_json(result, classes)
            fields = [f"mIoU={100 * result['miou']:.2f}", "best_t=-"]
        else:
            fields = _evaluate_cams(args, names, classes, gt_dir, report)
    except UserError as err:
        raise _with_flag_hint(err, classes, origin) from None
    _append_log(args.logfile, report, fields)
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _evaluate_cams(args: argparse.Namespace, names: list[str], classes: ClassSet, gt_dir: Path,
                   report: dict) -> list[str]:
    """Sweep the CAM files of images ``names`` with ``classes``, print the results, fill
    ``report``; return the log fields."""
    if args.t is not None:
        thresholds = np.asarray([args.t], np.float32)
    else:
        thresholds = threshold_range(*(args.t_range or DEFAULT_T_RANGE))
    if args.plot and thresholds.size < 2:
        raise UserError("--plot needs a sweep of at least two thresholds (use --t_range, not --t)")
    confs, free_conf = evaluate_cams(names, args.predict_dir, gt_dir, classes, thresholds,
                                     args.bg_from_file, args.workers, not args.no_progress)
    results = [scores(c, classes) for c in confs]
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
    print(format_table(results[best], classes))
    print(f"best: t = {best_t:.2f}, mIoU = {100 * mious[best]:.2f} on {len(names)} images")
    report["sweep"] = [
        {"t": float(round(float(t), 6)), **{k: _num(r[k]) for k in ("miou", "mean_fp", "mean_fn",
                                                                     "mean_precision", "mean_recall")}}
        for t, r in zip(thresholds, results)
    ]
    report["best"] = {"t": best_t, **scores_to_json(results[best], classes)}
    fields = [f"mIoU={100 * mious[best]:.2f}", f"best_t={best_t:.2f}"]
    ref = (args.ref_miou, "reference") if args.ref_miou is not None else None
    if free_conf is not None:
        free = scores(free_conf, classes)
        print("\nthreshold-free (argmax with the learned background map):")
        print(format_table(free, classes))
        print(f"threshold-free: mIoU = {100 * free['miou']:.2f}")
        report["bg_from_file"] = scores_to_json(free, classes)
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
