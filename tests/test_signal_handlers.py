"""Each entry script's ``main()`` called in-process leaves the caller's signal handling as it found it:
the Python handlers of SIGINT and SIGTERM (the training engine and apps.cli.run_cli install their
own while they run) and the signals ignored or blocked at the C level, which every process started
afterwards would inherit. Checked after a finished run and after a refused one.

(tests/conftest.py checks the same after every test of the suite.)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import signal_state
from tests.helpers import call_main


def _data(voc_root: Path) -> list[str]:
    return ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json")]


def _commands(voc_root: Path, transcam: Path, bao: Path, out: Path) -> dict[str, list[str]]:
    val = str(voc_root / "ImageSets/Segmentation/val.txt")
    train = str(voc_root / "ImageSets/Segmentation/train.txt")
    masks = str(voc_root / "SegmentationClass")
    return {
        "train_bao": [*_data(voc_root), "--method", "transcam", "--weights", str(transcam), "--arch", "tiny",
                      "--crop_size", "32", "--resize_long", "32", "64", "--batch_size", "4", "--max_steps", "1",
                      "--num_workers", "0", "--train_list", train, "--save_dir", str(out / "bao"), "--device", "cpu"],
        "train_seg": [*_data(voc_root), "--label_dir", masks, "--backbone", "tiny", "--bn", "train", "--from_scratch",
                      "--crop_size", "32", "--batch_size", "4", "--max_iters", "1", "--num_workers", "0",
                      "--train_list", train, "--save_dir", str(out / "seg"), "--session_name", "s", "--device", "cpu"],
        "infer_bao": [*_data(voc_root), "--weights", str(bao), "--arch", "tiny", "--scales", "32", "--num_workers",
                      "0", "--infer_list", val, "--out_pred", str(out / "pred"), "--out_crf", str(out / "crf"),
                      "--crf_workers", "1", "--device", "cpu"],
        "infer_seg": [*_data(voc_root), "--weights", str(out / "seg" / "s" / "s_final.pth"), "--infer_list", val,
                      "--scales", "1.0", "--num_workers", "0", "--out_pred", str(out / "seg_pred"), "--device", "cpu"],
        "evaluation_bao": [*_data(voc_root), "--predict_dir", str(out / "pred"), "--gt_dir", masks, "--list", val,
                           "--logfile", str(out / "eval.txt")],
        "visual_bao": [*_data(voc_root), "--weights", str(bao), "--arch", "tiny", "--scales", "32", "--num_workers",
                       "0", "--list", val, "--out_dir", str(out / "visual"), "--device", "cpu"],
    }


def test_every_entry_script_restores_the_signal_handling(voc_root, tiny_transcam_weights, tiny_bao_weights, tmp_path,
                                                         capsys):
    commands = _commands(voc_root, tiny_transcam_weights, tiny_bao_weights, tmp_path)
    for script, argv in commands.items():  # in order: infer_seg reads train_seg's weights, evaluation infer_bao's labels
        before = signal_state()
        code, _, err = call_main(script, argv, capsys)
        assert code == 0, f"{script}: {err}"
        assert signal_state() == before, f"{script} changed the signal handling"
        # Refused (a missing list): ends in the user-error path, which must restore them too.
        flag = next(f for f in ("--train_list", "--infer_list", "--list") if f in argv)
        refused = list(argv)
        refused[refused.index(flag) + 1] = str(tmp_path / "missing.txt")
        code, _, err = call_main(script, refused, capsys)
        assert code == 2 and "missing.txt" in err, f"{script}: {err}"
        assert signal_state() == before, f"{script} changed the signal handling when refused"


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_the_check_sees_a_changed_handler(name):
    import signal

    before = signal_state()
    number = getattr(signal, name)
    previous = signal.signal(number, signal.SIG_IGN)
    try:
        changed = signal_state()
    finally:
        signal.signal(number, previous)
    assert changed != before and changed[name] == signal.SIG_IGN
    assert signal_state() == before
