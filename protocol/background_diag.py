"""Which background map does BAO's pseudo-label loss train? A diagnostic for a BAO checkpoint.

Scores the threshold-free labels of a list against its masks with the three reads of BAO's
background channel of :mod:`tool.background` (published ``am[:, 0]``, softmax
``softmax(am)[:, 0]``, centred ``am[:, 0] - mean_k am[:, k]``), everything else as the
pseudo-label validation of training (scoring/validation.py) and infer_bao.py: multi-scale,
flipped, normalised, argmax.

    python -m protocol.background_diag --weights demo_out/seed0/refine_none/bao/bao/bao_9epochs_modelt.pth \\
        --refine none --arch tiny --voc12_root demo_out/data/VOC2012 \\
        --label_file demo_out/data/VOC2012/cls_labels.json --scales 96,128,192
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from apps.cli import (add_dataset_args, add_device_args, add_model_args, add_refine_arg, dataset_from_args,
                      parse_scales, positive_int, run_cli)
from core.errors import UserError
from core.fileio import atomic_write
from data.classes import ClassSet
from data.labels import read_list
from tool.background import BACKGROUNDS, WithBackground
from core.device import amp_dtype, resolve_device
from scoring.metrics import scores
from tool.predict import load_model
from scoring.validation import PseudoLabelValidation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser, weights_required=True, weights_help="BAO checkpoint")
    add_refine_arg(parser)
    parser.add_argument("--list", default=None,
                        help="images to score (default: <voc12_root>/ImageSets/Segmentation/train.txt)")
    parser.add_argument("--scales", type=parse_scales, default=(256, 512, 768),
                        help="square input sides, comma-separated multiples of 16, each also run flipped")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per batch")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    add_device_args(parser)
    add_dataset_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    spec = dataset_from_args(args)
    list_file = args.list or Path(args.voc12_root) / "ImageSets" / "Segmentation" / "train.txt"
    names = read_list(list_file)
    spec.check(names)
    device = resolve_device(args.device)
    model, report = load_model(args.network, args.arch, args.weights, spec.num_classes, "bao", device, args.refine)
    classes = ClassSet(spec.class_names)
    validation = PseudoLabelValidation(spec.layout, spec.labels, names, classes, "bao", args.scales, device,
                                       amp_dtype(args.amp, device), args.batch_size, 0, source=str(list_file))
    if validation.missing:
        raise UserError(f"{validation.missing} image(s) of the list have no ground-truth mask; the diagnostic "
                        "needs masks")
    result = {"weights": str(args.weights), "refine": args.refine, "num_images": len(names)}
    for kind in BACKGROUNDS:
        counts = validation.counts(WithBackground(model, kind))
        result[kind] = {k: float(v) for k, v in scores(counts, classes).items() if k.startswith(("miou", "mean_"))}
    print(f"weights {args.weights}: {report.summary()}; --refine {args.refine}, {len(names)} images")
    for kind in BACKGROUNDS:
        print(f"  background {kind:9s}: mIoU {100 * result[kind]['miou']:.2f}")
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
