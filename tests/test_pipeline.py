"""apps/pipeline.py: the protocol tables, and the whole protocol on the generated dataset with tiny
settings, interrupted between stages and inside one, resumed, and redone from a stage."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from apps import pipeline
from core.errors import UserError
from tests.helpers import run_cli

TINY_TRAIN = ["--arch", "tiny", "--max_epoches", "1", "--crop_size", "64", "--resize_long", "48", "80",
              "--batch_size", "4", "--num_workers", "0"]


def test_protocol_tables_name_the_field_s_lists():
    voc, coco = pipeline.PROTOCOLS["voc"], pipeline.PROTOCOLS["coco"]
    assert (voc.train_list, voc.score_list, voc.seg_train_list, voc.seg_val_list, voc.seg_test_list) == (
        "voc12/train_aug.txt", "voc12/train.txt", "voc12/train_aug.txt", "voc12/val.txt", "voc12/test.txt")
    assert (coco.score_list, coco.seg_train_list, coco.seg_val_list, coco.seg_test_list) == (
        "coco14/train.txt", "coco14/train.txt", "coco14/val_labelled.txt", None)
    for table in (voc, coco):
        assert set(table.published) >= {key for key, _, _, stage in pipeline.ROWS if stage not in pipeline.EXTRAS}
    args = pipeline.get_args_parser().parse_args(["--run_dir", "r", "--dataset", "coco", "--coco_val", "full"])
    assert pipeline.make_plan(args).lists["seg_val"].endswith("coco14/val.txt")
    assert len(read_lines("voc12/train.txt")) == 1464 and len(read_lines("voc12/train_aug.txt")) == 10582
    assert len(read_lines("voc12/val.txt")) == 1449 and len(read_lines("voc12/test.txt")) == 1456


def read_lines(path: str) -> list[str]:
    from data.labels import read_list

    return read_list(pipeline.REPO_ROOT / path)


def _tiny_protocol(voc_root: Path) -> pipeline.Protocol:
    sets = voc_root / "ImageSets" / "Segmentation"
    # Pseudo-labels scored on val, so that the segmentation training list needs its own (pseudo_seg).
    return pipeline.Protocol(
        train_list=str(sets / "train.txt"), score_list=str(sets / "val.txt"), seg_train_list=str(sets / "train.txt"),
        seg_val_list=str(sets / "val.txt"), seg_test_list=str(sets / "val.txt"),
        published=dict(pipeline.PROTOCOLS["voc"].published),
        settings={"bao": TINY_TRAIN, "infer": ["--arch", "tiny", "--scales", "32,64", "--num_workers", "0"],
                  "seg_train": ["--backbone", "tiny", "--bn", "train", "--crop_size", "48", "--batch_size", "4",
                                "--max_iters", "4", "--lr", "0.01", "--num_workers", "0"],
                  "seg_infer": ["--backbone", "tiny", "--scales", "1.0", "--num_workers", "0"],
                  "overlays": ["--max_images", "1"]},
        extras=pipeline.EXTRAS)


def _run(voc_root: Path, run_dir: Path, weights: Path, *extra: str) -> pipeline.Plan:
    args = pipeline.get_args_parser().parse_args(
        ["--run_dir", str(run_dir), "--weights", str(weights), "--seg_from_scratch", "--device", "cpu",
         "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"), *extra])
    plan = pipeline.make_plan(args, _tiny_protocol(voc_root))
    pipeline.run(plan)
    return plan


def test_pipeline_interrupted_resumed_and_redone_ends_with_the_same_table(voc_root, tiny_transcam_weights,
                                                                          tmp_path, capsys):
    whole = _run(voc_root, tmp_path / "whole", tiny_transcam_weights)
    results = json.loads((whole.run_dir / "results.json").read_text())["results"]
    assert set(results) == {key for key, *_ in pipeline.ROWS}
    assert all(0 <= r["miou"] <= 1 for r in results.values())
    assert (whole.out("seg_test") / "results.tar.gz").is_file()
    assert list(whole.out("overlays").glob("*_sheet.png"))
    assert (whole.out("seg_upper") / "seg" / "seg_final.pth").is_file()
    assert [s for s, state in pipeline.status(whole) if not state.startswith("done")] == ["transcam"]
    assert dict(pipeline.status(whole))["transcam"] == "not in this run"
    table = (whole.run_dir / "results.md").read_text()
    assert "| BAO pseudo-labels, threshold-free | val.txt |" in table and "| TransCAM CAMs, best" in table
    # the segmentation model trained on pseudo_seg's labels of train.txt, the sweep plot has BAO's line
    (seg_cmd,) = pipeline.commands(whole, "seg_train")
    assert seg_cmd[seg_cmd.index("--label_dir") + 1] == str(whole.out("pseudo_seg"))
    assert len(list(whole.out("pseudo_seg").glob("*.png"))) == len(pipeline.read_list(whole.lists["seg_train"]))
    (_, sweep) = pipeline.commands(whole, "eval_score")
    assert sweep[sweep.index("--ref_miou") + 1] == f"{100 * results['bao_pseudo']['miou']:.4f}"

    # interrupted between stages, then inside the segmentation training (a checkpoint mid-run)
    cut = tmp_path / "cut"
    plan = _run(voc_root, cut, tiny_transcam_weights, "--until", "pseudo_seg")
    assert [s for s, state in pipeline.status(plan) if state.startswith("done")] == [
        s for s in pipeline.STAGES[:pipeline.STAGES.index("pseudo_seg") + 1] if s != "transcam"]
    (seg_cmd,) = pipeline.commands(plan, "seg_train")
    stopped = run_cli(*seg_cmd, "--max_steps", "1")
    assert stopped.returncode == 0, stopped.stderr
    assert dict(pipeline.status(plan))["seg_train"] == "partly done (resumes)"
    capsys.readouterr()
    plan = _run(voc_root, cut, tiny_transcam_weights)
    out = capsys.readouterr().out
    assert "== bao: done before, skipped" in out and "resumed" in out
    assert json.loads((cut / "results.json").read_text())["results"] == results

    # --from redoes a stage and what follows it
    before = (cut / "stages" / "pseudo_seg.json").read_text()
    _run(voc_root, cut, tiny_transcam_weights, "--from", "seg_val")
    assert (cut / "stages" / "pseudo_seg.json").read_text() == before
    assert json.loads((cut / "stages" / "seg_val.json").read_text())["seconds"] >= 0
    assert json.loads((cut / "results.json").read_text())["results"] == results


def test_missing_prerequisites_stop_before_any_stage(voc_root, tiny_transcam_weights, tmp_path):
    args = pipeline.get_args_parser().parse_args(
        ["--run_dir", str(tmp_path / "r"), "--weights", str(tiny_transcam_weights), "--device", "cpu",
         "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json")])
    with pytest.raises(UserError, match="--backbone_weights"):
        pipeline.run(pipeline.make_plan(args, _tiny_protocol(voc_root)))
    args.seg_from_scratch, args.weights = True, str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="weights file not found"):
        pipeline.run(pipeline.make_plan(args, _tiny_protocol(voc_root)))
    args.weights = str(tiny_transcam_weights)
    masks = tmp_path / "masks_gone"
    shutil.copytree(voc_root, masks)
    shutil.rmtree(masks / "SegmentationClass")
    shutil.rmtree(masks / "SegmentationClassAug", ignore_errors=True)
    args.voc12_root = str(masks)
    with pytest.raises(UserError, match="no ground-truth mask"):
        pipeline.run(pipeline.make_plan(args, _tiny_protocol(masks)))
    assert not (tmp_path / "r" / "stages").exists()


def _plan(voc_root: Path, run_dir: Path, weights: Path, protocol: pipeline.Protocol, *extra: str) -> pipeline.Plan:
    args = pipeline.get_args_parser().parse_args(
        ["--run_dir", str(run_dir), "--weights", str(weights), "--seg_from_scratch", "--device", "cpu",
         "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"), *extra])
    return pipeline.make_plan(args, protocol)


def test_refine_none_reaches_every_bao_and_transcam_command(voc_root, tiny_transcam_weights, tmp_path):
    plan = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root), "--refine", "none")
    (plan.out("bao") / "bao").mkdir(parents=True)
    (plan.out("bao") / "bao" / "bao_0epochs_modelt.pth").touch()  # what the later stages' commands name
    scripts = {"train_bao.py", "infer_bao.py", "visual_bao.py"}
    seen = 0
    for stage in ("bao", "pseudo_score", "overlays", "pseudo_seg"):
        for cmd in pipeline.commands(plan, stage):
            if cmd[0] in scripts:
                assert cmd[cmd.index("--refine") + 1] == "none", (stage, cmd)
                seen += 1
    assert seen == 5  # bao, BAO and TransCAM inference, overlays, pseudo_seg
    # the CNN CAM ablation is unrefined by its method; the segmentation scripts know no refinement
    assert all("--refine" not in cmd
               for stage in ("cnn_score", "seg_train", "seg_val") for cmd in pipeline.commands(plan, stage))
    attention = _plan(voc_root, tmp_path / "a", tiny_transcam_weights, _tiny_protocol(voc_root))
    assert pipeline.commands(attention, "bao")[0][pipeline.commands(attention, "bao")[0].index("--refine") + 1] == \
        "attention"


def test_protocol_without_segmentation_and_with_one_list_runs_fewer_stages(voc_root, tiny_transcam_weights, tmp_path):
    protocol = _tiny_protocol(voc_root)
    same = replace(protocol, score_list=protocol.seg_train_list)
    plan = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, same)
    assert not plan.runs("pseudo_seg") and pipeline.commands(plan, "pseudo_seg") == []
    (seg_cmd,) = pipeline.commands(plan, "seg_train")
    assert seg_cmd[seg_cmd.index("--label_dir") + 1] == str(plan.out("pseudo_score") / "bao_pred")
    none = _plan(voc_root, tmp_path / "n", tiny_transcam_weights,
                 replace(protocol, seg_train_list=None, seg_val_list=None, seg_test_list=None))
    assert set(none.lists) == {"train", "score"}
    assert [s for s in pipeline.STAGES if none.runs(s)] == ["bao", "pseudo_score", "eval_score", "cnn_score",
                                                             "overlays", "table"]
    with pytest.raises(ValueError, match="both segmentation lists or neither"):
        pipeline.make_plan(none.args, replace(protocol, seg_val_list=None))


def test_a_rerun_with_other_settings_is_refused(voc_root, tiny_transcam_weights, tmp_path):
    plan = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root))
    pipeline.check_definition(plan)
    pipeline.check_definition(plan)  # the same settings: accepted
    assert json.loads((tmp_path / "r" / "run.json").read_text())["refine"] == "attention"
    # --status with nothing but --run_dir sees the run as it was made (its preset's lists and stages)
    bare = pipeline.get_args_parser().parse_args(["--run_dir", str(tmp_path / "r"), "--status"])
    recorded = pipeline.recorded_plan(bare)
    assert recorded.lists == plan.lists and recorded.protocol.settings == plan.protocol.settings
    assert [s for s in pipeline.STAGES if recorded.runs(s)] == [s for s in pipeline.STAGES if plan.runs(s)]
    assert pipeline.status(recorded) == pipeline.status(plan)
    other = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root), "--refine", "none")
    with pytest.raises(UserError, match="refine attention -> none"):
        pipeline.run(other)
    more = replace(_tiny_protocol(voc_root), settings={"bao": ["--max_epoches", "3"]})
    with pytest.raises(UserError, match=r"other settings \(settings\)"):
        pipeline.check_definition(_plan(voc_root, tmp_path / "r", tiny_transcam_weights, more))
    assert not (tmp_path / "r" / "stages").exists()
