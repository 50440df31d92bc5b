"""The published command lines: every published flag parses with its published meaning, and
evaluation's label outputs (--out-dir, --out-crf) are the files infer_bao.py writes."""
from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.cli import parse_bool, worker_count
from core.palette import read_label_png, save_label_png
from data.camio import load_cams, save_cams
from tests.helpers import ROOT, call_main, run_script
from tool.cam import pseudo_labels
from scoring.metrics import threshold_labels

PUBLISHED_SWEEP = [i / 100 for i in range(30, 70)]  # --start 30 --end 70: t = 0.30 .. 0.69

# script, command (after the script name; {tmp} = a fresh folder), expected settings. Evaluation's
# settings are those after its flag check (evaluation_bao.check_args), which settles the sweep.
COMMANDS = {
    # the published README commands
    "train README": ("train_bao", "--weights ../..",
                     {"weights": "../..", "method": "bao", "batch_size": 8, "lr": 5e-5, "val_every": 0}),
    "infer README": ("infer_bao", "--weights ../..",
                     {"weights": "../..", "method": "bao", "infer_list": None, "scales": (256, 512, 768)}),
    "evaluation README": ("evaluation_bao", "--comment bnr --predict_dir ../..",
                          {"comment": "bnr", "predict_dir": "../..", "type": "png", "thresholds": None}),
    # every published flag of each script
    "train every flag": (
        "train_bao", "--weights w.pth --batch_size 4 --max_epoches 3 --lr 1e-4 --wt_dec 1e-3 --crop_size 256 "
                     "--train_list a.txt --val_list b.txt --voc12_root R --session_name s --save_dir d "
                     "--tblog_dir tb --arch ti --eps 0.3 --momentum 0.999 --l_pcl 0.5 --w_pcl 2 --num_workers 1",
        {"weights": "w.pth", "batch_size": 4, "max_epoches": 3, "lr": 1e-4, "wt_dec": 1e-3, "crop_size": 256,
         "train_list": "a.txt", "val_list": "b.txt", "voc12_root": "R", "session_name": "s", "save_dir": "d",
         "tblog_dir": "tb", "arch": "ti", "eps": 0.3, "momentum": 0.999, "l_pcl": 0.5, "w_pcl": 2.0,
         "num_workers": 1, "val_every": 0}),
    "train validation": ("train_bao", "--weights w.pth --val_list b.txt --val_every 2 --val_scales 256,512,768",
                         {"val_list": "b.txt", "val_every": 2, "val_scales": (256, 512, 768)}),
    "infer every flag": (
        "infer_bao", "--weights w.pth --infer_list l.txt --voc12_root R --arch sm --num_workers 0 --out_cam c "
                     "--out_crf f --out_pred p",
        {"weights": "w.pth", "infer_list": "l.txt", "voc12_root": "R", "arch": "sm", "num_workers": 0,
         "out_cam": "c", "out_crf": "f", "out_pred": "p"}),
    "visual every flag": (
        "visual_bao", "--weights w.pth --infer_list l.txt --voc12_root R --arch sm --num_workers 0",
        {"weights": "w.pth", "list": "l.txt", "voc12_root": "R", "arch": "sm", "num_workers": 0}),
    "evaluation every flag": (
        "evaluation_bao", "--list l.txt --predict_dir p --gt_dir g --logfile log.txt --comment c --type npy "
                          "--t 0.44 --curve False --num_classes 21 --start 30 --end 70 --n_jobs 3 --cam-type cam "
                          "--out-dir {tmp}/o --out-crf --img_dir i",
        {"list": "l.txt", "predict_dir": "p", "gt_dir": "g", "logfile": "log.txt", "comment": "c", "type": "npy",
         "curve": False, "num_classes": 21, "workers": 3, "cam_type": "cam", "img_dir": "i",
         "thresholds": [0.44], "out_dir": "{tmp}/o", "crf_dir": "{tmp}/o"}),  # the switch: CRF labels in --out-dir
    "evaluation published sweep": ("evaluation_bao", "--type npy --start 30 --end 70 --predict_dir p",
                                   {"thresholds": PUBLISHED_SWEEP}),
    "evaluation curve": ("evaluation_bao", "--type npy --curve True --predict_dir p",  # our wider default sweep
                         {"curve": True, "thresholds": [round(0.05 + 0.01 * i, 2) for i in range(91)]}),
    "evaluation curve, --t ignored": ("evaluation_bao", "--type npy --curve true --t 0.5 --start 40 --predict_dir p",
                                      {"thresholds": [i / 100 for i in range(40, 70)]}),
    "evaluation end alone": ("evaluation_bao", "--type npy --end 35 --predict_dir p",
                             {"thresholds": [0.30, 0.31, 0.32, 0.33, 0.34]}),
    "evaluation every CPU": ("evaluation_bao", "--n_jobs -1 --predict_dir p", {"workers": os.cpu_count() or 1}),
    "evaluation CRF folder": ("evaluation_bao", "--type npy --t 0.3 --out-dir {tmp}/o --out-crf {tmp}/c --predict_dir p",
                              {"out_dir": "{tmp}/o", "crf_dir": "{tmp}/c", "thresholds": [0.3]}),
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_published_commands_parse_with_their_meaning(case, tmp_path):
    script, command, expected = COMMANDS[case]
    argv = command.replace("{tmp}", str(tmp_path)).split()
    module = importlib.import_module(script)
    args = module.get_args_parser().parse_args(argv)
    if script == "evaluation_bao":
        module.check_args(args)
    for key, want in expected.items():
        got = getattr(args, key)
        if isinstance(want, str):
            want = want.replace("{tmp}", str(tmp_path))
        if key == "thresholds" and want is not None:
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, np.asarray(want, np.float32))
        else:
            assert got == want, (key, got, want)
    if script == "evaluation_bao" and args.out_dir:
        assert Path(args.out_dir).is_dir()  # made before any file is read


def test_published_flags_appear_in_help():
    helps = {s: importlib.import_module(s).get_args_parser().format_help()
             for s in ("train_bao", "evaluation_bao", "visual_bao")}
    for flag in ("--start", "--end", "--n_jobs", "--curve", "--cam-type", "--out-dir", "--out-crf", "--img_dir"):
        assert flag in helps["evaluation_bao"], flag
    assert "'False' included, into True" in helps["evaluation_bao"]
    assert "--list LIST, --infer_list LIST" in helps["visual_bao"]
    assert "--val_list" in helps["train_bao"] and "--val_every" in helps["train_bao"]


def test_visual_readme_command_names_what_it_needs(capsys):
    # The published visual_bao.py read its weights from hard-coded globals; here they are a flag.
    module = importlib.import_module("visual_bao")
    with pytest.raises(SystemExit) as exc:
        module.get_args_parser().parse_args([])
    assert exc.value.code == 2
    assert "the following arguments are required: --weights" in capsys.readouterr().err


@pytest.mark.parametrize("command,phrase", [
    ("--type npy --curve false", "--curve false evaluates a single background score: give it as --t"),
    ("--type npy --t 44", "--t 44: a background score lies in 0..1"),
    ("--type npy --t 0.4 --start 30", "give either --t or --start/--end, not both"),
    ("--type npy --start 70 --end 70", "range(70, 70) is empty"),
    ("--type npy --start 30 --t_range 0.1 0.9 0.1", "give either --start/--end (percent, end excluded) or --t_range"),
    ("--type npy --out-dir {tmp}/o", "--out-dir / --out-crf write the labels at one background score: add --t"),
    ("--out-dir {tmp}/o", "--out-dir applies to --type npy"),
    ("--curve yes", "--curve true sweeps background scores of CAM files; add --type npy"),
])
def test_evaluation_refuses_impossible_published_combinations(command, phrase, tmp_path, capsys):
    argv = ["--predict_dir", "p", "--logfile", "", *command.replace("{tmp}", str(tmp_path)).split()]
    code, _, err = call_main("evaluation_bao", argv, capsys)
    assert code == 2 and phrase in err, err
    assert not (tmp_path / "o").exists()


def test_boolean_and_worker_count_types():
    for text in ("true", "True", "1", "yes", "ON"):
        assert parse_bool(text) is True
    for text in ("false", "False", "0", "no", "off"):
        assert parse_bool(text) is False  # the published type=bool gave True for "False"
    with pytest.raises(argparse.ArgumentTypeError, match="not a boolean"):
        parse_bool("maybe")
    assert worker_count("4") == 4
    assert worker_count("-1") == (os.cpu_count() or 1)
    assert worker_count("-1000") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        worker_count("0")


def test_threshold_labels_equal_what_infer_writes():
    rng = np.random.default_rng(0)
    for keys in ([0, 1, 4], [2], [0], [], [1, 3, 5]):
        keys = np.array(keys, np.int64)
        cams = rng.uniform(-0.2, 1, (len(keys), 9, 11)).astype(np.float16).astype(np.float32)
        if len(keys) > 1:
            cams[-1, :3] = cams[-2, :3]  # ties between classes go to the lower id
        for t in (0.0, 0.3, float(cams.flat[5]) if cams.size else 0.5, 1.0):  # t equal to a value: background
            want = pseudo_labels(torch.from_numpy(cams), torch.from_numpy(keys), t).numpy()
            np.testing.assert_array_equal(threshold_labels(keys, cams, t), want)


def _safe_threshold(cam_dir: Path, names: list[str]) -> float:
    """A background score no pixel's best foreground score lies near: infer_bao.py thresholds the
    float32 maps, the CAM files keep them in float16, and only a value within float16 rounding of
    t could fall on the other side of it."""
    best = np.concatenate([load_cams(cam_dir / f"{n}.npz")[1].max(axis=0).ravel() for n in names])
    for t in np.round(np.arange(0.300, 0.700, 0.001), 3):  # float16 steps are below 2.5e-4 here
        if np.abs(best - np.float32(t)).min() > 3e-4 and 0.05 < (best > t).mean() < 0.95:
            return float(t)
    raise AssertionError("no background score away from every pixel's score")


def test_out_dir_and_out_crf_are_the_files_infer_writes(voc_root, tiny_transcam_weights, tmp_path, capsys):
    val = voc_root / "ImageSets/Segmentation/val.txt"
    names = val.read_text().split()
    common = ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json")]
    infer = [*common, "--method", "transcam", "--weights", str(tiny_transcam_weights), "--arch", "tiny",
             "--scales", "32,64", "--num_workers", "0", "--device", "cpu", "--infer_list", str(val)]
    code, _, err = call_main("infer_bao", [*infer, "--out_cam", str(tmp_path / "cams")], capsys)
    assert code == 0, err
    t = _safe_threshold(tmp_path / "cams", names)
    code, _, err = call_main("infer_bao", [*infer, "--t", str(t), "--out_pred", str(tmp_path / "pred"),
                                           "--out_crf", str(tmp_path / "crf")], capsys)
    assert code == 0, err

    evaluate = [*common, "--type", "npy", "--predict_dir", str(tmp_path / "cams"), "--list", str(val), "--t", str(t),
                "--logfile", "", "--no_progress", "--n_jobs", "2"]
    code, out, err = call_main("evaluation_bao", [*evaluate, "--out-dir", str(tmp_path / "o"),
                                                  "--out-crf", str(tmp_path / "o_crf")], capsys)
    assert code == 0, err
    for name in names:
        assert (tmp_path / "o" / f"{name}.png").read_bytes() == (tmp_path / "pred" / f"{name}.png").read_bytes()
        assert (tmp_path / "o_crf" / f"{name}.png").read_bytes() == (tmp_path / "crf" / f"{name}.png").read_bytes()
        # and, for any t, the labels of the stored maps
        keys, cams = load_cams(tmp_path / "cams" / f"{name}.npz")
        want = pseudo_labels(torch.from_numpy(cams), torch.from_numpy(keys), t).numpy()
        np.testing.assert_array_equal(read_label_png(tmp_path / "o" / f"{name}.png"), want)
    # the CRF changed something, so that equal files say the refinement was done alike
    assert any((tmp_path / "o" / f"{n}.png").read_bytes() != (tmp_path / "o_crf" / f"{n}.png").read_bytes()
               for n in names)
    crf_line = next(line for line in out.splitlines() if line.startswith("with CRF: mIoU"))
    code, scored, err = call_main("evaluation_bao", [*common, "--predict_dir", str(tmp_path / "crf"), "--list",
                                                     str(val), "--logfile", "", "--no_progress"], capsys)
    assert code == 0, err
    assert f"mIoU = {crf_line.split('= ')[1].split(' ')[0]} on {len(names)} images" in scored

    # --crf_backend torch, in two worker processes: the files of infer_bao.py's torch CRF, and the
    # labels of the default's (pydensecrf2's where it is installed) on >= 99.5% of the pixels
    code, _, err = call_main("infer_bao", [*infer, "--t", str(t), "--out_crf", str(tmp_path / "crf_torch"),
                                           "--crf_backend", "torch", "--crf_workers", "0"], capsys)
    assert code == 0, err
    code, _, err = call_main("evaluation_bao", [*evaluate, "--out-crf", str(tmp_path / "o_torch"), "--crf_backend",
                                                "torch"], capsys)
    assert code == 0, err
    equal = total = 0
    for name in names:
        assert (tmp_path / "o_torch" / f"{name}.png").read_bytes() == \
            (tmp_path / "crf_torch" / f"{name}.png").read_bytes()
        ref, ours = read_label_png(tmp_path / "crf" / f"{name}.png"), read_label_png(tmp_path / "o_torch" / f"{name}.png")
        equal, total = equal + int((ref == ours).sum()), total + ref.size
    assert equal / total >= 0.995, equal / total

    # The published switch: --out-crf without a folder puts the refined labels in --out-dir,
    # the images read from --img_dir.
    code, _, err = call_main("evaluation_bao", [*evaluate, "--curve", "False", "--out-dir", str(tmp_path / "switch"),
                                                "--out-crf", "--img_dir", str(voc_root / "JPEGImages")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "switch").iterdir()) == sorted(f"{n}.png" for n in names)
    for name in names:
        assert (tmp_path / "switch" / f"{name}.png").read_bytes() == (tmp_path / "crf" / f"{name}.png").read_bytes()
    # images that are not there are named before anything is written
    code, _, err = call_main("evaluation_bao", [*evaluate, "--out-dir", str(tmp_path / "none"), "--out-crf",
                                                "--img_dir", str(tmp_path)], capsys)
    assert code == 2 and f"{len(names)} of {len(names)} images missing" in err and "set --img_dir" in err, err
    assert not list((tmp_path / "none").iterdir())


def test_published_sweep_end_to_end(tmp_path):
    # one image: class 1 scores 0.345 on its 4 pixels, so t < 0.345 is perfect and t >= 0.35 all background
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
    save_label_png(tmp_path / "gt" / "a.png", gt)
    save_cams(tmp_path / "cam" / "a.npz", np.array([1]), np.where(gt == 1, 0.345, 0.1)[None].astype(np.float32))
    (tmp_path / "list.txt").write_text("a\n")
    proc = run_script(str(ROOT / "evaluation_bao.py"), "--type", "npy", "--predict_dir", "cam", "--gt_dir", "gt", "--list",
                   "list.txt", "--curve", "True", "--start", "30", "--end", "70", "--n_jobs", "1", "--logfile",
                   "log.txt", "--comment", "bnr", "--json", "r.json", "--no_progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["t"] for s in report["sweep"]] == pytest.approx(PUBLISHED_SWEEP)
    assert [s["miou"] for s in report["sweep"]] == [1.0] * 5 + [0.25] * 35  # all background: (4/8 + 0) / 2
    assert report["best"]["t"] == pytest.approx(0.30)
    assert (tmp_path / "log.txt").read_text().split("\t")[1:5] == ["bnr", "npy", "mIoU=100.00", "best_t=0.30"]


@pytest.mark.parametrize("script", ["infer_bao", "infer_seg", "evaluation_bao", "protocol.pipeline"])
def test_every_crf_script_takes_crf_backend(script):
    """--crf_backend {auto,pydensecrf,torch} wherever a CRF runs, auto by default; other values refused."""
    parser = importlib.import_module(script).get_args_parser()
    required = {"infer_bao": ["--weights", "w.pth"], "infer_seg": ["--weights", "w.pth"],
                "evaluation_bao": ["--predict_dir", "p"], "protocol.pipeline": ["--run_dir", "r"]}[script]
    assert parser.parse_args(required).crf_backend == "auto"
    for backend in ("auto", "pydensecrf", "torch"):
        assert parser.parse_args([*required, "--crf_backend", backend]).crf_backend == backend
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--crf_backend", "gpu"])
    assert "pydensecrf2 when it is installed" in " ".join(parser.format_help().split())
