"""The segmentation stage: the loss and learning-rate schedule of its training, its
multi-scale inference, and the VOC evaluation server's layout.

Training follows the usual WSSS DeepLab recipe: cross-entropy on logits upsampled to the
crop (255 ignored), SGD whose learning rate decays along a polynomial of the iteration,
the head at 10x the backbone's rate. Inference averages the softmax probabilities over
rescaled and flipped copies of the image, each upsampled to the original size.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.fileio import atomic_path
from core.palette import IGNORE_INDEX, save_label_png
from data.transforms import scaled_input
from crf.params import CRFParams
from crf.refine import crf_refine_probs, limit_torch_threads
from core.device import autocast

DEFAULT_SEG_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
# Where the VOC evaluation server expects the test-set PNGs of competition 6 (segmentation,
# trained on other data than the VOC pixel labels), inside the archive.
VOC_SERVER_DIR = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"
SERVER_ARCHIVE = "results.tar.gz"


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9) -> float:
    """``base_lr * (1 - iteration / max_iters) ** power``: the rate of (0-based) ``iteration``."""
    return base_lr * (1.0 - min(iteration, max_iters) / max_iters) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lrs: Iterable[float], iteration: int, max_iters: int,
                power: float = 0.9) -> list[float]:
    """Set each parameter group's rate for ``iteration`` from its base rate; returns the rates."""
    lrs = [poly_lr(base, iteration, max_iters, power) for base in base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return lrs


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled to the labels' size, averaged over labelled pixels.

    Args:
        logits: (B, C, h, w) class scores at any resolution.
        labels: (B, H, W) int64 class ids, 255 ignored.
    Returns:
        A scalar float32 tensor; 0 (with a gradient) when every pixel is ignored, where the
        plain mean would be NaN.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def multiscale_probs(model: nn.Module, image: np.ndarray, scales: tuple[float, ...] = DEFAULT_SEG_SCALES,
                     flip: bool = True, device: torch.device | str = "cpu",
                     amp: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities of one image, averaged over scales and flips (:func:`batch_probs` of
    its inputs at ``scales``, made by :func:`data.transforms.scaled_input`).

    Args:
        model: eval-mode segmentation model, (B, 3, h, w) -> (B, C, h', w') logits.
        image: (H, W, 3) uint8 RGB.
    Returns:
        (C, H, W) float32 probabilities on ``device``.
    """
    inputs = [scaled_input(image, scale)[None] for scale in scales]
    return batch_probs(model, inputs, image.shape[:2], flip, device, amp)[0]


@torch.no_grad()
def batch_probs(model: nn.Module, inputs: Sequence[torch.Tensor], size: tuple[int, int], flip: bool = True,
                device: torch.device | str = "cpu", amp: torch.dtype | None = None) -> torch.Tensor:
    """Class probabilities of B images of one size, each averaged over scales and flips.

    For each scale the B inputs are run with their flips as one batch (the B plain ones, then
    the B flipped), the logits upsampled to the original size (bilinear), turned into
    probabilities (softmax over classes), the flipped ones flipped back; each image's result
    is the mean over its ``len(inputs) * (1 + flip)`` views. On the CPU keep B = 1: oneDNN
    rounds some convolutions of a batch of 2B differently from B batches of 2 (the published
    numbers were made one image at a time).

    Args:
        model: eval-mode segmentation model, (N, 3, h, w) -> (N, C, h', w') logits.
        inputs: per scale, (B, 3, h_s, w_s) normalised images (:func:`data.transforms.scaled_input`).
        size: (H, W), the images' original size.
    Returns:
        (B, C, H, W) float32 probabilities on ``device``.
    """
    total = None
    views = 0
    for x in inputs:
        x = x.to(device, non_blocking=True)
        b = x.shape[0]
        if flip:
            x = torch.cat([x, x.flip(-1)])
        with autocast(torch.device(device), amp):
            logits = model(x)
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        probs = logits.softmax(1)
        probs = torch.stack([probs[:b], probs[b:].flip(-1)]) if flip else probs[None]
        part = probs.sum(0)
        total = part if total is None else total + part
        views += probs.shape[0]
    return total / views


def argmax_classes(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) probabilities -> (B, H, W) uint8 class ids where they are, the first class on
    ties as numpy's argmax: labels, not the probabilities, cross to the host."""
    return probs.argmax(1).to(torch.uint8)


def server_png_path(out_dir: str | os.PathLike, name: str) -> Path:
    """Where ``name``'s PNG goes in the VOC server layout under ``out_dir``."""
    return Path(out_dir) / VOC_SERVER_DIR / f"{name}.png"


def write_server_archive(out_dir: str | os.PathLike, names: list[str]) -> Path:
    """Archive ``<out_dir>/results/`` (the PNGs of ``names``) as ``<out_dir>/results.tar.gz``,
    atomically; upload that file to the VOC evaluation server."""
    out = Path(out_dir)
    archive = out / SERVER_ARCHIVE
    with atomic_path(archive) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in names:
                tar.add(server_png_path(out, name), arcname=str(VOC_SERVER_DIR / f"{name}.png"))
    return archive


def write_label_pngs(name: str, image: np.ndarray, probs: np.ndarray, outputs: dict[str, Path],
                     server_labels: str, crf: CRFParams, backend: str = "auto", device: str = "cpu",
                     threads: int | None = None) -> None:
    """Write the requested label PNGs of one image (a :class:`core.workers.TaskPool` task).

    Args:
        image: (H, W, 3) uint8, the CRF's colour term.
        probs: (C, H, W) float class probabilities at the image's size.
        outputs: "pred" (argmax), "crf" (argmax after the dense CRF) and/or "server" -> folder.
        server_labels: "pred" or "crf", the labels the "server" folder receives.
        crf, backend, device: the CRF's terms, backend and device (:func:`crf.refine.crf_refine_probs`).
        threads: torch CPU threads of the CRF in a worker process (:func:`crf.refine.limit_torch_threads`).
    """
    labels = {}
    if "pred" in outputs or ("server" in outputs and server_labels == "pred"):
        labels["pred"] = probs.argmax(0).astype(np.uint8)
    if "crf" in outputs or ("server" in outputs and server_labels == "crf"):
        limit_torch_threads(backend, threads)
        labels["crf"] = crf_refine_probs(image, probs, crf, backend, device).argmax(0).astype(np.uint8)
    save_labels(name, labels, outputs, server_labels)


def write_label_pngs_batch(names: Sequence[str], images: Sequence[np.ndarray], probs: np.ndarray,
                           outputs: dict[str, Path], server_labels: str, crf: CRFParams, device: str,
                           pixels_per_call: int | None = None) -> None:
    """:func:`write_label_pngs` of a batch with the torch CRF in this process, several images per
    CRF call (:func:`crf.densecrf.crf_refine_probs_batch`: up to ``pixels_per_call`` pixels per
    lattice; None: its default for ``device``, several VOC images on a GPU, one on the CPU).

    Args:
        names: B image names.
        images: B (H, W, 3) uint8 images of one size, the CRF's colour term.
        probs: (B, C, H, W) float class probabilities at the images' size.
    """
    from crf.densecrf import crf_refine_probs_batch

    refined = crf_refine_probs_batch(images, list(probs), crf, device, pixels_per_call)
    for name, image_probs, crf_probs in zip(names, probs, refined, strict=True):
        labels = {"pred": image_probs.argmax(0).astype(np.uint8), "crf": crf_probs.argmax(0).astype(np.uint8)}
        save_labels(name, labels, outputs, server_labels)


def save_labels(name: str, labels: dict[str, np.ndarray], outputs: dict[str, Path], server_labels: str) -> None:
    """Save ``labels`` ("pred" and/or "crf" -> (H, W) uint8) as the PNGs of ``outputs`` that hold
    them ("server" receives ``labels[server_labels]``), atomically."""
    for kind in ("pred", "crf"):
        if kind in outputs:
            save_label_png(outputs[kind] / f"{name}.png", labels[kind])
    if "server" in outputs:
        save_label_png(outputs["server"] / f"{name}.png", labels[server_labels])
