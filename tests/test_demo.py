"""The demo's whole path (make demo), shortened: generate -> TransCAM -> BAO -> infer -> evaluate -> sweep -> overlays
-> segmentation stage, then BAO again without attention refinement (the demo runs both regimes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protocol import pipeline
from protocol.demo import REGIME_LABELS, REGIMES, apply_quick, get_args_parser, write_seed_tables
from core.palette import read_label_png
from network.conformer import REFINE_MODES
from tests.helpers import assert_refused, call_main, run_script
from tool.overlay import read_rgb, stacked_sheets

pytestmark = pytest.mark.slow  # the whole module: tests/README.md, tiers


def _miou(voc: Path, names: list[str], num_classes: int, pred_dir: Path | None) -> float:
    """mIoU over ``names`` of the PNGs in ``pred_dir`` (None: all background), by hand."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for name in names:
        # evaluation_bao.py's default ground truth, which the runner uses: the masks without the boundary band
        gt = read_label_png(voc / "SegmentationClassAug" / f"{name}.png").astype(np.int64)
        pred = read_label_png(pred_dir / f"{name}.png").astype(np.int64) if pred_dir else np.zeros_like(gt)
        keep = gt != 255
        conf += np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes ** 2).reshape(conf.shape)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return float(np.mean(inter[union > 0] / union[union > 0]))


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    proc = run_script("-m", "protocol.demo", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("BAO pseudo-labels, threshold-free", "TransCAM CAMs, best background threshold",
                "TransCAM CAMs, fixed threshold t = 0.44"):
        assert row in proc.stdout
    table = json.loads((out / "seed0" / "table.json").read_text())
    res, run = table["attention"], out / "seed0" / "attention"
    # The demo is the runner's preset: its run folder has every stage's marker and log.
    done = {p.stem for p in (run / "stages").glob("*.json")}
    assert done == set(pipeline.STAGES) - {"pseudo_seg", "seg_test"}  # one list: its labels reused; no test
    assert all((run / "logs" / f"{stage}.log").is_file() for stage in done)
    assert json.loads((run / "run.json").read_text())["start"] == "scratch"
    voc = out / "data" / "VOC2012"
    train = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    num_classes = len(json.loads((voc / "cls_labels.json").read_text())["classes"]) + 1
    # The BAO row is the mIoU of the written PNGs, recomputed here by hand; it beats labelling every
    # pixel background, which a BAO stage without a learned background map would not.
    bao_pred = run / "pseudo_score" / "bao_pred"
    assert res["bao_pseudo"]["miou"] == pytest.approx(_miou(voc, train, num_classes, bao_pred), abs=1e-12)
    floor = _miou(voc, train, num_classes, None)
    assert res["bao_pseudo"]["miou"] > floor + 0.01 and res["cnn_best"]["miou"] > floor + 0.01
    # The TransCAM rows come from one sweep: its best point, and its value at the fixed t = 0.44.
    sweep = {round(r["t"], 6): r["miou"]
             for r in json.loads((run / "eval_score" / "transcam.json").read_text())["sweep"]}
    best, fixed = res["transcam_best"], res["transcam_fixed"]
    assert best["miou"] == max(sweep.values()) == sweep[round(best["t"], 6)]
    assert abs(fixed["t"] - 0.44) < 1e-6 and fixed["miou"] == sweep[0.44]
    assert (run / "eval_score" / "transcam_sweep.png").stat().st_size > 0
    assert list((run / "overlays").glob("*_sheet.png"))
    assert len(list(bao_pred.glob("*.png"))) == len(train)

    # The segmentation rows: the val PNGs of both models (on the BAO pseudo-labels, which the
    # segmentation training reused from pseudo_score, and on the masks), with and without CRF, by hand.
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for key, folder in (("seg_val", run / "seg_val"), ("seg_upper", run / "seg_upper")):
        assert res[key]["miou"] == pytest.approx(_miou(voc, val, num_classes, folder / "pred"), abs=1e-12)
        assert res[f"{key}_crf"]["miou"] == pytest.approx(_miou(voc, val, num_classes, folder / "crf"), abs=1e-12)
    seg_args = json.loads((run / "seg_train" / "seg" / "args.json").read_text())
    assert seg_args["label_dir"] == str(bao_pred) and seg_args["bn"] == "train"
    assert "segmentation model on the BAO pseudo-labels" in proc.stdout

    # The regime without attention refinement: the runner again, from the attention run's TransCAM
    # weights, BAO with --refine none, its PNGs scored by hand, against the unrefined TransCAM CAMs
    # (the CNN CAMs of the attention run's ablation, the same sweep).
    none, nrun = table["refine_none"], out / "seed0" / "refine_none"
    assert "No attention refinement (`--refine none`" in proc.stdout
    assert json.loads((nrun / "bao" / "bao" / "args.json").read_text())["refine"] == "none"
    assert not (nrun / "transcam").exists() and not (nrun / "seg_train").exists()
    assert none["bao_pseudo"]["miou"] == pytest.approx(
        _miou(voc, train, num_classes, nrun / "pseudo_score" / "bao_pred"), abs=1e-12)
    cnn_sweep = {round(row["t"], 6): row["miou"]
                 for row in json.loads((nrun / "eval_score" / "transcam.json").read_text())["sweep"]}
    assert none["transcam_best"]["miou"] == res["cnn_best"]["miou"] == max(cnn_sweep.values())
    assert abs(none["transcam_fixed"]["t"] - 0.44) < 1e-6 and none["transcam_fixed"]["miou"] == cnn_sweep[0.44]
    assert set(none) == {"bao_pseudo", "bao_maps_best", "transcam_best", "transcam_fixed"}
    # Both regimes' sheets of each image on one sheet, labelled, the published regime on top.
    names = sorted(p.name[:-len("_sheet.png")] for p in (run / "overlays").glob("*_sheet.png"))
    assert len(names) == 2
    assert names == sorted(p.name[:-len("_sheet.png")] for p in (nrun / "overlays").glob("*_sheet.png"))
    assert sorted(p.name for p in (out / "seed0").glob("regimes_*.png")) == [f"regimes_{n}.png" for n in names]
    for name in names:
        expected = stacked_sheets([(REGIME_LABELS["attention"], read_rgb(run / "overlays" / f"{name}_sheet.png")),
                                   (REGIME_LABELS["none"], read_rgb(nrun / "overlays" / f"{name}_sheet.png"))])
        assert np.array_equal(read_rgb(out / "seed0" / f"regimes_{name}.png"), expected)
    first_sheet = out.resolve() / "seed0" / f"regimes_{names[0]}.png"
    assert f"Both regimes on one sheet per image (seed 0): {first_sheet}" in proc.stdout
    # --seeds' table, per regime (two equal seeds here: sd 0): every row the regime scored, once.
    args = get_args_parser().parse_args(["--quick", "--out", str(out)])
    apply_quick(args)
    text = write_seed_tables(args, {0: table, 1: table})
    attention, refine_none = text.split("## refine_none")
    bao = f"| BAO pseudo-labels, threshold-free | {100 * res['bao_pseudo']['miou']:.2f} ± 0.00 |"
    assert bao in attention and "| segmentation model on the BAO pseudo-labels |" in attention
    assert f"| BAO pseudo-labels, threshold-free | {100 * none['bao_pseudo']['miou']:.2f} ± 0.00 |" in refine_none
    assert "segmentation" not in refine_none
    assert json.loads((out / "seeds.json").read_text())["regimes"]["refine_none"]["bao_pseudo"]["sd"] == 0

    again = run_script("-m", "protocol.demo", "--quick", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    # the dataset and every stage of both runs are reused
    assert "== dataset: done before" in again.stdout
    assert again.stdout.count("done before, skipped") == len(done) + len(list((nrun / "stages").glob("*.json")))
    assert json.loads((out / "seed0" / "table.json").read_text()) == table


def test_demo_runs_both_regimes_by_default(tmp_path, capsys):
    assert REGIMES == REFINE_MODES  # the demo's choices are train_bao.py's --refine values
    assert get_args_parser().parse_args([]).regimes == ["attention", "none"]
    quick = get_args_parser().parse_args(["--quick"])
    apply_quick(quick)
    assert quick.regimes == ["attention", "none"]
    assert REGIME_LABELS == {"attention": "attention refinement (published)", "none": "no refinement"}
    code, _, err = call_main("protocol.demo", ["--regimes", "none", "--out", str(tmp_path / "demo")], capsys)
    assert_refused(code, err, "--regimes must include attention")
    assert not (tmp_path / "demo").exists()
