"""The demo's whole path (make demo), shortened: generate -> TransCAM -> BAO -> infer -> evaluate -> sweep -> overlays."""
from __future__ import annotations

import json

from conftest import run_cli


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("-m", "tool.demo", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("BAO pseudo-labels, threshold-free", "TransCAM CAMs, best threshold", "fixed default threshold"):
        assert row in proc.stdout
    res = json.loads((out / "seed0" / "table.json").read_text())
    for key in ("bao_miou", "transcam_best_miou", "transcam_fixed_miou", "bao_maps_best_miou", "cnn_best_miou"):
        assert 0.0 <= res[key] <= 1.0
    assert abs(res["transcam_fixed_t"] - 0.44) < 1e-6
    assert (out / "seed0" / "sweep_transcam.png").stat().st_size > 0
    assert list((out / "seed0" / "visual").glob("*_sheet.png"))
    names = (out / "data" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(list((out / "seed0" / "bao_pred").glob("*.png"))) == len(names)

    again = run_cli("-m", "tool.demo", "--quick", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reused") == 3  # dataset and both training stages
    assert json.loads((out / "seed0" / "table.json").read_text()) == res
