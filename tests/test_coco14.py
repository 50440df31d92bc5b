"""COCO 2014 preparation (coco14/prepare_coco.py) on a small COCO root built here.

Expected masks are decoded independently with the COCO API (``COCO.annToMask``), not with
the module's painter, and checked pixel by pixel; a few pixels are also checked by hand.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tests.coco_root import (
    annotation,
    box_mask,
    compressed_rle,
    rect,
    stem,
    uncompressed_rle,
    write_coco_root,
)
from tests.helpers import run_script
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from coco14.prepare_coco import get_args_parser, main, paint_mask
from data.classes import COCO as COCO_CONTIGUOUS, COCO_CATEGORY_IDS, COCO_CLASSES, COCO_RAW, convention_classes
from data.labels import ImageLabels, read_list
from core.errors import UserError
from core.palette import read_label_png

CONTIGUOUS = {cat: i + 1 for i, cat in enumerate(COCO_CATEGORY_IDS)}
PERSON, CAR, BUS, CAT, DOG, HORSE, TOOTHBRUSH = 1, 3, 6, 17, 18, 19, 90  # raw category ids

# image id -> (split, height, width); 3 has no annotation.
IMAGES = {1: ("train", 32, 40), 2: ("train", 30, 48), 3: ("train", 32, 40), 4: ("val", 32, 40), 5: ("val", 28, 36)}


def _annotations() -> list[dict]:
    car = box_mask(30, 48, slice(3, 13), slice(5, 21))
    crowd_bus = box_mask(30, 48, slice(10, 26), slice(15, 41))
    crowd_person = box_mask(28, 36, slice(5, 20), slice(10, 30))
    return [
        # Image 1: a small dog inside a large person; the dog comes first in the file and
        # its "area" field claims it is the larger one: only the decoded area may count.
        annotation(10, 1, DOG, [rect(10, 8, 18, 16)], area=5000.0),
        annotation(11, 1, PERSON, [rect(2, 2, 30, 26)], area=10.0),
        annotation(12, 1, TOOTHBRUSH, [[32, 2, 39, 2, 39, 9], [32, 20, 39, 20, 32, 28]]),  # two parts
        # Image 2: compressed RLE car, uncompressed-RLE crowd of buses over part of the car
        # and of a cat polygon.
        annotation(20, 2, CAR, compressed_rle(car)),
        annotation(21, 2, BUS, uncompressed_rle(crowd_bus), crowd=1),
        annotation(22, 2, CAT, [rect(30, 18, 44, 28)]),
        # Image 4: two overlapping squares of equal area: the higher id ends on top.
        annotation(41, 4, HORSE, [rect(8, 8, 18, 18)]),
        annotation(40, 4, DOG, [rect(4, 4, 14, 14)]),
        # Image 5: only a crowd (compressed RLE).
        annotation(50, 5, PERSON, compressed_rle(crowd_person), crowd=1),
    ]


def _stem(image_id: int) -> str:
    return stem(IMAGES, image_id)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_coco_root(tmp_path_factory.mktemp("coco"), IMAGES, _annotations())


def _expected_mask(coco: COCO, image_id: int, value_of: dict[int, int]) -> np.ndarray:
    """Reference painting with the COCO API: crowd 255, then instances largest first."""
    info = coco.imgs[image_id]
    expected = np.zeros((info["height"], info["width"]), np.uint8)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    for a in anns:
        if a["iscrowd"]:
            expected[coco.annToMask(a) > 0] = 255
    things = [(coco.annToMask(a), a) for a in anns if not a["iscrowd"]]
    for m, a in sorted(things, key=lambda t: (-int(t[0].sum()), t[1]["id"])):
        expected[m > 0] = value_of[a["category_id"]]
    return expected


def _run(*args: str) -> subprocess.CompletedProcess:
    return run_script("-m", "coco14.prepare_coco", *args, timeout=120)

def _check_masks(coco_root: Path, mask_dir: Path, value_of: dict[int, int]) -> None:
    for split in ("train", "val"):
        coco = COCO(str(coco_root / "annotations" / f"instances_{split}2014.json"))
        for image_id in coco.getImgIds():
            got = read_label_png(mask_dir / f"{_stem(image_id)}.png")
            np.testing.assert_array_equal(got, _expected_mask(coco, image_id, value_of),
                                          err_msg=f"mask of image {image_id}")


@pytest.fixture(scope="module")
def prepared(coco_root, tmp_path_factory) -> dict:
    """Contiguous run over val, then train (labels merge), then both again (all skipped)."""
    out = tmp_path_factory.mktemp("out")
    masks = coco_root / "SegmentationClass"  # the default mask folder
    first = _run("--coco_root", str(coco_root), "--out_dir", str(out), "--splits", "val", "--workers", "2")
    assert first.returncode == 0, first.stderr
    val_only = ImageLabels.load(out / "cls_labels.json", num_fg=80)
    second = _run("--coco_root", str(coco_root), "--out_dir", str(out), "--splits", "train", "--workers", "2")
    assert second.returncode == 0, second.stderr
    mtimes = {p.name: p.stat().st_mtime_ns for p in masks.glob("*.png")}
    third = _run("--coco_root", str(coco_root), "--out_dir", str(out), "--workers", "2")
    assert third.returncode == 0, third.stderr
    return {"out": out, "masks": masks, "val_only": val_only, "runs": (first, second, third), "mtimes": mtimes}


def test_contiguous_masks_match_cocoapi(coco_root, prepared):
    masks = prepared["masks"]
    assert sorted(p.name for p in masks.glob("*.png")) == sorted(f"{_stem(i)}.png" for i in IMAGES)
    _check_masks(coco_root, masks, CONTIGUOUS)
    # Hand-checked pixels (row, col): contiguous ids dog 17, horse 18, cat 16, toothbrush 80.
    m1 = read_label_png(masks / f"{_stem(1)}.png")
    assert m1.shape == (32, 40)
    assert (m1[12, 14], m1[20, 25], m1[0, 0], m1[4, 37], m1[25, 33]) == (17, 1, 0, 80, 80)
    m2 = read_label_png(masks / f"{_stem(2)}.png")
    assert m2.shape == (30, 48)
    assert (m2[11, 17], m2[20, 20], m2[22, 35], m2[5, 8], m2[28, 2]) == (3, 255, 16, 3, 0)
    assert not (read_label_png(masks / f"{_stem(3)}.png")).any()
    m4 = read_label_png(masks / f"{_stem(4)}.png")
    assert (m4[10, 10], m4[6, 6], m4[16, 16]) == (18, 17, 18)
    m5 = read_label_png(masks / f"{_stem(5)}.png")
    assert set(np.unique(m5).tolist()) == {0, 255}


def test_lists_labels_and_convention(coco_root, prepared):
    out, masks = prepared["out"], prepared["masks"]
    assert read_list(out / "train.txt") == [_stem(1), _stem(2), _stem(3)]
    assert read_list(out / "val.txt") == [_stem(4), _stem(5)]
    # the scoring lists: images with at least one labelled class (3 has no annotation; 5 a crowd person)
    assert read_list(out / "train_labelled.txt") == [_stem(1), _stem(2)]
    assert read_list(out / "val_labelled.txt") == [_stem(4), _stem(5)]
    # The val-only run wrote val labels; the train run merged into them.
    assert sorted(prepared["val_only"].ids) == [_stem(4), _stem(5)]
    labels = ImageLabels.load(out / "cls_labels.json", num_fg=80)
    assert labels.classes == list(COCO_CLASSES[1:])
    expected: dict[str, set[int]] = {_stem(i): set() for i in IMAGES}
    for a in _annotations():
        expected[_stem(a["image_id"])].add(CONTIGUOUS[a["category_id"]])
    assert {k: set(v) for k, v in labels.ids.items()} == expected
    assert labels.ids[_stem(1)] == [1, 17, 80]
    assert labels.ids[_stem(2)] == [3, 6, 16]  # the crowd bus counts
    assert labels.ids[_stem(3)] == []
    assert labels.ids[_stem(5)] == [1]
    assert labels.vector(_stem(4)).nonzero()[0].tolist() == [16, 17]

    record = json.loads((masks / "convention.json").read_text())
    assert record["convention"] == "contiguous"
    assert (record["num_classes"], record["background"], record["ignore"]) == (81, 0, 255)
    assert record["category_ids"] == list(COCO_CATEGORY_IDS)
    assert record["values"] == list(range(1, 81))
    assert record["class_names"] == list(COCO_CLASSES)
    assert convention_classes(record) == COCO_CONTIGUOUS  # what evaluation reads from it
    assert "255" in record["crowd"] and "smaller instance on top" in record["overlap"]


def test_resume_skips_existing_masks(prepared):
    first, second, third = prepared["runs"]
    assert "val: 2 images (0 without annotations), 2 masks written, 0 already present" in first.stdout
    assert "train: 3 images (1 without annotations), 3 masks written, 0 already present" in second.stdout
    assert "train: 3 images (1 without annotations), 0 masks written, 3 already present" in third.stdout
    assert "val: 2 images (0 without annotations), 0 masks written, 2 already present" in third.stdout
    assert {p.name: p.stat().st_mtime_ns for p in prepared["masks"].glob("*.png")} == prepared["mtimes"]
    assert not [p for p in prepared["masks"].iterdir() if p.name.startswith(".")]


def test_raw_convention_and_refusal_to_mix(coco_root, prepared, tmp_path):
    raw = tmp_path / "raw"
    run = _run("--coco_root", str(coco_root), "--out_dir", str(tmp_path / "out"), "--mask_dir", str(raw),
               "--convention", "raw", "--workers", "2")
    assert run.returncode == 0, run.stderr
    _check_masks(coco_root, raw, {c: c for c in COCO_CATEGORY_IDS})
    m4 = read_label_png(raw / f"{_stem(4)}.png")
    assert (m4[10, 10], m4[6, 6]) == (HORSE, DOG)
    record = json.loads((raw / "convention.json").read_text())
    assert (record["convention"], record["num_classes"]) == ("raw", 91)
    assert record["values"] == list(COCO_CATEGORY_IDS)
    assert convention_classes(record) == COCO_RAW  # 91 ids, the ten unused ones no class
    # Labels stay contiguous whatever the mask convention.
    assert ImageLabels.load(tmp_path / "out" / "cls_labels.json", num_fg=80).ids[_stem(1)] == [1, 17, 80]

    mixed = _run("--coco_root", str(coco_root), "--out_dir", str(tmp_path / "out"),
                 "--mask_dir", str(prepared["masks"]), "--convention", "raw", "--workers", "1")
    assert mixed.returncode == 2
    assert mixed.stderr.startswith("error:") and "'contiguous' convention" in mixed.stderr
    assert "Traceback" not in mixed.stderr


def test_degenerate_polygons_are_skipped():
    square = [1, 1, 8, 1, 8, 8, 1, 8]
    got = paint_mask(10, 12, [(1, 5, False, [square, [2, 2, 3, 3]])])
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([square], 10, 12))) * 5
    np.testing.assert_array_equal(got, expected)
    assert got.sum() > 0
    assert not paint_mask(10, 12, [(2, 5, False, [[2, 2, 3, 3], [4, 4]])]).any()


def _main(coco_root: Path, tmp_path: Path, *extra: str) -> None:
    args = get_args_parser().parse_args(["--coco_root", str(coco_root), "--out_dir", str(tmp_path / "o"),
                                         "--mask_dir", str(tmp_path / "m"), "--workers", "1", *extra])
    main(args)


def _copy_root(coco_root: Path, dest: Path) -> Path:
    for p in coco_root.rglob("*"):
        if p.is_file() and "SegmentationClass" not in p.parts:
            (dest / p.relative_to(coco_root)).parent.mkdir(parents=True, exist_ok=True)
            (dest / p.relative_to(coco_root)).write_bytes(p.read_bytes())
    return dest


def test_user_errors(coco_root, tmp_path):
    with pytest.raises(UserError, match="COCO root not found"):
        _main(tmp_path / "nowhere", tmp_path)
    root = _copy_root(coco_root, tmp_path / "root")
    ann = root / "annotations" / "instances_val2014.json"
    good = ann.read_text()

    ann.write_text(good[:100])
    with pytest.raises(UserError, match="instances_val2014.json is not valid JSON"):
        _main(root, tmp_path, "--splits", "val")

    data = json.loads(good)
    data["categories"] = data["categories"][:-1]
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"missing ids \[90\]"):
        _main(root, tmp_path, "--splits", "val")

    data = json.loads(good)
    data["annotations"][0]["segmentation"] = {"counts": [5, 7], "size": [32, 40]}
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match="annotation 41: uncompressed RLE counts"):
        _main(root, tmp_path, "--splits", "val")

    ann.write_text(good)
    (root / "val2014" / f"{_stem(5)}.jpg").unlink()
    with pytest.raises(UserError, match=f"1 image.* missing .*first: {_stem(5)}.jpg"):
        _main(root, tmp_path, "--splits", "val")

    ann.unlink()
    with pytest.raises(UserError, match="annotation file not found"):
        _main(root, tmp_path, "--splits", "val")
    for p in (root / "train2014").iterdir():
        p.unlink()
    (root / "train2014").rmdir()
    with pytest.raises(UserError, match="image folder not found: .*train2014"):
        _main(root, tmp_path, "--splits", "train")


def test_rejected_annotation_file_creates_nothing(coco_root, tmp_path):
    """docs/troubleshooting.md: a rejected input leaves no convention.json, mask or list behind."""
    root = _copy_root(coco_root, tmp_path / "root")
    data = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    data["categories"] = data["categories"][:-1]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"missing ids \[90\]"):
        _main(root, tmp_path, "--splits", "val")
    assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists()


def test_mask_dir_with_unknown_pngs_is_refused(coco_root, tmp_path):
    (tmp_path / "m").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "m" / "x.png")
    with pytest.raises(UserError, match="no convention.json"):
        _main(coco_root, tmp_path, "--splits", "val")


def test_every_flag_has_help():
    for action in get_args_parser()._actions:
        assert action.help, action.dest


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--coco_root", "x", "--workers", "0"])
    assert "argument --workers: must be >= 1, got 0" in capsys.readouterr().err
