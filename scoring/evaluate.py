"""Evaluation of folders of label maps or CAM files against ground truth, and the labels of
CAM files at one background score, on :mod:`core.workers`' process pool.

The counts come from :mod:`scoring.metrics` (confusion matrices, the one-pass threshold sweep);
each worker reads a chunk of the listed files and returns its summed counts, so only small
arrays travel between processes. Errors a user can cause raise :class:`UserError` with an
``about`` of :data:`scoring.metrics.ABOUT`.

At one background score, :func:`write_threshold_labels` also writes those labels as PNGs
(optionally refined by the dense CRF of :mod:`crf.refine`): the published way of making
threshold-based pseudo-labels from CAM files.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from core.errors import UserError
from core.fileio import remove_temporaries
from core.palette import read_label_png, save_label_png
from core.workers import TaskPool, default_workers
from data.camio import CAM_SUFFIX, load_cams
from data.classes import ClassSet
from data.images import read_image
from scoring.metrics import (argmax_labels, check_ids, check_thresholds, confusion, confusions_from_bins, shape_text,
                             sweep_bins, threshold_labels)

IMAGE_SUFFIX = ".jpg"  # images read for the CRF: <image folder>/<name>.jpg, as published


@dataclass(frozen=True)
class _Job:
    """What a worker needs to score a chunk of images (small; sent to every worker)."""

    pred_dir: str
    gt_dir: str
    classes: ClassSet
    thresholds: np.ndarray | None  # None: PNG label maps; else CAM files swept over these
    bg_from_file: bool


def _read_gt(job: _Job | _LabelJob, name: str) -> tuple[np.ndarray, str]:
    path = os.path.join(job.gt_dir, f"{name}.png")
    return read_label_png(path), path


def _score_chunk(args: tuple[_Job, list[str]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Worker: read the chunk's files and return its summed counts (only small arrays travel).

    PNG: (confusion (C, C), None). CAMs: (sweep bins (T+1, C, C), threshold-free confusion
    (C, C) or None).
    """
    job, names = args
    c = job.classes.num_classes
    if job.thresholds is None:
        total = np.zeros((c, c), np.int64)
        for name in names:
            gt, gt_path = _read_gt(job, name)
            pred_path = os.path.join(job.pred_dir, f"{name}.png")
            total += confusion(gt, read_label_png(pred_path), job.classes, gt_path, pred_path)
        return total, None
    bins = np.zeros((job.thresholds.size + 1, c, c), np.int64)
    free = np.zeros((c, c), np.int64) if job.bg_from_file else None
    for name in names:
        gt, gt_path = _read_gt(job, name)
        cam_path = os.path.join(job.pred_dir, f"{name}{CAM_SUFFIX}")
        keys, cams = load_cams(cam_path)
        bins += sweep_bins(gt, keys, cams, job.thresholds, job.classes, gt_path, cam_path)
        if free is not None:
            label = argmax_labels(keys, cams, c, cam_path).astype(np.uint8)
            free += confusion(gt, label, job.classes, gt_path, cam_path)
    return bins, free


def _check_folder(folder: str | os.PathLike, what: str, about: str) -> None:
    if not Path(folder).is_dir():
        raise UserError(f"{what} folder not found: {folder}", about=about)


def _check_files(names: Sequence[str], folder: str | os.PathLike, suffix: str, what: str, about: str,
                 other_hints: dict[str, tuple[str, str | None]] | None = None) -> None:
    """Raise :class:`UserError` (``about``) saying how many and which first listed files are missing.

    ``other_hints`` maps a suffix to the (hint, about) used instead when the first missing
    name exists with that suffix (a folder of the other prediction type, published files).
    """
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, f"{n}{suffix}"))]
    if not missing:
        return
    first = missing[0]
    hint = "check the folder and the list"
    for other, (other_hint, other_about) in (other_hints or {}).items():
        if os.path.isfile(os.path.join(folder, f"{first}{other}")):
            hint, about = f"{first}{other} exists: {other_hint}", other_about
            break
    raise UserError(f"{len(missing)} of {len(names)} {what} missing in {folder} (first: {first}{suffix}); {hint}",
                    about=about)


def _check_inputs(names: Sequence[str], pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, what: str,
                  suffix: str, other_hints: dict[str, tuple[str, str | None]]) -> None:
    """Both folders exist and hold a file of every listed name (ground truth checked first)."""
    _check_folder(pred_dir, what, "prediction_folder")
    _check_folder(gt_dir, "ground-truth", "ground_truth_folder")
    _check_files(names, gt_dir, ".png", "ground-truth masks", "ground_truth")
    _check_files(names, pred_dir, suffix, "predictions" if suffix == ".png" else "CAM files", "predictions",
                 other_hints)


def _chunks(names: Sequence[str], workers: int) -> list[list[str]]:
    # About four chunks per worker balances the load; each chunk returns one summed array,
    # so even a 91-threshold sweep with 81 classes sends few megabytes between processes.
    size = max(1, math.ceil(len(names) / (workers * 4))) if workers > 1 else 16
    return [list(names[i:i + size]) for i in range(0, len(names), size)]


def _pool_size(names: Sequence[str], workers: int | None) -> int:
    """The processes :func:`_run` reads ``names`` in (1: this one)."""
    workers = default_workers() if workers is None else max(1, int(workers))
    return min(workers, len(_chunks(names, workers)))


def _run(job: _Job | _LabelJob, names: Sequence[str], workers: int | None, progress: bool, desc: str,
         work: Callable[[tuple], tuple] = _score_chunk) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Run ``work`` on chunks of ``names`` with ``job`` in ``workers`` processes (1: in this
    process) and sum the chunk results (pairs of arrays or None)."""
    if not names:
        raise UserError("no images to evaluate: the list is empty")
    workers = _pool_size(names, workers)
    chunks = _chunks(names, workers)
    total: list[np.ndarray | None] = [None, None]
    # One worker reads in this process (no pool); on an error (e.g. a UserError from one
    # file) leaving the pool's block cancels the chunks not yet read. The workers are forked:
    # the evaluation needs no CUDA and no torch, and forked readers start at once.
    with TaskPool(workers if workers > 1 else 0, start="fork") as pool, \
            tqdm(total=len(names), desc=desc, unit="img", disable=not progress) as bar:
        for size, result in zip(map(len, chunks), pool.map(work, [(job, chunk) for chunk in chunks])):
            total = [r if t is None else (t if r is None else t + r) for t, r in zip(total, result)]
            bar.update(size)
    return total[0], total[1]


def evaluate_labels(names: Sequence[str], pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                    classes: ClassSet, workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Confusion matrix (C, C) of the label maps ``<pred_dir>/<name>.png`` against
    ``<gt_dir>/<name>.png`` over ``names``, files read in ``workers`` processes."""
    _check_inputs(names, pred_dir, gt_dir, "prediction", ".png",
                  {CAM_SUFFIX: ("this folder holds CAM files, not label maps", "cams_not_labels")})
    job = _Job(str(pred_dir), str(gt_dir), classes, None, False)
    return _run(job, names, workers, progress, "evaluate")[0]


def evaluate_cams(names: Sequence[str], cam_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                  classes: ClassSet, thresholds: np.ndarray, bg_from_file: bool = False,
                  workers: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Sweep the CAM files ``<cam_dir>/<name>.npz`` over background scores, reading each once.

    Returns confusion matrices (T, C, C), one per threshold of ``thresholds`` (T,) ascending,
    and, with ``bg_from_file``, the (C, C) confusion of the threshold-free argmax over all
    maps including the learned background (else None).
    """
    thresholds = check_thresholds(thresholds)
    _check_inputs(names, cam_dir, gt_dir, "CAM", CAM_SUFFIX, {
        ".npy": (".npy files of the published scripts (pickled dictionaries) are not read; regenerate the "
                 "maps with this repository's infer_bao.py, which writes <name>.npz", None),
        ".png": ("this folder holds label maps, not CAM files", "labels_not_cams"),
    })
    job = _Job(str(cam_dir), str(gt_dir), classes, thresholds, bg_from_file)
    bins, free = _run(job, names, workers, progress, "evaluate")
    return confusions_from_bins(bins), free


@dataclass(frozen=True)
class _LabelJob:
    """What a worker needs to write the labels of a chunk of CAM files at one background score."""

    cam_dir: str
    gt_dir: str
    classes: ClassSet
    threshold: float
    label_dir: str | None  # the thresholded labels; None: not written
    image_dir: str | None  # images for the CRF; None: no CRF
    crf_dir: str | None  # the CRF-refined labels; None: not written (but scored)
    crf_backend: str = "auto"  # crf.params.BACKENDS; the torch CRF runs on the CPU
    crf_threads: int | None = None  # torch threads of a worker process (None: unchanged)


def _label_chunk(args: tuple[_LabelJob, list[str]]) -> tuple[np.ndarray | None, None]:
    """Worker: write the chunk's labels (and CRF labels); return the CRF labels' confusion (C, C) or None."""
    job, names = args
    c = job.classes.num_classes
    crf_conf = None
    if job.image_dir is not None:
        from crf.refine import crf_refine_labels, limit_torch_threads  # pydensecrf is imported only where the CRF runs

        limit_torch_threads(job.crf_backend, job.crf_threads)
        crf_conf = np.zeros((c, c), np.int64)
    for name in names:
        cam_path = os.path.join(job.cam_dir, f"{name}{CAM_SUFFIX}")
        keys, cams = load_cams(cam_path)
        check_ids(keys, job.classes, f"{cam_path} (its 'keys')", allow_ignore=False)
        label = threshold_labels(keys, cams, job.threshold).astype(np.uint8)
        if job.label_dir is not None:
            save_label_png(os.path.join(job.label_dir, f"{name}.png"), label)
        if crf_conf is None:
            continue
        image_path = os.path.join(job.image_dir, f"{name}{IMAGE_SUFFIX}")
        image = read_image(image_path)
        if image.shape[:2] != label.shape:
            raise UserError(f"{image_path} has size {shape_text(image.shape)} but {cam_path} has maps of size "
                            f"{shape_text(label.shape)}; the images must be the originals the maps were made from",
                            about="images")
        refined = crf_refine_labels(image, label, c, backend=job.crf_backend)
        if job.crf_dir is not None:
            save_label_png(os.path.join(job.crf_dir, f"{name}.png"), refined)
        gt, gt_path = _read_gt(job, name)
        crf_conf += confusion(gt, refined, job.classes, gt_path, f"the CRF labels of {cam_path}")
    return crf_conf, None


def write_threshold_labels(names: Sequence[str], cam_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                           classes: ClassSet, t: float, label_dir: str | os.PathLike | None,
                           image_dir: str | os.PathLike | None = None, crf_dir: str | os.PathLike | None = None,
                           workers: int | None = None, progress: bool = True,
                           crf_backend: str = "auto") -> np.ndarray | None:
    """Write the labels of the CAM files ``<cam_dir>/<name>.npz`` at background score ``t``.

    Each label map (:func:`threshold_labels`) goes to ``<label_dir>/<name>.png`` (palette PNG,
    atomically) unless ``label_dir`` is None. With ``image_dir``, the label map is also refined
    by the dense CRF (:mod:`crf.refine`, the class count of ``classes``) on the image
    ``<image_dir>/<name>.jpg``, written to ``<crf_dir>/<name>.png`` unless ``crf_dir`` is None,
    and scored against ``<gt_dir>/<name>.png``: returns that confusion matrix (C, C), else None.
    ``crf_backend``: one of :data:`crf.params.BACKENDS`; the torch CRF runs on the CPU, with one
    thread in each worker process.
    Every listed file is checked to exist before any is written.
    """
    _check_inputs(names, cam_dir, gt_dir, "CAM", CAM_SUFFIX, {})
    if image_dir is not None:
        _check_folder(image_dir, "image", "images")
        _check_files(names, image_dir, IMAGE_SUFFIX, "images", "images")
    for folder in (label_dir, crf_dir):
        if folder is not None:
            remove_temporaries(folder, ".png", set(names))  # of an interrupted run
    job = _LabelJob(str(cam_dir), str(gt_dir), classes, float(t), None if label_dir is None else str(label_dir),
                    None if image_dir is None else str(image_dir), None if crf_dir is None else str(crf_dir),
                    crf_backend, 1 if _pool_size(names, workers) > 1 else None)
    return _run(job, names, workers, progress, "labels", _label_chunk)[0]
