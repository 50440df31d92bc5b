"""Multi-scale aggregation, normalisation, pseudo-labels (tool/cam.py), the batched
predictor (tool/predict.py) and the dense CRF (crf/refine.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from data.datasets import collate_inference
from data.transforms import resized_scales
from network.conformer import ConformerOutput
from network.conformer_CAM import Net_tiny
from tests.helpers import assert_labels_agree_where_clear, assert_maps_close
from tool.cam import NORM_EPS, fold_views, normalize_maps, present_keys, pseudo_labels
from crf.refine import crf_refine_labels
from tool.predict import MultiScalePredictor


def test_present_keys_with_and_without_background():
    label = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert present_keys(label, background=True).tolist() == [0, 2, 4]
    assert present_keys(label, background=False).tolist() == [2, 4]
    assert present_keys(torch.zeros(4), background=True).tolist() == [0]


def test_fold_views_flips_back_and_sums():
    plain = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    views = torch.stack([plain, plain.flip(-1)])  # (V=2, K=1, 2, 2): the second is a flipped input's map
    out = fold_views(views, (2, 2), [False, True])
    assert torch.equal(out, 2 * plain)


def test_fold_views_upsamples_bilinear_without_corner_alignment():
    # Width 2 -> 4 with align_corners=False samples source x = -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    out = fold_views(torch.tensor([[[[0.0, 4.0]]]]), (1, 4), [False])
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0, 3.0, 4.0]]]))


def test_normalize_maps_follows_the_published_rule():
    e = NORM_EPS
    maps = torch.tensor([[[-1.0, 0.0], [2.0, 4.0]],
                         [[1.0, 1.0], [3.0, 5.0]],
                         [[3.0, 3.0], [3.0, 3.0]],
                         [[0.0, 0.0], [0.0, 0.0]]])
    out = normalize_maps(maps)
    # clamp: [0, 0, 2, 4], min 0, max 4; the zeros stay below min + eps, so (0 - 0 - e) / (4 + e)
    assert torch.allclose(out[0], torch.tensor([[-e / (4 + e), -e / (4 + e)], [(2 - e) / (4 + e), (4 - e) / (4 + e)]]))
    # "dead" pixels at the minimum 1 are set to 0 first, then normalised: -(1 + e) / (4 + e), about -0.25
    assert torch.allclose(out[1], torch.tensor([[-(1 + e) / (4 + e)] * 2, [(2 - e) / (4 + e), (4 - e) / (4 + e)]]))
    assert out[1, 0, 0] < -0.24  # not clamped to 0, as published
    # a constant channel is all "dead": -(3 + e) / e everywhere; an all-zero one (an absent class) -1
    assert torch.allclose(out[2], torch.full((2, 2), -(3 + e) / e))
    assert torch.equal(out[3], torch.full((2, 2), -1.0))
    assert normalize_maps(torch.zeros(0, 3, 5)).shape == (0, 3, 5)


def test_pseudo_labels_at_dead_pixels_follow_the_published_argmax():
    keys = torch.tensor([0, 2])
    raw = torch.tensor([[[1.0, 1.0, 3.0, 5.0]],    # background: min 1, max 5 -> about -0.25, -0.25, 0.5, 1
                        [[0.0, 0.0, 4.0, 4.0]]])   # class 2: min 0, max 4 -> about -2.5e-6, -2.5e-6, 1, 1
    # Pixels 0-1: every map sits at its minimum; class 2's -e / (4 + e) beats the background's
    # -(1 + e) / (4 + e) (clamping them to 0 would give background). Pixel 3: an exact tie -> background.
    assert pseudo_labels(normalize_maps(raw), keys, num_classes=3).tolist() == [[2, 2, 2, 0]]


def test_pseudo_labels_absent_classes_score_minus_one():
    # background min 10, max 10.5: pixel 0 scores -(10 + e) / (0.5 + e), about -20; class 2 is constant
    # (about -3e5 everywhere). The published argmax over all 4 channels then picks absent class 1 (score -1).
    raw = torch.tensor([[[10.0, 10.5]], [[3.0, 3.0]]])
    keys = torch.tensor([0, 2])
    assert pseudo_labels(normalize_maps(raw), keys, num_classes=4).tolist() == [[1, 0]]
    assert pseudo_labels(normalize_maps(raw), keys, num_classes=3).tolist() == [[1, 0]]
    # a present all-zero map also scores -1: the tie goes to the lower id, present (1) or absent (1 < 3)
    zero = torch.tensor([[[10.0, 10.5]], [[0.0, 0.0]]])
    assert pseudo_labels(normalize_maps(zero), torch.tensor([0, 1]), num_classes=3).tolist() == [[1, 0]]
    assert pseudo_labels(normalize_maps(zero), torch.tensor([0, 3]), num_classes=4).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        pseudo_labels(normalize_maps(raw), keys)


def test_pseudo_labels_argmax_and_threshold():
    keys = torch.tensor([0, 2, 5])
    maps = torch.tensor([[[0.9, 0.1, 0.2]], [[0.5, 0.8, 0.3]], [[0.1, 0.2, 0.7]]])
    assert pseudo_labels(maps, keys, num_classes=6).tolist() == [[0, 2, 5]]
    fg_keys = torch.tensor([2, 5])
    assert pseudo_labels(maps[1:], fg_keys, background_score=0.6).tolist() == [[0, 2, 5]]
    assert pseudo_labels(maps[1:], fg_keys, background_score=0.75).tolist() == [[0, 2, 0]]
    with pytest.raises(ValueError, match="background map"):
        pseudo_labels(maps[1:], fg_keys, num_classes=6)


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_present_channels_equal_masking_all_channels(offset):
    """Keeping only present channels gives the labels of the published [1, y] masking and argmax over
    all K channels; offset 10 gives maps whose shared minimum normalises below -1, where an absent class wins."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(6, 9, 11, generator=gen) * (0.1 if offset else 1.0) + offset
    if offset:
        # a region where every map sits at its minimum 9, with max about 10.4: -(9 + e) / (1.4 + e) < -1 there
        raw[:, :3] = offset - 1
    label = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])
    full = normalize_maps(raw * torch.cat([torch.ones(1), label])[:, None, None])
    expected = full.argmax(dim=0)
    keys = present_keys(label, background=True)
    assert torch.equal(pseudo_labels(normalize_maps(raw[keys]), keys, num_classes=6), expected)
    if offset:
        assert (expected == 1).any()  # the absent class really wins somewhere


class _FixedMaps(nn.Module):
    """Stands in for the network: returns given feature-resolution maps for every input."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = maps

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        n = x.shape[0]
        maps = nn.functional.interpolate(self.maps[None], size=(x.shape[2] // 16, x.shape[3] // 16)).expand(n, -1, -1, -1)
        zeros = torch.zeros(n, self.maps.shape[0])
        return ConformerOutput(zeros, zeros, maps, maps, maps)


def _batch(images: list[np.ndarray], labels: list[np.ndarray], scales: tuple[int, ...]) -> dict:
    items = [{"name": f"im{i}", "size": img.shape[:2], "label": torch.from_numpy(lab),
              "inputs": resized_scales(img, scales), "views": 2} for i, (img, lab) in enumerate(zip(images, labels))]
    return collate_inference(items)


def test_predictor_folds_views_and_normalises():
    grad = torch.linspace(0, 1, 4)[:, None].expand(4, 4)  # varies along y only, so flips leave it unchanged
    maps = torch.stack([grad + 2.0, grad ** 2, grad, torch.zeros(4, 4)])  # K = 4; channel 2 absent
    img = np.full((20, 30, 3), 128, np.uint8)
    batch = _batch([img], [np.array([1, 0, 1], np.float32)], (32, 64))
    (keys, out), = MultiScalePredictor(_FixedMaps(maps), "bao", torch.device("cpu"))(batch)
    assert keys.tolist() == [0, 1, 3]
    assert out.shape == (3, 20, 30)
    # Background (grad + 2) beats class 1 (grad^2) wherever grad > 0; where grad = 0 both maps sit at their
    # minimum and class 1's -e / (max + e) beats the background's -(min + e) / (max - min + e).
    at_min = out[0] == out[0].amin()
    assert at_min.any() and not at_min.all()
    assert torch.equal(pseudo_labels(out, keys, num_classes=4), at_min.long())


class _PooledInput(nn.Module):
    """Per-sample maps that depend on the input: channel k = (k + 1) x colour channel k % 3
    + k / 10 x colour channel (k + 1) % 3 (so that no two channels are proportional, which would tie
    them after normalisation), averaged over 16 x 16 patches. Records whether labels were passed."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.got_labels: list[bool] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        self.got_labels.append(labels is not None)
        pooled = nn.functional.avg_pool2d(x, 16)
        maps = torch.stack([(k + 1) * pooled[:, k % 3] + k / 10 * pooled[:, (k + 1) % 3]
                            for k in range(self.num_classes)], dim=1)
        zeros = torch.zeros(x.shape[0], self.num_classes)
        return ConformerOutput(zeros, zeros, maps, maps, maps)


def test_predictor_batches_and_chunks_like_single_images():
    """Images of different sizes in one batch, any chunking: each image gets its maps computed alone."""
    model = _PooledInput(num_classes=5)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (64, 48), (33, 70))]
    labels = [np.array(v, np.float32) for v in ([1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0])]
    scales = (32, 64)
    cpu = torch.device("cpu")
    alone = [MultiScalePredictor(model, "bao", cpu)(_batch([im], [lab], scales))[0] for im, lab in zip(images, labels)]
    for pixels in (1, 3 * 64 * 64, 10 ** 7):  # one input per forward, mixed chunks, everything at once
        batched = MultiScalePredictor(model, "bao", cpu, forward_pixels=pixels)(_batch(images, labels, scales))
        for i, ((k1, m1), (k2, m2), img) in enumerate(zip(alone, batched, images)):
            assert torch.equal(k1, k2)
            assert m1.shape == (len(k1),) + img.shape[:2]
            what = f"image {i}, forward_pixels {pixels}"
            assert_maps_close(m1, m2, 1e-5, what)
            assert_labels_agree_where_clear(m1, k2[m2.argmax(dim=0)], keys=k1, what=what)
            assert m1.amax() > 0.99  # maps really vary, so the comparison means something
    assert all(model.got_labels)
    model.got_labels.clear()
    (keys, maps), = MultiScalePredictor(model, "transcam", cpu)(_batch(images[:1], labels[:1], scales))
    assert keys.tolist() == [1, 4] and maps.shape == (2, 40, 56)
    assert not any(model.got_labels)  # TransCAM skips the label-conditioned head


def test_predictor_runs_the_real_network():
    torch.manual_seed(0)
    model = Net_tiny(num_classes=5).eval().to(memory_format=torch.channels_last)
    img = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    (keys, maps), = MultiScalePredictor(model, "bao", torch.device("cpu"))(
        _batch([img], [np.array([0, 1, 0, 1], np.float32)], (32, 64)))
    assert keys.tolist() == [0, 2, 4] and maps.shape == (3, 40, 56)
    assert maps.max() < 1 and torch.isfinite(maps).all()
    # each channel's minimum is a "dead" value -(min + e) / (max - min + e) <= 0, as published
    assert (maps.amin(dim=(1, 2)) < 0).all()


def test_crf_removes_isolated_pixels_and_follows_colour_edges():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = (200, 50, 50)
    label = np.zeros((40, 60), np.uint8)
    label[:, 28:] = 2  # boundary two pixels off the colour edge
    label[10, 10] = 1  # an isolated pixel
    out = crf_refine_labels(img, label, n_labels=21)
    expected = np.zeros_like(label)
    expected[:, 30:] = 2
    assert out.dtype == np.uint8 and np.array_equal(out, expected)


def test_crf_rejects_ids_outside_the_label_count():
    with pytest.raises(ValueError, match="0..2"):
        crf_refine_labels(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 3, np.uint8), n_labels=3)
