"""Bad input and interruption, through the entry scripts where users meet them: one clear
``error:`` line (what, which file, what to do), exit status 2 (130 for Ctrl-C), no traceback,
and no partial file in the output folders.

Cases already covered elsewhere (test_train.py, test_infer.py, test_visual.py,
test_evaluation.py, test_coco14.py, test_network.py) are not repeated here. Most cases call the script's own ``get_args_parser`` / ``main`` under
``apps.cli.run_cli`` in-process (the command line's path without a torch start-up per
case); each script family also runs here as a real subprocess, where worker processes and
signals behave as in a terminal.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.fileio import is_temporary
from core.palette import read_label_png
from data.camio import load_cams
from data.labels import read_list
from tests.helpers import ROOT, assert_no_partial_files, assert_refused, call_main, run_script

TRAIN_LIST = "ImageSets/Segmentation/train.txt"
# The odd images of the fixture ``odd_root``: name -> (how it is stored, its size (W, H)).
ODD_IMAGES = {
    "synth_000000": ("grayscale JPEG", (57, 68)),
    "synth_000001": ("RGBA PNG", (66, 76)),
    "synth_000002": ("CMYK JPEG", (61, 51)),
    "synth_000003": ("16-bit grayscale PNG", (76, 77)),
    "synth_000004": ("5x3 JPEG", (5, 3)),
    "synth_000005": ("1x1 JPEG", (1, 1)),
}


# ------------------------------------------------------------------------------- helpers

def _train_args(root: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0",
            "--voc12_root", str(root), "--label_file", str(root / "cls_labels.json"),
            "--train_list", str(root / TRAIN_LIST), "--save_dir", str(save_dir), *extra]


def _as_from_a_terminal() -> None:
    """``preexec_fn`` of the processes these tests interrupt: Ctrl-C's default disposition and no
    blocked signal, as a command typed in a terminal starts. A process inherits an ignored SIGINT
    from whatever started it (Python then keeps ignoring it): in the full suite the test process
    had SIGINT ignored by the time these tests ran (seen in the children this function runs in),
    which the scripts under test do not decide."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _infer_args(root: Path, weights: Path, *extra: str) -> list[str]:
    return ["--voc12_root", str(root), "--label_file", str(root / "cls_labels.json"),
            "--infer_list", str(root / TRAIN_LIST), "--weights", str(weights), "--arch", "tiny",
            "--scales", "32,64", "--num_workers", "0", "--batch_size", "2", "--device", "cpu", *extra]


def _visual_args(root: Path, weights: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--voc12_root", str(root), "--label_file", str(root / "cls_labels.json"),
            "--list", str(root / TRAIN_LIST), "--weights", str(weights), "--arch", "tiny",
            "--scales", "32", "--num_workers", "0", "--max_images", "3", "--device", "cpu",
            "--out_dir", str(out_dir), *extra]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


class _RunsCode:
    """Pickles as a call of ``os.system``: loading it without ``weights_only`` runs a command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def bad(tmp_path_factory, voc_root, num_classes, tiny_bao_weights) -> dict[str, Path]:
    """Wrong weights, lists and label files, by case name."""
    from network.conformer_CAM import Net_tiny

    d = tmp_path_factory.mktemp("bad")
    files = {"folder": d / "weights_dir", "text": d / "text.pth", "truncated": d / "truncated.pth",
             "runs_code": d / "runs_code.pth", "21_classes": d / "voc21.pth", "other_arch": d / "other_arch.pth",
             "marker": d / "code_ran", "empty_list": d / "empty.txt", "ghost_list": d / "ghost.txt",
             "unlabelled_list": d / "unlabelled.txt", "ghost_labels": d / "labels_ghost.json",
             "id_out_of_range": d / "labels_id9.json", "a_file": d / "a_file"}
    files["folder"].mkdir()
    files["text"].write_text("not a checkpoint")
    good = tiny_bao_weights.read_bytes()
    files["truncated"].write_bytes(good[:len(good) // 2])
    torch.save({"model": torch.load(tiny_bao_weights, weights_only=True),
                "hook": _RunsCode(f"touch {files['marker']}")}, files["runs_code"])
    torch.save(Net_tiny(num_classes=21).state_dict(), files["21_classes"])  # a VOC checkpoint, 7-class labels
    torch.save(Net_tiny(num_classes=num_classes, embed_dim=48).state_dict(), files["other_arch"])
    files["empty_list"].write_text("# no names\n\n")
    files["ghost_list"].write_text("synth_000000\nghost_image\n")
    files["unlabelled_list"].write_text("synth_000000\nnot_in_labels\n")
    raw = json.loads((voc_root / "cls_labels.json").read_text())
    raw["labels"]["ghost_image"] = [1]
    files["ghost_labels"].write_text(json.dumps(raw))
    raw = json.loads((voc_root / "cls_labels.json").read_text())
    raw["labels"]["synth_000001"] = [9]
    files["id_out_of_range"].write_text(json.dumps(raw))
    files["a_file"].write_text("")
    return files


@pytest.fixture(scope="module")
def corrupt_root(tmp_path_factory, voc_root) -> tuple[Path, Path]:
    """A copy of the dataset whose third training image is a truncated JPEG: (root, that file)."""
    root = tmp_path_factory.mktemp("corrupt") / "VOC2012"
    shutil.copytree(voc_root, root)
    jpeg = root / "JPEGImages" / f"{read_list(root / TRAIN_LIST)[2]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    return root, jpeg


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory, voc_root) -> Path:
    """A copy of the dataset whose first images are stored as in ODD_IMAGES (PNG content under
    the .jpg name, as hand-built folders often have it)."""
    root = tmp_path_factory.mktemp("odd") / "VOC2012"
    shutil.copytree(voc_root, root)
    folder = root / "JPEGImages"

    def rgb(name: str) -> np.ndarray:
        with Image.open(folder / f"{name}.jpg") as im:
            return np.asarray(im.convert("RGB"))

    a = rgb("synth_000000")
    Image.fromarray(a).convert("L").save(folder / "synth_000000.jpg", format="JPEG")
    a = rgb("synth_000001")
    Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])).save(folder / "synth_000001.jpg", format="PNG")
    Image.fromarray(rgb("synth_000002")).convert("CMYK").save(folder / "synth_000002.jpg", format="JPEG")
    Image.fromarray(rgb("synth_000003")[..., 0].astype(np.uint16) * 257).save(folder / "synth_000003.jpg", format="PNG")
    Image.fromarray(np.ascontiguousarray(rgb("synth_000004")[:3, :5])).save(folder / "synth_000004.jpg", format="JPEG")
    Image.fromarray(np.ascontiguousarray(rgb("synth_000005")[:1, :1])).save(folder / "synth_000005.jpg", format="JPEG")
    modes = {"synth_000000": "L", "synth_000001": "RGBA", "synth_000002": "CMYK", "synth_000003": "I;16"}
    for name, (_, size) in ODD_IMAGES.items():
        with Image.open(folder / f"{name}.jpg") as im:
            assert im.size == size and im.mode == modes.get(name, "RGB"), name
    return root


# ------------------------------------------------------------------------------ training

@pytest.mark.slow
def test_train_corrupt_jpeg_in_a_loader_worker_is_one_line(corrupt_root, tiny_transcam_weights, tmp_path):
    root, jpeg = corrupt_root
    proc = run_script("train_bao.py", *_replace(_train_args(root, tmp_path, "--weights", str(tiny_transcam_weights)),
                                             "--num_workers", "2"))
    assert_refused(proc.returncode, proc.stderr, f"cannot read image {jpeg}", "corrupt or truncated",
                    "no checkpoint had been saved yet")
    assert "DataLoader worker" not in proc.stderr
    run_dir = tmp_path / "bao"
    assert_no_partial_files(run_dir)
    assert not (run_dir / "checkpoint.pth").exists()


TRAIN_REFUSALS = {
    # case: (flag changes, phrases of the message); {name} is a file of the ``bad`` fixture
    "weights is a folder": ({"--weights": "{folder}"}, ("weights file", "is a folder", ".pth file itself")),
    "weights not a checkpoint": ({"--weights": "{text}"}, ("text.pth is not a readable PyTorch checkpoint",)),
    "weights truncated": ({"--weights": "{truncated}"}, ("truncated.pth", "truncated or corrupt",
                                                         "copy or download it again")),
    "weights would run code": ({"--weights": "{runs_code}"}, ("refused by the safe loader (weights_only=True)",
                                                              "posix.system", "Re-save it as a plain state_dict")),
    "weights of another class count": ({"--weights": "{21_classes}"}, ("different number of classes than the 7",
                                                                        "--label_file")),
    "weights of another arch": ({"--weights": "{other_arch}"}, ("does not fit this model", "--arch")),
    "resume truncated": ({"--resume": "{truncated}"}, ("truncated.pth", "truncated or corrupt")),
    "resume would run code": ({"--resume": "{runs_code}"}, ("refused by the safe loader",)),
    "resume a folder": ({"--resume": "{folder}"}, ("checkpoint to resume", "is a folder")),
    "dataset root missing": ({"--voc12_root": "{folder}/nowhere"}, ("VOC root", "does not exist", "--voc12_root")),
    "train list missing": ({"--train_list": "{folder}/none.txt"}, ("train list not found", "--train_list")),
    "train list empty": ({"--train_list": "{empty_list}"}, ("list file", "empty.txt is empty")),
    # the messages name the list file
    "name without image": ({"--train_list": "{ghost_list}", "--label_file": "{ghost_labels}"},
                           ("1 of 2 images of {ghost_list} are missing", "first: ghost_image")),
    "name without label": ({"--train_list": "{unlabelled_list}"},
                           ("1 image(s) of {unlabelled_list} have no image-level label", "first: not_in_labels")),
    "dataset root without images": ({"--voc12_root": "{folder}"},
                                    ("no image folder in {folder} (expected {folder}/JPEGImages): not a dataset root; "
                                     "check --voc12_root",)),
    "label id out of range": ({"--label_file": "{id_out_of_range}"},
                              ("image synth_000001 has a class id outside 1..6",)),
    "label file missing": ({"--label_file": "{folder}/none.json"}, ("label file not found",)),
    "negative batch": ({"--batch_size": "-1"}, ("argument --batch_size: must be >= 1, got -1",)),
    "crop not a multiple of 16": ({"--crop_size": "100"}, ("--crop_size must be a multiple of 16", "try 96")),
    "unknown arch": ({"--arch": "huge"}, ("unknown --arch 'huge'", "choose one of")),
    "unknown method": ({"--method": "foo"}, ("argument --method: invalid choice: 'foo'",)),
    "negative workers": ({"--num_workers": "-1"}, ("argument --num_workers: must be >= 0, got -1",)),
}


@pytest.mark.parametrize("case", sorted(TRAIN_REFUSALS))
def test_train_refuses_before_creating_the_run(case, bad, voc_root, tiny_transcam_weights, tmp_path, capsys,
                                               monkeypatch):
    import train_bao

    changes, phrases = TRAIN_REFUSALS[case]
    built = []
    # Flag errors must stop before a model is built; data and weights errors right after
    # (weights can only be checked against a model).
    if case in ("negative batch", "crop not a multiple of 16", "unknown arch", "negative workers"):
        monkeypatch.setattr(train_bao, "build_network", lambda *a, **k: built.append(a))
    argv = _train_args(voc_root, tmp_path / "runs", "--weights", str(tiny_transcam_weights))
    names = {k: str(v) for k, v in bad.items()}
    for flag, value in changes.items():
        argv = _replace(argv, flag, value.format(**names))
    code, _, err = call_main("train_bao", argv, capsys)
    assert_refused(code, err, *(phrase.format(**names) for phrase in phrases))
    assert not built
    assert not (tmp_path / "runs").exists()  # no run directory, no log, no checkpoint
    assert not bad["marker"].exists()  # the pickled command did not run


def test_train_odd_image_modes_and_images_smaller_than_the_crop(odd_root, tiny_transcam_weights, tmp_path, capsys):
    # Long sides of 24..40 pixels: every crop of 64 is padded, the 1x1 and 5x3 images most.
    argv = _train_args(odd_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "1",
                       "--resize_long", "24", "40", "--log_every", "1")
    code, _, err = call_main("train_bao", argv, capsys)
    assert code == 0, err
    run_dir = tmp_path / "bao"
    steps = [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
    assert {"bao_0epochs_modelt.pth", "bao_0epochs_models.pth", "checkpoint.pth"} <= {p.name for p in run_dir.iterdir()}
    assert_no_partial_files(run_dir)


def test_train_resume_with_another_label_file_is_refused(voc_root, tiny_transcam_weights, tmp_path, capsys):
    argv = _train_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_steps", "1")
    assert call_main("train_bao", argv, capsys)[0] == 0
    checkpoint = tmp_path / "bao" / "checkpoint.pth"
    before = checkpoint.read_bytes()
    raw = json.loads((voc_root / "cls_labels.json").read_text())
    raw["classes"].append("extra")  # one class more: label vectors of another length
    other = tmp_path / "labels_8.json"
    other.write_text(json.dumps(raw))
    code, _, err = call_main("train_bao", _replace(argv, "--label_file", str(other)) + ["--resume", "auto"], capsys)
    assert_refused(code, err, f"{checkpoint} was trained on another image list or label file",
                    "7 classes", "--label_file")
    assert checkpoint.read_bytes() == before


def test_train_disk_full_names_the_file_and_keeps_no_partial_file(voc_root, tiny_transcam_weights, tmp_path, capsys,
                                                                   monkeypatch):
    import tool.training

    def full_disk_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tool.training.torch, "save", full_disk_save)
    argv = _train_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "1")
    code, _, err = call_main("train_bao", argv, capsys)
    monkeypatch.undo()
    assert_refused(code, err, f"cannot write {tmp_path / 'bao' / 'bao_0epochs_modelt.pth'}: the disk is full",
                    "free space or choose another folder")
    assert not [p for p in (tmp_path / "bao").iterdir() if p.suffix == ".pth"]
    assert_no_partial_files(tmp_path / "bao")


@pytest.mark.slow
def test_train_ctrl_c_with_loader_workers(voc_root, tiny_transcam_weights, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, loader workers included."""
    args = _replace(_train_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "100",
                                "--log_every", "1"), "--num_workers", "2")
    proc = subprocess.Popen([sys.executable, "train_bao.py", *args], cwd=ROOT, text=True, start_new_session=True,
                            preexec_fn=_as_from_a_terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "bao" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and '"step"' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resumable checkpoint" in out + err
    assert torch.load(tmp_path / "bao" / "checkpoint.pth", weights_only=True)["position"]["global_step"] >= 1
    assert_no_partial_files(tmp_path / "bao")


# ----------------------------------------------------------------------------- inference

INFER_REFUSALS = {
    "weights is a folder": ({"--weights": "{folder}"}, ("weights file", "is a folder")),
    "weights truncated": ({"--weights": "{truncated}"}, ("truncated or corrupt", "copy or download it again")),
    "weights would run code": ({"--weights": "{runs_code}"}, ("refused by the safe loader (weights_only=True)",
                                                              "posix.system")),
    "21-class weights, 7-class label file": ({"--weights": "{21_classes}"},
                                             ("different number of classes than the 7", "--label_file")),
    "label id out of range": ({"--label_file": "{id_out_of_range}"}, ("a class id outside 1..6",)),
    "unknown arch": ({"--arch": "huge"}, ("unknown --arch 'huge'",)),
    "scale not a multiple of 16": ({"--scales": "100"}, ("argument --scales", "multiples of 16", "[100]")),
    "negative batch": ({"--batch_size": "-1"}, ("argument --batch_size: must be >= 1",)),
    "unknown method": ({"--method": "foo"}, ("argument --method: invalid choice: 'foo'",)),
}


@pytest.mark.parametrize("case", sorted(INFER_REFUSALS))
def test_infer_refuses_before_writing(case, bad, voc_root, tiny_bao_weights, tmp_path, capsys):
    changes, phrases = INFER_REFUSALS[case]
    argv = _infer_args(voc_root, tiny_bao_weights, "--out_pred", str(tmp_path / "out" / "pred"))
    for flag, value in changes.items():
        argv = _replace(argv, flag, value.format(**{k: str(v) for k, v in bad.items()}))
    code, _, err = call_main("infer_bao", argv, capsys)
    assert_refused(code, err, *phrases)
    assert not (tmp_path / "out").exists()
    assert not bad["marker"].exists()


def test_infer_odd_image_modes_and_tiny_images(odd_root, tiny_bao_weights, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = call_main("infer_bao", _infer_args(odd_root, tiny_bao_weights, "--out_pred", str(out / "pred"),
                                                  "--out_crf", str(out / "crf"), "--out_cam", str(out / "cam")),
                         capsys)
    assert code == 0, err
    for name, (_, (w, h)) in ODD_IMAGES.items():
        assert read_label_png(out / "pred" / f"{name}.png").shape == (h, w), name
        assert read_label_png(out / "crf" / f"{name}.png").shape == (h, w), name
        assert load_cams(out / "cam" / f"{name}.npz")[1].shape[1:] == (h, w), name
    assert_no_partial_files(out)


@pytest.mark.parametrize("failure", ["disk full", "permission denied"])
def test_infer_write_errors_name_the_path(failure, voc_root, tiny_bao_weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pred"
    if failure == "disk full":
        def save(self, fp, *args, **kwargs):
            Path(fp).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Image.Image, "save", save)
        phrase = "the disk is full; free space or choose another folder"
    else:
        real_open = os.open

        def open_denied(file, *args, **kwargs):  # the folder became read-only (tests may run as root)
            if Path(file).parent == out:
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_denied)
        phrase = "permission denied; choose a folder you can write to"
    code, _, err = call_main("infer_bao", _infer_args(voc_root, tiny_bao_weights, "--out_pred", str(out)), capsys)
    monkeypatch.undo()
    assert_refused(code, err, f"cannot write {out / 'synth_000000.png'}: {phrase}")
    assert out.is_dir() and not list(out.iterdir())


@pytest.mark.slow
def test_infer_ctrl_c_exits_cleanly_and_leaves_only_complete_files(voc_root, tiny_bao_weights, tmp_path):
    out = tmp_path / "out"
    args = _replace(_infer_args(voc_root, tiny_bao_weights, "--out_pred", str(out / "pred"), "--out_cam",
                                str(out / "cam")), "--scales", "128,256")
    args = _replace(_replace(args, "--infer_list", str(voc_root / "ImageSets/Segmentation/trainval.txt")),
                    "--num_workers", "1")
    proc = subprocess.Popen([sys.executable, "infer_bao.py", *args], cwd=ROOT, text=True, start_new_session=True,
                            preexec_fn=_as_from_a_terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "cam").is_dir() or not [p for p in (out / "cam").iterdir() if not is_temporary(p.name)]:
        assert proc.poll() is None and time.monotonic() < deadline, "inference ended before it could be interrupted"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    done = {p.stem for p in (out / "cam").iterdir()}
    assert 0 < len(done) < 18
    assert_no_partial_files(out)


# -------------------------------------------------------------------------- visualisation

@pytest.mark.slow
def test_visual_corrupt_jpeg_through_a_worker(corrupt_root, tiny_bao_weights, tmp_path):
    root, jpeg = corrupt_root
    out = tmp_path / "vis"
    proc = run_script("visual_bao.py", *_replace(_visual_args(root, tiny_bao_weights, out), "--num_workers", "1"))
    assert_refused(proc.returncode, proc.stderr, f"cannot read image {jpeg}")
    assert "DataLoader worker" not in proc.stderr
    assert_no_partial_files(out)


VISUAL_REFUSALS = {
    "weights is a folder": ({"--weights": "{folder}"}, ("is a folder",)),
    "transcam weights for bao": ({"--weights": "{transcam}"}, ("is a TransCAM checkpoint", "--method transcam")),
    "weights truncated": ({"--weights": "{truncated}"}, ("truncated or corrupt",)),
    "dataset root missing": ({"--voc12_root": "{folder}/nowhere"}, ("VOC root", "does not exist")),
    "list missing": ({"--list": "{folder}/none.txt"}, ("list file not found",)),
    "list empty": ({"--list": "{empty_list}"}, ("is empty",)),
    "name without image": ({"--list": "{ghost_list}", "--label_file": "{ghost_labels}"},
                           ("1 of 2 images of {ghost_list} are missing", "first: ghost_image")),
    "dataset root without images": ({"--voc12_root": "{folder}"}, ("not a dataset root; check --voc12_root",)),
    "unknown arch": ({"--arch": "huge"}, ("unknown --arch 'huge'",)),
    "scale not a multiple of 16": ({"--scales": "100"}, ("multiples of 16",)),
    "negative batch": ({"--batch_size": "-1"}, ("argument --batch_size: must be >= 1",)),
    "unknown method": ({"--method": "foo"}, ("invalid choice: 'foo'",)),
}


@pytest.mark.parametrize("case", sorted(VISUAL_REFUSALS))
def test_visual_refuses_before_writing(case, bad, voc_root, tiny_bao_weights, tiny_transcam_weights, tmp_path,
                                       capsys):
    changes, phrases = VISUAL_REFUSALS[case]
    argv = _visual_args(voc_root, tiny_bao_weights, tmp_path / "vis")
    names = {k: str(v) for k, v in bad.items()} | {"transcam": str(tiny_transcam_weights)}
    for flag, value in changes.items():
        argv = _replace(argv, flag, value.format(**names))
    code, _, err = call_main("visual_bao", argv, capsys)
    assert_refused(code, err, *(phrase.format(**names) for phrase in phrases))
    assert not (tmp_path / "vis").exists()


# ----------------------------------------------------------------------------- evaluation

def test_evaluation_list_and_flag_errors(bad, tmp_path, capsys):
    from core.palette import save_label_png

    save_label_png(tmp_path / "gt" / "a.png", np.zeros((2, 3), np.uint8))
    save_label_png(tmp_path / "pred" / "a.png", np.zeros((2, 3), np.uint8))
    (tmp_path / "list.txt").write_text("a\n")
    base = ["--predict_dir", str(tmp_path / "pred"), "--gt_dir", str(tmp_path / "gt"), "--workers", "1",
            "--no_progress", "--logfile", str(tmp_path / "log.txt")]
    proc = run_script("evaluation_bao.py", *base, "--list", str(bad["empty_list"]))
    assert_refused(proc.returncode, proc.stderr, f"list file {bad['empty_list']} is empty")
    cases = {
        "list missing": (["--list", str(tmp_path / "none.txt")], ("list file not found",)),
        "one class": (["--list", str(tmp_path / "list.txt"), "--num_classes", "1"],
                      ("argument --num_classes: must be >= 2, got 1",)),
        "no workers": (["--list", str(tmp_path / "list.txt"), "--workers", "0"],
                       ("argument --workers: must be >= 1, got 0",)),
        "unknown type": (["--list", str(tmp_path / "list.txt"), "--type", "foo"], ("invalid choice: 'foo'",)),
        "json under a file": (["--list", str(tmp_path / "list.txt"), "--json", str(bad["a_file"] / "r.json")],
                              (f"cannot write {bad['a_file'] / 'r.json'}",)),
    }
    for extra, phrases in cases.values():
        code, _, err = call_main("evaluation_bao", base + extra, capsys)
        assert_refused(code, err, *phrases)
    assert not (tmp_path / "log.txt").exists()  # every refusal came before any scoring
    assert_no_partial_files(tmp_path)


# ------------------------------------------------------------------- COCO preparation

@pytest.fixture(scope="module")
def slow_coco_root(tmp_path_factory) -> Path:
    """A COCO root of 150 large val images (one polygon each) that takes seconds to paint."""
    from data.classes import COCO_CATEGORY_IDS, COCO_CLASSES

    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, 151):
        name = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014" / name).write_bytes(b"")  # only the existence of the images is checked
        images.append({"id": i, "file_name": name, "height": 1600, "width": 1600})
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[10, 10, 1500, 40, 1400, 1500, 30, 1400]]})
    categories = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return root


def test_prepare_coco_ctrl_c_leaves_no_worker_traceback_and_no_temporary(slow_coco_root, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    stale = masks / ".COCO_val2014_000000000150.png.abc123.tmp.png"  # left by an earlier, killed run
    stale.write_bytes(b"half")
    cmd = [sys.executable, "-m", "coco14.prepare_coco", "--coco_root", str(slow_coco_root), "--splits", "val",
           "--out_dir", str(tmp_path / "out"), "--mask_dir", str(masks), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, start_new_session=True, preexec_fn=_as_from_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not [p for p in masks.glob("COCO_*.png")]:
        assert proc.poll() is None and time.monotonic() < deadline, "preparation ended before it could be interrupted"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the workers get it too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err and "PoolWorker" not in err
    assert not stale.exists()
    written = list(masks.glob("COCO_*.png"))
    assert 0 < len(written) < 150
    assert_no_partial_files(masks)
    assert not (tmp_path / "out").exists()  # lists and labels are written once all masks are done

    code, _, err = call_main("coco14.prepare_coco", cmd[3:-2] + ["--workers", "0"], capsys)
    assert_refused(code, err, "argument --workers: must be >= 1, got 0")


# ---------------------------------------------------------------------- dataset generator

def test_make_dataset_errors(bad, tmp_path, capsys):
    cases = {
        "no train images": (["--out", str(tmp_path / "a"), "--num_train", "0"], ("argument --num_train: must be >= 1",)),
        "bad quality": (["--out", str(tmp_path / "b"), "--quality", "0"], ("--quality must lie in 1..100",)),
        "output under a file": (["--out", str(bad["a_file"] / "VOC2012"), "--num_train", "1", "--num_val", "0"],
                                (f"cannot write {bad['a_file'] / 'VOC2012' / 'JPEGImages'}",)),
    }
    for argv, phrases in cases.values():
        code, _, err = call_main("protocol.make_dataset", argv, capsys)
        assert_refused(code, err, *phrases)
    assert not list(tmp_path.iterdir())


def test_remove_temporaries_touches_only_the_given_outputs(tmp_path):
    from core.fileio import atomic_path, remove_temporaries

    names = [".a.png.x1y2.tmp.png", ".b.png.z3w4.tmp.png", ".a.npz.q5r6.tmp.npz", "a.png", ".hidden.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert remove_temporaries(tmp_path, ".png", {"a"}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert remove_temporaries(tmp_path / "missing", ".png", {"a"}) == 0
    with atomic_path(tmp_path / "c.png") as tmp:  # the names atomic_path really uses are recognised
        assert remove_temporaries(tmp_path, ".png", {"c"}) == 1 and not Path(tmp).exists()
        Path(tmp).write_bytes(b"done")
    assert (tmp_path / "c.png").read_bytes() == b"done"


def test_atomic_path_leaves_nothing_when_interrupted_right_after_creating_the_temporary(tmp_path, monkeypatch):
    """Ctrl-C lands between any two steps; right after the temporary file appears is the worst."""
    from core.fileio import atomic_path

    def close_interrupted(fd):
        real_close(fd)
        raise KeyboardInterrupt

    real_close = os.close
    monkeypatch.setattr(os, "close", close_interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "a.png"):
        pass
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())


def test_loader_workers_ignore_ctrl_c_and_a_dropped_hand_over():
    """A batch hand-over the interrupted main process dropped is not reported; other errors are."""
    code = ("import signal, sys; from core.errors import quiet_loader_worker; quiet_loader_worker(); "
            "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN; "
            "sys.excepthook(ConnectionResetError, ConnectionResetError(104, 'reset'), None); "
            "sys.excepthook(EOFError, EOFError(), None); sys.excepthook(ValueError, ValueError('shown'), None)")
    proc = run_script("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "ValueError: shown"
