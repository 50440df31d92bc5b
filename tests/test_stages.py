"""protocol/stages.py: the stage table is the one place a stage is defined.

A stage added as one record of a test-only table is run, reported and skipped on a rerun by the
runner with no other change; the records' settings keys and figures are what their command lines
and the results table use; the runner, the plan and the results name no stage; the demo's seeds
table and seed check are the runner's.
"""
from __future__ import annotations

import ast
import json
import shutil
from dataclasses import replace
from pathlib import Path

from protocol import demo, pipeline, results, rows
from protocol.plan import Stage
from tests.helpers import ROOT, assert_refused, call_main
from tests.test_pipeline import _fake_roots

# A program that is no entry script: writes hello.txt into the folder argv[1].
HELLO = """import sys
from pathlib import Path
Path(sys.argv[1], "hello.txt").write_text("hello\\n")
print("said hello")
"""


def _hello_stage(script: Path, **fields) -> Stage:
    """A trivial stage: runs ``script`` on its own folder; reads the train list."""
    return Stage("hello", (str(script),), lambda plan: [[str(script), str(plan.out("hello"))]],
                 reads=("train",), **fields)


def test_a_stage_added_as_one_record_runs_reports_its_status_and_is_skipped_on_a_rerun(voc_root, tmp_path, capsys):
    script = tmp_path / "hello.py"
    script.write_text(HELLO)
    sets = voc_root / "ImageSets" / "Segmentation"
    protocol = pipeline.Protocol(lists={"train": str(sets / "train.txt"), "score": str(sets / "val.txt")})
    args = pipeline.runner_args(tmp_path / "run", device="cpu", voc12_root=str(voc_root),
                                label_file=str(voc_root / "cls_labels.json"))
    table = (_hello_stage(script),)
    plan = pipeline.make_plan(args, protocol, stages=table)
    assert pipeline.status(plan) == [("hello", "to do")]
    pipeline.run(plan)
    assert (plan.out("hello") / "hello.txt").read_text() == "hello\n"
    assert "== hello" in capsys.readouterr().out
    assert [s for s, _ in pipeline.status(plan)] == ["hello"] and pipeline.status(plan)[0][1].startswith("done in")
    assert "said hello" in (plan.run_dir / "logs" / "hello.log").read_text()
    pipeline.run(plan)
    assert "== hello: done before, skipped" in capsys.readouterr().out
    assert (plan.run_dir / "logs" / "hello.log").read_text().count("said hello") == 1

    # as an optional stage: not in a run whose protocol does not name it, run where it does
    optional = (_hello_stage(script, extra=True),)
    other = pipeline.make_plan(args, protocol, run_dir=tmp_path / "other", stages=optional)
    assert pipeline.status(other) == [("hello", "not in this run")]
    named = pipeline.make_plan(args, replace(protocol, extras=("hello",)), run_dir=other.run_dir, stages=optional)
    assert pipeline.status(named) == [("hello", "to do")]


def test_each_record_s_settings_keys_reach_its_command_lines_and_no_others(tmp_path):
    f = _fake_roots(tmp_path)
    base = pipeline.preset("voc")
    args = pipeline.get_args_parser().parse_args(["--run_dir", str(tmp_path / "r"), "--weights", f["weights"],
                                                  "--backbone_weights", f["backbone"], "--start", "imagenet",
                                                  "--voc12_root", f["voc"]])
    marked = replace(base, extras=pipeline.EXTRAS,
                     settings={key: [f"--marker_{key}"] for key in pipeline.SETTING_KEYS})
    plan = pipeline.make_plan(args, marked, check=False)
    for record in pipeline.STAGE_TABLE:
        words = {w for cmd in pipeline.commands(plan, record.name) for w in cmd}
        assert {w[len("--marker_"):] for w in words if w.startswith("--marker_")} == set(record.settings), record.name
        assert all(cmd[0] in record.scripts for cmd in pipeline.commands(plan, record.name))
    assert set(pipeline.SETTING_KEYS) == {"train", "transcam", "bao", "infer", "overlays", "seg_train", "seg_infer"}
    assert pipeline.EXTRAS == ("cnn_score", "overlays", "seg_upper")


def test_the_figures_of_the_records_are_the_rows_of_the_table():
    figures = [f.row for record in pipeline.STAGE_TABLE for f in record.figures]
    assert figures == [row.key for row in rows.ROWS]  # each row once, scored by one stage, in table order
    assert [r.name for r in pipeline.STAGE_TABLE if r.writes_results] == ["table"]


def _stage_name_uses(path: Path) -> list[str]:
    """Where ``path`` compares a stage with a stage's name, or passes a name to a plan's stage lookup."""
    names, found = set(pipeline.STAGES), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):  # stage == "table", stage in ("seg_val", ...)
            sides = [node.left, *node.comparators]
            about_stage = any("stage" in getattr(side, "id", getattr(side, "attr", "")) for side in sides)
            values = [c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)]
            found += [f"{path.name}:{node.lineno}" for v in values if about_stage and v in names]
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "runs", "out", "home", "shared", "stage", "commands"):
            found += [f"{path.name}:{node.lineno}" for arg in node.args
                      if isinstance(arg, ast.Constant) and arg.value in names]
    return found


def test_the_runner_plan_and_results_name_no_stage():
    for module in ("pipeline", "plan", "results", "protocol_file"):
        assert _stage_name_uses(ROOT / "protocol" / f"{module}.py") == [], module


def test_the_demo_s_seeds_table_and_seed_check_are_the_runner_s(voc_root, tmp_path, capsys):
    args = demo.get_args_parser().parse_args(["--quick", "--out", str(tmp_path / "demo")])
    demo.apply_quick(args)
    shutil.copytree(voc_root, tmp_path / "demo" / "data" / "VOC2012")  # the dataset the demo would generate
    per_seed = {s: {"attention": {"bao_pseudo": {"miou": 0.5 + s / 10}, "transcam_best": {"miou": 0.4, "t": 0.3},
                                  "seg_val": {"miou": 0.2 + s / 100}},
                    "refine_none": {"bao_pseudo": {"miou": 0.3 + s / 10}}} for s in (0, 1)}
    text = demo.write_seed_tables(args, per_seed)
    # The runner's seeds table of runs with the demo's attention settings, from their results.json.
    plans = []
    for s in (0, 1):
        plan = demo.demo_plan(args, demo.Paths(tmp_path / "demo", s))
        plan.run_dir.mkdir(parents=True)
        (plan.run_dir / "results.json").write_text(json.dumps({"results": per_seed[s]["attention"]}))
        plans.append(plan)
    runner = results.write_seed_table(plans, tmp_path)
    table = runner.split("\n\n", 1)[1]
    assert f"## attention\n\n{table}" in text and "| segmentation model on the BAO pseudo-labels |" in table
    saved = json.loads((tmp_path / "demo" / "seeds.json").read_text())
    assert saved["regimes"]["attention"] == json.loads((tmp_path / "seeds.json").read_text())["rows"]
    # one seed check: the same refusal from both commands, before anything is made
    code, _, err = call_main("protocol.demo", ["--seeds", "0", "0", "--out", str(tmp_path / "again")], capsys)
    assert_refused(code, err, "--seeds repeats a seed: 0 0")
    code, _, runner_err = call_main("protocol.pipeline", ["--seeds", "0", "0", "--run_dir", str(tmp_path / "r")],
                                    capsys)
    assert_refused(code, runner_err, "--seeds repeats a seed: 0 0")
    assert not (tmp_path / "again").exists() and not (tmp_path / "r").exists()
