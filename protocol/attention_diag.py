"""Does the attention refinement help or hurt the CAMs of a checkpoint? A diagnostic.

For each listed image and each of its classes, compares the class map inside the object
(ground-truth mask) with outside it, for the CNN CAM before refinement and the TransCAM
CAM after ``refine`` (spec section 2), and measures where the attention goes: the
attention mass that object patches and background patches give to object patches,
normalised by the object's share of patches (1.0 = no preference).

    python -m protocol.attention_diag --arch tiny \\
        --weights demo_out/seed0/attention/transcam/transcam/transcam_29epochs.pth \\
        --voc12_root demo_out/data/VOC2012 --label_file demo_out/data/VOC2012/cls_labels.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from apps.cli import add_dataset_args, add_model_args, dataset_from_args, positive_int, run_cli
from core.errors import UserError
from core.palette import IGNORE_INDEX
from data.datasets import read_mask
from data.images import read_image
from data.labels import read_list
from data.transforms import normalize
from network.checkpoint import load_weights
from network.factory import build_network


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser, weights_required=True, weights_help="TransCAM or BAO checkpoint")
    parser.add_argument("--list", default=None,
                        help="images to use (default: <voc12_root>/ImageSets/Segmentation/train.txt)")
    parser.add_argument("--max_images", type=positive_int, default=100, help="use the first N images of the list")
    parser.add_argument("--size", type=int, default=128, help="square input side (multiple of 16)")
    add_dataset_args(parser)
    return parser


@torch.inference_mode()
def diagnose(model: torch.nn.Module, images: list[tuple[np.ndarray, np.ndarray, list[int]]], size: int) -> dict:
    """Statistics over (image, mask, class ids) triples; see the module docstring."""
    inside = {"cnn": [], "refined": []}
    mass = {"object->object": [], "background->object": []}
    for image, mask, ids in images:
        x = F.interpolate(normalize(image)[None], size=(size, size), mode="bilinear", align_corners=False)
        feats, _, attn = model.forward_features(x)
        cnn = model.conv_cls_head(feats)
        for name, maps in (("cnn", cnn), ("refined", model.refine(cnn, attn))):
            up = F.interpolate(maps, size=mask.shape, mode="bilinear", align_corners=False)[0].numpy()
            for c in ids:
                obj, rest = mask == c, (mask != c) & (mask != IGNORE_INDEX)
                if obj.any() and rest.any():
                    inside[name].append(up[c][obj].mean() > up[c][rest].mean())
        fg = torch.from_numpy(((mask > 0) & (mask != IGNORE_INDEX)).astype(np.float32))
        grid = F.interpolate(fg[None, None], size=feats.shape[2:], mode="area").flatten() > 0.5
        share = grid.float().mean().item()
        if 0 < share < 1:
            a = attn[0] / model.depth  # mean over blocks; rows sum to at most 1
            mass["object->object"].append(a[grid][:, grid].sum(1).mean().item() / share)
            mass["background->object"].append(a[~grid][:, grid].sum(1).mean().item() / share)
    return {**{f"{k} map higher inside the object": float(np.mean(v)) for k, v in inside.items()},
            **{f"attention {k} (1 = no preference)": float(np.mean(v)) for k, v in mass.items()}}


def main(args: argparse.Namespace) -> dict:
    spec = dataset_from_args(args)
    list_file = args.list or Path(args.voc12_root) / "ImageSets" / "Segmentation" / "train.txt"
    names = read_list(list_file)[: args.max_images]
    spec.check(names)
    model = build_network(args.network, args.arch, spec.num_classes)
    load_weights(model, args.weights, purpose="transcam")
    model.eval()
    images = []
    for name in names:
        image = read_image(spec.layout.image_path(name))
        mask = read_mask(spec.layout, name, image.shape[:2])
        if mask is None:
            raise UserError(f"{name} has no ground-truth mask; the diagnostic needs masks")
        images.append((image, mask, spec.labels.ids[name]))
    stats = diagnose(model, images, args.size)
    print(f"{args.weights}, {len(names)} images at {args.size}x{args.size}:")
    for key, value in stats.items():
        print(f"  {key}: {value:.3f}")
    return stats


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
