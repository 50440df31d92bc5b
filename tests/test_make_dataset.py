"""Tests of data/synthetic.py and its command protocol/make_dataset.py: the synthetic dataset in the real VOC folder format."""
from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from core.palette import read_label_png
from data.images import read_image
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout, labels_from_annotations
from data.synthetic import CLASSES, generate

REPO = Path(__file__).resolve().parent.parent
NUM_TRAIN, NUM_VAL, SIZE, SEED = 8, 4, 64, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "VOC2012"
    return root, generate(root, NUM_TRAIN, NUM_VAL, SIZE, SEED)


def _shifts(a: np.ndarray):
    """The 9 views of ``a`` shifted by -1..1 pixels (edges repeated)."""
    h, w = a.shape
    padded = np.pad(a, 1, mode="edge")
    return [padded[dy:dy + h, dx:dx + w] for dy in (0, 1, 2) for dx in (0, 1, 2)]


def _next_to_other(ids: np.ndarray) -> np.ndarray:
    """Pixels with a different id in their 3 x 3 neighbourhood."""
    return np.logical_or.reduce([s != ids for s in _shifts(ids)])


def _names(root: Path) -> list[str]:
    return read_list(root / "ImageSets" / "Segmentation" / "trainval.txt")


def test_list_files_and_label_file(dataset):
    root, summary = dataset
    train = read_list(root / "ImageSets" / "Segmentation" / "train.txt")
    val = read_list(root / "ImageSets" / "Segmentation" / "val.txt")
    assert len(train) == NUM_TRAIN and len(val) == NUM_VAL
    assert _names(root) == train + val and not set(train) & set(val)
    assert (root / "ImageSets" / "Segmentation" / "train.txt").read_text().splitlines() == train  # bare names
    labels = ImageLabels.load(root / "cls_labels.json")
    assert labels.classes == list(CLASSES) == summary["classes"]
    assert 5 <= len(CLASSES) <= 6
    assert sorted(labels.ids) == sorted(train + val)
    assert all(1 <= len(v) <= 2 for v in labels.ids.values())
    assert any(len(v) == 2 for v in labels.ids.values()), "some image must hold two classes"
    assert summary["two_class_images"] == sum(len(v) == 2 for v in labels.ids.values())


def test_images_and_masks_readable_by_the_voc_layout(dataset):
    root, summary = dataset
    layout = DatasetLayout.voc(root)
    names = _names(root)
    layout.check(names)
    layout.check_masks(names)
    labels = ImageLabels.load(root / "cls_labels.json")
    shapes = set()
    for name in names:
        img = read_image(layout.image_path(name))
        h, w = img.shape[:2]
        shapes.add((h, w))
        assert 0.75 * SIZE - 1 <= h <= 1.25 * SIZE + 1 and 0.75 * SIZE - 1 <= w <= 1.25 * SIZE + 1
        assert layout.mask_path(name) == root / "SegmentationClassAug" / f"{name}.png"
        aug = read_label_png(root / "SegmentationClassAug" / f"{name}.png")
        seg = read_label_png(root / "SegmentationClass" / f"{name}.png")
        assert aug.shape == seg.shape == (h, w)
        # Both masks hold exactly the image's label ids (besides background and ignore).
        assert sorted(set(np.unique(aug).tolist()) - {0}) == labels.ids[name]
        assert sorted(set(np.unique(seg).tolist()) - {0, 255}) == labels.ids[name]
        # SegmentationClass = Aug plus a thin 255 band on boundaries; Aug has no ignore pixels.
        assert 255 not in aug
        band = seg == 255
        assert band.any() and 0.0 < band.mean() < 0.25
        np.testing.assert_array_equal(seg[~band], aug[~band])
        objects = read_label_png(root / "SegmentationObject" / f"{name}.png")
        np.testing.assert_array_equal(objects == 255, band)
        # Every pixel next to another class is in the band, and the band separates objects:
        # an id pixel outside the band touches only its own id or the band.
        assert not (_next_to_other(aug) & ~band).any()
        for shifted in _shifts(objects):
            assert not (~band & (shifted != objects) & (shifted != 255)).any()
    assert len({h for h, _ in shapes}) > 1 and len({w for _, w in shapes}) > 1
    assert any(h != w for h, w in shapes)
    assert summary["height"] == (min(h for h, _ in shapes), max(h for h, _ in shapes))


def test_annotations_match_labels_and_masks(dataset):
    root, summary = dataset
    layout = DatasetLayout.voc(root)
    names = _names(root)
    labels = ImageLabels.load(root / "cls_labels.json")
    assert labels_from_annotations(layout, names, list(CLASSES)).ids == labels.ids
    num_objects = 0
    for name in names:
        tree = ET.parse(layout.annotation_path(name)).getroot()
        aug = read_label_png(root / "SegmentationClassAug" / f"{name}.png")
        h, w = aug.shape
        assert tree.findtext("filename") == f"{name}.jpg"
        assert (int(tree.findtext("size/width")), int(tree.findtext("size/height"))) == (w, h)
        objects = tree.findall("object")
        assert 1 <= len(objects) <= 3
        num_objects += len(objects)
        instances = read_label_png(root / "SegmentationObject" / f"{name}.png")
        assert sorted(set(np.unique(instances).tolist()) - {0, 255}) == list(range(1, len(objects) + 1))
        for k, obj in enumerate(objects, start=1):
            cls_id = CLASSES.index(obj.findtext("name")) + 1
            assert (aug[instances == k] == cls_id).all()
            x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h
            # The 1-based inclusive box holds the whole object.
            ys, xs = np.nonzero(instances == k)
            assert x0 - 1 <= xs.min() and xs.max() <= x1 - 1 and y0 - 1 <= ys.min() and ys.max() <= y1 - 1
    assert num_objects == summary["objects"]


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    again = tmp_path / "again"
    generate(again, NUM_TRAIN, NUM_VAL, SIZE, SEED)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 5 * (NUM_TRAIN + NUM_VAL) + 4
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate(other, 2, 0, SIZE, SEED + 1)
    name = _names(root)[0]
    assert (root / "JPEGImages" / f"{name}.jpg").read_bytes() != (other / "JPEGImages" / f"{name}.jpg").read_bytes()


def test_train_images_do_not_depend_on_num_val(dataset, tmp_path):
    root, _ = dataset
    generate(tmp_path / "fewer", 2, 1, SIZE, SEED)
    name = _names(root)[1]
    assert (root / "JPEGImages" / f"{name}.jpg").read_bytes() == \
        (tmp_path / "fewer" / "JPEGImages" / f"{name}.jpg").read_bytes()


def test_cli_writes_dataset_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "VOC2012"
    cmd = [sys.executable, "-m", "protocol.make_dataset", "--out", str(out), "--num_train", "3",
           "--num_val", "1", "--size", "48", "--seed", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 train + 1 val images" in done.stdout and "disc" in done.stdout
    assert len(list((out / "JPEGImages").iterdir())) == 4
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: {out} already holds images; pass --overwrite or "
                                                 "choose another --out"]
    forced = subprocess.run(cmd + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    bad = subprocess.run(cmd[:-2] + ["--size", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--size 8 is too small" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "protocol.make_dataset", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for flag in ("--out", "--num_train", "--num_val", "--size", "--seed", "--quality", "--overwrite"):
        assert flag in helped.stdout


def test_three_hundred_images_generate_quickly(tmp_path):
    start = time.perf_counter()
    summary = generate(tmp_path / "big", 300, 0, 128, 0)
    elapsed = time.perf_counter() - start
    print(f"300 images of size 128 generated in {elapsed:.2f} s")
    assert summary["num_train"] == 300
    assert all(n > 20 for n in summary["images_per_class"].values())  # every class well represented
    # Generous bound (about 3 s on one free core): catches an accidental slow path only.
    assert elapsed < 60
