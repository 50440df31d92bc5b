"""Dense-CRF refinement: of a label map (method spec section 4, step 5), and of class
probabilities (the segmentation stage, :func:`crf_refine_probs`), by pydensecrf2 or by
its torch re-implementation (tool/densecrf.py), which gives the same labels on the CPU or a GPU.

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

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.palette import save_label_png

GT_PROB = 0.7
GAUSSIAN_SXY = 3
GAUSSIAN_COMPAT = 3
BILATERAL_SXY = 50
BILATERAL_SRGB = 5
BILATERAL_COMPAT = 10
ITERATIONS = 10

BACKENDS = ("auto", "pydensecrf", "torch")


def pydensecrf_installed() -> bool:
    """Whether pydensecrf2 imports."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """``"pydensecrf"`` or ``"torch"`` for a ``--crf_backend`` choice (one of :data:`BACKENDS`).

    Raises:
        UserError: ``"pydensecrf"`` asked for but pydensecrf2 is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"CRF backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if pydensecrf_installed():
        return "pydensecrf"
    if backend == "auto":
        return "torch"
    raise UserError("the pydensecrf CRF backend needs pydensecrf2, which is not installed: "
                    "`pip install pydensecrf2`, or use `--crf_backend torch`", about="crf_backend")


def check_label_inputs(image: np.ndarray, labels: np.ndarray, n_labels: int) -> None:
    """Raise ValueError unless ``image`` (H, W, 3) uint8 matches ``labels`` (H, W) with ids in 0..n_labels-1."""
    h, w = labels.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be ({h}, {w}, 3) uint8 to match the labels, got {image.shape} {image.dtype}")
    if n_labels < 2 or n_labels > 256:
        raise ValueError(f"n_labels must lie in 2..256, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"label ids must lie in 0..{n_labels - 1}")


def check_prob_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    """Raise ValueError unless ``image`` (H, W, 3) uint8 matches ``probs`` (C, H, W)."""
    _, h, w = probs.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be ({h}, {w}, 3) uint8 to match the probabilities, got {image.shape} "
                         f"{image.dtype}")


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
        from tool import densecrf
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


@dataclass(frozen=True)
class CRFParams:
    """Pairwise terms and iterations of a dense CRF on class probabilities.

    The defaults are DeepLab-V2's (the segmentation stage's recipe): Gaussian weight 3,
    sxy 1; bilateral weight 4, sxy 67, srgb 3; 10 mean-field iterations.
    """

    gaussian_compat: float = 3.0
    gaussian_sxy: float = 1.0
    bilateral_compat: float = 4.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    iterations: int = 10


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
        from tool import densecrf
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
