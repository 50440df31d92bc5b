"""Multi-scale CAM aggregation, normalisation and pseudo-labels (method spec section 4).

Pure torch functions, usable on any device. The inference procedure, per image of size
H x W with foreground labels y (C-1,):

1. every view (scale x flip) gives maps (K, h, w) at feature resolution; only the
   channels of :func:`present_keys` are kept, which equals multiplying by ``[1, y]``
   (BAO, background kept) or ``y`` (TransCAM) and dropping the zero channels;
2. :func:`fold_views`: bilinear upsampling to H x W (align_corners False), flipped views
   flipped back, summed over views (and, by the caller, over scales);
3. :func:`normalize_maps`: the published rule, literally: negatives clamped to 0, values
   below ``min + 1e-5`` set to 0, then per channel ``(v - min - 1e-5) / (max - min + 1e-5)``;
   the zeroed values therefore come out slightly negative, ``-(min + 1e-5) / (max - min + 1e-5)``;
4. :func:`pseudo_labels`: argmax over the channels (ties go to the lower class id), or over
   ``[t, foreground maps]`` for thresholded TransCAM maps. The published argmax runs over all
   C channels, the absent classes' zero maps (-1 once normalised) included:
   :mod:`tool.labelrule` gives the same labels without materialising C full-size maps.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tool.labelrule import with_absent_classes

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
    """Per-channel min/max normalisation of summed maps, the published rule (spec section 4, step 3).

    With ``mn``/``mx`` the channel's spatial min and max after clamping negatives to 0: values
    below ``mn + 1e-5`` become 0, then every value ``v`` becomes
    ``(v - mn - 1e-5) / (mx - mn + 1e-5)``. The zeroed values, at least the channel's minimum,
    end at ``-(mn + 1e-5) / (mx - mn + 1e-5)``, which is negative (not clamped, as published);
    an all-zero channel becomes -1 everywhere. The others lie in (0, 1).

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
    maps = maps.masked_fill(maps < mn + NORM_EPS, 0.0)
    return (maps - mn - NORM_EPS) / (mx - mn + NORM_EPS)


def pseudo_labels(maps: torch.Tensor, keys: torch.Tensor, background_score: float | None = None,
                  num_classes: int | None = None, device_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Label map from normalised maps.

    Args:
        maps: (K, H, W) normalised maps of the classes ``keys``.
        keys: (K,) int64 strictly increasing class ids of the channels.
        background_score: None for BAO maps (key 0 must be the learned background: plain
            argmax, no threshold); a threshold t for foreground-only maps (TransCAM), used
            as a constant background channel. Keys other than foreground are then ignored.
        num_classes: C, needed for BAO maps: the classes missing from ``keys`` take part
            in the argmax with the score -1 of their all-zero normalised maps, as in the
            published argmax over all C channels (they win only where every present map
            lies below -1, or at -1 with a higher id).
        device_keys: ``keys`` already on the maps' device, when the caller holds them: on a
            GPU a copy of ``keys`` there would wait for every queued kernel.
    Returns:
        (H, W) int64 class ids on the maps' device; ties go to the lower class id.
    """
    ids = keys.to(maps.device) if device_keys is None else device_keys
    if background_score is None:
        if keys.numel() == 0 or int(keys[0]) != 0:
            raise ValueError("threshold-free labels need the background map (key 0) as first channel")
        if num_classes is None:
            raise ValueError("threshold-free labels need num_classes (the absent classes take part in the argmax)")
        score, best = maps.max(dim=0)
        return with_absent_classes(ids[best], score, keys.tolist(), num_classes)
    fg = keys > 0
    if not bool(fg.all()):  # drop the non-foreground channels (TransCAM maps have none)
        maps, ids = maps[fg.to(maps.device)], keys[fg].to(maps.device)
    stack = torch.cat([maps.new_full((1,) + tuple(maps.shape[1:]), float(background_score)), maps])
    return torch.cat([ids.new_zeros(1), ids])[stack.argmax(dim=0)]
