"""The losses of one training batch for each stage: BAO (teacher-student), TransCAM
(classification only) and the segmentation model trained on pseudo-labels.

``*_batch_losses`` are the step functions the training scripts hand the engine (and the
benchmarks time): a loader batch moved to the device, in the training layout
(:func:`core.device.memory_layout`), then its losses. The loop and the optimisation step that
drive them are :mod:`engine.loop` and :mod:`engine.step`; the loss functions themselves are in
:mod:`tool.losses` and :mod:`tool.segmentation`, the teacher update in :mod:`tool.teacher`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.errors import UserError
from data.labels import ImageLabels
from network.checkpoint import BAO_HEADS
from core.device import autocast, memory_layout
from tool.losses import class_balanced_ce, classification_loss, smooth_targets, teacher_pseudo_label
from tool.segmentation import segmentation_loss

STAGES = ("bao", "transcam")  # the trainable stages; each has its loss function below


def labelled_names(names: list[str], labels: ImageLabels, source: str) -> tuple[list[str], int]:
    """Drop the names whose image-level label is empty; return the kept names and how many were dropped.

    An image without any foreground class gives the multi-label classification loss nothing
    to learn and BAO's pseudo-label loss no class to condition on (the usual COCO training
    lists leave these images out). Names without a label at all are kept, for the dataset's
    check to report them.
    """
    kept = [n for n in names if n not in labels or labels.ids[n]]
    if not kept:
        raise UserError(f"no image of {source} has a foreground class in its image-level label; "
                        "check the list and --label_file")
    return kept, len(names) - len(kept)


def freeze_bao_heads(model: nn.Module) -> None:
    """Freeze the BAO heads for the TransCAM stage: they take no part in its loss, so DDP then
    needs no unused-parameter search and AdamW's weight decay leaves them at initialisation."""
    for name, p in model.named_parameters():
        if name.startswith(BAO_HEADS):
            p.requires_grad_(False)


def weights_prefix(session: str, epoch: int) -> str:
    """The start of the weight files' names of a finished ``epoch`` (0-based): ``{session}_{epoch}epochs``."""
    return f"{session}_{epoch}epochs"


def epoch_weight_files(session: str, epoch: int, model: nn.Module,
                       teacher: nn.Module | None) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
    """The plain weight files of a finished ``epoch`` (0-based) of a stage, named as published:
    ``name -> (module, key prefixes left out)``.

    BAO (with a ``teacher``): ``{session}_{epoch}epochs_modelt.pth`` (the teacher) and
    ``..._models.pth`` (the student); TransCAM: ``{session}_{epoch}epochs.pth`` without the
    (untrained) BAO heads, the published TransCAM layout.
    """
    prefix = weights_prefix(session, epoch)
    if teacher is not None:
        return {f"{prefix}_modelt.pth": (teacher, ()), f"{prefix}_models.pth": (model, ())}
    return {f"{prefix}.pth": (model, BAO_HEADS)}


def bao_losses(student: nn.Module, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               eps: float, l_pcl: float, amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Losses of one BAO training step (method spec, section 3, steps 2-7).

    The teacher runs under ``torch.no_grad()``: its CAMs only make the pseudo-label, so
    no autograd graph is recorded for it. Losses are computed in float32 under AMP.

    Args:
        student: the trained model (possibly DDP-wrapped), called as ``student(x, y)``.
        teacher: the teacher model, called as ``teacher(x)`` (only its CAMs are used).
        images: (B, 3, S, S) normalised crops.
        labels: (B, C-1) multi-hot foreground labels.
        eps: label smoothing of the pseudo-label target.
        l_pcl: weight of the pseudo-label loss.
        amp_dtype: autocast dtype, or None for float32.
    Returns:
        ``{"loss": L, "loss_cls": L_cls, "loss_pcl": L_pcl}``, scalar float32 tensors
        (``loss`` is the one to backpropagate).
    """
    with autocast(images.device, amp_dtype):
        with torch.no_grad():
            cams_t = teacher(images).cams
        out = student(images, labels)
    loss_cls = classification_loss(out.conv_logits.float(), out.trans_logits.float(), labels)
    pseudo = teacher_pseudo_label(cams_t.float(), labels)
    target = smooth_targets(pseudo, out.am.shape[1], eps)
    loss_pcl = class_balanced_ce(out.am, target, pseudo)
    return {"loss": loss_cls + l_pcl * loss_pcl, "loss_cls": loss_cls, "loss_pcl": loss_pcl}


def transcam_losses(student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Loss of one TransCAM training step: ``L_cls`` of the forward without labels.

    Args:
        student: the trained model (possibly DDP-wrapped), called as ``student(x)``.
        images: (B, 3, S, S) normalised crops.
        labels: (B, C-1) multi-hot foreground labels.
        amp_dtype: autocast dtype, or None for float32.
    Returns:
        ``{"loss": L_cls, "loss_cls": L_cls}`` (the same scalar tensor).
    """
    with autocast(images.device, amp_dtype):
        out = student(images)
    loss_cls = classification_loss(out.conv_logits.float(), out.trans_logits.float(), labels)
    return {"loss": loss_cls, "loss_cls": loss_cls}


def to_training_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch's ``img`` (B, 3, S, S), in the training layout, and ``label`` on ``device``
    (copied without waiting: the loader pins its batches on CUDA)."""
    images = batch["img"].to(device, non_blocking=True, memory_format=memory_layout(device, "training"))
    return images, batch["label"].to(device, non_blocking=True)


def bao_batch_losses(student: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                     eps: float, l_pcl: float, amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:func:`bao_losses` of a loader batch (``img`` (B, 3, S, S), ``label`` (B, C-1)) moved to ``device``."""
    images, labels = to_training_device(batch, device)
    return bao_losses(student, teacher, images, labels, eps, l_pcl, amp_dtype)


def transcam_batch_losses(student: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """:func:`transcam_losses` of a loader batch (``img`` (B, 3, S, S), ``label`` (B, C-1)) moved to ``device``."""
    images, labels = to_training_device(batch, device)
    return transcam_losses(student, images, labels, amp_dtype)


def seg_batch_losses(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Loss of one segmentation training step: :func:`tool.segmentation.segmentation_loss` of the
    model's logits on a loader batch moved to ``device``.

    Args:
        model: the segmentation model (possibly DDP-wrapped), ``(B, 3, S, S) -> (B, C, h, w)`` logits.
        batch: ``img`` (B, 3, S, S) normalised crops, ``label`` (B, S, S) int64 class ids (255 ignored).
        device: the training device.
        amp_dtype: autocast dtype of the forward, or None for float32.
    Returns:
        ``{"loss": L}``, a scalar float32 tensor.
    """
    images, labels = to_training_device(batch, device)
    with autocast(device, amp_dtype):
        logits = model(images)
    return {"loss": segmentation_loss(logits, labels)}
