"""Dense-CRF refinement of a label map (method spec section 4, step 5), with pydensecrf2.

The unary comes from the label map itself: probability ``gt_prob`` for the pixel's label
and ``(1 - gt_prob) / (n_labels - 1)`` for each other label. ``n_labels`` must be the
dataset's class count (21 for VOC, 81 for COCO), as in the TransCAM code; the published
BAO script passed 91 for VOC, which lowers the energy of the other labels and changes the
result.
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels

GT_PROB = 0.7
GAUSSIAN_SXY = 3
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 50
BILATERAL_SRGB = 5
BILATERAL_COMPAT = 10
ITERATIONS = 10


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = GT_PROB,
                      iterations: int = ITERATIONS) -> np.ndarray:
    """Refine a label map with a fully connected CRF on the image colours.

    Args:
        image: (H, W, 3) uint8 RGB original image.
        labels: (H, W) integer class ids in 0..n_labels-1.
        n_labels: number of classes the map may hold (background included).
        gt_prob: confidence given to the input label of each pixel.
        iterations: mean-field iterations.
    Returns:
        (H, W) uint8 refined class ids.
    """
    h, w = labels.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be ({h}, {w}, 3) uint8 to match the labels, got {image.shape} {image.dtype}")
    if n_labels < 2 or n_labels > 256:
        raise ValueError(f"n_labels must lie in 2..256, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"label ids must lie in 0..{n_labels - 1}")
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    crf.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=np.ascontiguousarray(image),
                             compat=BILATERAL_COMPAT)
    q = np.asarray(crf.inference(iterations), dtype=np.float32).reshape(n_labels, h, w)
    return q.argmax(axis=0).astype(np.uint8)
