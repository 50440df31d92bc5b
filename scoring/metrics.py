"""Segmentation metrics: confusion matrices, IoU scores, the one-pass threshold sweep, labels
of CAM files (threshold-free argmax, one background score) and the result tables; the
evaluation of whole folders is :mod:`scoring.evaluate`.

Conventions: a confusion matrix ``conf`` is int64 (C, C) with rows = ground-truth class and
columns = predicted class. Ground-truth 255 is ignored. The classes are a
:class:`data.classes.ClassSet`, always passed explicitly: ids must lie in 0..C-1 and not be
one of its unused ids (the ten unused COCO category ids of the raw-id convention).

Errors a user can cause raise :class:`UserError` stating the problem without command-line
terms; its ``about`` names what it is about (:data:`ABOUT`), so that an entry script can add
the flag that fixes it.

The threshold sweep (CAM files): at background score t, a pixel's label is the argmax over
[t, foreground maps] with ties going to background. With m = the pixel's highest
foreground score and c its class, the pixel is c for every t < m and background otherwise.
So one pass counts pixels by (number of thresholds below m, gt, c), and cumulative sums
over that first axis give the confusion matrix of every threshold at once.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable

import numpy as np

from core.errors import UserError
from core.palette import IGNORE_INDEX
from data.classes import COCO, COCO_RAW, ClassSet
from tool.labelrule import with_absent_classes

# The background scores swept by default: (start, stop included, step).
DEFAULT_SWEEP = (0.05, 0.95, 0.01)
_SCORE_KEYS = ("iou", "fp", "fn", "precision", "recall")

# The ``about`` of the UserErrors raised here -> what it is about (entry scripts add their flags).
ABOUT = {
    "prediction_folder": "the folder of predictions (label maps or CAM files) does not exist",
    "ground_truth_folder": "the ground-truth folder does not exist",
    "predictions": "listed predictions are missing",
    "ground_truth": "listed ground-truth masks are missing",
    "cams_not_labels": "label maps were expected, the folder holds CAM files",
    "labels_not_cams": "CAM files were expected, the folder holds label maps",
    "class_ids": "a file holds ids that are not classes of the class set",
    "coco_contiguous_ids": "contiguous COCO ids evaluated as raw COCO category ids",
    "coco_raw_ids": "raw COCO category ids evaluated as contiguous COCO ids",
    "background_map": "the threshold-free argmax got maps without a background map",
    "images": "listed images (read by the CRF) are missing or do not match their CAM files",
}


def check_ids(ids: Iterable[int], classes: ClassSet, source: str, allow_ignore: bool) -> None:
    """Raise :class:`UserError` if any of ``ids`` (ids present in ``source``) is not a class.

    ``allow_ignore`` admits 255 (ground truth). The message names the file, the ids and the
    range; with the COCO class sets it explains convention mismatches (raw ids evaluated as
    contiguous ids, contiguous ids as raw ids).
    """
    count, valid = classes.num_classes, classes.valid
    bad = [int(i) for i in ids if not (i < count and valid[i]) and not (allow_ignore and i == IGNORE_INDEX)]
    if not bad:
        return
    shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
    msg = f"{source} contains class id(s) {shown} outside the {count}-class range 0..{count - 1}"
    about = "class_ids"
    if any(i in classes.unused for i in bad):
        unused = ", ".join(map(str, classes.unused))
        if classes.unused == COCO_RAW.unused:
            msg = (f"{source} contains class id(s) {shown}, which are unused COCO category ids: in the raw-id "
                   f"convention ids are COCO category ids and {unused} never occur; these look like "
                   "contiguous ids 1..80")
            about = "coco_contiguous_ids"
        else:
            msg = f"{source} contains class id(s) {shown}, which are unused ids ({unused}) of these {count} classes"
    elif classes == COCO and all(count <= i <= 90 for i in bad):
        msg += ("; ids above 80 are raw COCO category ids (the raw-id convention, 91 classes), but contiguous "
                "COCO ids are 1..80")
        about = "coco_raw_ids"
    elif IGNORE_INDEX in bad and not allow_ignore:
        msg += "; 255 (ignore) is allowed in ground truth only: a prediction needs a class for every pixel"
        about = None
    else:
        msg += "; check the classes evaluated with and that the file holds class ids"
    raise UserError(msg, about=about)


def _present(counts: np.ndarray) -> np.ndarray:
    return np.flatnonzero(counts)


def confusion(gt: np.ndarray, pred: np.ndarray, classes: ClassSet,
              gt_name: str = "ground truth", pred_name: str = "prediction") -> np.ndarray:
    """Confusion matrix (C, C) int64 of uint8 label maps ``gt`` and ``pred`` (same shape).

    One bincount over the joint (gt, pred) byte pair gives all counts and the ids present in
    either map; ids outside the class range raise :class:`UserError` naming the file.
    """
    if gt.dtype != np.uint8 or pred.dtype != np.uint8:
        raise ValueError(f"label maps must be uint8, got {gt.dtype} and {pred.dtype}")
    if gt.shape != pred.shape:
        raise UserError(
            f"{pred_name} has size {shape_text(pred.shape)} but {gt_name} has size {shape_text(gt.shape)}; "
            "predictions must have the resolution of the original image"
        )
    pair = gt.astype(np.uint16)  # in-place uint16 ops: a third faster than intp temporaries
    pair <<= 8
    pair |= pred
    joint = np.bincount(pair.reshape(-1), minlength=256 * 256).reshape(256, 256)
    check_ids(_present(joint.sum(axis=1)), classes, gt_name, allow_ignore=True)
    check_ids(_present(joint.sum(axis=0)), classes, pred_name, allow_ignore=False)
    count = classes.num_classes
    return joint[:count, :count].copy()


def shape_text(shape: tuple[int, ...]) -> str:
    """An image size for messages: shape (H, W, ...) -> ``"<W>x<H> (WxH)"``."""
    return f"{shape[1]}x{shape[0]} (WxH)" if len(shape) >= 2 else str(shape)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def scores(conf: np.ndarray, classes: ClassSet) -> dict:
    """Per-class and mean scores of a confusion matrix (C, C).

    With T = gt pixels, P = predicted pixels and TP = their overlap of a class:
    IoU = TP / (T + P - TP), FP = (P - TP) / (T + P - TP), FN = (T - TP) / (T + P - TP),
    precision = TP / P, recall = TP / T. Undefined ratios (a class absent from both, or
    from P for precision, from T for recall) are NaN and skipped in the means, as are the
    unused ids of ``classes``.

    Returns a dict with (C,) float64 arrays ``iou fp fn precision recall``, (C,) int64
    ``tp gt_pixels pred_pixels`` and floats ``miou mean_fp mean_fn mean_precision mean_recall``.
    """
    conf = np.asarray(conf, np.int64)
    if conf.shape != (classes.num_classes,) * 2:
        raise ValueError(f"confusion matrix of shape {conf.shape} for {classes.num_classes} classes")
    valid = classes.valid
    tp = np.diag(conf).copy()
    t = conf.sum(axis=1)
    p = conf.sum(axis=0)
    union = (t + p - tp).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "iou": tp / union,
            "fp": (p - tp) / union,
            "fn": (t - tp) / union,
            "precision": tp / p.astype(np.float64),
            "recall": tp / t.astype(np.float64),
        }
    for key in _SCORE_KEYS:
        out[key][~valid] = np.nan
    out.update(tp=tp, gt_pixels=t, pred_pixels=p)
    out["miou"] = _nanmean(out["iou"])
    for key in ("fp", "fn", "precision", "recall"):
        out[f"mean_{key}"] = _nanmean(out[key])
    return out


def threshold_range(start: float, stop: float, step: float) -> np.ndarray:
    """Background scores start, start+step, ..., stop (stop included), float32, ascending.

    Values are rounded to 6 decimals first so that 0.05 + 0.01 * i gives the usual numbers.
    """
    if not (step > 0 and stop >= start):
        raise UserError(f"bad threshold range start={start} stop={stop} step={step}: need step > 0 and stop >= start")
    count = int(math.floor((stop - start) / step + 1e-6)) + 1
    return np.round(start + step * np.arange(count), 6).astype(np.float32)


def check_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """``thresholds`` as a (T,) float32 array; ValueError unless non-empty and strictly increasing."""
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    if thresholds.size == 0 or np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be a non-empty strictly increasing sequence")
    return thresholds


def _argmax0(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index (N,) intp and value (N,) float32 of the maximum over the first axis of (K, N) maps.

    Ties go to the lowest index, as np.argmax; a running maximum over the few maps is several
    times faster than np.argmax along a strided axis.
    """
    best = np.zeros(maps.shape[1], np.intp)
    if maps.shape[0] == 1:
        return best, maps[0]
    score = maps[0].copy()
    for i in range(1, maps.shape[0]):
        best[maps[i] > score] = i
        np.maximum(score, maps[i], out=score)
    return best, score


def argmax_labels(keys: np.ndarray, cams: np.ndarray, num_classes: int, source: str = "CAM file") -> np.ndarray:
    """Threshold-free labels (H, W) int64: the published argmax over all ``num_classes`` maps,
    the learned background (key 0, which must be present) and the absent classes
    (:mod:`tool.labelrule`) included; ties go to the lower class id. Equals
    :func:`tool.cam.pseudo_labels` without a threshold."""
    if keys.size == 0 or keys[0] != 0:
        raise UserError(
            f"{source} has no background map (key 0): the threshold-free argmax needs BAO maps from "
            "infer_bao.py (TransCAM CAMs have no background map; sweep thresholds instead)",
            about="background_map",
        )
    best, score = _argmax0(cams.reshape(keys.size, -1))
    return with_absent_classes(keys[best], score, keys, num_classes).reshape(cams.shape[1:])


def threshold_labels(keys: np.ndarray, cams: np.ndarray, t: float) -> np.ndarray:
    """Labels (H, W) int64 at background score ``t``: the argmax over [t, foreground maps],
    ties going to background, then to the lower class id.

    keys (K,) class ids, cams (K, H, W) float32; a learned background map (key 0) is ignored,
    as in the sweep. Equals :func:`tool.cam.pseudo_labels` with ``t`` (what ``infer_bao.py
    --t`` writes) on the same maps; numpy, so that evaluation does not need torch.
    """
    fg = keys > 0
    fg_keys = keys[fg]
    if fg_keys.size == 0:
        return np.zeros(cams.shape[1:], np.int64)
    best, score = _argmax0(cams[fg].reshape(fg_keys.size, -1))
    # t compared in float32, as the background channel pseudo_labels stacks onto float32 maps
    return np.where(score > np.float32(t), fg_keys[best], 0).reshape(cams.shape[1:])


@functools.lru_cache(maxsize=8)
def _bucket_counts(threshold_bytes: bytes) -> np.ndarray:
    """(65536,) intp lookup table over the float32 values sharing their top 16 bits (a
    contiguous range of values): the number of thresholds below every value of the bucket,
    or -1 where a threshold lies inside the bucket's range so values need an exact search."""
    thresholds = np.frombuffer(threshold_bytes, np.float32)
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    first = np.searchsorted(thresholds, top.view(np.float32), side="left")
    last = np.searchsorted(thresholds, (top | 0xFFFF).view(np.float32), side="left")
    return np.where(first == last, first, -1).astype(np.intp)


def _count_below(thresholds: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(N,) intp: how many of ``thresholds`` (T,) float32 ascending are < each of ``score`` (N,)
    float32. Equal to np.searchsorted(thresholds, score, "left"), several times faster: a
    table lookup on the top 16 bits settles all but the values near a threshold."""
    below = _bucket_counts(thresholds.tobytes())[np.ascontiguousarray(score).view(np.uint32) >> 16]
    near = np.flatnonzero(below < 0)
    below[near] = np.searchsorted(thresholds, score[near], side="left")
    return below


def sweep_bins(gt: np.ndarray, keys: np.ndarray, cams: np.ndarray, thresholds: np.ndarray,
               classes: ClassSet, gt_name: str = "ground truth", cam_name: str = "CAM file") -> np.ndarray:
    """Counts (T+1, C, C) int64 of one image for :func:`confusions_from_bins`.

    ``bins[k, g, c]``: pixels with ground truth g whose best foreground class is c and for
    which exactly k thresholds lie below its score m (so it is c at thresholds 0..k-1 and
    background from k on; m equal to a threshold counts as background there). Pixels
    without any foreground map are counted at k = 0.
    gt (H, W) uint8, keys (K,), cams (K, H, W) float32, thresholds (T,) ascending. Sizes and
    ids are checked (:class:`UserError` naming ``gt_name`` / ``cam_name``).
    """
    thresholds = check_thresholds(thresholds)
    if cams.shape[1:] != gt.shape:
        raise UserError(
            f"{cam_name} has maps of size {shape_text(cams.shape[1:])} but {gt_name} has size "
            f"{shape_text(gt.shape)}; CAMs must have the resolution of the original image"
        )
    check_ids(keys, classes, f"{cam_name} (its 'keys')", allow_ignore=False)
    check_ids(_present(np.bincount(gt.reshape(-1), minlength=256)), classes, gt_name, allow_ignore=True)
    count, c = thresholds.size, classes.num_classes
    # ignored pixels (255) go to an extra ground-truth row c that is dropped at the end,
    # which is cheaper than selecting the kept pixels of every array
    g = np.minimum(gt.reshape(-1), c)
    bins = np.zeros((count + 1, c, c), np.int64)
    fg_maps = cams[1:] if keys.size and keys[0] == 0 else cams  # keys ascending: 0 comes first
    fg_keys = keys[keys > 0]
    k = fg_keys.size
    if k == 0:
        bins[0, :, 0] = np.bincount(g, minlength=c + 1)[:c]
        return bins
    best, score = _argmax0(fg_maps.reshape(k, -1))
    flat = _count_below(thresholds, score)
    flat *= c + 1
    flat += g
    if k > 1:
        flat *= k
        flat += best
    hist = np.bincount(flat, minlength=(count + 1) * (c + 1) * k).reshape(count + 1, c + 1, k)
    bins[:, :, fg_keys] = hist[:, :c]
    return bins


def confusions_from_bins(bins: np.ndarray) -> np.ndarray:
    """Confusion matrices (T, C, C) of every threshold from summed :func:`sweep_bins` counts.

    At threshold j a pixel is foreground iff its bin k > j (suffix sums over k) and
    background otherwise (prefix sums over k, all into column 0).
    """
    count = bins.shape[0] - 1
    conf = np.cumsum(bins[::-1], axis=0)[::-1][1:].copy()
    conf[:, :, 0] = np.cumsum(bins.sum(axis=2), axis=0)[:count]
    return conf


def sweep_confusions(gt: np.ndarray, keys: np.ndarray, cams: np.ndarray, thresholds: np.ndarray,
                     classes: ClassSet) -> np.ndarray:
    """Confusion matrices (T, C, C) of one image at every threshold, in one pass."""
    return confusions_from_bins(sweep_bins(gt, keys, cams, thresholds, classes))


# ---------------------------------------------------------------- reporting


def format_table(result: dict, classes: ClassSet) -> str:
    """The per-class table (IoU, FP, FN, precision, recall in %) and the mean line of :func:`scores`,
    one row per class of ``classes`` (its unused ids left out), named by its names."""
    names, valid = classes.names, classes.valid
    width = max(12, max(len(n) for n in names) + 1)
    head = f"{'class':<{width}}{'IoU':>8}{'FP':>8}{'FN':>8}{'prec':>8}{'recall':>8}"
    lines = [head, "-" * len(head)]
    for i, name in enumerate(names):
        if valid[i]:
            lines.append(f"{name:<{width}}" + "".join(_pct(result[k][i]) for k in _SCORE_KEYS))
    lines.append("-" * len(head))
    lines.append(f"{'mean':<{width}}" + _pct(result["miou"])
                 + "".join(_pct(result[f"mean_{k}"]) for k in ("fp", "fn", "precision", "recall")))
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{'nan':>8}" if np.isnan(value) else f"{100 * value:8.2f}"


def scores_to_json(result: dict, classes: ClassSet) -> dict:
    """A JSON-ready copy of :func:`scores` output: fractions in 0..1, NaN as null, per class of
    ``classes`` by id and name (its unused ids left out)."""
    def num(v: float) -> float | None:
        return None if np.isnan(v) else float(v)

    names, valid = classes.names, classes.valid
    per_class = [
        {"id": i, "class": names[i], **{k: num(result[k][i]) for k in _SCORE_KEYS},
         "tp": int(result["tp"][i]), "gt_pixels": int(result["gt_pixels"][i]),
         "pred_pixels": int(result["pred_pixels"][i])}
        for i in range(classes.num_classes) if valid[i]
    ]
    means = {k: num(result[k]) for k in ("miou", "mean_fp", "mean_fn", "mean_precision", "mean_recall")}
    return {**means, "classes": per_class}
