"""crf/densecrf.py: the permutohedral lattice against an exact Gaussian filter, the torch CRF
against pydensecrf2, and crf/params.py's backend switch (crf/refine.py runs it)."""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from core.errors import UserError
from crf import densecrf, params, refine
from crf.params import CRFParams
from tests import make_crf_reference as make_ref
from tests.make_crf_reference import REFERENCE

# pydensecrf2 is optional (requirements-crf.txt): the comparisons with it skip where it is not installed.
NO_PYDENSECRF = "compares with pydensecrf2 (optional, requirements-crf.txt), which is not installed"


@pytest.mark.parametrize("sxy, srgb", [(1.0, None), (2.0, 30.0)])
def test_lattice_filter_matches_brute_force_gaussian(sxy, srgb):
    """The lattice filters with exp(-|f_i - f_j|^2 / 2) up to its approximation error.

    The permutohedral lattice replaces the Gaussian by splatting to the d + 1 vertices of each
    point's simplex, a [1/2, 1, 1/2] blur per lattice axis and linear interpolation back
    (Adams, Baek and Davis 2010): a kernel of about the right width, with a gain below 1 that
    varies with where a point sits in its simplex. The CRF divides that gain out (its kernel
    normalisation), so the comparison is of the normalised filters K v / K 1, and the error is
    measured against the smoothing the exact filter does, |exact - v|: the lattice's is a few
    percent (3-4% here, 12 x 10 pixels, 2-D positions and 5-D positions and colours), bounded
    at 8%. A lattice without blur is off by 30-50%, one with an axis' blur missing by 14% (2-D).
    """
    image = make_ref.image(10, 12, 0)
    features = densecrf._features([image], sxy, srgb, torch.device("cpu"))
    lattice = densecrf.Lattice(features, torch.zeros(features.shape[0], dtype=torch.int64))
    values = torch.from_numpy(np.random.default_rng(1).random((features.shape[0], 3)).astype(np.float32))
    f = features.double()
    kernel = torch.exp(-((f[:, None, :] - f[None, :, :]) ** 2).sum(2) / 2)  # every pixel pair
    exact = kernel @ values.double() / kernel.sum(1, keepdim=True)
    approx = lattice.compute(values).double() / lattice.compute(torch.ones(features.shape[0], 1)).double()
    assert ((approx - exact).norm() / (exact - values.double()).norm()).item() < 0.08
    assert (approx - exact).abs().max().item() < 0.08
    # Each pixel's simplex weights are barycentric: non-negative (to rounding), summing to 1.
    assert lattice.weights.min().item() > -1e-6
    torch.testing.assert_close(lattice.weights.sum(1), torch.ones(features.shape[0]), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """pydensecrf2's marginals on two inputs, stored by tests/make_crf_reference.py."""
    with np.load(REFERENCE) as stored:
        return dict(stored)


def test_label_map_crf_agrees_with_pydensecrf(reference):
    """gt_prob 0.7, the published pairwise terms, 21 labels; 45 x 61 pixels (not a multiple of 4:
    pydensecrf's padded lattice points are reproduced). Against the stored reference, so it runs
    where pydensecrf2 is not installed."""
    image, labels, ref = reference["label_image"], reference["labels"], reference["label_marginals"]
    q = densecrf.mean_field([image], torch.from_numpy(densecrf.label_unary(labels, 21, 0.7)),
                            (params.GAUSSIAN_SXY, params.GAUSSIAN_COMPAT),
                            (params.BILATERAL_SXY, params.BILATERAL_SRGB, params.BILATERAL_COMPAT), params.ITERATIONS)
    q = q.numpy().T.reshape(ref.shape)
    assert np.abs(q - ref).max() < 1e-4  # measured 3e-6: float summation order only
    refined = densecrf.crf_refine_labels(image, labels, 21)
    assert (refined == ref.argmax(0)).mean() >= 0.995
    assert (refined != labels).mean() > 0.05  # the CRF did change the noisy map
    # Through crf/refine.py's switch, the torch backend gives the same marginals.
    np.testing.assert_array_equal(refine.crf_label_marginals(image, labels, 21, backend="torch"),
                                  densecrf.crf_label_marginals_batch([image], [labels], 21)[0])


def test_probability_crf_agrees_with_pydensecrf(reference):
    """DeepLab-V2's terms (CRFParams) on softmax probabilities, against the stored reference."""
    image, probs, ref = reference["prob_image"], reference["probs"], reference["prob_marginals"]
    crf_params = CRFParams()
    q = densecrf.crf_refine_probs(image, probs, crf_params)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.abs(q - ref).max() < 1e-4
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.995
    # Through crf/refine.py's switch.
    np.testing.assert_allclose(refine.crf_refine_probs(image, probs, crf_params, backend="torch"), q, atol=0, rtol=0)


def test_the_stored_reference_is_what_pydensecrf_gives(reference):
    """Where pydensecrf2 is installed: the stored inputs are the generator's and the stored marginals
    are pydensecrf2's own (also through crf/refine.py's pydensecrf backend)."""
    utils = pytest.importorskip("pydensecrf.utils", reason=NO_PYDENSECRF)
    image, labels = make_ref.image(45, 61, 2), make_ref.noisy_labels(45, 61, 21, 3)
    np.testing.assert_array_equal(image, reference["label_image"])
    np.testing.assert_array_equal(labels, reference["labels"])
    unary = utils.unary_from_labels(labels.astype(np.int64), 21, gt_prob=0.7, zero_unsure=False)
    np.testing.assert_allclose(densecrf.label_unary(labels, 21, 0.7).T, unary, rtol=1e-6)
    live = refine.crf_label_marginals(image, labels, 21, backend="pydensecrf")
    np.testing.assert_allclose(live, reference["label_marginals"], atol=1e-6, rtol=0)
    probs = make_ref.smooth_probs(6, 40, 56, 5)
    np.testing.assert_array_equal(probs, reference["probs"])
    live = refine.crf_refine_probs(reference["prob_image"], probs, CRFParams(), backend="pydensecrf")
    np.testing.assert_allclose(live, reference["prob_marginals"], atol=1e-6, rtol=0)


def test_batch_of_different_sizes_equals_one_by_one():
    """Images sharing one lattice (keys carry the image) give what each gives alone."""
    images = [make_ref.image(20, 28, 6), make_ref.image(17, 23, 7), make_ref.image(20, 28, 8)]
    labels = [make_ref.noisy_labels(*image.shape[:2], 5, 9 + i) for i, image in enumerate(images)]
    together = densecrf.crf_refine_labels_batch(images, labels, 5, pixels_per_call=10 ** 9)
    alone = [densecrf.crf_refine_labels(image, label, 5) for image, label in zip(images, labels)]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
    # A budget of one image per lattice gives the same too.
    split = densecrf.crf_refine_labels_batch(images, labels, 5, pixels_per_call=1)
    for a, b in zip(split, alone):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def no_pydensecrf(monkeypatch):
    """Make ``import pydensecrf`` fail, as where pydensecrf2 is not installed."""
    for name in [n for n in sys.modules if n == "pydensecrf" or n.startswith("pydensecrf.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)


def test_auto_backend_without_pydensecrf_uses_torch(no_pydensecrf, monkeypatch):
    assert not params.pydensecrf_installed()
    assert params.resolve_backend("auto") == "torch"
    assert params.resolve_backend("torch") == "torch"
    # crf/refine.py imports without it, and refines with torch. The fresh import also rebinds the
    # package attribute crf.refine: restore it too, or later tests patch one module and run another.
    monkeypatch.setattr(sys.modules["crf"], "refine", refine)
    monkeypatch.delitem(sys.modules, "crf.refine")
    fresh = importlib.import_module("crf.refine")
    image, labels = make_ref.image(12, 16, 10), make_ref.noisy_labels(12, 16, 4, 11)
    np.testing.assert_array_equal(fresh.crf_refine_labels(image, labels, 4),
                                  densecrf.crf_refine_labels(image, labels, 4))


def test_pydensecrf_backend_without_it_is_one_user_error(no_pydensecrf):
    with pytest.raises(UserError) as err:
        params.resolve_backend("pydensecrf")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install pydensecrf2" in message and "--crf_backend torch" in message
    with pytest.raises(UserError):
        refine.crf_refine_labels(make_ref.image(8, 8, 12), np.zeros((8, 8), np.uint8), 3, backend="pydensecrf")
    with pytest.raises(ValueError):
        params.resolve_backend("gpu")


def test_auto_backend_with_pydensecrf_is_pydensecrf():
    pytest.importorskip("pydensecrf.densecrf", reason=NO_PYDENSECRF)
    assert params.resolve_backend("auto") == "pydensecrf"
