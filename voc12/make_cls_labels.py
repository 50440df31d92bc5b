"""Derive image-level labels from VOC Annotations XML: ``voc12/cls_labels.json`` anew.

The repository ships ``voc12/cls_labels.json`` (converted from the published labels); this
command rebuilds it, or builds one for another list, from the object names in
``<voc12_root>/Annotations/<name>.xml`` (difficult objects included, parts ignored).

    python -m voc12.make_cls_labels --voc12_root VOCdevkit/VOC2012 \\
        --list voc12/train_aug.txt voc12/val.txt --out voc12/cls_labels.json

A dataset of other classes in the VOC layout needs ``--class_file`` (its class list) only: its
images are then every ``<voc12_root>/Annotations/<name>.xml`` unless ``--list`` names others.

    python -m voc12.make_cls_labels --voc12_root my_data --class_file classes.json --out my_data/cls_labels.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from apps.cli import DefaultsHelpFormatter, add_voc_root_arg, voc_layout_from_args
from data.classes import VOC
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout, labels_from_annotations
from core.errors import UserError, run_guarded

HERE = Path(__file__).resolve().parent
# The images labelled by default: the VOC lists of this repository (the published label file's images).
VOC_LISTS = (HERE / "train_aug.txt", HERE / "val.txt")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    add_voc_root_arg(parser)
    parser.add_argument("--list", nargs="+", default=None,
                        help="list files whose images get labels (bare names or published lines) (default: "
                             f"{' and '.join(str(p.relative_to(HERE.parent)) for p in VOC_LISTS)} of this "
                             "repository; with --class_file, every <voc12_root>/Annotations/<name>.xml)")
    parser.add_argument("--out", required=True, help="label file to write (JSON, written atomically)")
    parser.add_argument("--class_file", default=None,
                        help="take the class list (and ids) from this label file instead of the 20 VOC "
                             "classes, e.g. for a dataset of other classes in the VOC layout (its images are "
                             "then those of its Annotations/ folder, unless --list is given)")
    return parser


def image_names(args: argparse.Namespace, layout: DatasetLayout) -> list[str]:
    """The images to label, in order, each once: those of ``--list``; else, with ``--class_file``,
    every annotated image of the root (sorted); else those of the repository's VOC lists."""
    if args.list is None and args.class_file:
        names = sorted(path.stem for path in layout.annotation_dir.glob("*.xml"))
        if not names:
            raise UserError(f"{layout.annotation_dir} holds no <name>.xml annotation; check --voc12_root, or "
                            "name the images with --list")
        return names
    lists = args.list if args.list is not None else [str(p) for p in VOC_LISTS]
    return list(dict.fromkeys(n for path in lists for n in read_list(path)))


def main(args: argparse.Namespace) -> ImageLabels:
    layout = voc_layout_from_args(args)
    names = image_names(args, layout)
    missing = [n for n in names if not layout.annotation_path(n).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} images have no annotation (first: "
                        f"{layout.annotation_path(missing[0])}); check --voc12_root and --list")
    classes = ImageLabels.load(args.class_file).classes if args.class_file else list(VOC.names[1:])
    labels = labels_from_annotations(layout, names, classes)
    labels.save(args.out)
    print(f"wrote labels of {len(labels)} images ({labels.num_fg} classes) to {args.out}")
    return labels


if __name__ == "__main__":
    run_guarded(main, get_args_parser().parse_args())
