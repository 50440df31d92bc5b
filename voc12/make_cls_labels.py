"""Derive image-level labels from VOC Annotations XML: ``voc12/cls_labels.json`` anew.

The repository ships ``voc12/cls_labels.json`` (converted from the published labels); this
command rebuilds it, or builds one for another list, from the object names in
``<voc12_root>/Annotations/<name>.xml`` (difficult objects included, parts ignored).

    python -m voc12.make_cls_labels --voc12_root VOCdevkit/VOC2012 \\
        --list voc12/train_aug.txt voc12/val.txt --out voc12/cls_labels.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from apps.cli import DefaultsHelpFormatter, add_voc_root_arg, voc_layout_from_args
from data.classes import VOC
from data.labels import ImageLabels, read_list
from data.layout import labels_from_annotations
from core.errors import UserError, run_cli

HERE = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    add_voc_root_arg(parser)
    parser.add_argument("--list", nargs="+", default=[str(HERE / "train_aug.txt"), str(HERE / "val.txt")],
                        help="list files whose images get labels (bare names or published lines)")
    parser.add_argument("--out", required=True, help="label file to write (JSON, written atomically)")
    parser.add_argument("--class_file", default=None,
                        help="take the class list (and ids) from this label file instead of the 20 VOC "
                             "classes, e.g. for a dataset of other classes in the VOC layout")
    return parser


def main(args: argparse.Namespace) -> ImageLabels:
    names = list(dict.fromkeys(n for path in args.list for n in read_list(path)))
    layout = voc_layout_from_args(args)
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
    run_cli(main, get_args_parser().parse_args())
