"""The joints of the pipeline, each against an independent computation.

A formula test proves a function right; these prove that the right tensor reaches it: the BAO
head reads its labels, the pseudo-label comes from the teacher, flipped views are flipped back
before they are summed, and every augmentation moves the label with the image. Each test is
built so that wiring the joint to another tensor (a constant, the student's CAMs, the
un-flipped view, the un-flipped label) changes what it checks (see tests/README.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data.datasets import ClassificationDataset, collate_inference
from data.labels import ImageLabels
from data.layout import DatasetLayout
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, SegAugment, TrainAugment, resized_scales
from network.conformer import ConformerOutput
from network.conformer_CAM import Net_tiny
from tool.cam import pseudo_labels
from tool.predict import MultiScalePredictor
from tool.segmentation import multiscale_probs
from tool.teacher import make_teacher
from tool.training import bao_losses

CPU = torch.device("cpu")
MEAN = np.asarray(IMAGENET_MEAN, np.float64)
STD = np.asarray(IMAGENET_STD, np.float64)


def _normalised(rgb) -> np.ndarray:
    """uint8 colour(s) (..., 3) -> the normalised values data.transforms.normalize gives, in float64."""
    return (np.asarray(rgb, np.float64) / 255.0 - MEAN) / STD


def _rgb(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) float colours in 0..255 (the inverse of normalize)."""
    return (x.double().numpy().transpose(1, 2, 0) * STD + MEAN) * 255.0


# ----------------------------------------------------------------------------- label conditioning

def test_bao_head_reads_the_labels_through_label_enc():
    """The classifier's input is feats * label_enc(y) (hooked), with label_enc(y) = y W^T + b computed
    here from the weights; two label vectors give different activation maps. A constant in place of
    label_enc(y) fails both."""
    torch.manual_seed(0)
    model = Net_tiny(num_classes=5).eval()
    with torch.no_grad():  # a visible bias, so that a missing bias term would show too
        model.label_enc.bias.normal_(0, 0.5)
    x = torch.randn(2, 3, 48, 64)
    y = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    inputs: list[torch.Tensor] = []
    model.classifier_x.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    with torch.no_grad():
        am = model(x, y).am
        feats = model.forward_features(x)[0]
        am_other = model(x, 1.0 - y).am
    cond = y @ model.label_enc.weight.detach().T + model.label_enc.bias.detach()  # (B, c3)
    assert inputs[0].shape == feats.shape
    assert torch.allclose(inputs[0], feats * cond[:, :, None, None], atol=1e-6)
    # each image's own labels: swapping the two label rows changes the classifier input accordingly
    assert not torch.allclose(inputs[0], feats * cond.flip(0)[:, :, None, None], atol=1e-4)
    assert (am - am_other).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # both images' maps depend on y


# ------------------------------------------------------------------------- teacher -> pseudo-label

def _published_pseudo_label(cams: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spec section 3 step 4, written out pixel-wise in float64 (not tool.losses)."""
    c = cams.double()
    fg = torch.clamp(c[:, 1:] * y.double()[:, :, None, None], min=0.0)
    peak = fg.flatten(2).max(dim=2).values[:, :, None, None]
    fg = fg / (peak + 1e-5)
    bg = 1.0 - fg.max(dim=1, keepdim=True).values
    return torch.cat([bg, fg], dim=1).argmax(dim=1)


def _balanced_ce(am: torch.Tensor, label: torch.Tensor, eps: float) -> float:
    """Spec section 3 steps 5-6 by explicit loops over pixels, in float64."""
    b, c, h, w = am.shape
    logp = torch.log_softmax(am.double(), dim=1)
    groups: dict[bool, list[float]] = {False: [], True: []}
    for i in range(b):
        for r in range(h):
            for s in range(w):
                k = int(label[i, r, s])
                target = torch.full((c,), eps / (c - 1), dtype=torch.float64)
                target[k] = 1.0 - eps
                groups[k > 0].append(float(-(target * logp[i, :, r, s]).sum()))
    means = [sum(v) / len(v) for v in groups.values() if v]
    return sum(means) / len(means)


def test_pseudo_label_loss_uses_the_teachers_cams():
    """loss_pcl is the class-balanced CE of the student's am against the pseudo-label of the *teacher*'s
    CAMs (computed here independently), and differs from the one built from the student's own CAMs."""
    torch.manual_seed(0)
    student = Net_tiny(num_classes=4).eval()  # eval: no drop-path draws, forwards are repeatable
    teacher = make_teacher(student)
    torch.manual_seed(1)
    teacher.load_state_dict(Net_tiny(num_classes=4).state_dict())  # a teacher that differs from the student
    teacher.eval()
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    eps = 0.4
    losses = bao_losses(student, teacher, x, y, eps=eps, l_pcl=1.0)
    with torch.no_grad():
        cams_t = teacher(x).cams
        out_s = student(x, y)
    from_teacher = _published_pseudo_label(cams_t, y)
    from_student = _published_pseudo_label(out_s.cams, y)
    assert (from_teacher != from_student).sum() >= 4  # the two wirings really differ
    expected = _balanced_ce(out_s.am, from_teacher, eps)
    wrong = _balanced_ce(out_s.am, from_student, eps)
    assert abs(expected - wrong) > 1e-3
    assert float(losses["loss_pcl"].detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------ predictor flips

class _PooledColours(nn.Module):
    """Stands in for the network: class maps are the 16 x 16 averages of the input's colour
    channels (background = G, class 1 = R, class 2 = B, class 3 = R), so a flipped input gives
    exactly the flipped maps, as a real network's would be approximately."""

    CHANNELS = [1, 0, 2, 0]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        maps = F.avg_pool2d(x, 16)[:, self.CHANNELS]
        zeros = torch.zeros(x.shape[0], len(self.CHANNELS))
        return ConformerOutput(zeros, zeros, maps, maps, maps)


def _batch(img: np.ndarray, label: np.ndarray, scales: tuple[int, ...]) -> dict:
    return collate_inference([{"name": "im", "size": img.shape[:2], "label": torch.from_numpy(label),
                               "inputs": resized_scales(img, scales), "views": 2}])


def _published_normalisation(v: np.ndarray) -> np.ndarray:
    """Spec section 4 step 3 for one channel, by hand."""
    v = np.maximum(v, 0.0)
    mn, mx = v.min(), v.max()
    v = np.where(v < mn + 1e-5, 0.0, v)
    return (v - mn - 1e-5) / (mx - mn + 1e-5)


def test_predictor_flips_the_flipped_view_back_before_the_sum():
    """A 64 x 64 image of four vertical stripes (a scale of 64: no resizing), maps that vary along x.
    Expected by hand: the plain view's 4 columns, counted twice (the flipped view flipped back),
    upsampled bilinearly (align_corners False: source x = (x + 0.5) / 16 - 0.5, clamped), normalised
    by the published rule. Summing the flipped view as it is would give maps symmetric in x."""
    stripes = np.array([[250, 10, 60], [180, 90, 20], [110, 160, 240], [40, 230, 130]], np.uint8)
    img = np.repeat(stripes, 16, axis=0)[None].repeat(64, axis=0)  # (64, 64, 3), stripe j at x in [16 j, 16 j + 16)
    (keys, maps), = MultiScalePredictor(_PooledColours(), "bao", CPU)(_batch(img, np.array([1, 1, 0], np.float32), (64,)))
    assert keys.tolist() == [0, 1, 2]
    columns = _normalised(stripes)  # (4 stripes, 3 colour channels): the feature map's columns
    src = np.clip((np.arange(64) + 0.5) / 16 - 0.5, 0, 3)
    lo = np.minimum(np.floor(src).astype(int), 2)
    frac = src - lo
    for key, channel in zip(keys.tolist(), (1, 0, 2)):  # background = G, class 1 = R, class 2 = B
        col = columns[:, channel]
        row = 2 * (col[lo] * (1 - frac) + col[lo + 1] * frac)  # plain + flipped-back view
        expected = _published_normalisation(np.broadcast_to(row, (64, 64)))
        assert np.allclose(maps[keys.tolist().index(key)].numpy(), expected, atol=1e-5), key
    assert not torch.allclose(maps, maps.flip(-1), atol=1e-3)  # the comparison is not blind to flips


def _region_layout(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Three vertical bands: red = class 1, green = background, blue = class 2; returns (image, ids)."""
    ids = np.zeros((h, w), np.int64)
    ids[:, : w // 3] = 1
    ids[:, 2 * w // 3:] = 2
    colours = np.array([[0, 255, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    return colours[ids], ids


def test_multiscale_flipped_inputs_give_the_known_layout():
    """Inference inputs at several scales (resized to S x S, aspect ignored) and flips: the labels of the
    summed maps are the image's bands, compared at least 20 pixels (more than one feature cell of the
    coarsest scale) away from a band edge."""
    img, ids = _region_layout(60, 192)
    (keys, maps), = MultiScalePredictor(_PooledColours(), "bao", CPU)(
        _batch(img, np.array([1, 1, 0], np.float32), (128, 192, 256)))
    labels = pseudo_labels(maps, keys, num_classes=4).numpy()
    away = np.ones(192, bool)
    for edge in (64, 128):
        away[edge - 20:edge + 20] = False
    assert np.array_equal(labels[:, away], ids[:, away])


class _ColourLogits(nn.Module):
    """A segmentation model stand-in: logits = 5 x (G, R, B) of the input, averaged over 8 x 8 cells."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 8, ceil_mode=True)
        return 5.0 * pooled[:, [1, 0, 2]]


def test_segmentation_inference_scales_and_flips_keep_the_layout():
    """infer_seg's multi-scale, flipped probabilities: the argmax is the image's bands away from the
    edges (12 pixels: a cell of the coarsest scale plus the upsampling). Dropping the flip-back of
    the flipped probabilities mirrors the outer bands into each other."""
    img, ids = _region_layout(40, 120)
    probs = multiscale_probs(_ColourLogits(), img, scales=(0.5, 0.75, 1.0, 1.5), flip=True)
    labels = probs.argmax(0).numpy()
    away = np.ones(120, bool)
    for edge in (40, 80):
        away[edge - 12:edge + 12] = False
    assert np.array_equal(labels[:, away], ids[:, away])


# ------------------------------------------------------------------- training augmentations

PALETTE = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 255: (255, 255, 255)}


def _asymmetric_label(h: int, w: int) -> np.ndarray:
    """Class blocks no flip or crop maps onto themselves, with an ignore (255) patch."""
    label = np.zeros((h, w), np.uint8)
    label[:, : w // 3] = 1
    label[: h // 2, 2 * w // 3:] = 2
    label[h // 2:, 2 * w // 3:] = 3
    label[3 * h // 4:, : w // 6] = 255
    return label


def _decode(x: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised crop -> (S, S) ids by nearest palette colour; the zero canvas -> 255."""
    rgb = _rgb(x)
    ids = np.array(list(PALETTE))
    colours = np.array(list(PALETTE.values()), np.float64)
    nearest = ids[np.argmin(((rgb[:, :, None, :] - colours) ** 2).sum(-1), axis=-1)]
    canvas = (x == 0).all(dim=0).numpy()
    return np.where(canvas, 255, nearest)


def _interior(label: np.ndarray, radius: int = 2) -> np.ndarray:
    """True where the (2 radius + 1)^2 window of ``label`` holds one value and lies inside the crop: the
    pixels where bilinear (image) and nearest (label) resampling cannot disagree (an edge just outside
    the crop is unseen, so the crop's own border is left out too)."""
    padded = np.pad(label.astype(np.int64), radius, constant_values=-1)
    h, w = label.shape
    windows = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)]
    return np.all([win == label for win in windows], axis=0)


def test_segmentation_augmentation_moves_the_label_with_the_image():
    """SegAugment over 60 seeds (rescale 0.5-1.5, flips, padded crops): the label of every pixel at
    least 2 pixels from a label edge and from the crop's border is the class read back from the
    augmented colours, padding included (zero canvas <-> ignore). Rule: interpolation only mixes
    colours within 2 pixels of an edge, so those pixels are not compared."""
    label = _asymmetric_label(40, 66)
    img = np.array([PALETTE[int(v)] for v in label.reshape(-1)], np.uint8).reshape(40, 66, 3)
    aug = SegAugment(crop_size=48, scale_range=(0.5, 1.5))
    padded = compared = 0
    seen: set[int] = set()
    for seed in range(60):
        x, y = aug(img, label, np.random.default_rng(seed))
        y = y.numpy()
        decoded = _decode(x)
        inside = _interior(y)
        mismatch = inside & (decoded != y)
        assert not mismatch.any(), f"seed {seed}: {int(mismatch.sum())} pixels whose label is not their colour's"
        assert np.array_equal((x == 0).all(dim=0).numpy() & (y != 255), np.zeros_like(inside))  # canvas is ignored
        padded += int((x == 0).all(dim=0).any())
        compared += int(inside.sum())
        seen |= set(np.unique(y[inside]).tolist())
    assert padded >= 10 and seen == {0, 1, 2, 3, 255} and compared > 60 * 48 * 48 // 3


def test_classification_samples_carry_the_label_of_their_own_image(tmp_path):
    """ClassificationDataset over 4 epochs: every image is one saturated primary colour (red = class 1,
    green = 2, blue = 3), so the class of each augmented crop is its dominant colour channel
    (resizing keeps a flat colour; the jitter's hue shift of at most 36 degrees keeps the dominant
    channel); it must be the sample's label vector. The zero canvas (padding) is left out."""
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    colours = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
    ids = {}
    for i, (h, w) in enumerate([(40, 60), (64, 48), (30, 30), (52, 70), (44, 44), (36, 80)]):
        cls = 1 + i % 3
        ids[f"im{i}"] = [cls]
        Image.fromarray(np.full((h, w, 3), colours[cls], np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg", quality=95)
    labels = ImageLabels(["r", "g", "b"], ids)
    ds = ClassificationDataset(DatasetLayout.voc(root), sorted(ids), labels,
                               TrainAugment(crop_size=48, resize_long=(24, 72)), seed=3)
    for epoch in range(4):
        for index in range(len(ds)):
            item = ds[(epoch, index)]
            image = ~(item["img"] == 0).all(dim=0).numpy()
            assert image.any()
            dominant = int(_rgb(item["img"])[image].mean(axis=0).argmax()) + 1  # the class the crop shows
            assert item["label"].tolist() == [float(c == dominant) for c in (1, 2, 3)], (epoch, index)
            assert [dominant] == ids[item["name"]], (epoch, index)
