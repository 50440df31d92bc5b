"""Tests of the data package: list/label files, image reading, layouts, transforms, datasets."""
from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from apps.cli import add_dataset_args, dataset_from_args
from core.errors import UserError
from core.palette import save_label_png
from data.datasets import ClassificationDataset, InferenceDataset, SegmentationDataset, collate_inference
from data.images import read_image
from data.labels import ImageLabels, read_list, write_list
from data.layout import DatasetLayout, labels_from_annotations
from data.transforms import (IMAGENET_MEAN, IMAGENET_STD, TrainAugment, multiscale_inputs, normalize, normalized_views,
                             resized_scales, stack_scales)

NO_JITTER = (0.0, 0.0, 0.0, 0.0)


def _normalized(rgb: tuple[int, int, int]) -> np.ndarray:
    """Hand-computed normalised value of one RGB colour: (x / 255 - mean) / std."""
    return (np.asarray(rgb) / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


def _voc_root(tmp_path: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """A tiny VOC root: one random JPEG per name with the given (H, W)."""
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    return root


# ---------------------------------------------------------------- list and label files

def test_read_list_accepts_bare_and_published_lines(tmp_path):
    published = tmp_path / "published.txt"
    published.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
                         "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n")
    bare = tmp_path / "bare.txt"
    write_list(bare, ["2007_000032", "2007_000039"])
    assert read_list(published) == read_list(bare) == ["2007_000032", "2007_000039"]
    assert bare.read_text() == "2007_000032\n2007_000039\n"


def test_image_labels_round_trip(tmp_path):
    labels = ImageLabels(["cat", "dog", "cow"], {"a": [3, 1], "b": [2]})
    labels.save(tmp_path / "labels.json")
    loaded = ImageLabels.load(tmp_path / "labels.json", num_fg=3)
    assert loaded.classes == ["cat", "dog", "cow"]
    assert loaded.ids == {"a": [1, 3], "b": [2]}
    np.testing.assert_array_equal(loaded.vector("a"), np.array([1, 0, 1], np.float32))
    with pytest.raises(UserError, match="has 3 foreground classes but 2 were expected"):
        ImageLabels.load(tmp_path / "labels.json", num_fg=2)


# ---------------------------------------------------------------- read_image

def test_read_image_grayscale_rgba_palette_and_one_bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0  # fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), np.full((2, 2, 3), [10, 20, 30]))

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_image(tmp_path / "pal.png"),
                                  [[[255, 0, 0], [0, 0, 255]], [[0, 0, 255], [255, 0, 0]]])

    Image.fromarray(np.array([[True, False]])).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_image(tmp_path / "bits.png"), [[[255] * 3, [0] * 3]])


def test_read_image_cmyk_and_16_bit(tmp_path):
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # full magenta + yellow = red
    cmyk.save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tif"), np.full((2, 3, 3), [255, 0, 0]))

    wide = np.array([[0, 257 * 100], [65535, 257 * 7 + 100]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    out = read_image(tmp_path / "wide.png")
    np.testing.assert_array_equal(out[..., 0], [[0, 100], [255, 7]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_read_image_ignores_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display": the stored pixels are still 2 x 5
    Image.new("RGB", (5, 2), (1, 2, 3)).save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (2, 5, 3)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="image not found: .*missing.jpg"):
        read_image(tmp_path / "missing.jpg")

    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    with pytest.raises(UserError, match="junk.jpg"):
        read_image(tmp_path / "junk.jpg")

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert read_image(tmp_path / "full.jpg").shape == (64, 64, 3)
    with pytest.raises(UserError, match="cut.jpg.*truncated"):
        read_image(tmp_path / "cut.jpg")


# ---------------------------------------------------------------- layouts

def test_voc_layout_paths_and_checks(tmp_path):
    root = _voc_root(tmp_path, {"a": (4, 4), "b": (4, 4)})
    save_label_png(root / "SegmentationClassAug" / "a.png", np.zeros((4, 4), np.uint8))
    save_label_png(root / "SegmentationClass" / "a.png", np.zeros((4, 4), np.uint8))
    save_label_png(root / "SegmentationClass" / "b.png", np.zeros((4, 4), np.uint8))
    layout = DatasetLayout.voc(root)
    assert layout.image_path("a") == root / "JPEGImages" / "a.jpg"
    assert layout.mask_path("a") == root / "SegmentationClassAug" / "a.png"  # Aug preferred
    assert layout.mask_path("b") == root / "SegmentationClass" / "b.png"  # fallback
    assert layout.mask_path("c") is None
    assert layout.annotation_path("a") == root / "Annotations" / "a.xml"
    layout.check(["a", "b"])
    with pytest.raises(UserError, match=r"2 of 4 images of train.txt are missing \(first: x"):
        layout.check(["a", "x", "b", "y"], "train.txt")
    with pytest.raises(UserError, match="1 of 2 images .* no ground-truth mask .first: c"):
        layout.check_masks(["a", "c"])
    with pytest.raises(UserError, match="VOC root .*nowhere does not exist.*JPEGImages"):
        DatasetLayout.voc(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image folder"):
        DatasetLayout.voc(tmp_path / "empty").check(["a"])


def test_coco_layout_picks_folder_by_prefix(tmp_path):
    root = tmp_path / "coco"
    for folder, name in (("train2014", "COCO_train2014_000000000009"), ("val2014", "COCO_val2014_000000000042"),
                         ("val2014", "plain")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (3, 3)).save(root / folder / f"{name}.jpg")
    # A stray copy in the wrong folder must not be picked for a prefixed name.
    Image.new("RGB", (3, 3)).save(root / "val2014" / "COCO_train2014_000000000009.jpg")
    layout = DatasetLayout.coco(root)
    assert layout.image_path("COCO_train2014_000000000009") == root / "train2014" / "COCO_train2014_000000000009.jpg"
    assert layout.image_path("COCO_val2014_000000000042") == root / "val2014" / "COCO_val2014_000000000042.jpg"
    assert layout.image_path("plain") == root / "val2014" / "plain.jpg"  # no prefix: both searched
    assert layout.image_path("COCO_val2014_000000000001") == root / "val2014" / "COCO_val2014_000000000001.jpg"
    layout.check(["COCO_train2014_000000000009", "plain"])
    with pytest.raises(UserError, match="1 of 1 images"):
        layout.check(["COCO_val2014_000000000001"])
    save_label_png(tmp_path / "masks" / "plain.png", np.zeros((3, 3), np.uint8))
    assert DatasetLayout.coco(root, tmp_path / "masks").mask_path("plain") == tmp_path / "masks" / "plain.png"
    assert layout.mask_dirs == (root / "SegmentationClass",)
    with pytest.raises(UserError, match="no XML annotations"):
        layout.annotation_path("plain")


def test_dataset_from_args(tmp_path):
    root = _voc_root(tmp_path, {"a": (4, 4)})
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    spec = dataset_from_args(parser.parse_args(["--voc12_root", str(root)]))
    assert spec.num_classes == 21 and spec.class_names[0] == "background" and spec.class_names[1] == "aeroplane"
    assert spec.labels.ids["2007_000032"] == [1, 15]

    ImageLabels(["x", "y"], {"a": [2]}).save(tmp_path / "two.json")
    spec = dataset_from_args(parser.parse_args(["--voc12_root", str(root), "--label_file", str(tmp_path / "two.json")]))
    assert spec.num_classes == 3 and spec.class_names == ("background", "x", "y")
    spec.check(["a"])
    with pytest.raises(UserError, match="no image-level label"):
        spec.check(["a", "b"])

    with pytest.raises(UserError, match="--dataset coco needs --coco_root"):
        dataset_from_args(parser.parse_args(["--dataset", "coco"]))
    # the library states the problem; the command-line layer adds the flag that fixes it
    with pytest.raises(UserError, match="nowhere does not exist.*; check --voc12_root"):
        dataset_from_args(parser.parse_args(["--voc12_root", str(tmp_path / "nowhere")]))
    (tmp_path / "coco").mkdir()
    spec = dataset_from_args(parser.parse_args(["--dataset", "coco", "--coco_root", str(tmp_path / "coco"),
                                                "--label_file", str(tmp_path / "two.json")]))
    assert spec.layout.kind == "coco" and spec.num_classes == 3


def test_labels_from_annotations(tmp_path):
    root = _voc_root(tmp_path, {"a": (4, 4), "b": (4, 4)})
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>dog</name><difficult>1</difficult></object>"
        "<object><name>person</name><part><name>head</name></part></object>"
        "<object><name>dog</name></object></annotation>")
    (root / "Annotations" / "b.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    layout = DatasetLayout.voc(root)
    labels = labels_from_annotations(layout, ["a"], ["cat", "dog", "person"])
    assert labels.ids == {"a": [2, 3]}
    with pytest.raises(UserError, match="b.xml.*'unicorn'"):
        labels_from_annotations(layout, ["b"], ["cat", "dog", "person"])
    with pytest.raises(UserError, match="annotation not found"):
        labels_from_annotations(layout, ["c"], ["cat"])


# ---------------------------------------------------------------- transforms

def test_normalize_hand_computed():
    img = np.array([[[255, 0, 128]]], np.uint8)
    out = normalize(img)
    assert out.shape == (3, 1, 1) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0, 0].numpy(), _normalized((255, 0, 128)), rtol=1e-5)


def test_train_augment_shape_and_determinism():
    img = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    aug = TrainAugment(crop_size=48, resize_long=(40, 80))
    a = aug(img, np.random.default_rng([7, 0, 3]))
    b = aug(img, np.random.default_rng([7, 0, 3]))
    c = aug(img, np.random.default_rng([7, 1, 3]))
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(aug(img, 5), aug(img, 5))  # an int seed works too


def test_train_augment_places_small_image_in_zero_canvas():
    img = np.zeros((10, 20, 3), np.uint8)
    img[...] = (255, 0, 0)
    aug = TrainAugment(crop_size=64, resize_long=(30, 30), jitter=NO_JITTER)
    for seed in range(4):
        out = aug(img, seed)
        inside = (out != 0).any(dim=0)
        ys, xs = torch.nonzero(inside, as_tuple=True)
        # long side 20 -> 30, short side 10 -> 15: a 15 x 30 block of pure red, zeros around it
        assert int(inside.sum()) == 15 * 30
        assert int(ys.max() - ys.min()) + 1 == 15 and int(xs.max() - xs.min()) + 1 == 30
        np.testing.assert_allclose(out[:, ys[0], xs[0]].numpy(), _normalized((255, 0, 0)), rtol=1e-5)


def test_train_augment_long_side_range_and_crop():
    img = np.full((100, 200, 3), 200, np.uint8)
    longs = set()
    aug = TrainAugment(crop_size=70, resize_long=(40, 60), jitter=NO_JITTER)
    for seed in range(30):
        inside = (aug(img, seed) != 0).any(dim=0)
        longs.add(int(inside.any(dim=0).sum()))
    assert min(longs) >= 40 and max(longs) <= 60 and len(longs) > 5
    # image larger than the crop along the width only: width fully covered, height padded
    out = TrainAugment(crop_size=48, resize_long=(64, 64), jitter=NO_JITTER)(img, 0)
    inside = (out != 0).any(dim=0)
    assert int(inside.any(dim=1).sum()) == 32 and int(inside.any(dim=0).sum()) == 48


def test_train_augment_flips_sometimes():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = (255, 0, 0)
    img[:, 4:] = (0, 0, 255)
    plain = normalize(img)
    aug = TrainAugment(crop_size=8, resize_long=(8, 8), jitter=NO_JITTER)
    seen = set()
    for seed in range(12):
        out = aug(img, seed)
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        seen.add(torch.equal(out, plain))
    assert seen == {True, False}


def test_multiscale_inputs_shapes_and_flip():
    img = np.random.default_rng(2).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out = multiscale_inputs(img, scales=(16, 24))
    assert [s for s, _ in out] == [16, 24]
    assert out[0][1].shape == (2, 3, 16, 16) and out[1][1].shape == (2, 3, 24, 24)
    for _, x in out:
        assert torch.equal(x[1], x[0].flip(-1))
    single = multiscale_inputs(img, scales=(16,), flip=False)
    assert single[0][1].shape == (1, 3, 16, 16)
    assert torch.equal(single[0][1][0], out[0][1][0])
    flat = multiscale_inputs(np.full((5, 9, 3), (255, 0, 128), np.uint8), scales=(8,), flip=False)
    np.testing.assert_allclose(flat[0][1][0, :, 3, 5].numpy(), _normalized((255, 0, 128)), rtol=1e-5)
    with pytest.raises(ValueError, match="same scales"):
        stack_scales([resized_scales(img, (16, 24)), resized_scales(img, (16,))])


def test_normalized_views_are_the_host_normalisation_bit_for_bit():
    """The device-side normalisation of the inference inputs (uint8 uploaded, normalised where the model
    runs) gives normalize()'s float32 values exactly, for every uint8 value in every channel."""
    values = np.arange(256, dtype=np.uint8)
    img = np.repeat(np.stack([values, values[::-1]], axis=1)[:, :, None], 3, axis=2)  # (256, 2, 3)
    expected = normalize(img)
    got = normalized_views(torch.from_numpy(img.transpose(2, 0, 1).copy())[None], 1)
    assert got.dtype == torch.float32 and got.shape == (1, 3, 256, 2)
    assert got[0].numpy().tobytes() == expected.numpy().tobytes()
    two = normalized_views(torch.from_numpy(np.stack([img, img[::-1]]).transpose(0, 3, 1, 2).copy()), 2)
    assert two.shape == (4, 3, 256, 2)  # image-major: image 0 plain, flipped, image 1 plain, flipped
    assert torch.equal(two[0], expected) and torch.equal(two[1], expected.flip(-1))
    assert torch.equal(two[2], normalize(img[::-1].copy())) and torch.equal(two[3], two[2].flip(-1))
    with pytest.raises(ValueError, match="views must be 1 or 2"):
        normalized_views(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), 3)


def test_multiscale_inputs_normalise_the_resized_uint8_image():
    """Normalisation follows the bicubic resize of the uint8 image (so it can run on the device after the
    upload): multiscale_inputs is normalize() of resized_scales' images, bit for bit."""
    img = np.random.default_rng(4).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    resized = resized_scales(img, (16, 32))
    assert [(s, x.dtype, tuple(x.shape)) for s, x in resized] == [(16, torch.uint8, (3, 16, 16)),
                                                                  (32, torch.uint8, (3, 32, 32))]
    for (s, x), (_, views) in zip(resized, multiscale_inputs(img, (16, 32))):
        pil = Image.fromarray(img).resize((s, s), Image.Resampling.BICUBIC)
        assert np.array_equal(x.numpy().transpose(1, 2, 0), np.asarray(pil))
        host = normalize(np.asarray(pil))
        assert views[0].numpy().tobytes() == host.numpy().tobytes()
        assert views[1].numpy().tobytes() == host.flip(-1).numpy().tobytes()


# ---------------------------------------------------------------- datasets

def test_classification_dataset_reproducible_per_epoch(tmp_path):
    root = _voc_root(tmp_path, {"a": (20, 30), "b": (6, 5)})
    labels = ImageLabels(["x", "y"], {"a": [1], "b": [1, 2]})
    aug = TrainAugment(crop_size=32, resize_long=(10, 40))
    ds = ClassificationDataset(DatasetLayout.voc(root), ["a", "b"], labels, aug, seed=3)
    first = ds[1]
    assert first["name"] == "b" and first["img"].shape == (3, 32, 32)
    assert torch.equal(first["label"], torch.tensor([1.0, 1.0]))
    again = ClassificationDataset(DatasetLayout.voc(root), ["a", "b"], labels, aug, seed=3)
    assert torch.equal(again[1]["img"], first["img"])
    assert torch.equal(again[(0, 1)]["img"], first["img"])  # a plain index is epoch 0
    assert not torch.equal(again[(1, 1)]["img"], first["img"])
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["img"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 2)
    with pytest.raises(UserError, match="no image-level label"):
        ClassificationDataset(DatasetLayout.voc(root), ["a", "c"], labels, aug)


def test_inference_dataset_and_collate(tmp_path):
    root = _voc_root(tmp_path, {"a": (10, 14), "b": (7, 5), "c": (9, 9)})
    labels = ImageLabels(["x", "y"], {"a": [1], "b": [2], "c": [1, 2]})
    ds = InferenceDataset(DatasetLayout.voc(root), ["a", "b", "c"], labels, scales=(8, 16), return_image=True)
    item = ds[1]
    assert item["size"] == (7, 5) and item["image"].shape == (7, 5, 3)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_inference)))
    assert batch["names"] == ["a", "b", "c"] and batch["sizes"] == [(10, 14), (7, 5), (9, 9)]
    assert batch["views"] == 2 and batch["labels"].tolist() == [[1, 0], [0, 1], [1, 1]]
    assert [s for s, _ in batch["inputs"]] == [8, 16]
    x16 = batch["inputs"][1][1]
    assert x16.shape == (3, 3, 16, 16) and x16.dtype == torch.uint8  # resized only: normalised on the device
    assert torch.equal(x16[1], item["inputs"][1][1])  # row b: image b
    assert torch.equal(normalized_views(x16, 2)[2:4], multiscale_inputs(item["image"], (16,))[0][1])
    assert [im.shape for im in batch["images"]] == [(10, 14, 3), (7, 5, 3), (9, 9, 3)]
    no_image = InferenceDataset(DatasetLayout.voc(root), ["a"], labels, scales=(8,), flip=False)
    assert "image" not in no_image[0] and no_image[0]["inputs"][0][1].shape == (3, 8, 8)
    assert no_image[0]["views"] == 1


def test_segmentation_dataset(tmp_path):
    root = _voc_root(tmp_path, {"a": (4, 6), "b": (4, 6)})
    mask = np.array([[0, 1, 1, 255, 0, 0]] * 4, np.uint8)
    save_label_png(root / "SegmentationClass" / "a.png", mask)
    save_label_png(root / "SegmentationClass" / "b.png", np.zeros((6, 4), np.uint8))
    layout = DatasetLayout.voc(root)
    item = SegmentationDataset(layout, ["a"], return_image=True)[0]
    np.testing.assert_array_equal(item["mask"], mask)
    assert item["image"].shape == (4, 6, 3)
    with pytest.raises(UserError, match="b.png is 4x6 but its image is 6x4"):
        SegmentationDataset(layout, ["b"], return_image=True)[0]
    with pytest.raises(UserError, match="no ground-truth mask .first: c"):
        SegmentationDataset(layout, ["a", "c"])


def test_voc_xml_written_by_element_tree_is_read(tmp_path):
    """Annotations with whitespace around names (as pretty-printed VOC files have) parse."""
    root = _voc_root(tmp_path, {"a": (4, 4)})
    ann = ET.Element("annotation")
    obj = ET.SubElement(ann, "object")
    ET.SubElement(obj, "name").text = "\n   cat  "
    (root / "Annotations").mkdir()
    ET.ElementTree(ann).write(root / "Annotations" / "a.xml")
    assert labels_from_annotations(DatasetLayout.voc(root), ["a"], ["dog", "cat"]).ids == {"a": [2]}


def test_make_cls_labels_command_rebuilds_the_label_file(voc_root, tmp_path):
    """voc12.make_cls_labels derives from the XML exactly the labels the generator wrote."""
    from tests.helpers import run_script

    lists = [str(voc_root / "ImageSets/Segmentation" / f"{s}.txt") for s in ("train", "val")]
    out = tmp_path / "labels.json"
    proc = run_script("-m", "voc12.make_cls_labels", "--voc12_root", str(voc_root), "--list", *lists,
                   "--out", str(out), "--class_file", str(voc_root / "cls_labels.json"))
    assert proc.returncode == 0, proc.stderr
    assert ImageLabels.load(out).ids == ImageLabels.load(voc_root / "cls_labels.json").ids
    (tmp_path / "ghost.txt").write_text("ghost\n")
    proc = run_script("-m", "voc12.make_cls_labels", "--voc12_root", str(voc_root), "--list",
                   str(tmp_path / "ghost.txt"), "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "1 of 1 images have no annotation" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()


def test_make_cls_labels_class_file_alone_labels_every_annotated_image(voc_root, tmp_path, capsys):
    """A dataset of its own classes needs --class_file only (README): without --list its images are
    those of its Annotations/ folder, not the repository's VOC lists."""
    from tests.helpers import call_main

    out = tmp_path / "labels.json"
    code, _, err = call_main("voc12.make_cls_labels", ["--voc12_root", str(voc_root), "--out", str(out),
                                                       "--class_file", str(voc_root / "cls_labels.json")], capsys)
    assert code == 0, err
    annotated = sorted(p.stem for p in (voc_root / "Annotations").glob("*.xml"))
    assert sorted(ImageLabels.load(out).ids) == annotated
    assert ImageLabels.load(out).ids == ImageLabels.load(voc_root / "cls_labels.json").ids
