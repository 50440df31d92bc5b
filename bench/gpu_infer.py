"""bench/gpu_check.py's inference measurements: infer_bao.py's multi-scale pseudo-labels and
infer_seg.py's multi-scale segmentation, this version's against the published loop's, and the
share of labels a variant changes."""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from bench.gpu_common import NOT_REACHED, NUM_CLASSES, Variant, layout, peak_gib, release, say, set_math, sync
from bench.gpu_train import seg_model
from core.device import compile_model
from data.classes import VOC_CLASSES
from data.datasets import InferenceDataset
from data.images import read_image
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout
from data.synthetic import generate_once
from data.transforms import scaled_input
from network.checkpoint import load_weights
from network.factory import DEFAULT_NETWORK, build_network
from tool.cam import pseudo_labels
from tool.predict import MultiScalePredictor, iterate_batches, to_host
from tool.segmentation import DEFAULT_SEG_SCALES, argmax_classes, batch_probs, multiscale_probs


@dataclass
class InferResult:
    """What an inference measurement found."""

    images_per_s: float
    peak_gib: float | None
    labels: list[torch.Tensor]  # (H, W) uint8 pseudo-labels per image, on the CPU


def inference_data(args: argparse.Namespace, work: Path, device: torch.device,
                    batch_size: int) -> tuple[list[dict[str, Any]], str]:
    """All inference batches of ``batch_size`` images, read and resized once (so that only the
    model's work is timed), and a description of the image sizes."""
    root = work / "VOC2012"
    generate_once(root, num_train=args.infer_images, num_val=0, size=args.infer_size, seed=args.seed)
    names = read_list(root / "ImageSets" / "Segmentation" / "train.txt")
    # The generated classes' ids 1..6 reused as VOC ids: any present-class set will do for timing.
    labels = ImageLabels(list(VOC_CLASSES[1:]), ImageLabels.load(root / "cls_labels.json").ids)
    layout = DatasetLayout.voc(root)
    dataset = InferenceDataset(layout, names, labels, scales=args.scales, flip=True)
    batches = list(iterate_batches(dataset, batch_size, 0, device))
    shapes = [read_image(layout.image_path(n)).shape[:2] for n in names]
    sizes = (f"{min(h for h, _ in shapes)}-{max(h for h, _ in shapes)} x "
             f"{min(w for _, w in shapes)}-{max(w for _, w in shapes)}")
    return batches, sizes


def inference_model(args: argparse.Namespace) -> nn.Module:
    """The inference model on the CPU, in eval mode: built first, so that a wrong --weights file
    is refused before the training measurements, but moved to the GPU only after them."""
    torch.manual_seed(args.seed)
    model = build_network(DEFAULT_NETWORK, args.arch, NUM_CLASSES)
    if args.weights:
        report = load_weights(model, args.weights, purpose="bao")
        say(f"weights {args.weights}: {report.summary()}")
    return model.eval()


def infer_bao(args: argparse.Namespace, model: nn.Module, device: torch.device, variant: Variant,
              batches: list[dict[str, Any]]) -> InferResult:
    """Time multi-scale prediction and pseudo-labels over all batches, after one untimed batch.

    The published loop (``batches`` of one image) runs one forward per view; this version's
    runs each scale's views together, chunked by --forward_pixels.
    """
    set_math(device, variant)
    model = model.to(memory_format=layout(device, variant, "cam_prediction"))
    if variant.compile != "off":
        model = compile_model(copy.deepcopy(model), variant.compile)
    forward_pixels = 1 if variant.published else args.forward_pixels
    predictor = MultiScalePredictor(model, "bao", device, variant.dtype, forward_pixels)
    predictor(batches[0])  # kernel selection, compilation and allocator warm-up stay out of the timing
    release(device)
    labels = []
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        if variant.published:  # per image: its maps, its labels, its copy to the host
            for keys, maps in predictor(batch):
                labels.append(pseudo_labels(maps, keys, num_classes=NUM_CLASSES).to(torch.uint8).cpu())
        else:  # infer_bao.py's path: labels made on the device, one copy to the host per batch
            for out in to_host(predictor.predict(batch), labels=True, maps=False, num_classes=NUM_CLASSES):
                labels.append(torch.from_numpy(out.label))
    sync(device)
    seconds = time.perf_counter() - start
    return InferResult(images_per_s=len(labels) / seconds, peak_gib=peak_gib(device), labels=labels)


def infer_seg(args: argparse.Namespace, device: torch.device, variant: Variant) -> InferResult:
    """Time infer_seg.py's multi-scale, flipped probabilities and labels on 500 x 375 images.

    The published loop: one image at a time, NCHW, its probabilities brought to the host for the
    argmax; this version's: infer_seg.py's path, --seg_infer_batch images per forward (the
    script's --batch_size), the scaled inputs prepared beforehand (as its loader workers do),
    the argmax on the device and uint8 labels to the host.
    """
    release(device)
    set_math(device, variant)
    model = seg_model(args, device).to(memory_format=layout(device, variant, "seg_inference")).eval()
    compile_model(model, variant.compile)
    rng = np.random.default_rng(args.seed)
    batch = 1 if variant.published else args.seg_infer_batch
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.seg_images + batch)]
    size = images[0].shape[:2]
    groups = [images[i:i + batch] for i in range(0, len(images), batch)]
    inputs = [[torch.stack([scaled_input(image, scale) for image in group]) for scale in DEFAULT_SEG_SCALES]
              for group in groups]
    labels = []
    for i, (group, scaled) in enumerate(zip(groups, inputs)):
        if i == 1:  # the first group (kernel selection, compilation) stays out of the timing
            sync(device)
            start = time.perf_counter()
        if variant.published:
            probs = multiscale_probs(model, group[0], DEFAULT_SEG_SCALES, True, device, variant.dtype)
            found = [probs.cpu().argmax(0)]
        else:
            probs = batch_probs(model, scaled, size, True, device, variant.dtype)
            found = list(argmax_classes(probs).cpu())
        if i:
            labels += found
    sync(device)
    return InferResult(images_per_s=len(labels) / (time.perf_counter() - start), peak_gib=peak_gib(device),
                       labels=[label.to(torch.uint8) for label in labels])


def label_change(reference: InferResult | str, other: InferResult | str) -> str:
    """The share of ``other``'s labels that differ from ``reference``'s, or why there is none."""
    if NOT_REACHED in (reference, other):
        return NOT_REACHED
    if isinstance(reference, str) or isinstance(other, str):
        return "not measured (an inference run failed)"
    changed = sum(int((a != b).sum()) for a, b in zip(reference.labels, other.labels))
    total = sum(a.numel() for a in reference.labels)
    images = sum(bool((a != b).any()) for a, b in zip(reference.labels, other.labels))
    return (f"{100 * changed / total:.4f}% of pixels ({changed} of {total}), in {images} of "
            f"{len(reference.labels)} images")
