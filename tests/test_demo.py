"""The demo's whole path (make demo), shortened: generate -> TransCAM -> BAO -> infer -> evaluate -> sweep -> overlays."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.palette import read_label_png
from tests.helpers import run_cli


def _miou(voc: Path, names: list[str], num_classes: int, pred_dir: Path | None) -> float:
    """mIoU over ``names`` of the PNGs in ``pred_dir`` (None: all background), by hand."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for name in names:
        gt = read_label_png(voc / "SegmentationClass" / f"{name}.png").astype(np.int64)
        pred = read_label_png(pred_dir / f"{name}.png").astype(np.int64) if pred_dir else np.zeros_like(gt)
        keep = gt != 255
        conf += np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(conf.shape)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]))


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("-m", "apps.demo", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("BAO pseudo-labels, threshold-free", "TransCAM CAMs, best threshold", "fixed default threshold"):
        assert row in proc.stdout
    res = json.loads((out / "seed0" / "table.json").read_text())
    voc = out / "data" / "VOC2012"
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    num_classes = len(json.loads((voc / "cls_labels.json").read_text())["classes"]) + 1
    # The BAO row is the mIoU of the written PNGs, recomputed here by hand; it beats labelling every
    # pixel background, which a BAO stage without a learned background map would not.
    assert res["bao_miou"] == pytest.approx(_miou(voc, train, num_classes, out / "seed0" / "bao_pred"), abs=1e-12)
    floor = _miou(voc, train, num_classes, None)
    assert res["bao_miou"] > floor + 0.01 and res["cnn_best_miou"] > floor + 0.01
    # The TransCAM rows come from one sweep: its best point, and its value at the fixed t = 0.44.
    sweep = {round(r["t"], 6): r["miou"] for r in json.loads((out / "seed0" / "eval_transcam.json").read_text())["sweep"]}
    assert res["transcam_best_miou"] == max(sweep.values()) == sweep[round(res["transcam_best_t"], 6)]
    assert abs(res["transcam_fixed_t"] - 0.44) < 1e-6 and res["transcam_fixed_miou"] == sweep[0.44]
    assert (out / "seed0" / "sweep_transcam.png").stat().st_size > 0
    assert list((out / "seed0" / "visual").glob("*_sheet.png"))
    names = (out / "data" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(list((out / "seed0" / "bao_pred").glob("*.png"))) == len(names)

    again = run_cli("-m", "apps.demo", "--quick", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reused") == 3  # dataset and both training stages
    assert json.loads((out / "seed0" / "table.json").read_text()) == res
