"""MS COCO 2014 end to end on a small COCO root built here: coco14/prepare_coco.py, TransCAM
and BAO training, inference with CRF, evaluation in both id conventions, visualisation,
all through the real command lines (tiny model, 64-pixel images); plus the class-count and
class-name rules of evaluation_bao.py.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation_bao
import train_bao
from tests.coco_root import annotation, box_mask, compressed_rle, rect, stem, uncompressed_rle, write_coco_root
from tests.helpers import run_script
from data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from data.labels import ImageLabels
from data.camio import load_cams
from core.errors import UserError
from core.palette import read_label_png, save_label_png

PERSON, CAR, TRAFFIC_LIGHT, CAT, DOG, UMBRELLA = 1, 3, 10, 17, 18, 28  # raw category ids
CONTIGUOUS = {cat: i + 1 for i, cat in enumerate(COCO_CATEGORY_IDS)}  # umbrella 28 -> 26, an unused raw id

# image id -> (split, height, width); 5 and 9 have no annotation.
IMAGES = {1: ("train", 64, 64), 2: ("train", 64, 80), 3: ("train", 64, 64), 4: ("train", 64, 80),
          5: ("train", 64, 64), 6: ("train", 64, 64), 7: ("val", 64, 80), 8: ("val", 64, 64), 9: ("val", 64, 64)}
TINY = ("--arch", "tiny", "--device", "cpu")


def _annotations() -> list[dict]:
    return [
        annotation(10, 1, PERSON, [rect(4, 4, 40, 60)]),
        annotation(11, 1, DOG, [rect(30, 30, 60, 60)]),
        annotation(20, 2, DOG, [rect(10, 10, 50, 50)]),
        annotation(21, 2, UMBRELLA, [rect(50, 5, 75, 30)]),
        annotation(30, 3, PERSON, compressed_rle(box_mask(64, 64, slice(5, 30), slice(10, 50))), crowd=1),
        annotation(31, 3, CAR, [rect(5, 40, 40, 60)]),
        annotation(40, 4, UMBRELLA, [rect(5, 5, 40, 40)]),
        annotation(41, 4, CAT, [rect(40, 20, 78, 60)]),
        annotation(60, 6, PERSON, [rect(8, 2, 30, 62)]),
        annotation(61, 6, CAR, [rect(30, 30, 62, 55)]),
        annotation(70, 7, PERSON, [rect(5, 5, 40, 60)]),
        annotation(71, 7, UMBRELLA, [rect(45, 10, 75, 40)]),
        annotation(80, 8, DOG, [rect(10, 10, 50, 50)]),
        annotation(81, 8, TRAFFIC_LIGHT, [rect(50, 2, 62, 30)]),
        annotation(82, 8, PERSON, uncompressed_rle(box_mask(64, 64, slice(52, 62), slice(2, 30))), crowd=1),
    ]


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Prepare (contiguous and raw masks), train TransCAM then BAO, infer on val."""
    tmp = tmp_path_factory.mktemp("coco_pipeline")
    root = write_coco_root(tmp / "coco", IMAGES, _annotations())
    paths = {"root": root, "lists": tmp / "lists", "masks": root / "SegmentationClass", "raw": tmp / "raw_masks",
             "runs": tmp / "runs", "pred": tmp / "pred", "crf": tmp / "crf", "cam": tmp / "cam"}
    _ok(run_script("-m", "coco14.prepare_coco", "--coco_root", str(root), "--out_dir", str(paths["lists"]),
                "--workers", "1"))
    _ok(run_script("-m", "coco14.prepare_coco", "--coco_root", str(root), "--out_dir", str(tmp / "lists_raw"),
                "--mask_dir", str(paths["raw"]), "--convention", "raw", "--workers", "1"))
    data = ("--dataset", "coco", "--coco_root", str(root), "--label_file", str(paths["lists"] / "cls_labels.json"))
    train = ("train_bao.py", *data, *TINY, "--train_list", str(paths["lists"] / "train.txt"), "--crop_size", "64",
             "--resize_long", "48", "80", "--batch_size", "2", "--max_steps", "2", "--num_workers", "0",
             "--save_dir", str(paths["runs"]))
    _ok(run_script(*train, "--method", "transcam", "--from_scratch", "--session_name", "tc"))
    _ok(run_script(*train, "--method", "bao", "--weights", str(paths["runs"] / "tc" / "tc_0epochs.pth"),
                "--session_name", "bao"))
    paths["weights"] = paths["runs"] / "bao" / "bao_0epochs_modelt.pth"
    paths["data"] = data
    _ok(run_script("infer_bao.py", *data, *TINY, "--infer_list", str(paths["lists"] / "val.txt"),
                "--weights", str(paths["weights"]), "--scales", "32,64", "--num_workers", "0",
                "--out_pred", str(paths["pred"]), "--out_crf", str(paths["crf"]), "--out_cam", str(paths["cam"])))
    return paths


def _stem(image_id: int) -> str:
    return stem(IMAGES, image_id)


def _val_stems() -> list[str]:
    return [_stem(i) for i in (7, 8, 9)]


@pytest.mark.slow
def test_training_skips_unlabelled_images_and_builds_81_classes(run):
    labels = ImageLabels.load(run["lists"] / "cls_labels.json", num_fg=80)
    assert labels.ids[_stem(5)] == [] and labels.ids[_stem(2)] == [17, 26]
    for session in ("tc", "bao"):
        log = (run["runs"] / session / "log.txt").read_text()
        assert "skipped 1 image(s) of" in log and ": 5 images, 2 steps per epoch" in log, log
    state = torch.load(run["weights"], weights_only=True)
    c3 = state["conv_cls_head.weight"].shape[1]
    assert state["label_enc.weight"].shape == (c3, 80)
    assert state["classifier_x.weight"].shape[0] == 81 and state["conv_cls_head.weight"].shape[0] == 81


def test_training_refuses_a_list_without_any_labelled_image(run, tmp_path):
    (tmp_path / "empty_only.txt").write_text(f"{_stem(5)}\n")
    argv = [*run["data"], *TINY, "--method", "transcam", "--from_scratch", "--train_list",
            str(tmp_path / "empty_only.txt"), "--save_dir", str(tmp_path / "runs"), "--num_workers", "0"]
    with pytest.raises(UserError, match="no image of .*empty_only.txt has a foreground class"):
        train_bao.main(train_bao.get_args_parser().parse_args(argv))
    assert not (tmp_path / "runs").exists()


def test_inference_outputs(run):
    labels = ImageLabels.load(run["lists"] / "cls_labels.json")
    for name in _val_stems():
        height, width = read_label_png(run["masks"] / f"{name}.png").shape
        allowed = {0, *labels.ids[name]}
        for folder in ("pred", "crf"):
            label = read_label_png(run[folder] / f"{name}.png")
            assert label.shape == (height, width)
            assert set(np.unique(label).tolist()) <= allowed, (folder, name)
        keys, cams = load_cams(run["cam"] / f"{name}.npz")
        assert keys.tolist() == [0, *labels.ids[name]] and cams.shape == (len(keys), height, width)
    # The image without annotations: only the background map, an all-background label map.
    assert not read_label_png(run["pred"] / f"{_stem(9)}.png").any()
    assert not read_label_png(run["crf"] / f"{_stem(9)}.png").any()


def _miou(pairs: list[tuple[np.ndarray, np.ndarray]], ids: list[int]) -> float:
    """Mean IoU (%) over ``ids`` present in ground truth or prediction, ground-truth 255 ignored."""
    ious = []
    for c in ids:
        tp = t = p = 0
        for gt, pred in pairs:
            keep = gt != 255
            g, q = gt[keep] == c, pred[keep] == c
            tp, t, p = tp + int((g & q).sum()), t + int(g.sum()), p + int(q.sum())
        if t + p:
            ious.append(tp / (t + p - tp))
    return 100 * float(np.mean(ious))


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_script("evaluation_bao.py", "--workers", "1", "--no_progress", "--logfile", "", *args)


def _main(*argv: str) -> dict:
    return evaluation_bao.main(evaluation_bao.get_args_parser().parse_args(
        ["--workers", "1", "--no_progress", "--logfile", "", *argv]))


def test_evaluation_in_both_conventions(run, tmp_path):
    val = str(run["lists"] / "val.txt")
    out = _ok(_evaluate("--predict_dir", str(run["pred"]), "--gt_dir", str(run["masks"]), "--list", val,
                        "--json", str(tmp_path / "c.json")))
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["num_classes"] == 81  # from convention.json beside the masks
    assert [c["class"] for c in report["result"]["classes"]] == list(COCO_CLASSES)
    pairs = [(read_label_png(run["masks"] / f"{n}.png"), read_label_png(run["pred"] / f"{n}.png"))
             for n in _val_stems()]
    expected = _miou(pairs, list(range(81)))
    assert f"mIoU = {expected:.2f} on 3 images" in out
    assert report["result"]["miou"] == pytest.approx(expected / 100)
    assert "umbrella" in out and "traffic light" in out and "class1 " not in out

    # Raw-id masks: the same predictions in raw ids give the same scores, the ten unused ids
    # are not classes (absent from the table and the JSON, not in the mean).
    raw_lut = np.zeros(256, np.uint8)
    raw_lut[1:81] = COCO_CATEGORY_IDS
    for name in _val_stems():
        save_label_png(tmp_path / "raw_pred" / f"{name}.png", raw_lut[read_label_png(run["pred"] / f"{name}.png")])
    out = _ok(_evaluate("--predict_dir", str(tmp_path / "raw_pred"), "--gt_dir", str(run["raw"]),
                        "--num_classes", "91", "--list", val, "--json", str(tmp_path / "r.json")))
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["num_classes"] == 91
    assert [c["id"] for c in raw["result"]["classes"]] == [0, *COCO_CATEGORY_IDS]
    assert [c["class"] for c in raw["result"]["classes"]] == list(COCO_CLASSES)
    assert raw["result"]["miou"] == pytest.approx(report["result"]["miou"])
    assert f"mIoU = {expected:.2f} on 3 images" in out and "unused" not in out
    raw_pairs = [(read_label_png(run["raw"] / f"{n}.png"), read_label_png(tmp_path / "raw_pred" / f"{n}.png"))
                 for n in _val_stems()]
    assert _miou(raw_pairs, list(range(91))) == pytest.approx(expected)

    # Contiguous ids against raw masks: umbrella is 26, an unused raw id, so they are refused.
    for name in _val_stems():
        gt = read_label_png(run["masks"] / f"{name}.png")
        save_label_png(tmp_path / "contiguous" / f"{name}.png", np.where(gt == 255, 0, gt).astype(np.uint8))
    with pytest.raises(UserError, match=r"class id\(s\) 26, which are unused COCO category ids.*"
                                        "--convention contiguous"):
        _main("--predict_dir", str(tmp_path / "contiguous"), "--gt_dir", str(run["raw"]), "--list", val)


def test_evaluation_refuses_flags_contradicting_the_masks(run):
    val = str(run["lists"] / "val.txt")
    proc = _evaluate("--predict_dir", str(run["pred"]), "--gt_dir", str(run["masks"]), "--list", val,
                     "--num_classes", "91")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for part in ("--num_classes 91 contradicts", "'contiguous' convention, evaluated with 81 classes",
                 "raw category ids", "91 classes", "--convention"):
        assert part in proc.stderr, proc.stderr
    with pytest.raises(UserError, match=r"names 81 classes .* 'raw' convention, evaluated with 91 classes"):
        _main("--predict_dir", str(run["pred"]), "--gt_dir", str(run["raw"]), "--list", val,
              "--label_file", str(run["lists"] / "cls_labels.json"))
    with pytest.raises(UserError, match=r"--convention raw contradicts the ground truth: .* 'contiguous' convention"):
        _main("--predict_dir", str(run["pred"]), "--gt_dir", str(run["masks"]), "--list", val,
              "--dataset", "coco", "--convention", "raw")


@pytest.mark.slow
def test_visualisation(run, tmp_path):
    out = tmp_path / "visual"
    _ok(run_script("visual_bao.py", *run["data"], *TINY, "--list", str(run["lists"] / "val.txt"),
                "--weights", str(run["weights"]), "--scales", "32,64", "--num_workers", "0", "--out_dir", str(out)))
    written = {p.name for p in out.iterdir()}
    s7, s8, s9 = _val_stems()
    assert {f"{s}_sheet.png" for s in (s7, s8, s9)} <= written
    assert {f"{s8}_bg.jpg", f"{s8}_dog.jpg", f"{s8}_traffic_light.jpg", f"{s7}_umbrella.jpg"} <= written
    assert sorted(n for n in written if n.startswith(s9)) == [f"{s9}_bg.jpg", f"{s9}_sheet.png"]


def test_label_file_names_the_table(tmp_path):
    """Without convention.json, --label_file gives the names and the class count."""
    save_label_png(tmp_path / "gt" / "a.png", np.array([[0, 1], [2, 2]], np.uint8))
    save_label_png(tmp_path / "pred" / "a.png", np.array([[0, 1], [2, 0]], np.uint8))
    (tmp_path / "list.txt").write_text("a\n")
    ImageLabels(["cat", "dog"], {"a": [1, 2]}).save(tmp_path / "labels.json")
    base = ("--predict_dir", str(tmp_path / "pred"), "--gt_dir", str(tmp_path / "gt"),
            "--list", str(tmp_path / "list.txt"))
    out = _ok(_evaluate(*base, "--label_file", str(tmp_path / "labels.json")))
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line[:1].isalpha() and "=" not in line}
    # background: T 1, P 2, TP 1 -> 50 %; cat 100 %; dog: T 2, P 1, TP 1 -> 50 %
    assert rows == {"class": "IoU", "background": "50.00", "cat": "100.00", "dog": "50.00", "mean": "66.67"}
    assert "mIoU = 66.67 on 1 images" in out
    assert "aeroplane" in _ok(_evaluate(*base))  # no label file, no convention.json: 21 VOC classes
    with pytest.raises(UserError, match="--num_classes 21 contradicts --label_file .* 2 foreground classes"):
        _main(*base, "--label_file", str(tmp_path / "labels.json"), "--num_classes", "21")
    (tmp_path / "gt" / "convention.json").write_text("{")
    with pytest.raises(UserError, match="cannot read .*convention.json"):
        _main(*base)
    (tmp_path / "gt" / "convention.json").write_text(json.dumps({"convention": "contiguous", "num_classes": 1}))
    with pytest.raises(UserError, match="is not a mask convention record"):
        _main(*base)


@pytest.mark.slow
def test_segmentation_stage_on_coco(run, tmp_path):
    """BAO pseudo-labels of the train list -> train_seg.py -> infer_seg.py on val -> evaluation (81 classes)."""
    train, val = run["lists"] / "train.txt", run["lists"] / "val.txt"
    _ok(run_script("infer_bao.py", *run["data"], *TINY, "--infer_list", str(train), "--weights", str(run["weights"]),
                "--scales", "32,64", "--num_workers", "0", "--out_pred", str(tmp_path / "pseudo")))
    _ok(run_script("train_seg.py", *run["data"], "--device", "cpu", "--train_list", str(train), "--label_dir",
                str(tmp_path / "pseudo"), "--backbone", "tiny", "--bn", "train", "--from_scratch", "--crop_size", "48",
                "--batch_size", "2", "--max_iters", "3", "--num_workers", "0", "--save_dir", str(tmp_path / "runs"),
                "--session_name", "seg"))
    weights = tmp_path / "runs" / "seg" / "seg_final.pth"
    assert torch.load(weights, weights_only=True)["aspp.0.weight"].shape[0] == 81
    _ok(run_script("infer_seg.py", *run["data"], "--device", "cpu", "--weights", str(weights), "--backbone", "tiny",
                "--infer_list", str(val), "--scales", "0.5,1.0", "--num_workers", "0", "--out_pred",
                str(tmp_path / "seg_val")))
    _ok(_evaluate("--predict_dir", str(tmp_path / "seg_val"), "--gt_dir", str(run["masks"]), "--list", str(val),
                  "--json", str(tmp_path / "seg.json")))
    report = json.loads((tmp_path / "seg.json").read_text())
    assert report["num_classes"] == 81
    pairs = []
    for name in _val_stems():
        gt = read_label_png(run["masks"] / f"{name}.png")
        pred = read_label_png(tmp_path / "seg_val" / f"{name}.png")
        assert pred.shape == gt.shape and int(pred.max()) < 81
        pairs.append((gt, pred))
    assert 100 * report["result"]["miou"] == pytest.approx(_miou(pairs, list(range(81))), abs=1e-6)
