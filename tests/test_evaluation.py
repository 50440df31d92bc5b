"""evaluation_bao.py end to end through the real CLI, including the user-error cases."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.palette import save_label_png
from data.camio import save_cams

REPO = Path(__file__).resolve().parents[1]

# Hand-made masks (see tests/test_metrics.py): IoU 25 / 50 / 50 %, mIoU 41.67 %.
GT_A = np.array([[0, 0, 1, 1],
                 [2, 2, 255, 1]], np.uint8)
PRED_A = np.array([[0, 1, 1, 1],
                   [2, 0, 2, 0]], np.uint8)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "evaluation_bao.py"), "--workers", "1", "--no_progress", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for part in parts:
        assert part in proc.stderr, proc.stderr


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """gt/, pred/ (PNG) and cam/ (npz) for two images a and b, and list.txt."""
    save_label_png(tmp_path / "gt" / "a.png", GT_A)
    save_label_png(tmp_path / "pred" / "a.png", PRED_A)
    # b: a perfect 2x4 prediction of classes 0 and 1 (adds T = P = TP = 4 to class 0 and 1)
    gt_b = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
    save_label_png(tmp_path / "gt" / "b.png", gt_b)
    save_label_png(tmp_path / "pred" / "b.png", gt_b)
    # CAMs for b: class 1 scores 0.6 / 0.8 on the object, 0.3 / 0.5 on background, so the best
    # background score on the 0.1 grid is t = 0.5 exactly (0.5 ties -> background)
    fg = np.array([[0.3, 0.5, 0.6, 0.8], [0.5, 0.3, 0.8, 0.6]], np.float32)
    bg = np.array([[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]], np.float32)
    save_cams(tmp_path / "cam" / "b.npz", np.array([0, 1]), np.stack([bg, fg]).astype(np.float16))
    (tmp_path / "list.txt").write_text("a\nb\n")
    (tmp_path / "list_b.txt").write_text("b\n")
    return tmp_path


def test_png_table_log_and_json(data: Path) -> None:
    args = ("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--logfile", "log.txt")
    proc = run(*args, "--comment", "first run", "--json", "out/r.json", cwd=data)
    assert proc.returncode == 0, proc.stderr
    # class 0: T=6 P=7 TP=5 -> 5/8; class 1: T=7 P=7 TP=6 -> 6/8; class 2: 1/2
    miou = 100 * (5 / 8 + 6 / 8 + 1 / 2) / 3
    assert f"mIoU = {miou:.2f} on 2 images" in proc.stdout
    assert "aeroplane" in proc.stdout and "62.50" in proc.stdout and "75.00" in proc.stdout
    report = json.loads((data / "out" / "r.json").read_text())
    assert report["result"]["miou"] == pytest.approx(miou / 100)
    by_name = {c["class"]: c for c in report["result"]["classes"]}
    assert by_name["bicycle"]["iou"] == pytest.approx(0.5) and by_name["bicycle"]["fn"] == pytest.approx(0.5)
    assert by_name["background"]["fp"] == pytest.approx(2 / 8) and by_name["background"]["tp"] == 5
    assert by_name["bird"]["iou"] is None  # no ground truth and no prediction: NaN -> null
    assert run(*args, "--comment", "second", "--workers", "2", cwd=data).returncode == 0
    lines = (data / "log.txt").read_text().splitlines()
    assert len(lines) == 2
    fields = lines[0].split("\t")
    assert fields[1:5] == ["first run", "png", f"mIoU={miou:.2f}", "best_t=-"]
    assert lines[1].split("\t")[1] == "second"


def test_npy_sweep_best_t_plot_and_bg_from_file(data: Path) -> None:
    proc = run("--type", "npy", "--predict_dir", "cam", "--gt_dir", "gt", "--list", "list_b.txt",
               "--t_range", "0.1", "0.9", "0.1", "--bg_from_file", "--logfile", "log.txt",
               "--comment", "sweep", "--plot", "sweep.png", "--json", "s.json", cwd=data)
    assert proc.returncode == 0, proc.stderr
    assert "best: t = 0.50, mIoU = 100.00" in proc.stdout
    assert "threshold-free: mIoU = 100.00" in proc.stdout
    report = json.loads((data / "s.json").read_text())
    assert [s["t"] for s in report["sweep"]] == pytest.approx([0.1 * i for i in range(1, 10)])
    # t = 0.4: the 0.5 background pixels become class 1 -> bg IoU 2/4, class 1 IoU 4/6
    assert report["sweep"][3]["miou"] == pytest.approx((2 / 4 + 4 / 6) / 2)
    assert report["best"]["t"] == pytest.approx(0.5) and report["bg_from_file"]["miou"] == 1.0
    assert (data / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (data / "log.txt").read_text().split("\t")
    assert log[1:5] == ["sweep", "npy", "mIoU=100.00", "best_t=0.50"]
    single = run("--type", "npz", "--predict_dir", "cam", "--gt_dir", "gt", "--list", "list_b.txt",
                 "--t", "0.4", "--logfile", "", cwd=data)
    assert single.returncode == 0 and f"mIoU = {100 * (2 / 4 + 4 / 6) / 2:.2f}" in single.stdout


def test_missing_files(data: Path) -> None:
    (data / "list3.txt").write_text("a\nb\nc\n")
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list3.txt", "--logfile", "", cwd=data)
    assert_user_error(proc, "1 of 3 ground-truth masks missing", "first: c.png")
    save_label_png(data / "gt" / "c.png", GT_A)
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list3.txt", "--logfile", "", cwd=data)
    assert_user_error(proc, "1 of 3 predictions missing", "first: c.png")
    proc = run("--predict_dir", "pred", "--list", "list3.txt", "--voc12_root", "nowhere", cwd=data)
    assert_user_error(proc, "VOC root nowhere does not exist", "--voc12_root")
    (data / "voc").mkdir()
    proc = run("--predict_dir", "pred", "--list", "list3.txt", "--voc12_root", "voc", cwd=data)
    assert_user_error(proc, "ground-truth folder not found: voc/SegmentationClass", "--gt_dir or --voc12_root")
    (data / "voc" / "SegmentationClassAug").mkdir()
    proc = run("--predict_dir", "pred", "--list", "list3.txt", "--voc12_root", "voc", cwd=data)
    assert_user_error(proc, "3 of 3 ground-truth masks missing in voc/SegmentationClassAug")
    proc = run("--predict_dir", "nowhere", "--gt_dir", "gt", "--list", "list3.txt", cwd=data)
    assert_user_error(proc, "prediction folder not found: nowhere; set --predict_dir")
    proc = run("--type", "npy", "--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", cwd=data)
    assert_user_error(proc, "2 of 2 CAM files missing", "a.png exists", "--type png")


def test_unwritable_log_file_names_the_flag(data: Path) -> None:
    """scoring.report states the problem; the script adds the flag that fixes it (apps.cli.FLAG_HINTS)."""
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--logfile", "gt", cwd=data)
    assert_user_error(proc, "cannot append to the log file gt: ", "; set --logfile")
    assert proc.stderr.count("error:") == 1


def test_size_mismatch(data: Path) -> None:
    save_label_png(data / "pred" / "a.png", np.zeros((3, 4), np.uint8))
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--logfile", "", cwd=data)
    assert_user_error(proc, "pred/a.png has size 4x3 (WxH)", "gt/a.png has size 4x2 (WxH)")
    save_cams(data / "cam" / "b.npz", np.array([1]), np.zeros((1, 4, 2), np.float32))
    proc = run("--type", "npy", "--predict_dir", "cam", "--gt_dir", "gt", "--list", "list_b.txt",
               "--logfile", "", cwd=data)
    assert_user_error(proc, "cam/b.npz has maps of size 2x4 (WxH)", "gt/b.png has size 4x2 (WxH)")


def test_ids_out_of_range_and_coco_conventions(data: Path) -> None:
    save_label_png(data / "pred" / "a.png", np.full((2, 4), 25, np.uint8))
    base = ("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--logfile", "")
    assert_user_error(run(*base, cwd=data), "pred/a.png contains class id(s) 25 outside the 21-class range 0..20",
                      "21 classes, from --dataset voc")
    save_label_png(data / "pred" / "a.png", np.full((2, 4), 85, np.uint8))
    assert_user_error(run(*base, "--dataset", "coco", "--num_classes", "81", cwd=data),
                      "pred/a.png contains class id(s) 85", "0..80", "raw COCO category ids",
                      "--convention raw")
    # A count alone names no dataset: 81 classes without --dataset coco are generic classes.
    assert_user_error(run(*base, "--num_classes", "81", cwd=data),
                      "pred/a.png contains class id(s) 85 outside the 81-class range 0..80", "--num_classes 81")
    save_label_png(data / "pred" / "a.png", np.full((2, 4), 12, np.uint8))
    assert_user_error(run(*base, "--dataset", "coco", "--convention", "raw", "--num_classes", "91", cwd=data),
                      "pred/a.png contains class id(s) 12, which are unused COCO category ids",
                      "--convention contiguous")
    proc = run(*base, "--num_classes", "91", cwd=data)  # generic ids 0..90: 12 is a class
    assert proc.returncode == 0 and "class12" in proc.stdout and "aeroplane" not in proc.stdout, proc.stderr
    assert_user_error(run(*base, "--dataset", "coco", "--num_classes", "91", cwd=data),
                      "--num_classes 91 contradicts --dataset coco", "--convention raw")
    assert_user_error(run(*base, "--convention", "raw", cwd=data), "--convention", "--dataset coco")
    save_cams(data / "cam" / "b.npz", np.array([30]), np.zeros((1, 2, 4), np.float32))
    assert_user_error(run("--type", "npy", "--predict_dir", "cam", "--gt_dir", "gt", "--list", "list_b.txt",
                          "--logfile", "", cwd=data),
                      "cam/b.npz (its 'keys') contains class id(s) 30 outside the 21-class range")


def test_rgb_prediction_refused(data: Path) -> None:
    Image.fromarray(np.zeros((2, 4, 3), np.uint8), mode="RGB").save(data / "pred" / "a.png")
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--logfile", "", cwd=data)
    assert_user_error(proc, "pred/a.png is a RGB image", "not colours")


def test_cam_files_of_another_format(data: Path) -> None:
    base = ("--type", "npy", "--gt_dir", "gt", "--list", "list_b.txt", "--logfile", "")
    pub = data / "pub"
    pub.mkdir()
    np.save(pub / "b.npy", np.array({0: np.zeros((2, 4), np.float32)}, dtype=object), allow_pickle=True)
    assert_user_error(run(*base, "--predict_dir", "pub", cwd=data),
                      "1 of 1 CAM files missing", "b.npy exists", "pickled", "infer_bao.py")
    np.savez(pub / "b.npz", high_res=np.zeros((1, 2, 4)))
    assert_user_error(run(*base, "--predict_dir", "pub", cwd=data), "pub/b.npz holds arrays ['high_res']",
                      "not a CAM file")
    save_cams(pub / "b.npz", np.array([1]), np.zeros((1, 2, 4), np.float32))
    assert_user_error(run(*base, "--predict_dir", "pub", "--bg_from_file", cwd=data),
                      "pub/b.npz has no background map (key 0)", "drop --bg_from_file")


def test_flag_misuse(data: Path) -> None:
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--plot", "x.png", cwd=data)
    assert_user_error(proc, "--plot applies to --type npy")
    proc = run("--type", "npy", "--predict_dir", "cam", "--gt_dir", "gt", "--list", "list_b.txt",
               "--t", "0.5", "--plot", "x.png", "--logfile", "", cwd=data)
    assert_user_error(proc, "--plot needs a sweep of at least two thresholds")
    assert not (data / "x.png").exists()
    proc = run("--predict_dir", "pred", "--gt_dir", "gt", "--list", "list.txt", "--workers", "0", cwd=data)
    assert proc.returncode == 2 and "argument --workers: must be >= 1, got 0" in proc.stderr


def test_class_names_come_from_the_datasets_label_file(voc_root: Path, tmp_path: Path) -> None:
    """A generated dataset names its six classes in its root's cls_labels.json: the table and the
    JSON use them, never the VOC names; a class count that contradicts the file is refused."""
    from data.synthetic import CLASSES

    base = ("--predict_dir", str(voc_root / "SegmentationClassAug"), "--voc12_root", str(voc_root),
            "--list", str(voc_root / "ImageSets" / "Segmentation" / "val.txt"), "--logfile", "")
    proc = run(*base, "--json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "aeroplane" not in proc.stdout and "mIoU = 100.00 on 6 images" in proc.stdout
    rows = [line.split()[0] for line in proc.stdout.splitlines()[2:2 + len(CLASSES) + 1]]
    assert rows == ["background", *CLASSES]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_classes"] == 7 and [c["class"] for c in report["result"]["classes"]] == ["background", *CLASSES]
    assert_user_error(run(*base, "--num_classes", "21", cwd=tmp_path), "--num_classes 21 contradicts",
                      str(voc_root / "cls_labels.json"), "6 foreground classes")
