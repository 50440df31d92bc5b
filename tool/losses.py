"""The training losses and the teacher pseudo-label of BAO (method spec, section 3).

Pure functions of tensors: no module state, no randomness, no device or class-count
literals (the class count C comes from the tensors). Shapes: B batch, C classes with
background (21 for VOC), h x w the feature resolution (input side / 16).

The full BAO loss of one batch is::

    L_cls = classification_loss(conv_logits, trans_logits, y)
    label = teacher_pseudo_label(cams_T, y)
    L_pcl = class_balanced_ce(am_S, smooth_targets(label, C, eps), label)
    L     = L_cls + l_pcl * L_pcl

and the TransCAM stage uses ``L_cls`` alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Added to each channel's spatial maximum before dividing by it, as in the published
# pseudo-label: a channel that is zero everywhere (absent class) stays zero.
MAX_NORM_EPS = 1e-5


def classification_loss(conv_logits: torch.Tensor, trans_logits: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss of the summed CNN and transformer logits.

    ``mean_b mean_c [-y log sigmoid(s) - (1 - y) log sigmoid(-s)]`` with
    ``s = (conv_logits + trans_logits)[:, 1:]`` (the background logit is not supervised).

    Args:
        conv_logits: (B, C) logits of the CNN branch.
        trans_logits: (B, C) logits of the class token.
        labels: (B, C-1) multi-hot foreground labels y.
    Returns:
        Scalar loss (float32 for float32 inputs).
    """
    logits = (conv_logits + trans_logits)[:, 1:]
    if logits.shape != labels.shape:
        raise ValueError(f"logits (B, C) give {tuple(logits.shape)} foreground scores but labels are "
                         f"{tuple(labels.shape)}")
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def teacher_pseudo_label(cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Threshold-free pseudo-label from the teacher's TransCAM maps.

    ``fg = relu(cams[:, 1:] * y)``, each channel divided by (its spatial maximum + 1e-5);
    ``bg = 1 - max_c fg``; ``label = argmax([bg, fg])`` over channels. Ties go to the lower
    index, so a pixel where every foreground map is 0 is background, and an image without
    any foreground label is all background.

    Args:
        cams: (B, C, h, w) teacher CAMs (channel 0 is ignored).
        labels: (B, C-1) multi-hot foreground labels y.
    Returns:
        (B, h, w) int64 class ids in 0..C-1.
    """
    b, c, h, w = cams.shape
    if labels.shape != (b, c - 1):
        raise ValueError(f"labels must be (B, C-1) = {(b, c - 1)}, got {tuple(labels.shape)}")
    fg = F.relu(cams[:, 1:] * labels.to(cams.dtype)[:, :, None, None])
    fg = fg / (fg.amax(dim=(2, 3), keepdim=True) + MAX_NORM_EPS)
    bg = 1.0 - fg.amax(dim=1, keepdim=True)
    return torch.cat([bg, fg], dim=1).argmax(dim=1)


def smooth_targets(label: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Label-smoothed per-pixel target distribution.

    ``1 - eps`` for the pixel's class and ``eps / (C - 1)`` for each other class, so every
    pixel's target sums to 1.

    Args:
        label: (B, h, w) int64 class ids in 0..C-1.
        num_classes: C (background included), at least 2.
        eps: smoothing mass moved off the labelled class, in [0, 1).
    Returns:
        (B, C, h, w) float32 target.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts background and at least one class, got {num_classes}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    off = eps / (num_classes - 1)
    one_hot = F.one_hot(label, num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return one_hot * (1.0 - eps - off) + off


def class_balanced_ce(logits: torch.Tensor, target: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax(logits) against a soft target, balanced between background
    and foreground pixels.

    Per pixel ``ce = -sum_c target_c * log_softmax(logits)_c``. The loss is the mean of
    ``ce`` over background pixels (label 0) and the mean over foreground pixels (label > 0),
    pooled over the batch, then the average of these two means. A group without pixels is
    left out of the average (the loss is then the other group's mean), so a batch that is
    all background or all foreground gives a finite loss of the usual size, never NaN and
    never half of it. Computed without host synchronisation.

    Args:
        logits: (B, C, h, w) student activation map (am_S); computed in float32.
        target: (B, C, h, w) per-pixel target distribution (see :func:`smooth_targets`).
        label: (B, h, w) int64 class ids that define the two groups.
    Returns:
        Scalar float32 loss.
    """
    if logits.shape != target.shape or label.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                         f"label {tuple(label.shape)}")
    ce = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    bg = (label == 0).to(ce.dtype)
    fg = 1.0 - bg
    n_bg, n_fg = bg.sum(), fg.sum()
    bg_mean = (ce * bg).sum() / n_bg.clamp(min=1.0)
    fg_mean = (ce * fg).sum() / n_fg.clamp(min=1.0)
    groups = (n_bg > 0).to(ce.dtype) + (n_fg > 0).to(ce.dtype)
    return (bg_mean + fg_mean) / groups
