"""The demo's whole path (make demo), shortened: generate -> TransCAM -> BAO -> infer -> evaluate -> sweep -> overlays
-> segmentation stage, then BAO again without attention refinement (--quick runs both regimes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apps.demo import REGIMES, apply_quick, get_args_parser
from apps.repro_demo import summarize
from core.palette import read_label_png
from network.conformer import REFINE_MODES
from tests.helpers import assert_refused, call_main, run_cli


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

    # The segmentation rows: the val PNGs of both models, scored by hand.
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for kind in ("bao", "gt"):
        assert res[f"seg_{kind}_miou"] == pytest.approx(
            _miou(voc, val, num_classes, out / "seed0" / f"seg_{kind}_val"), abs=1e-12)
    assert "Segmentation model trained on BAO pseudo-labels" in proc.stdout

    # The regime without attention refinement: BAO trained with --refine none from the same TransCAM
    # weights, its PNGs scored by hand, against the CNN CAMs (the TransCAM CAMs unrefined) of the same sweep.
    none, r = res["refine_none"], out / "seed0" / "refine_none"
    assert "without attention refinement (--refine none)" in proc.stdout
    assert json.loads((out / "runs" / "bao_none_s0" / "args.json").read_text())["refine"] == "none"
    assert none["bao_miou"] == pytest.approx(_miou(voc, train, num_classes, r / "bao_pred"), abs=1e-12)
    cnn_sweep = {round(row["t"], 6): row["miou"] for row in json.loads((r / "eval_cnn.json").read_text())["sweep"]}
    assert none["cnn_best_miou"] == res["cnn_best_miou"] == max(cnn_sweep.values())
    assert abs(none["cnn_fixed_t"] - 0.44) < 1e-6 and none["cnn_fixed_miou"] == cnn_sweep[0.44]
    assert 0 < none["bao_maps_best_miou"] < 1 and (r / "sweep_cnn.png").stat().st_size > 0
    assert list((r / "visual").glob("*_sheet.png"))
    # apps/repro_demo.py sets the two regimes side by side: BAO's row holds both, the segmentation rows one.
    table = summarize([res, res]).splitlines()
    assert "no refinement (`--refine none`)" in table[0]
    bao_row, seg_row = table[2].split(" | "), table[-2].split(" | ")
    assert bao_row[1] == f"{100 * res['bao_miou']:.2f} ± 0.00" and bao_row[4] == f"{100 * none['bao_miou']:.2f} ± 0.00"
    assert seg_row[4:7] == ["-", "-", "-"]

    again = run_cli("-m", "apps.demo", "--quick", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # dataset, TransCAM, BAO in both regimes, both segmentation trainings
    assert again.stdout.count("reused") == 6
    assert json.loads((out / "seed0" / "table.json").read_text()) == res


def test_regimes_default_to_attention_and_quick_runs_both(tmp_path, capsys):
    assert REGIMES == REFINE_MODES  # the demo's choices are train_bao.py's --refine values
    assert get_args_parser().parse_args([]).regimes is None  # run_pipeline: attention only
    quick = get_args_parser().parse_args(["--quick"])
    apply_quick(quick)
    assert quick.regimes == ["attention", "none"]
    code, _, err = call_main("apps.demo", ["--regimes", "none", "--out", str(tmp_path / "demo")], capsys)
    assert_refused(code, err, "--regimes must include attention")
    assert not (tmp_path / "demo").exists()
