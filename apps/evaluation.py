"""The flag policies of evaluation_bao.py: which background scores its sweep flags ask for, where
its ground truth and images are, and which classes it evaluates with, in the terms of its flags.

The classes (their ids, names and unused ids) are chosen explicitly, never guessed from a
count, in this order (:func:`data.classes.resolve_class_set`): the ``convention.json`` that
coco14/prepare_coco.py writes beside COCO masks, else ``--dataset coco --convention``, else
``--label_file``, else the dataset's own label file (``cls_labels.json`` in ``--voc12_root`` when
its masks are evaluated), else ``--dataset``; ``--num_classes`` must agree with them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from apps.cli import FLAG_HINTS, voc_layout_from_args
from core.errors import UserError
from data.classes import (CONVENTION_FILE, ClassSet, ClassSetConflict, from_foreground, read_mask_convention,
                          resolve_class_set)
from data.labels import ImageLabels
from scoring.metrics import DEFAULT_SWEEP, threshold_range

# The published sweep --start/--end (percent, end excluded): t = 0.30 .. 0.69.
PUBLISHED_START, PUBLISHED_END = 30, 70
CONVENTIONS_TEXT = (
    "COCO masks come in two conventions: contiguous ids (0 background, 1..80 in sorted category-id order; "
    "81 classes) and raw category ids (0 background, 1..90, the ten unused ids skipped; 91 classes)"
)


def background_scores(args: argparse.Namespace) -> np.ndarray:
    """The background scores (T,) float32, ascending, that ``--type npy`` evaluates.

    ``--t``: that one score. Otherwise a sweep: ``--start``/``--end`` (t = i / 100 for i in
    range(start, end), end excluded, a missing one at its published default), else
    ``--t_range`` (stop included), else :data:`DEFAULT_SWEEP`. An explicit ``--curve`` decides
    between the two as published, the flags of the other mode being ignored with a note;
    without it, giving both is refused.
    """
    percents = args.start is not None or args.end is not None
    sweep_flags = [flag for flag, given in (("--t_range", args.t_range is not None), ("--start/--end", percents))
                   if given]
    if args.curve is True and args.t is not None:
        print(f"note: --curve true sweeps background scores; --t {args.t:g} is ignored, as published")
        args.t = None
    elif args.curve is False:
        if args.t is None:
            raise UserError("--curve false evaluates a single background score: give it as --t (or drop --curve "
                            "to sweep)")
        if sweep_flags:
            print(f"note: --curve false evaluates --t {args.t:g} alone; {' and '.join(sweep_flags)} ignored, as "
                  "published")
            sweep_flags, percents, args.t_range = [], False, None
    if args.t is not None:
        if sweep_flags:
            raise UserError(f"give either --t or {sweep_flags[0]}, not both (or --curve true / false to choose)")
        if not 0.0 <= args.t <= 1.0:
            raise UserError(f"--t {args.t:g}: a background score lies in 0..1 (the normalised maps lie below 1), "
                            f"e.g. --t 0.44; --start/--end count in percent, --t does not")
        return np.asarray([args.t], np.float32)
    if not percents:
        return threshold_range(*(args.t_range or DEFAULT_SWEEP))
    if args.t_range is not None:
        raise UserError("give either --start/--end (percent, end excluded) or --t_range, not both")
    start = PUBLISHED_START if args.start is None else args.start
    end = PUBLISHED_END if args.end is None else args.end
    if start >= end:
        raise UserError(f"--start {start} --end {end}: the sweep t = i/100 for i in range({start}, {end}) is "
                        "empty; --end must exceed --start (it is excluded)")
    return np.asarray([i / 100 for i in range(start, end)], np.float32)


def gt_dir_from_args(args: argparse.Namespace) -> Path:
    """The folder of the ground-truth masks: ``--gt_dir``, else the mask folder of ``--voc12_root``."""
    if args.gt_dir:
        return Path(args.gt_dir)
    return voc_layout_from_args(args, hint=", or give the mask folder as --gt_dir").mask_folder()


def image_dir_from_args(args: argparse.Namespace) -> Path:
    """The folder of the images the CRF reads: ``--img_dir``, else the VOC root's JPEGImages."""
    if args.img_dir:
        return Path(args.img_dir)
    return voc_layout_from_args(args, hint=", or give the image folder as --img_dir").image_dirs[0]


def resolve_classes(args: argparse.Namespace, gt_dir: Path) -> tuple[ClassSet, str]:
    """The classes to evaluate with and where they come from (for messages); see the module docstring.

    Raises :class:`UserError` when ``--num_classes``, ``--convention`` or ``--label_file``
    contradicts the convention recorded beside the masks or given by ``--convention``,
    ``--num_classes`` contradicts ``--label_file``, the dataset's label file or ``--dataset coco``.
    """
    record = read_mask_convention(gt_dir)
    label = from_foreground(ImageLabels.load(args.label_file).classes) if args.label_file else None
    # The dataset's own label file names its classes when its masks are the ones evaluated.
    data_file = None if args.gt_dir else voc_layout_from_args(args).label_file()
    data_label = from_foreground(ImageLabels.load(data_file).classes) if data_file and not label else None
    try:
        classes, source = resolve_class_set(record, args.convention, label, data_label, args.dataset,
                                            args.num_classes)
    except ClassSetConflict as err:
        raise _conflict_message(err, args, gt_dir, record, label, data_file) from None
    return classes, {
        "mask_convention": str(gt_dir / CONVENTION_FILE),
        "convention": f"--convention {args.convention}",
        "label_file": f"--label_file {args.label_file}",
        "dataset_label_file": f"{data_file}, the label file of the dataset root",
        "dataset": f"--dataset {args.dataset}",
        "count": f"--num_classes {args.num_classes} (generic class names)",
    }[source]
def _conflict_message(err: ClassSetConflict, args: argparse.Namespace, gt_dir: Path, record: dict | None,
                      label: ClassSet | None, data_file: Path | None) -> UserError:
    """The flags' terms of a contradiction between the sources of the class set."""
    classes = err.classes
    if err.source == "mask_convention":
        where, convention = gt_dir / CONVENTION_FILE, record["convention"]
        if err.given == "convention":
            return UserError(f"--convention {args.convention} contradicts the ground truth: {where} says the "
                             f"masks use the {convention!r} convention; drop --convention")
        says = (f"the ground truth: {where} says the masks use the {convention!r} convention, evaluated with "
                f"{classes.num_classes} classes")
        names_from = "convention.json"
    elif err.source == "convention":
        names_from = f"--convention {args.convention}"
        says = f"{names_from}, which means {classes.num_classes} classes"
    if err.source in ("mask_convention", "convention"):
        if err.given == "count":
            return UserError(f"--num_classes {args.num_classes} contradicts {says}. {CONVENTIONS_TEXT}. Drop "
                             "--num_classes, or evaluate against masks of the other convention (python -m "
                             "coco14.prepare_coco --convention ... --mask_dir DIR, then --gt_dir DIR)")
        return UserError(f"--label_file {args.label_file} names {label.num_classes} classes (background "
                         f"included), which contradicts {says}. {CONVENTIONS_TEXT}; the label file holds "
                         f"contiguous classes. Drop --label_file: the class names come from {names_from}")
    if err.source == "label_file":
        return UserError(f"--num_classes {args.num_classes} contradicts --label_file {args.label_file}, which has "
                         f"{classes.num_classes - 1} foreground classes ({classes.num_classes} with background); "
                         "drop one of the two flags")
    if err.source == "dataset_label_file":
        return UserError(f"--num_classes {args.num_classes} contradicts {data_file}, the label file of the dataset "
                         f"root, which has {classes.num_classes - 1} foreground classes ({classes.num_classes} with "
                         "background); drop --num_classes, or give the classes with --label_file")
    return UserError(f"--num_classes {args.num_classes} contradicts --dataset coco, whose masks have "
                     f"{classes.num_classes} classes unless --convention says otherwise. {CONVENTIONS_TEXT}: "
                     "drop --num_classes, or add --convention raw for raw category ids")


def with_flag_hint(err: UserError, classes: ClassSet, origin: str) -> UserError:
    """``err`` of the evaluation with what this script's flags can do about it (:data:`apps.cli.FLAG_HINTS`)."""
    if err.about == "class_ids":
        return UserError(f"{err} (here {classes.num_classes} classes, from {origin}; the classes come from "
                         "convention.json beside the masks, --convention, --label_file, --dataset or --num_classes)")
    hint = FLAG_HINTS.get(err.about)
    return UserError(f"{err}{hint}") if hint else err

