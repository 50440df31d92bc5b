"""Look at the maps behind the pseudo-labels (method spec section 6).

    python visual_bao.py --weights bao.pth --voc12_root VOCdevkit/VOC2012 --max_images 10
    python visual_bao.py --weights bao.pth --names 2007_000032,2007_000039 --out_dir out/visual

For each image (the same multi-scale maps as infer_bao.py, ``tool.predict``), written to
``--out_dir``:

- ``<name>_bg.jpg``: the learned background map (BAO) as a JET heat map on the image;
- ``<name>_<class>.jpg``: the same for each class present in the image-level label;
- ``<name>_sheet.png``: one summary sheet: image, ground truth (when the dataset has a
  mask), pseudo-label, background map and class maps, under a title naming the maps and
  whether they are attention-refined (``--refine``).

With ``--method transcam`` there is no background map; the pseudo-label panel then needs
a background threshold ``--t``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from apps.cli import add_prediction_args, check_threshold, dataset_from_args, positive_int, run_cli
from apps.run_settings import prediction_settings_from_run
from core.errors import UserError
from core.fileio import prepare_output_dir
from data.datasets import InferenceDataset, read_mask
from data.labels import read_list
from data.layout import DEFAULT_INFER_LISTS, DatasetSpec
from core.device import amp_dtype, compile_model, configure_math, resolve_device
from tool.overlay import colorize_labels, jet_overlay, save_rgb, summary_sheet
from tool.predict import HostOutputs, MultiScalePredictor, iterate_batches, load_model, to_host


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", "--infer_list", dest="list", default=None,
                        help="list file to take images from; --infer_list is the published name (default: "
                             "voc12/train.txt for voc, coco14/train.txt for coco, in this repository)")
    parser.add_argument("--names", default=None,
                        help="comma-separated image names to show instead of the first --max_images of --list")
    parser.add_argument("--max_images", type=positive_int, default=10,
                        help="how many images of --list to show, from the top (default: 10)")
    parser.add_argument("--out_dir", default="out/visual",
                        help="folder for the overlays and sheets (default: out/visual)")
    add_prediction_args(parser)
    return parser


def _selected_names(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.names:
        names = [n.strip() for n in args.names.split(",") if n.strip()]
        if not names:
            raise UserError("--names is empty; give comma-separated image names")
        return names, "--names"
    path = args.list or DEFAULT_INFER_LISTS[args.dataset]
    return read_list(path)[:args.max_images], str(path)


def _file_part(class_name: str) -> str:
    """A class name usable in a file name ('traffic light' -> 'traffic_light')."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", class_name).strip("_") or "class"


def main(args: argparse.Namespace) -> None:
    taken = prediction_settings_from_run(args)
    if taken:
        print(taken)
    check_threshold(args)
    device = resolve_device(args.device)
    amp = amp_dtype(args.amp, device)
    spec = dataset_from_args(args)
    names, source = _selected_names(args)
    spec.check(names, source=source)
    model, report = load_model(args.network, args.arch, args.weights, spec.num_classes, args.method, device,
                               args.refine)
    print(f"weights {args.weights}: {report.summary()}")
    print(configure_math(device, args.tf32))
    compile_model(model, args.compile)
    out_dir = Path(args.out_dir)
    prepare_output_dir(out_dir)

    dataset = InferenceDataset(spec.layout, names, spec.labels, scales=args.scales, flip=True, return_image=True)
    predictor = MultiScalePredictor(model, args.method, device, amp, args.forward_pixels)
    labelled = args.method == "bao" or args.t is not None
    with tqdm(total=len(names), unit="img", desc="visual") as bar:
        for batch in iterate_batches(dataset, args.batch_size, args.num_workers, device):
            results = to_host(predictor.predict(batch), labels=labelled, maps=True, background_score=args.t,
                              num_classes=spec.num_classes)
            for name, image, result in zip(batch["names"], batch["images"], results):
                _visualise(name, image, result, spec, args.t, out_dir, sheet_title(name, args.method, args.refine))
            bar.update(len(batch["names"]))
    print(f"wrote {len(names)} sheets and their overlays to {out_dir}")


def sheet_title(name: str, method: str, refine: str) -> str:
    """The title of an image's summary sheet: the image, the maps and their refinement regime."""
    maps = {"bao": "BAO maps", "transcam": "TransCAM CAMs", "cnn": "CNN CAMs"}[method]
    if method == "cnn":  # never refined, whatever --refine says
        regime = "before attention refinement (--method cnn)"
    elif refine == "none":
        regime = "without attention refinement (--refine none, ablation)"
    else:
        regime = "attention-refined (published)"
    return f"{name}: {maps}, {regime}"


def _visualise(name: str, image: np.ndarray, result: HostOutputs, spec: DatasetSpec, t: float | None, out_dir: Path,
               heading: str) -> None:
    """Write the overlays and the sheet (under ``heading``) of one image: its keys (K'), maps (K', H, W)
    normalised, and pseudo-label (H, W) when there is one (BAO, or TransCAM with ``t``)."""
    panels = [("image", image)]
    gt = read_mask(spec.layout, name, image.shape[:2])
    if gt is not None:
        panels.append(("ground truth", colorize_labels(gt)))
    if result.label is not None:
        title = "pseudo-label" if t is None else f"pseudo-label (t={t:g})"
        panels.append((title, colorize_labels(result.label)))
    for key, channel in zip(result.keys.tolist(), result.maps):
        class_name = "background" if key == 0 else spec.class_names[key]
        overlay = jet_overlay(image, channel)
        suffix = "bg" if key == 0 else _file_part(class_name)
        save_rgb(out_dir / f"{name}_{suffix}.jpg", overlay)
        panels.append((f"{class_name} map" if key else "background map (learned)", overlay))
    save_rgb(out_dir / f"{name}_sheet.png", summary_sheet(panels, title=heading))


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
