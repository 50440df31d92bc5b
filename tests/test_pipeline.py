"""protocol/pipeline.py: the protocol files, and the whole protocol on the generated dataset with tiny
settings, interrupted between stages and inside one, resumed, and redone from a stage."""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from core.errors import UserError
from data.classes import COCO_CLASSES
from data.labels import read_list
from protocol import demo, pipeline, rows
from tests.helpers import ROOT, assert_refused, call_main, run_script
from crf.params import resolve_backend

TINY_TRAIN = ["--arch", "tiny", "--max_epoches", "1", "--crop_size", "64", "--resize_long", "48", "80",
              "--batch_size", "4", "--num_workers", "0"]


def test_protocol_files_name_the_field_s_lists():
    voc, coco = pipeline.preset("voc"), pipeline.preset("coco")
    assert voc.lists == {"train": "{repo}/voc12/train_aug.txt", "score": "{repo}/voc12/train.txt",
                         "seg_train": "{repo}/voc12/train_aug.txt", "seg_val": "{repo}/voc12/val.txt",
                         "seg_test": "{repo}/voc12/test.txt"}
    assert coco.lists == {"train": "{repo}/coco14/train.txt", "score": "{repo}/coco14/train.txt",
                          "seg_train": "{repo}/coco14/train.txt", "seg_val": "{repo}/coco14/val_labelled.txt",
                          "seg_val_full": "{repo}/coco14/val.txt"}
    assert voc.settings == coco.settings == {} and voc.extras == coco.extras == () and voc.fixed_t == 0.44
    for table in (voc, coco):
        published = rows.PUBLISHED[table.published]
        assert set(published) >= {"bao_pseudo", "seg_val", "seg_val_crf"}
    # the threshold-free row's figure is in the paper; 74.97 is the BAO maps' at their best threshold
    assert rows.PUBLISHED["voc"]["bao_pseudo"] == "paper"
    assert rows.PUBLISHED["voc"]["bao_maps_best"] == "74.97 (t = 0.49-0.50)"
    assert rows.PUBLISHED["voc"]["transcam_best"] == "64.85 (t = 0.44)"
    assert len(read_lines("voc12/train.txt")) == 1464 and len(read_lines("voc12/train_aug.txt")) == 10582
    assert len(read_lines("voc12/val.txt")) == 1449 and len(read_lines("voc12/test.txt")) == 1456


def read_lines(path: str) -> list[str]:
    return read_list(pipeline.REPO_ROOT / path)


def _fake_roots(tmp_path: Path) -> dict[str, str]:
    """Dataset roots and files enough for command lines (nothing is run): name -> path."""
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir()
    coco = tmp_path / "COCO"
    (coco / "train2014").mkdir(parents=True)
    (coco / "val2014").mkdir()
    (tmp_path / "coco_labels.json").write_text(json.dumps({"classes": list(COCO_CLASSES), "labels": {}}))
    (tmp_path / "w.pth").touch()
    (tmp_path / "b.pth").touch()
    return {"voc": str(voc), "coco": str(coco), "coco_labels": str(tmp_path / "coco_labels.json"),
            "weights": str(tmp_path / "w.pth"), "backbone": str(tmp_path / "b.pth")}


def test_voc_and_coco_protocol_files_make_the_command_lines_of_the_former_built_in_tables(tmp_path):
    """tests/data/protocol_commands.json: every stage's command lines as the runner made them from its
    built-in VOC and COCO tables (before the protocol files), with the paths as placeholders."""
    expected = json.loads((ROOT / "tests" / "data" / "protocol_commands.json").read_text())
    f = _fake_roots(tmp_path)
    coco = ["--dataset", "coco", "--coco_root", f["coco"], "--label_file", f["coco_labels"]]
    cases = {"voc": ["--voc12_root", f["voc"]], "coco": coco, "coco_full": [*coco, "--coco_val", "full"]}
    for name, extra in cases.items():
        for start in ("transcam", "imagenet"):
            run = tmp_path / f"run_{name}_{start}"
            args = pipeline.get_args_parser().parse_args(["--run_dir", str(run), "--weights", f["weights"],
                                                          "--backbone_weights", f["backbone"], "--start", start,
                                                          *extra])
            plan = pipeline.make_plan(args)  # the dataset's protocol file; the weights' names from the epochs
            made = json.dumps({s: pipeline.commands(plan, s) for s in pipeline.STAGES})
            made = made.replace(str(run), "{run}").replace(str(tmp_path), "{tmp}").replace(str(ROOT), "{repo}")
            assert json.loads(made) == expected[f"{name}_{start}"], (name, start)


def test_every_stage_s_command_line_parses_with_its_script_s_parser(tmp_path):
    """VOC, COCO and the demo preset: every stage's argv (the TransCAM stage and the optional stages
    included) goes through the script's own get_args_parser; a flag a script does not know is one
    error naming the stage and the flag, when the plan is made."""
    f = _fake_roots(tmp_path)
    parsers = pipeline.script_parsers()
    protocols = {"voc": (pipeline.preset("voc"), ["--voc12_root", f["voc"]]),
                 "coco": (pipeline.preset("coco"), ["--dataset", "coco", "--coco_root", f["coco"], "--label_file",
                                                    f["coco_labels"]]),
                 "demo": (demo.demo_protocol(demo.get_args_parser().parse_args([])), ["--voc12_root", f["voc"]])}
    for name, (protocol, extra) in protocols.items():
        protocol = replace(protocol, extras=pipeline.EXTRAS)
        args = pipeline.get_args_parser().parse_args(["--run_dir", str(tmp_path / name), "--weights", f["weights"],
                                                      "--backbone_weights", f["backbone"], "--start", "imagenet",
                                                      *extra])
        plan = pipeline.make_plan(args, protocol, seed=3)
        parsed = 0
        for stage in pipeline.STAGES:
            for cmd in pipeline.commands(plan, stage):
                parsed_args = parsers[cmd[0]]().parse_args(cmd[1:])
                if cmd[0] in ("train_bao.py", "train_seg.py"):
                    assert parsed_args.seed == 3, (name, stage)
                parsed += 1
        assert parsed >= 18, name  # every stage of the protocol has its command lines
        for stage, key in (("bao", "bao"), ("seg_val", "seg_infer")):
            bad = replace(protocol, settings={**protocol.settings, key: ["--no_such_flag", "1"]})
            with pytest.raises(UserError, match=rf"stage {stage}: \S+ refuses .*--no_such_flag"):
                pipeline.make_plan(args, bad)


def test_crf_backend_command_reaches_only_the_stages_that_run_a_crf(tmp_path, monkeypatch):
    """--crf_backend torch: on each infer_seg.py line that writes CRF labels (seg_val, seg_upper with
    --out_crf; seg_test's --out_server, CRF labels by default), nowhere else; at auto (the default)
    on none (the default lines are tests/data/protocol_commands.json's). --crf_backend pydensecrf
    without pydensecrf2 stops the runner before it makes its run folder."""
    f = _fake_roots(tmp_path)
    base = ["--weights", f["weights"], "--backbone_weights", f["backbone"], "--voc12_root", f["voc"]]
    protocol = replace(pipeline.preset("voc"), extras=pipeline.EXTRAS)
    for backend in ("auto", "torch", "pydensecrf"):
        args = pipeline.get_args_parser().parse_args(["--run_dir", str(tmp_path / backend), *base,
                                                      "--crf_backend", backend])
        plan = pipeline.make_plan(args, protocol)
        with_flag = []
        for stage in pipeline.STAGES:
            for cmd in pipeline.commands(plan, stage):
                if "--crf_backend" in cmd:
                    assert cmd[cmd.index("--crf_backend") + 1] == backend
                    with_flag.append((stage, cmd[0]))
        expected = [("seg_val", "infer_seg.py"), ("seg_upper", "infer_seg.py"), ("seg_test", "infer_seg.py")]
        assert with_flag == ([] if backend == "auto" else expected), backend
    monkeypatch.setattr("crf.params.pydensecrf_installed", lambda: False)
    run_dir = tmp_path / "refused"
    args = pipeline.get_args_parser().parse_args(["--run_dir", str(run_dir), *base, "--crf_backend", "pydensecrf"])
    with pytest.raises(UserError, match="pip install pydensecrf2.*--crf_backend torch"):
        pipeline.main(args)
    assert not run_dir.exists()


def _tiny_protocol(voc_root: Path) -> pipeline.Protocol:
    sets = voc_root / "ImageSets" / "Segmentation"
    # Pseudo-labels scored on val, so that the segmentation training list needs its own (pseudo_seg).
    return pipeline.Protocol(
        lists={"train": str(sets / "train.txt"), "score": str(sets / "val.txt"), "seg_train": str(sets / "train.txt"),
               "seg_val": str(sets / "val.txt"), "seg_test": str(sets / "val.txt")},
        published="voc",
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


@pytest.mark.slow
def test_pipeline_interrupted_resumed_and_redone_ends_with_the_same_table(voc_root, tiny_transcam_weights,
                                                                          tmp_path, capsys):
    whole = _run(voc_root, tmp_path / "whole", tiny_transcam_weights)
    results = json.loads((whole.run_dir / "results.json").read_text())["results"]
    assert set(results) == {row.key for row in rows.ROWS}
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
    assert len(list(whole.out("pseudo_seg").glob("*.png"))) == len(read_list(whole.lists["seg_train"]))
    (_, sweep) = pipeline.commands(whole, "eval_score")
    assert sweep[sweep.index("--ref_miou") + 1] == f"{100 * results['bao_pseudo']['miou']:.4f}"

    # interrupted between stages, then inside the segmentation training (a checkpoint mid-run)
    cut = tmp_path / "cut"
    plan = _run(voc_root, cut, tiny_transcam_weights, "--until", "pseudo_seg")
    assert [s for s, state in pipeline.status(plan) if state.startswith("done")] == [
        s for s in pipeline.STAGES[:pipeline.STAGES.index("pseudo_seg") + 1] if s != "transcam"]
    # On one machine the same commands give the same files (issue 22): up to pseudo_seg both runs ran
    # them alike, so every PNG (pseudo-labels, sweep plots, overlay sheets) is byte-identical.
    done = [s for s in pipeline.STAGES[:pipeline.STAGES.index("pseudo_seg") + 1] if plan.runs(s)]
    pngs = sorted(p.relative_to(cut) for s in done for p in plan.out(s).rglob("*.png"))
    assert len(pngs) > 3 * len(read_list(plan.lists["score"]))  # labels of three stages and plots
    assert pngs == sorted(p.relative_to(whole.run_dir) for s in done for p in whole.out(s).rglob("*.png"))
    differing = [str(p) for p in pngs if (cut / p).read_bytes() != (whole.run_dir / p).read_bytes()]
    assert not differing, differing
    (seg_cmd,) = pipeline.commands(plan, "seg_train")
    stopped = run_script(*seg_cmd, "--max_steps", "1")
    assert stopped.returncode == 0, stopped.stderr
    assert dict(pipeline.status(plan))["seg_train"] == "partly done (resumes)"
    capsys.readouterr()
    plan = _run(voc_root, cut, tiny_transcam_weights)
    out = capsys.readouterr().out
    assert "== bao: done before, skipped" in out and "resumed" in out
    assert json.loads((cut / "results.json").read_text())["results"] == results

    # --from redoes a stage and what follows it (the last two: seg_test and table), and nothing before
    before = {s: (cut / "stages" / f"{s}.json").read_text() for s in ("pseudo_seg", "seg_val", "seg_test")}
    (cut / "seg_test" / "stale.txt").write_text("a file the redone stage's folder must not keep")
    _run(voc_root, cut, tiny_transcam_weights, "--from", "seg_test")
    assert [(cut / "stages" / f"{s}.json").read_text() == before[s] for s in before] == [True, True, False]
    assert not (cut / "seg_test" / "stale.txt").exists() and (cut / "seg_test" / "results.tar.gz").is_file()
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
    same = replace(protocol, lists={**protocol.lists, "score": protocol.lists["seg_train"]})
    plan = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, same)
    assert not plan.runs("pseudo_seg") and pipeline.commands(plan, "pseudo_seg") == []
    (seg_cmd,) = pipeline.commands(plan, "seg_train")
    assert seg_cmd[seg_cmd.index("--label_dir") + 1] == str(plan.out("pseudo_score") / "bao_pred")
    none = _plan(voc_root, tmp_path / "n", tiny_transcam_weights,
                 replace(protocol, lists={k: protocol.lists[k] for k in ("train", "score")}))
    assert set(none.lists) == {"train", "score"}
    assert [s for s in pipeline.STAGES if none.runs(s)] == ["bao", "pseudo_score", "eval_score", "cnn_score",
                                                             "overlays", "table"]
    with pytest.raises(ValueError, match="both segmentation lists or neither"):
        pipeline.make_plan(none.args, replace(protocol, lists={**none.lists, "seg_train": protocol.lists["seg_train"]}))


def test_a_rerun_with_other_settings_is_refused(voc_root, tiny_transcam_weights, tmp_path):
    plan = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root))
    pipeline.check_definition(plan)
    pipeline.check_definition(plan)  # the same settings: accepted
    assert json.loads((tmp_path / "r" / "run.json").read_text())["refine"] == "attention"
    # --status with nothing but --run_dir sees the run as it was made (its preset's lists and stages)
    bare = pipeline.get_args_parser().parse_args(["--run_dir", str(tmp_path / "r"), "--status"])
    (recorded,) = pipeline.recorded_plans(bare)
    assert recorded.lists == plan.lists and recorded.protocol.settings == plan.protocol.settings
    assert [s for s in pipeline.STAGES if recorded.runs(s)] == [s for s in pipeline.STAGES if plan.runs(s)]
    assert pipeline.status(recorded) == pipeline.status(plan)
    other = _plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root), "--refine", "none")
    with pytest.raises(UserError, match="refine attention -> none"):
        pipeline.run(other)
    tiny = _tiny_protocol(voc_root)
    more = replace(tiny, settings={**tiny.settings, "bao": [*TINY_TRAIN, "--max_epoches", "3"]})
    with pytest.raises(UserError, match=r"other settings \(settings\.bao \[.*\] -> \[.*'--max_epoches', '3'\]\)"):
        pipeline.check_definition(_plan(voc_root, tmp_path / "r", tiny_transcam_weights, more))
    # the CRF implementation that ran ("auto" resolved) is part of the run: another one is refused
    recorded_crf = json.loads((tmp_path / "r" / "run.json").read_text())["crf_backend"]
    assert recorded_crf == resolve_backend("auto")
    if recorded_crf == "pydensecrf":
        with pytest.raises(UserError, match="crf_backend pydensecrf -> torch"):
            pipeline.check_definition(_plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root),
                                            "--crf_backend", "torch"))
    pipeline.check_definition(_plan(voc_root, tmp_path / "r", tiny_transcam_weights, _tiny_protocol(voc_root),
                                    "--crf_backend", recorded_crf))  # the same implementation named: accepted
    assert not (tmp_path / "r" / "stages").exists()


def test_status_of_a_folder_without_a_run_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = call_main("protocol.pipeline", ["--run_dir", str(tmp_path / "empty"), "--status"], capsys)
    assert_refused(code, err, "holds no run (no run.json)")
    code, _, err = call_main("protocol.pipeline", ["--run_dir", str(tmp_path / "nowhere"), "--status"], capsys)
    assert_refused(code, err, "does not exist")


@pytest.mark.slow
def test_two_seeds_of_a_protocol_file_on_a_subset_write_mean_and_sample_sd(voc_root, tiny_transcam_weights, tmp_path,
                                                                             capsys):
    """A user's protocol file (a subset of the generated train list, tiny settings) run with --seeds 0 1:
    one folder per seed, the CNN CAM stage of the given TransCAM weights run once, and seeds.json's mean
    and sd (sample sd, n - 1) equal to statistics.mean / stdev of the two seeds' results.json."""
    names = read_list(voc_root / "ImageSets" / "Segmentation" / "train.txt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "subset.txt").write_text("\n".join(names[:8]) + "\n")
    (mine / "protocol.json").write_text(json.dumps({
        "lists": {"train": "subset.txt", "score": "{root}/ImageSets/Segmentation/val.txt"},
        "settings": {"bao": TINY_TRAIN, "infer": ["--arch", "tiny", "--scales", "32,64", "--num_workers", "0"]},
        "extras": ["cnn_score"]}))
    run_dir = tmp_path / "run"
    code, out, err = call_main("protocol.pipeline", [
        "--protocol", str(mine / "protocol.json"), "--seeds", "0", "1", "--run_dir", str(run_dir), "--weights",
        str(tiny_transcam_weights), "--device", "cpu", "--voc12_root", str(voc_root), "--label_file",
        str(voc_root / "cls_labels.json")], capsys)
    assert code == 0, err
    per_seed = {s: json.loads((run_dir / f"seed{s}" / "results.json").read_text())["results"] for s in (0, 1)}
    for s in (0, 1):
        (bao,) = json.loads((run_dir / f"seed{s}" / "stages" / "bao.json").read_text())["commands"]
        assert bao[bao.index("--seed") + 1] == str(s) and bao[bao.index("--train_list") + 1] == str(mine / "subset.txt")
        assert not (run_dir / f"seed{s}" / "cnn_score").exists()
    assert (run_dir / "stages" / "cnn_score.json").is_file() and "== cnn_score: done before, skipped" in out
    assert per_seed[0]["cnn_best"] == per_seed[1]["cnn_best"]  # the shared stage's row
    assert per_seed[0]["bao_pseudo"] != per_seed[1]["bao_pseudo"]  # the seeds trained differently
    table = json.loads((run_dir / "seeds.json").read_text())
    assert table["seeds"] == [0, 1] and set(table["rows"]) == set(per_seed[0])
    for key, row in table["rows"].items():
        values = [per_seed[0][key]["miou"], per_seed[1][key]["miou"]]
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert row["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)  # sample sd (n - 1)
        assert row["miou"] == {"0": values[0], "1": values[1]}
    bao_line = next(line for line in (run_dir / "seeds.md").read_text().splitlines()
                    if line.startswith("| BAO pseudo-labels, threshold-free"))
    mean, sd = table["rows"]["bao_pseudo"]["mean"], table["rows"]["bao_pseudo"]["sd"]
    assert f"| {100 * mean:.2f} ± {100 * sd:.2f} |" in bao_line and bao_line.endswith("| - |")
    code, out, _ = call_main("protocol.pipeline", ["--run_dir", str(run_dir), "--status"], capsys)
    assert code == 0 and out.count("table          done") == 2 and "seed 1 (" in out
