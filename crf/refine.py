"""Dense-CRF refinement: of a label map (method spec section 4, step 5), and of class
probabilities (the segmentation stage, :func:`crf_refine_probs`), by pydensecrf2 or by
its torch re-implementation (crf/densecrf.py), which gives the same labels on the CPU or a GPU.

For a label map the unary comes from the map itself: probability ``gt_prob`` for the pixel's label
and ``(1 - gt_prob) / (n_labels - 1)`` for each other label. ``n_labels`` must be the
dataset's class count (21 for VOC, 81 for COCO), as in the TransCAM code; the published
BAO script passed 91 for VOC, which lowers the energy of the other labels and changes the
result.

pydensecrf2 is optional (its source package does not build everywhere): it is imported only
when a CRF runs with it. ``backend`` chooses: ``"pydensecrf"``, ``"torch"`` or ``"auto"``
(pydensecrf2 when it is installed, which gives the published numbers, else torch); an entry
script resolves it once with :func:`resolve_backend`, so that a missing pydensecrf2 is
reported before any work.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.palette import save_label_png
from crf.params import (BILATERAL_COMPAT, BILATERAL_SRGB, BILATERAL_SXY, GAUSSIAN_COMPAT, GAUSSIAN_SXY, GT_PROB,
                        ITERATIONS, CRFParams, check_label_inputs, check_prob_inputs, resolve_backend)


def crf_label_marginals(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = GT_PROB,
                        iterations: int = ITERATIONS, backend: str = "auto", device: str = "cpu") -> np.ndarray:
    """Mean-field marginals of the label-map CRF (:func:`crf_refine_labels` is their argmax).

    Args:
        image: (H, W, 3) uint8 RGB original image.
        labels: (H, W) integer class ids in 0..n_labels-1.
        n_labels: number of classes the map may hold (background included).
        gt_prob: confidence given to the input label of each pixel.
        iterations: mean-field iterations.
        backend: one of :data:`BACKENDS` (see :func:`resolve_backend`).
        device: where the torch backend computes (pydensecrf2 runs on the CPU).
    Returns:
        (n_labels, H, W) float32 marginals.
    """
    check_label_inputs(image, labels, n_labels)
    if resolve_backend(backend) == "torch":
        from crf import densecrf
        return densecrf.crf_label_marginals_batch([image], [labels], n_labels, gt_prob, iterations, device)[0]
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels
    h, w = labels.shape
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=np.ascontiguousarray(image),
                             compat=BILATERAL_COMPAT)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(n_labels, h, w)


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = GT_PROB,
                      iterations: int = ITERATIONS, backend: str = "auto", device: str = "cpu") -> np.ndarray:
    """Refine a label map with a fully connected CRF on the image colours.

    Args: as :func:`crf_label_marginals`.
    Returns:
        (H, W) uint8 refined class ids.
    """
    return crf_label_marginals(image, labels, n_labels, gt_prob, iterations, backend, device).argmax(0).astype(np.uint8)


def crf_refine_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(), backend: str = "auto",
                     device: str = "cpu") -> np.ndarray:
    """Refine class probabilities with a fully connected CRF on the image colours.

    Args:
        image: (H, W, 3) uint8 RGB original image.
        probs: (C, H, W) class probabilities (summing to 1 over C).
        params: the CRF's pairwise terms and iterations.
        backend: one of :data:`BACKENDS` (see :func:`resolve_backend`).
        device: where the torch backend computes (pydensecrf2 runs on the CPU).
    Returns:
        (C, H, W) float32 refined probabilities.
    """
    check_prob_inputs(image, probs)
    if resolve_backend(backend) == "torch":
        from crf import densecrf
        return densecrf.crf_refine_probs(image, probs, params, device)
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(c, h, w)


def limit_torch_threads(backend: str, threads: int | None) -> None:
    """In a worker process of a pool, give the torch CRF ``threads`` CPU threads (None: leave torch's
    setting): the pool's processes share the cores, each taking one."""
    if threads is not None and backend == "torch":
        import torch
        torch.set_num_threads(threads)


def write_crf_png(path: Path, image: np.ndarray, labels: np.ndarray, n_labels: int, backend: str = "auto",
                  device: str = "cpu", threads: int | None = None) -> None:
    """Refine ``labels`` (H, W) with :func:`crf_refine_labels` and save them as a label PNG (a
    :class:`core.workers.TaskPool` task); ``threads``: as :func:`limit_torch_threads`."""
    limit_torch_threads(backend, threads)
    save_label_png(path, crf_refine_labels(image, labels, n_labels, backend=backend, device=device))
