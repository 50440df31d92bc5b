"""Validation during training (scoring/validation.py) of TransCAM CAMs: the background score it reports
is the best one of a sweep made by hand, and the mIoU it reports is that score's.

The hand sweep labels each pixel with the argmax over [t, the present classes' CAMs] (background on
ties), counts intersections and unions with numpy and averages the IoU of the classes that occur.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.classes import ClassSet
from data.datasets import InferenceDataset, read_mask
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout
from network.conformer_CAM import Net_tiny
from scoring.metrics import DEFAULT_SWEEP, threshold_range
from scoring.validation import PseudoLabelValidation
from tool.predict import MultiScalePredictor, iterate_batches

SCALES = (32, 64)


def _hand_miou(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> float:
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for gt, pred in pairs:
        keep = gt != 255
        for c in range(num_classes):
            g, p = (gt == c) & keep, (pred == c) & keep
            inter[c] += (g & p).sum()
            union[c] += (g | p).sum()
    occurring = union > 0
    return float((inter[occurring] / union[occurring]).mean())


@pytest.fixture(scope="module")
def setup(voc_root, num_classes):
    layout = DatasetLayout.voc(voc_root)
    labels = ImageLabels.load(voc_root / "cls_labels.json")
    names = read_list(voc_root / "ImageSets/Segmentation/val.txt")
    torch.manual_seed(7)
    model = Net_tiny(num_classes=num_classes).eval()
    return layout, labels, names, model


def test_reported_threshold_is_the_hand_sweeps_best_and_its_miou(setup, num_classes):
    layout, labels, names, model = setup
    classes = ClassSet(("background", *labels.classes))
    validation = PseudoLabelValidation(layout, labels, names, classes, "transcam", SCALES, torch.device("cpu"),
                                       None, batch_size=2, num_workers=0)
    reported = validation(model)

    predictor = MultiScalePredictor(model, "transcam", torch.device("cpu"), None)
    dataset = InferenceDataset(layout, names, labels, scales=SCALES, flip=True)
    maps = []  # (gt, keys, cams) per image
    for batch in iterate_batches(dataset, 2, 0, torch.device("cpu")):
        for name, (keys, cams) in zip(batch["names"], predictor(batch)):
            maps.append((read_mask(layout, name, tuple(cams.shape[1:])), keys.numpy(), cams.numpy()))
    thresholds = threshold_range(*DEFAULT_SWEEP)
    mious = []
    for t in thresholds:
        pairs = []
        for gt, keys, cams in maps:
            fg = keys > 0
            best = cams[fg].argmax(0)
            pred = np.where(cams[fg].max(0) > np.float32(t), keys[fg][best], 0)
            pairs.append((gt, pred))
        mious.append(_hand_miou(pairs, num_classes))
    mious = np.array(mious)
    assert mious.max() > mious.min() + 0.01  # the sweep has a clear best, so a wrong index shows
    best = int(np.argmax(mious))
    assert reported["best_t"] == round(float(thresholds[best]), 6)
    assert reported["miou_pct"] == pytest.approx(100 * mious[best], abs=1e-9)
    assert reported["rule"] == "best background score" and reported["images"] == len(names)
