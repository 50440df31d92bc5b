"""Write tests/data/crf_reference.npz: pydensecrf2's marginals on two small inputs, so that the torch
CRF's numbers are checked on every machine, pydensecrf2 installed or not (tests/test_densecrf.py).

Run once where pydensecrf2 is installed (requirements-crf.txt), from the repository root::

    python -m tests.make_crf_reference

The inputs are stored with the marginals: the label-map CRF (gt_prob 0.7, the published pairwise
terms, 21 labels, 45 x 61 pixels: not a multiple of 4, so that pydensecrf's padded lattice points
matter) and the probability CRF (DeepLab-V2's terms, 6 classes, 40 x 56 pixels).
"""
from __future__ import annotations

import numpy as np

from crf.params import (BILATERAL_COMPAT, BILATERAL_SRGB, BILATERAL_SXY, GAUSSIAN_COMPAT, GAUSSIAN_SXY, ITERATIONS,
                        CRFParams)
from tests.helpers import ROOT

REFERENCE = ROOT / "tests" / "data" / "crf_reference.npz"
GT_PROB = 0.7
N_LABELS = 21


def image(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: colour ramps with blocks and noise, so that the bilateral kernel has edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 3], -1) + 90 * ((xx // 9 + yy // 7) % 2)[..., None]
    return np.clip(base + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)


def noisy_labels(h: int, w: int, n_labels: int, seed: int) -> np.ndarray:
    """(h, w) uint8: three classes in blocks, a quarter of the pixels relabelled at random."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    labels = ((xx // 9 + yy // 7) % 3).astype(np.uint8)
    flip = rng.random((h, w)) < 0.25
    labels[flip] = rng.integers(0, n_labels, int(flip.sum()))
    return labels


def smooth_probs(c: int, h: int, w: int, seed: int) -> np.ndarray:
    """(c, h, w) float32 softmax probabilities of blocky logits with noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(c, h // 8 + 1, w // 8 + 1)).astype(np.float32) * 3
    logits = np.kron(coarse, np.ones((8, 8), np.float32))[:, :h, :w] + rng.normal(size=(c, h, w)).astype(np.float32)
    probs = np.exp(logits - logits.max(0))
    return probs / probs.sum(0)


def pydensecrf_marginals(img: np.ndarray, unary: np.ndarray, gaussian: tuple[float, float],
                         bilateral: tuple[float, float, float], iterations: int) -> np.ndarray:
    """(C, H, W) float32 marginals of pydensecrf2's DenseCRF2D with a (C, H*W) unary."""
    import pydensecrf.densecrf as dcrf
    h, w = img.shape[:2]
    model = dcrf.DenseCRF2D(w, h, unary.shape[0])
    model.setUnaryEnergy(np.ascontiguousarray(unary))
    model.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    model.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=img, compat=bilateral[2])
    return np.asarray(model.inference(iterations), np.float32).reshape(unary.shape[0], h, w)


def main() -> None:
    from pydensecrf.utils import unary_from_labels, unary_from_softmax
    label_image, labels = image(45, 61, 2), noisy_labels(45, 61, N_LABELS, 3)
    label_marginals = pydensecrf_marginals(
        label_image, unary_from_labels(labels.astype(np.int64), N_LABELS, gt_prob=GT_PROB, zero_unsure=False),
        (GAUSSIAN_SXY, GAUSSIAN_COMPAT), (BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT), ITERATIONS)
    prob_image, probs = image(40, 56, 4), smooth_probs(6, 40, 56, 5)
    p = CRFParams()
    prob_marginals = pydensecrf_marginals(prob_image, unary_from_softmax(probs), (p.gaussian_sxy, p.gaussian_compat),
                                          (p.bilateral_sxy, p.bilateral_srgb, p.bilateral_compat), p.iterations)
    np.savez_compressed(REFERENCE, label_image=label_image, labels=labels, label_marginals=label_marginals,
                        prob_image=prob_image, probs=probs.astype(np.float32), prob_marginals=prob_marginals)
    print(f"wrote {REFERENCE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
