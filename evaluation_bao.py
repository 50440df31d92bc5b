"""Evaluate pseudo-labels (PNG label maps) or CAM files (threshold sweep) against ground truth.

    python evaluation_bao.py --comment bao --predict_dir out/pseudo_labels
    python evaluation_bao.py --type npy --predict_dir out/cams --bg_from_file --plot sweep.png
    python evaluation_bao.py --predict_dir out/coco_pseudo --gt_dir COCO/SegmentationClass --list coco14/val.txt
    python evaluation_bao.py --type npy --predict_dir out/cams --t 0.44 --out-dir out/t44 --out-crf out/t44_crf

The published flags keep their published meaning: ``--start``/``--end`` (the sweep in
percent, end excluded), ``--curve`` (true: sweep, false: the single ``--t``), ``--n_jobs``
(= ``--workers``), ``--cam-type``, and ``--out-dir`` / ``--out-crf`` / ``--img_dir`` (at one
``--t``, the label PNGs of the thresholded maps and their dense-CRF refinement, the same
files as ``infer_bao.py --method transcam --t T --out_pred / --out_crf`` on the same maps).

The classes (their ids, names and unused ids) are chosen explicitly, never guessed from a
count, in this order (:func:`data.classes.resolve_class_set`): the ``convention.json`` that
coco14/prepare_coco.py writes beside COCO masks (contiguous ids: 81 classes; raw category ids:
91 ids, the ten unused ones no class), else ``--dataset coco --convention``, else
``--label_file`` (its class list), else the dataset's own label file (``cls_labels.json`` in
``--voc12_root`` when its masks are evaluated, as a generated dataset has), else ``--dataset``
(voc: the 21 VOC classes, the default; coco: the 81 contiguous COCO classes).
``--num_classes`` must agree with the chosen classes, except that without a convention or a
label file, with ``--dataset voc``, a count other than 21 evaluates that many classes with
generic names (class1, ...): names the data does not define are never printed.

Prints the per-class IoU / FP / FN / precision / recall table and the means, appends one
line to the log file, and optionally writes JSON and a plot of the sweep.
"""
from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

import numpy as np

from apps.cli import (DefaultsHelpFormatter, add_crf_backend_arg, add_label_file_arg, add_voc_root_arg,
                      crf_backend_from_args, int_at_least, non_negative_int, parse_bool, run_cli, worker_count)
from apps.evaluation import (PUBLISHED_END, PUBLISHED_START, background_scores, gt_dir_from_args,
                             image_dir_from_args, resolve_classes, with_flag_hint)
from core.errors import UserError
from core.fileio import prepare_output_dir
from core.workers import default_workers
from data.classes import COCO, COCO_CONVENTIONS, COCO_RAW, DATASET_CLASSES, MAX_CLASSES, ClassSet
from data.labels import read_list
from data.layout import DEFAULT_INFER_LISTS
from scoring.evaluate import IMAGE_SUFFIX, evaluate_cams, evaluate_labels, write_threshold_labels
from scoring.metrics import DEFAULT_SWEEP, format_table, scores, scores_to_json
from scoring.report import append_log, write_report
from scoring.sweep import best_threshold, plot_sweep, sweep_json, sweep_table

# The images evaluated by default: those infer_bao.py makes pseudo-labels for by default (VOC).
DEFAULT_LIST = DEFAULT_INFER_LISTS["voc"]
# The published --cam-type: its default names the maps; "coco" chose the COCO variant.
CAM_TYPES = ("cam", "coco")
# --out-crf without a folder (the published switch): the refined labels go to --out-dir.
CRF_INTO_OUT_DIR = "<--out-dir>"


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
    parser.add_argument("--list", default=None,
                        help="list file of the images to evaluate (bare names or published lines) (default: "
                             f"{DEFAULT_LIST.relative_to(DEFAULT_LIST.parents[1])} of this repository)")
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
                        help="--type npy: evaluate this single background score instead of a sweep; a fraction "
                             "in 0..1 (e.g. 0.44), not a percent like --start/--end")
    parser.add_argument("--curve", type=parse_bool, default=None, metavar="BOOL",
                        help="--type npy, published flag: true = sweep background scores (--start/--end, "
                             "--t_range or the default range; --t ignored, as published), false = evaluate the "
                             "single --t (sweep flags ignored). Reads true/false, 1/0, yes/no; the published "
                             "type=bool turned any text, 'False' included, into True. Without it: a sweep unless "
                             "--t is given")
    parser.add_argument("--start", type=non_negative_int, default=None, metavar="PERCENT",
                        help="--type npy, published flag: sweep t = i/100 for i in range(START, END), END "
                             f"excluded as published (published defaults {PUBLISHED_START} and {PUBLISHED_END}: "
                             "t = 0.30 .. 0.69). Giving one of --start/--end sets the other to its published "
                             "default; giving neither sweeps the --t_range default, a wider range holding the "
                             "published one")
    parser.add_argument("--end", type=non_negative_int, default=None, metavar="PERCENT",
                        help="--type npy, published flag: end of the --start sweep in percent, excluded")
    parser.add_argument("--t_range", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=None,
                        help="--type npy: sweep background scores START..STOP (STOP included) by STEP; "
                             f"default {' '.join(map(str, DEFAULT_SWEEP))} when neither --t nor --start/--end "
                             "is given. Every file is read once for the whole sweep")
    parser.add_argument("--cam-type", dest="cam_type", default=None, metavar="KIND",
                        help="--type npy, published flag: which maps of the published CAM dictionaries to read "
                             "('cam', the published default) or 'coco' (the published COCO variant). Our CAM "
                             "files (<name>.npz) hold one kind, the normalised maps of the present classes, so "
                             "'cam' reads them; 'coco' needs the COCO classes (convention.json beside the masks "
                             "or --dataset coco), which also set the CRF's label count; other names are read as "
                             "'cam' with a note. BAO's learned background map (key 0) is scored with "
                             "--bg_from_file")
    parser.add_argument("--out-dir", dest="out_dir", default=None, metavar="DIR",
                        help="--type npy with one background score (--t), published flag: write the label map "
                             "of every image (argmax over [t, foreground maps]) to DIR/<name>.png, palette PNG, "
                             "atomically; the files infer_bao.py --method transcam --t T --out_pred writes from "
                             "the same maps")
    parser.add_argument("--out-crf", dest="out_crf", nargs="?", const=CRF_INTO_OUT_DIR, default=None,
                        metavar="DIR",
                        help="--type npy with one background score (--t), published flag: refine those labels "
                             "with the dense CRF (crf/refine.py, the images read from --img_dir), score them and "
                             "write them to DIR/<name>.png (as infer_bao.py --out_crf). Without DIR (the "
                             "published switch) the refined labels replace the plain ones in --out-dir")
    parser.add_argument("--img_dir", default=None, metavar="DIR",
                        help=f"images read by --out-crf: DIR/<name>{IMAGE_SUFFIX} (default: <voc12_root>/JPEGImages)")
    add_crf_backend_arg(parser, device_flag=False)
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
    parser.add_argument("--workers", type=worker_count, default=default_workers(),
                        help="processes reading files in parallel (1: no extra processes; negative: counted back "
                             "from the CPU count, -1 = every CPU)")
    # The published name, a second spelling of --workers (its own entry, so that the messages
    # about --workers keep naming the flag given).
    parser.add_argument("--n_jobs", dest="workers", type=worker_count, default=argparse.SUPPRESS, metavar="N",
                        help="published name of --workers")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def check_args(args: argparse.Namespace) -> bool:
    """Validate flag combinations and settle them; return True for CAM (npy/npz) evaluation.

    Sets ``args.thresholds`` ((T,) float32 background scores, ascending; None for label maps,
    see :func:`background_scores`) and ``args.crf_dir`` (the folder of the CRF labels, or None).
    """
    cams = args.type in ("npy", "npz")
    if args.num_classes is not None and args.num_classes > MAX_CLASSES:
        raise UserError(f"--num_classes {args.num_classes}: must be between 2 and {MAX_CLASSES}")
    if args.convention is not None and args.dataset != "coco":
        raise UserError("--convention names a COCO mask convention; add --dataset coco")
    if not cams:
        for flag, value in (("--t", args.t), ("--t_range", args.t_range), ("--plot", args.plot),
                            ("--start", args.start), ("--end", args.end), ("--out-dir", args.out_dir),
                            ("--out-crf", args.out_crf)):
            if value is not None:
                raise UserError(f"{flag} applies to --type npy (CAM files) only")
        if args.bg_from_file:
            raise UserError("--bg_from_file applies to --type npy (CAM files) only")
        if args.curve:
            raise UserError("--curve true sweeps background scores of CAM files; add --type npy")
    args.thresholds = background_scores(args) if cams else None
    args.crf_dir = args.out_dir if args.out_crf == CRF_INTO_OUT_DIR else args.out_crf
    if (args.out_dir or args.out_crf) and args.thresholds.size != 1:
        raise UserError("--out-dir / --out-crf write the labels at one background score: add --t (e.g. the best "
                        "t of a sweep)")
    args.crf_backend = crf_backend_from_args(args, args.out_crf is not None)
    if cams and args.cam_type not in (None, *CAM_TYPES):
        print(f"note: --cam-type {args.cam_type} names a key of the published .npy dictionaries; the CAM files "
              "read here hold one kind of map (the normalised maps of the present classes), read as --cam-type cam")
    for output in (args.json, args.plot):
        if output:  # fail now rather than after scoring every file
            prepare_output_dir(Path(output).resolve().parent, target=output)
    for folder in (args.out_dir, args.crf_dir):
        if folder:
            prepare_output_dir(folder)
    return cams


def main(args: argparse.Namespace) -> dict:
    cams = check_args(args)
    args.list = args.list or str(DEFAULT_LIST)
    names = read_list(args.list)
    gt_dir = gt_dir_from_args(args)
    classes, origin = resolve_classes(args, gt_dir)
    args.num_classes = classes.num_classes
    if cams and args.cam_type == "coco" and classes.num_classes not in (COCO.num_classes, COCO_RAW.num_classes):
        raise UserError(f"--cam-type coco evaluates COCO maps, but these are {classes.num_classes} classes (from "
                        f"{origin}); the classes come from convention.json beside the masks or --dataset coco: "
                        "add --dataset coco, or drop --cam-type")
    image_dir = image_dir_from_args(args) if args.out_crf else None
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
            if args.out_dir or args.out_crf:
                fields += _write_labels(args, names, classes, gt_dir, image_dir, report)
    except UserError as err:
        raise with_flag_hint(err, classes, origin) from None
    append_log(args.logfile, report, fields)
    if args.json:
        write_report(args.json, report)
    return report


def _write_labels(args: argparse.Namespace, names: list[str], classes: ClassSet, gt_dir: Path,
                  image_dir: Path | None, report: dict) -> list[str]:
    """Write the labels at the single --t (--out-dir) and their CRF refinement (--out-crf), print
    the CRF labels' scores, fill ``report``; return the log fields."""
    t = float(args.thresholds[0])
    label_dir = None if args.out_crf == CRF_INTO_OUT_DIR else args.out_dir
    crf_conf = write_threshold_labels(names, args.predict_dir, gt_dir, classes, t, label_dir, image_dir,
                                      args.crf_dir, args.workers, not args.no_progress, args.crf_backend)
    report["outputs"] = {"t": round(t, 6), "out_dir": label_dir, "out_crf": args.crf_dir}
    written = [f"{what} to {folder}" for what, folder in (("labels", label_dir), ("CRF labels", args.crf_dir))
               if folder]
    if written:
        print(f"wrote the {' and the '.join(written)} (t = {t:.6g}, {len(names)} images)")
    if crf_conf is None:
        return []
    crf = scores(crf_conf, classes)
    print(f"\nwith dense CRF (images from {image_dir}):")
    print(format_table(crf, classes))
    print(f"with CRF: mIoU = {100 * crf['miou']:.2f} at t = {t:.6g}")
    report["crf"] = scores_to_json(crf, classes)
    return [f"crf_mIoU={100 * crf['miou']:.2f}"]


def _evaluate_cams(args: argparse.Namespace, names: list[str], classes: ClassSet, gt_dir: Path,
                   report: dict) -> list[str]:
    """Sweep the CAM files of images ``names`` with ``classes`` over ``args.thresholds``, print
    the results, fill ``report``; return the log fields."""
    thresholds = args.thresholds
    if args.plot and thresholds.size < 2:
        raise UserError("--plot needs a sweep of at least two thresholds (use --t_range, not --t)")
    confs, free_conf = evaluate_cams(names, args.predict_dir, gt_dir, classes, thresholds,
                                     args.bg_from_file, args.workers, not args.no_progress)
    results = [scores(c, classes) for c in confs]
    print(sweep_table(thresholds, results))
    mious = np.array([r["miou"] for r in results])
    if np.all(np.isnan(mious)):
        raise UserError("no class has ground truth or predictions in these images; nothing to score")
    best, best_t = best_threshold(thresholds, mious)
    print(f"\nper-class scores at the best background score t = {best_t:.2f}:")
    print(format_table(results[best], classes))
    print(f"best: t = {best_t:.2f}, mIoU = {100 * mious[best]:.2f} on {len(names)} images")
    report["sweep"] = sweep_json(thresholds, results)
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
        plot_sweep(args.plot, thresholds, results, ref, args.comment)
    return fields


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
