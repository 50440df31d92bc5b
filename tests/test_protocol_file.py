"""protocol/protocol_file.py: a protocol file's values are checked like flags, by one schema.

Every wrong type or value is one line (UserError; exit 2 through the runner's command line) that
names it, before anything is created; a runner refused before its first stage leaves no run
folder; a missing relative list names the path tried and the folder it was resolved from.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import UserError
from protocol import pipeline
from protocol.protocol_file import fixed_t_problem, sweep_grid
from tests.helpers import assert_refused, call_main

GOOD = {"about": "a subset", "lists": {"train": "train.txt", "score": "val.txt"}, "published": "voc",
        "settings": {"bao": ["--max_epoches", "1"]}, "extras": ["overlays"], "fixed_t": 0.44}

# protocol file (changes to GOOD; None removes a key) -> a phrase of its refusal
BAD = [
    ({"fixed_t": "0.44"}, '"fixed_t" must be a number, not "0.44"'),
    ({"fixed_t": "high"}, '"fixed_t" must be a number, not "high"'),
    ({"fixed_t": True}, '"fixed_t" must be a number, not true'),
    ({"fixed_t": 0.445}, '"fixed_t" 0.445 is not on the sweep grid (0.05 to 0.95 by 0.01, the thresholds '
                         'eval_score scores), nearest: 0.44 or 0.45'),
    ({"fixed_t": 0.01}, "nearest: 0.05"),
    ({"fixed_t": 1.5}, '"fixed_t" 1.5 is outside 0-1'),
    ({"fixed_t": -0.2}, '"fixed_t" -0.2 is outside 0-1'),
    ({"lists": {"train": 12, "score": "val.txt"}}, "list 'train' must be a path (text), not 12"),
    ({"lists": {"train": "t.txt", "score": "v.txt", "seg_train": "t.txt"}}, '"seg_train" and "seg_val" go together'),
    ({"lists": {"train": "t.txt", "score": "v.txt", "val": "v.txt"}}, "unknown list 'val' (lists: train, score"),
    ({"lists": {"train": "t.txt"}}, "no 'score' list"),
    ({"lists": ["t.txt"]}, '"lists" must be an object'),
    ({"lists": None}, 'no "lists" object'),
    ({"extras": "overlays"}, '"extras" must be a list of optional stage names, not "overlays"'),
    ({"extras": ["ovelrays"]}, "unknown optional stage 'ovelrays' in \"extras\" (optional stages: cnn_score, "
                               "overlays, seg_upper)"),
    ({"extras": ["bao"]}, "unknown optional stage 'bao'"),
    ({"settings": {"eval_score": ["--t", "0.3"]}}, "unknown settings key 'eval_score' (settings keys: train, "
                                                   "transcam, bao, infer, overlays, seg_train, seg_infer)"),
    ({"settings": {"bao": "--lr 1"}}, "settings 'bao' must be a list of text"),
    ({"settings": {"bao": ["--max_epoches", 1]}}, "settings 'bao' must be a list of text"),
    ({"settings": ["--lr"]}, '"settings" must be an object'),
    ({"published": "vco"}, '"published" must be null or one of voc, coco, not "vco"'),
    ({"about": 3}, '"about" must be text, not 3'),
    ({"fixedt": 0.44}, "unknown key 'fixedt' (keys: about, lists, published, settings, extras, fixed_t)"),
]


def _write(folder: Path, changes: dict, name: str = "protocol.json") -> Path:
    d = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    path = folder / name
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("changes, phrase", BAD, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD)])
def test_each_wrong_type_or_value_is_one_line_naming_it(tmp_path, changes, phrase):
    with pytest.raises(UserError) as refused:
        pipeline.load_protocol(str(_write(tmp_path, changes)))
    message = str(refused.value)
    assert phrase in message and "\n" not in message
    assert message.count(";") == phrase.count(";")  # one problem: one phrase, not one per character
    assert [p.name for p in tmp_path.iterdir()] == ["protocol.json"]


def test_every_problem_of_a_file_is_on_its_one_line(tmp_path):
    with pytest.raises(UserError) as refused:
        pipeline.load_protocol(str(_write(tmp_path, {"fixed_t": "0.44", "extras": "overlays", "colour": 1})))
    message = str(refused.value)
    assert "\n" not in message and message.count("; ") == 2
    assert "unknown key 'colour'" in message and '"extras" must be a list' in message and "not \"0.44\"" in message


def test_a_good_file_and_the_presets_load(tmp_path):
    protocol = pipeline.load_protocol(str(_write(tmp_path, {})))
    assert protocol.fixed_t == 0.44 and protocol.extras == ("overlays",) and protocol.base == str(tmp_path)
    for name in ("voc", "coco", "demo"):
        assert fixed_t_problem(pipeline.preset(name).fixed_t) is None
    assert fixed_t_problem(0.3) is None and fixed_t_problem(0.95) is None and "nearest: 0.95" in fixed_t_problem(1)
    assert sweep_grid()[0] == 0.05 and sweep_grid()[-1] == 0.95 and len(sweep_grid()) == 91
    for broken in ("{", "[1, 2]"):
        (tmp_path / "broken.json").write_text(broken)
        with pytest.raises(UserError, match="broken.json"):
            pipeline.load_protocol(str(tmp_path / "broken.json"))


def _runner(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "w.pth").touch()
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    return ["--weights", str(tmp_path / "w.pth"), "--voc12_root", str(voc), *extra]


@pytest.mark.parametrize("changes, phrase", [({"fixed_t": "0.44"}, 'not "0.44"'),
                                             ({"fixed_t": 0.445}, "nearest: 0.44 or 0.45"),
                                             ({"extras": "overlays"}, '"extras" must be a list')])
def test_the_runner_refuses_a_bad_protocol_file_with_exit_2_and_creates_nothing(tmp_path, capsys, changes, phrase):
    run_dir = tmp_path / "run"
    code, _, err = call_main("protocol.pipeline", ["--protocol", str(_write(tmp_path, changes)), "--run_dir",
                                                   str(run_dir), *_runner(tmp_path)], capsys)
    assert_refused(code, err, "protocol.json: ", phrase)
    assert not run_dir.exists()


def test_a_runner_refused_before_its_first_stage_leaves_no_run_folder(tmp_path, capsys):
    """Refused for its weights: the run folder (and its parents) it would have made are gone; a folder that
    was there stays, with no run.json."""
    for run_dir in (tmp_path / "new" / "run", tmp_path / "there"):
        existed = run_dir == tmp_path / "there"
        if existed:
            run_dir.mkdir()
        code, _, err = call_main("protocol.pipeline", ["--run_dir", str(run_dir), *_runner(tmp_path)], capsys)
        assert_refused(code, err, "give --backbone_weights")
        assert run_dir.exists() == existed and not (tmp_path / "new").exists()
        assert not existed or list(run_dir.iterdir()) == []


def test_a_missing_relative_list_names_the_path_tried_and_the_folder_it_was_resolved_from(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    path = _write(mine, {"lists": {"train": "lists/train.txt", "score": "{root}/ImageSets/Segmentation/val.txt"},
                         "settings": None, "extras": None})
    code, _, err = call_main("protocol.pipeline", ["--protocol", str(path), "--run_dir", str(tmp_path / "run"),
                                                   *_runner(tmp_path)], capsys)
    assert_refused(code, err, f"the train list {mine / 'lists' / 'train.txt'} is missing (the protocol's "
                              f"'lists/train.txt', resolved from the protocol file's folder {mine})")
    assert not (tmp_path / "run").exists()


def test_the_demo_s_fixed_threshold_is_checked_as_the_protocol_file_s(tmp_path, capsys):
    code, _, err = call_main("protocol.demo", ["--default_t", "0.445", "--regimes", "none", "--out",
                                                 str(tmp_path / "demo")], capsys)  # --regimes none: no run if unchecked
    assert_refused(code, err, "--default_t 0.445 is not on the sweep grid", "nearest: 0.44 or 0.45")
    assert not (tmp_path / "demo").exists()
