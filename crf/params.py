"""The dense CRF's settings, its backend choice and its input checks, shared by both backends.

The label-map CRF's constants are the TransCAM code's (method spec section 4, step 5); the
probability CRF's (:class:`CRFParams`) are DeepLab-V2's, the segmentation stage's recipe.
:mod:`crf.refine` runs a CRF by the chosen backend, :mod:`crf.densecrf` is the torch one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UserError

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
