"""bench/gpu_check.py's training measurements: the BAO step of train_bao.py and the DeepLab-V2
step of train_seg.py, this version's against the published loop's.

This version's step is the one the training scripts run, the very functions their engine
calls: :func:`engine.step.train_step` (backward, the non-finite guard, the optimizer step)
around the stage's step function of :mod:`tool.training` (the batch moved to the device in
the training layout, then the losses). The published loops are reimplemented here: NCHW, the
losses read on the host before backward, each step.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from bench.gpu_common import NUM_CLASSES, Variant, layout, peak_gib, release, set_math, sync
from core.device import autocast, compile_model
from engine.step import train_step
from network.deeplab import build_segmentation_model
from network.factory import DEFAULT_NETWORK, build_network
from tool.segmentation import segmentation_loss
from tool.teacher import make_teacher, update_teacher
from tool.training import bao_batch_losses, bao_losses, seg_batch_losses

# train_bao.py's defaults: label smoothing, pseudo-label loss weight, AdamW, EMA base momentum.
EPS, L_PCL, LR, WT_DEC, ADAM_EPS, MOMENTUM = 0.4, 1.0, 5e-5, 5e-4, 1e-8, 0.9995
LOSS_NAMES = ("loss", "loss_cls", "loss_pcl")


@dataclass
class TrainResult:
    """What a training measurement found."""

    images_per_s: float
    peak_gib: float | None  # None off CUDA
    finite: bool  # every loss term of every step
    first_loss: float  # total loss of the first step: same seed and batch in both precisions
    float32_state: bool  # every floating tensor of the student's and teacher's state_dicts


def train_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """A loader batch in host memory (pinned on CUDA, as the training loader's): ``img`` (B, 3, S, S)
    random normalised images, ``label`` (B, C-1) multi-hot labels with at least one class per image."""
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.crop_size, args.crop_size, generator=gen)
    labels = (torch.rand(args.batch_size, NUM_CLASSES - 1, generator=gen) < 0.1).float()
    labels[torch.arange(args.batch_size), torch.randint(NUM_CLASSES - 1, (args.batch_size,), generator=gen)] = 1.0
    batch = {"img": images, "label": labels}
    return {k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch


def train_bao(args: argparse.Namespace, device: torch.device, variant: Variant,
              batch: dict[str, torch.Tensor]) -> TrainResult:
    """Time the BAO step of train_bao.py (teacher forward without gradients, student forward, losses,
    backward, AdamW, teacher EMA) in a fresh model, teacher and optimizer, each step on ``batch``
    moved from host memory.

    This version's step reads its losses once per step, while backward runs; the published one
    before backward (a synchronisation before backward can be queued). A non-finite loss of this
    version's step raises :class:`engine.step.NonFiniteLoss`, as it stops a training run.
    """
    release(device)
    set_math(device, variant)
    torch.manual_seed(args.seed)  # same initial weights and drop-path draws in every variant
    memory_format = layout(device, variant, "training")
    student = build_network(DEFAULT_NETWORK, args.arch, NUM_CLASSES).to(device, memory_format=memory_format).train()
    teacher = make_teacher(student)
    compile_model(student, variant.compile)
    compile_model(teacher, variant.compile)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WT_DEC, eps=ADAM_EPS)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # train_bao.py's: on for fp16 only
    total = args.warmup + args.train_steps
    losses = []
    start = 0.0
    for it in range(total):
        if it == args.warmup:
            sync(device)
            start = time.perf_counter()
        if variant.published:
            terms = bao_losses(student, teacher, batch["img"].to(device, non_blocking=True),
                               batch["label"].to(device, non_blocking=True), EPS, L_PCL, variant.dtype)
            losses.append([terms[k].item() for k in LOSS_NAMES])
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
        else:
            values = train_step(lambda: bao_batch_losses(student, teacher, batch, device, EPS, L_PCL, variant.dtype),
                                optimizer, scaler)
            losses.append([values[k] for k in LOSS_NAMES])
        # epoch 1: the EMA update of every epoch after the first (epoch 0 copies the student)
        update_teacher(teacher, student, epoch=1, it=it, iters_per_epoch=total, base_momentum=MOMENTUM)
    sync(device)
    seconds = time.perf_counter() - start
    values = torch.tensor(losses)
    state = [*student.state_dict().values(), *teacher.state_dict().values()]
    return TrainResult(
        images_per_s=args.batch_size * args.train_steps / seconds,
        peak_gib=peak_gib(device),
        finite=bool(torch.isfinite(values).all()),
        first_loss=float(values[0, 0]),
        float32_state=all(t.dtype == torch.float32 for t in state if t.is_floating_point()),
    )


def seg_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """DeepLab-V2 with frozen batch norm whose statistics fit its own random weights.

    Frozen batch norm keeps the statistics it is given; a randomly initialised ResNet-101 with
    the identity statistics (mean 0, variance 1) grows its activations through 100 layers until
    the loss is in the tens of thousands and SGD turns it to NaN, which real ImageNet weights
    never do. So the statistics are first estimated in training mode (a cumulative average over
    a few batches of random images), as ImageNet training would have left them.
    """
    torch.manual_seed(args.seed)
    calibrating = build_segmentation_model("deeplabv2", args.seg_backbone, NUM_CLASSES, "train").to(device).train()
    for module in calibrating.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for _ in range(4):
            calibrating(torch.randn(2, 3, args.seg_crop_size, args.seg_crop_size, generator=gen).to(device))
    model = build_segmentation_model("deeplabv2", args.seg_backbone, NUM_CLASSES, "frozen").to(device)
    model.load_state_dict(calibrating.state_dict())
    del calibrating
    release(device)
    return model


def train_seg(args: argparse.Namespace, device: torch.device, variant: Variant) -> TrainResult:
    """Time train_seg.py's step: DeepLab-V2, frozen batch norm, SGD, cross-entropy on upsampled logits,
    each step on the same batch moved from host memory."""
    release(device)
    set_math(device, variant)
    model = seg_model(args, device).to(memory_format=layout(device, variant, "training")).train()
    compile_model(model, variant.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # train_seg.py's: on for fp16 only
    gen = torch.Generator().manual_seed(args.seed)
    size = args.seg_crop_size
    batch = {"img": torch.randn(args.seg_batch_size, 3, size, size, generator=gen),
             "label": torch.randint(0, NUM_CLASSES, (args.seg_batch_size, size, size), generator=gen)}
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    losses = []
    start = 0.0
    for it in range(args.warmup + args.train_steps):
        if it == args.warmup:
            sync(device)
            start = time.perf_counter()
        if variant.published:
            with autocast(device, variant.dtype):
                logits = model(batch["img"].to(device, non_blocking=True))
            loss = segmentation_loss(logits, batch["label"].to(device, non_blocking=True))
            losses.append(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            losses.append(train_step(lambda: seg_batch_losses(model, batch, device, variant.dtype), optimizer,
                                     scaler)["loss"])
    sync(device)
    seconds = time.perf_counter() - start
    values = torch.tensor(losses)
    return TrainResult(images_per_s=args.seg_batch_size * args.train_steps / seconds, peak_gib=peak_gib(device),
                       finite=bool(torch.isfinite(values).all()), first_loss=float(values[0]),
                       float32_state=all(t.dtype == torch.float32 for t in model.state_dict().values()
                                         if t.is_floating_point()))
