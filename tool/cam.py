"""Multi-scale CAM aggregation, normalisation and pseudo-labels (method spec section 4).

Pure torch functions, usable on any device. The inference procedure, per image of size
H x W with foreground labels y (C-1,):

1. every view (scale x flip) gives maps (K, h, w) at feature resolution; only the
   channels of :func:`present_keys` are kept, which equals multiplying by ``[1, y]``
   (BAO, background kept) or ``y`` (TransCAM) and dropping the zero channels;
2. :func:`fold_views`: bilinear upsampling to H x W (align_corners False), flipped views
   flipped back, summed over views (and, by the caller, over scales);
3. :func:`normalize_maps`: negatives clamped to 0, then per channel
   ``(v - min - 1e-5) / (max - min + 1e-5)`` with values below ``min + 1e-5`` set to 0;
4. :func:`pseudo_labels`: argmax over the channels (ties go to the lower class id, so to
   background), or over ``[t, foreground maps]`` for thresholded TransCAM maps.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5  # the published normalisation constant


def present_keys(label: torch.Tensor, background: bool) -> torch.Tensor:
    """Class ids of the channels kept for one image.

    Args:
        label: (C-1,) multi-hot foreground labels.
        background: prepend id 0 (the learned BAO background map).
    Returns:
        (K',) int64 strictly increasing class ids, K' = number of present classes (+ 1).
    """
    fg = torch.nonzero(label > 0.5).flatten().to(torch.int64) + 1
    if background:
        fg = torch.cat([fg.new_zeros(1), fg])
    return fg


def fold_views(maps: torch.Tensor, size: tuple[int, int], flipped: Sequence[bool]) -> torch.Tensor:
    """Bring the views of one image to its original size and sum them.

    Args:
        maps: (V, K, h, w) maps of V views at feature resolution.
        size: (H, W) original image size.
        flipped: V flags, True where the view's input was flipped horizontally.
    Returns:
        (K, H, W) float32 sum over the views, in the original (unflipped) orientation.
    """
    if len(flipped) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} views but {len(flipped)} flip flags")
    up = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=False)
    total = up.new_zeros(up.shape[1:])
    for view, flip in zip(up, flipped):
        total += view.flip(-1) if flip else view
    return total


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-channel min/max normalisation of summed maps to [0, 1).

    Negatives are clamped to 0 first; then with ``mn``/``mx`` the channel's spatial min and
    max, ``(v - mn - 1e-5) / (mx - mn + 1e-5)``, where values below ``mn + 1e-5`` (which
    would come out negative) are 0. An all-constant channel becomes all 0.

    Args:
        maps: (..., K, H, W) summed maps.
    Returns:
        (..., K, H, W) float32 normalised maps.
    """
    maps = maps.float().clamp_min(0)
    if maps.numel() == 0:
        return maps
    mn = maps.amin(dim=(-2, -1), keepdim=True)
    mx = maps.amax(dim=(-2, -1), keepdim=True)
    return ((maps - mn - NORM_EPS) / (mx - mn + NORM_EPS)).clamp_min(0)


def pseudo_labels(maps: torch.Tensor, keys: torch.Tensor, background_score: float | None = None) -> torch.Tensor:
    """Label map from normalised maps.

    Args:
        maps: (K, H, W) normalised maps of the classes ``keys``.
        keys: (K,) int64 class ids of the channels.
        background_score: None for BAO maps (key 0 must be the learned background: plain
            argmax, no threshold); a threshold t for foreground-only maps (TransCAM), used
            as a constant background channel. Keys other than foreground are then ignored.
    Returns:
        (H, W) int64 class ids; ties go to the lower channel, i.e. to background.
    """
    if background_score is None:
        if keys.numel() == 0 or int(keys[0]) != 0:
            raise ValueError("threshold-free labels need the background map (key 0) as first channel")
        return keys.to(maps.device)[maps.argmax(dim=0)]
    fg = keys > 0
    stack = torch.cat([maps.new_full((1,) + tuple(maps.shape[1:]), float(background_score)), maps[fg.to(maps.device)]])
    ids = torch.cat([keys.new_zeros(1), keys[fg]]).to(maps.device)
    return ids[stack.argmax(dim=0)]
