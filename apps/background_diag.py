"""Which background map does BAO's pseudo-label loss train? A diagnostic for a BAO checkpoint.

BAO's threshold-free labels (spec section 4) compare the background channel of the learned
activation map, ``am[:, 0]``, with the TransCAM foreground CAMs. The loss that trains the map
(spec section 3, L_pcl) is a cross-entropy of ``softmax(am)``, which is unchanged when the same
number is added to every channel at a pixel: it sets ``am[:, 0]`` only relative to the map's
other channels. This scores the threshold-free labels of a list against its masks with three
background channels, everything else as infer_bao.py (multi-scale, flipped, normalised, argmax):

- published: ``am[:, 0]``, the method;
- softmax: ``softmax(am)[:, 0]``, the background probability the loss trains;
- centred: ``am[:, 0] - mean_k am[:, k]``, the channel without the offset all channels share.

    python -m apps.background_diag --weights demo_out/seed0/refine_none/bao/bao/bao_9epochs_modelt.pth \\
        --refine none --arch tiny --voc12_root demo_out/data/VOC2012 \\
        --label_file demo_out/data/VOC2012/cls_labels.json --scales 96,128,192
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from apps.cli import (add_dataset_args, add_device_args, add_model_args, add_refine_arg, dataset_from_args,
                      parse_scales, positive_int, run_cli)
from core.errors import UserError
from core.fileio import atomic_write
from core.palette import read_label_png
from data.classes import ClassSet
from data.datasets import InferenceDataset, read_mask
from data.labels import read_list
from network.conformer import ConformerOutput
from tool.cam import pseudo_labels
from tool.device import amp_dtype, resolve_device
from tool.metrics import confusion, scores
from tool.predict import MultiScalePredictor, iterate_batches, load_model

# Background channel (B, 1, h, w) of each variant, from the forward output.
BACKGROUNDS: dict[str, Callable[[ConformerOutput], torch.Tensor]] = {
    "published": lambda out: out.am[:, :1],
    "softmax": lambda out: out.am.softmax(dim=1)[:, :1],
    "centred": lambda out: out.am[:, :1] - out.am.mean(dim=1, keepdim=True),
}


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
    parser.add_argument("--gt_dir", default=None,
                        help="folder of ground-truth <name>.png masks, as evaluation_bao.py's (default: the "
                             "dataset's masks, SegmentationClassAug before SegmentationClass)")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    add_device_args(parser)
    add_dataset_args(parser)
    return parser


class WithBackground(nn.Module):
    """``model`` whose BAO map takes its background channel from :data:`BACKGROUNDS` ``[kind]``."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        """x (B, 3, S, S), labels (B, K-1) -> the model's output with bao (B, K, h, w) rebuilt."""
        out = self.model(x, labels)
        return out._replace(bao=torch.cat([BACKGROUNDS[self.kind](out), out.cams[:, 1:]], dim=1))


def main(args: argparse.Namespace) -> dict:
    spec = dataset_from_args(args)
    names = read_list(args.list or Path(args.voc12_root) / "ImageSets" / "Segmentation" / "train.txt")
    spec.check(names)
    device = resolve_device(args.device)
    model, report = load_model(args.network, args.arch, args.weights, spec.num_classes, "bao", device, args.refine)
    classes = ClassSet(spec.class_names)
    predictors = {kind: MultiScalePredictor(WithBackground(model, kind), "bao", device, amp_dtype(args.amp, device))
                  for kind in BACKGROUNDS}
    conf = {kind: np.zeros((classes.num_classes,) * 2, np.int64) for kind in BACKGROUNDS}
    dataset = InferenceDataset(spec.layout, names, spec.labels, scales=args.scales, flip=True)
    for batch in iterate_batches(dataset, args.batch_size, 0, device):
        maps = {kind: predict(batch) for kind, predict in predictors.items()}
        for i, name in enumerate(batch["names"]):
            gt = read_label_png(Path(args.gt_dir) / f"{name}.png") if args.gt_dir else read_mask(spec.layout, name)
            if gt is None:
                raise UserError(f"{name} has no ground-truth mask; the diagnostic needs masks")
            for kind, per_image in maps.items():
                keys, image_maps = per_image[i]
                label = pseudo_labels(image_maps, keys, None, spec.num_classes).cpu().numpy().astype(np.uint8)
                conf[kind] += confusion(gt, label, classes)
    result = {"weights": str(args.weights), "refine": args.refine, "num_images": len(names),
              **{kind: {k: float(v) for k, v in scores(c, classes).items() if k.startswith(("miou", "mean_"))}
                 for kind, c in conf.items()}}
    print(f"weights {args.weights}: {report.summary()}; --refine {args.refine}, {len(names)} images")
    for kind in BACKGROUNDS:
        print(f"  background {kind:9s}: mIoU {100 * result[kind]['miou']:.2f}")
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
