"""Metrics, the one-pass threshold sweep and the CAM file format (library level)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from data.classes import COCO, COCO_RAW, COCO_UNUSED_IDS, VOC, ClassSet, generic
from tool.cam import pseudo_labels
from data.camio import load_cams, save_cams
from core.errors import UserError
from scoring.evaluate import evaluate_cams, evaluate_labels
from scoring.metrics import (_count_below, argmax_labels, check_ids, confusion, confusions_from_bins, scores,
                             format_table, scores_to_json, sweep_bins, sweep_confusions, threshold_range)
from core.palette import save_label_png
from scoring.sweep import best_threshold

# Hand-made 2x4 masks with 3 classes; 255 in the ground truth is ignored.
GT = np.array([[0, 0, 1, 1],
               [2, 2, 255, 1]], np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 2, 0]], np.uint8)
# Counted by hand, rows = gt, columns = prediction, the (255, 2) pixel left out.
CONF = np.array([[1, 1, 0],
                 [1, 2, 0],
                 [1, 0, 1]])
C3 = generic(3)


def test_confusion_hand_made() -> None:
    np.testing.assert_array_equal(confusion(GT, PRED, C3), CONF)


def test_scores_hand_computed() -> None:
    r = scores(CONF, C3)
    # class 0: T=2 P=3 TP=1 union 4; class 1: T=3 P=3 TP=2 union 4; class 2: T=2 P=1 TP=1 union 2
    np.testing.assert_allclose(r["iou"], [1 / 4, 2 / 4, 1 / 2])
    np.testing.assert_allclose(r["fp"], [2 / 4, 1 / 4, 0 / 2])
    np.testing.assert_allclose(r["fn"], [1 / 4, 1 / 4, 1 / 2])
    np.testing.assert_allclose(r["precision"], [1 / 3, 2 / 3, 1 / 1])
    np.testing.assert_allclose(r["recall"], [1 / 2, 2 / 3, 1 / 2])
    assert r["miou"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert r["mean_fp"] == pytest.approx(0.75 / 3)
    assert r["mean_fn"] == pytest.approx(1.0 / 3)
    assert r["mean_precision"] == pytest.approx((1 / 3 + 2 / 3 + 1) / 3)
    assert r["mean_recall"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    np.testing.assert_array_equal(r["gt_pixels"], [2, 3, 2])
    np.testing.assert_array_equal(r["pred_pixels"], [3, 3, 1])


def test_scores_nan_classes_skipped() -> None:
    # 5 classes: class 3 absent everywhere (all NaN), class 4 in the ground truth only.
    gt = np.array([[0, 1, 4, 4]], np.uint8)
    pred = np.array([[0, 1, 0, 1]], np.uint8)
    r = scores(confusion(gt, pred, generic(5)), generic(5))
    assert np.isnan(r["iou"][2]) and np.isnan(r["iou"][3]) and np.isnan(r["recall"][3])
    assert r["iou"][4] == 0 and r["recall"][4] == 0 and np.isnan(r["precision"][4])
    # IoU: class 0 = 1/2 (T=1, P=2), class 1 = 1/2, class 4 = 0 -> mean over 3 classes
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["mean_precision"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    empty = scores(np.zeros((3, 3), np.int64), C3)
    assert np.isnan(empty["miou"])


def test_class_sets_are_explicit() -> None:
    assert (VOC.num_classes, COCO.num_classes, COCO_RAW.num_classes) == (21, 81, 91)
    assert VOC.valid.all() and COCO.valid.all()
    assert COCO_RAW.valid.sum() == 81 and not COCO_RAW.valid[list(COCO_UNUSED_IDS)].any()
    # 91 classes are not COCO raw ids unless the class set says so
    assert generic(91).valid.all() and generic(91).names[12] == "class12" and generic(91) != COCO_RAW
    with pytest.raises(ValueError, match="unused ids"):
        ClassSet(("background", "a"), unused=(2,))


def test_coco_raw_ids_unused_classes() -> None:
    gt = np.array([[0, 1, 90, 255]], np.uint8)
    r = scores(confusion(gt, np.array([[0, 1, 90, 5]], np.uint8), COCO_RAW), COCO_RAW)
    assert r["miou"] == pytest.approx(1.0)  # only 0, 1, 90 defined; unused ids never count
    assert np.isnan(r["iou"][12])
    table = format_table(r, COCO_RAW)
    assert "toothbrush" in table and "unused" not in table
    assert [c["id"] for c in scores_to_json(r, COCO_RAW)["classes"]][:13] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]
    with pytest.raises(UserError, match="unused COCO category ids.*contiguous ids 1..80") as err:
        confusion(gt, np.array([[0, 12, 90, 5]], np.uint8), COCO_RAW, pred_name="p.png")
    assert err.value.about == "coco_contiguous_ids"
    with pytest.raises(UserError, match=r"p.png contains class id\(s\) 85 .*0\.\.80.*raw COCO category ids") as err:
        confusion(np.zeros((1, 2), np.uint8), np.array([[0, 85]], np.uint8), COCO, pred_name="p.png")
    assert err.value.about == "coco_raw_ids"
    # the same ids with a count-alike class set of other classes: no COCO hints
    with pytest.raises(UserError, match="outside the 81-class range 0..80; check the classes") as err:
        confusion(np.zeros((1, 2), np.uint8), np.array([[0, 85]], np.uint8), generic(81), pred_name="p.png")
    assert err.value.about == "class_ids"
    check_ids([12], generic(91), "x", allow_ignore=False)


def test_ids_out_of_range_and_ignore() -> None:
    with pytest.raises(UserError, match=r"g.png contains class id\(s\) 3 outside the 3-class range 0..2"):
        confusion(np.array([[3]], np.uint8), np.array([[0]], np.uint8), C3, gt_name="g.png")
    with pytest.raises(UserError, match="255 .ignore. is allowed in ground truth only"):
        confusion(np.array([[0]], np.uint8), np.array([[255]], np.uint8), C3)
    with pytest.raises(UserError, match="size 3x1 .WxH. but .* size 2x1"):
        confusion(np.zeros((1, 2), np.uint8), np.zeros((1, 3), np.uint8), C3)
    check_ids([0, 2, 255], C3, "x", allow_ignore=True)


def test_threshold_range() -> None:
    t = threshold_range(0.05, 0.95, 0.01)
    assert t.dtype == np.float32 and t.size == 91
    assert t[0] == np.float32(0.05) and t[-1] == np.float32(0.95) and t[44] == np.float32(0.49)
    with pytest.raises(UserError, match="bad threshold range"):
        threshold_range(0.5, 0.1, 0.1)


def test_sweep_hand_made_ties() -> None:
    # one foreground class 3; scores 0.2, 0.5, 0.8; at t = 0.5 the tie goes to background
    keys = np.array([0, 3])
    cams = np.array([[[0.9, 0.9, 0.9]], [[0.2, 0.5, 0.8]]], np.float32)
    gt = np.array([[0, 3, 3]], np.uint8)
    conf = sweep_confusions(gt, keys, cams, np.array([0.1, 0.5, 0.9], np.float32), generic(4))
    np.testing.assert_array_equal(conf[0][[0, 3]][:, [0, 3]], [[0, 1], [0, 2]])  # all pixels class 3
    np.testing.assert_array_equal(conf[1][[0, 3]][:, [0, 3]], [[1, 0], [1, 1]])  # 0.5 == t -> background
    np.testing.assert_array_equal(conf[2][[0, 3]][:, [0, 3]], [[1, 0], [2, 0]])  # all background
    # the learned background (key 0) is ignored by the sweep but used by the argmax
    np.testing.assert_array_equal(argmax_labels(keys, cams, 4), [[0, 0, 0]])


def _random_cams(rng: np.random.Generator, keys: list[int], shape: tuple[int, int]) -> np.ndarray:
    # half the scores on the 0.05 grid of the thresholds, so that many pixels tie with a
    # threshold and foreground classes tie with each other; the rest anywhere, also < 0, > 1
    grid = np.round(0.05 * rng.integers(0, 21, (len(keys),) + shape), 6).astype(np.float32)
    free = rng.uniform(-0.2, 1.2, grid.shape).astype(np.float32)
    return np.where(rng.random(grid.shape) < 0.5, grid, free)


def test_count_below_equals_searchsorted() -> None:
    rng = np.random.default_rng(3)
    thresholds = threshold_range(0.05, 0.95, 0.01)
    score = np.concatenate([
        rng.uniform(-1, 2, 20000), thresholds, np.nextafter(thresholds, 2), np.nextafter(thresholds, -2),
        [0.0, -0.0, 1e-30, -1e-30, 1e30, np.inf, -np.inf],
    ]).astype(np.float32)
    np.testing.assert_array_equal(_count_below(thresholds, score),
                                  np.searchsorted(thresholds, score, side="left"))


def test_one_pass_sweep_equals_direct_thresholding() -> None:
    rng = np.random.default_rng(0)
    c = 6
    classes = generic(c)
    thresholds = threshold_range(0.0, 1.0, 0.05)
    total_bins = np.zeros((thresholds.size + 1, c, c), np.int64)
    direct = np.zeros((thresholds.size, c, c), np.int64)
    for keys in ([0, 1, 4], [2], [0], [], [1, 3, 5], [0, 5]):
        keys = np.array(keys, np.int64)
        shape = (7, 9)
        cams = _random_cams(rng, list(keys), shape)
        gt = rng.integers(0, c, shape).astype(np.uint8)
        gt[rng.random(shape) < 0.1] = 255
        total_bins += sweep_bins(gt, keys, cams, thresholds, classes)
        for j, t in enumerate(thresholds):
            # what infer_bao.py --t writes: argmax over [t, foreground maps]
            label = pseudo_labels(torch.from_numpy(cams.astype(np.float32)), torch.from_numpy(keys), float(t))
            direct[j] += confusion(gt, label.numpy().astype(np.uint8), classes)
    swept = confusions_from_bins(total_bins)
    np.testing.assert_array_equal(swept, direct)
    assert swept.sum() > 0 and len({int(s) for s in swept.sum(axis=(1, 2))}) == 1


def test_cam_file_round_trip(tmp_path) -> None:
    keys = np.array([0, 2, 7])
    cams = np.random.default_rng(1).random((3, 4, 5)).astype(np.float16)
    save_cams(tmp_path / "a.npz", keys, cams)
    k, m = load_cams(tmp_path / "a.npz")
    assert k.dtype == np.int64 and m.dtype == np.float32 and m.shape == (3, 4, 5)
    np.testing.assert_array_equal(k, keys)
    np.testing.assert_array_equal(m, cams.astype(np.float32))
    save_cams(tmp_path / "empty.npz", np.zeros(0, np.int64), np.zeros((0, 4, 5), np.float32))
    assert load_cams(tmp_path / "empty.npz")[1].shape == (0, 4, 5)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "empty.npz"]  # no temporary file left
    with pytest.raises(ValueError, match="strictly increasing"):
        save_cams(tmp_path / "b.npz", np.array([2, 1]), np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(K, H, W\) with K = 1"):
        save_cams(tmp_path / "b.npz", np.array([1]), np.zeros((2, 3, 3), np.float32))


def test_cam_files_of_another_format(tmp_path) -> None:
    published = tmp_path / "pub.npy"
    with open(published, "wb") as f:  # the published layout: a pickled dict in .npy
        np.save(f, np.array({0: np.zeros((2, 2), np.float32)}, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="pickled file.*infer_bao.py"):
        load_cams(published)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match=r"holds arrays \['x'\], not a CAM file"):
        load_cams(tmp_path / "other.npz")
    np.save(tmp_path / "plain.npy", np.zeros((2, 2)))
    with pytest.raises(UserError, match="single array"):
        load_cams(tmp_path / "plain.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="junk.npz"):
        load_cams(tmp_path / "junk.npz")
    np.savez(tmp_path / "nan.npz", keys=np.array([1]), cams=np.full((1, 2, 2), np.nan, np.float32))
    with pytest.raises(UserError, match="NaN"):
        load_cams(tmp_path / "nan.npz")


def test_folder_evaluation_parallel_equals_serial(tmp_path) -> None:
    rng = np.random.default_rng(2)
    gt_dir, pred_dir, cam_dir = tmp_path / "gt", tmp_path / "pred", tmp_path / "cam"
    names = [f"im{i}" for i in range(5)]
    thresholds = threshold_range(0.1, 0.9, 0.2)
    expected = np.zeros((3, 3), np.int64)
    expected_sweep = np.zeros((thresholds.size, 3, 3), np.int64)
    for n in names:
        gt = rng.integers(0, 3, (6, 8)).astype(np.uint8)
        pred = rng.integers(0, 3, (6, 8)).astype(np.uint8)
        keys = np.array([0, 1, 2])
        cams = _random_cams(rng, [0, 1, 2], (6, 8))
        save_label_png(gt_dir / f"{n}.png", gt)
        save_label_png(pred_dir / f"{n}.png", pred)
        save_cams(cam_dir / f"{n}.npz", keys, cams)
        expected += confusion(gt, pred, C3)
        expected_sweep += sweep_confusions(gt, keys, cams, thresholds, C3)
    for workers in (1, 2):
        np.testing.assert_array_equal(evaluate_labels(names, pred_dir, gt_dir, C3, workers, False), expected)
        confs, free = evaluate_cams(names, cam_dir, gt_dir, C3, thresholds, True, workers, False)
        np.testing.assert_array_equal(confs, expected_sweep)
        assert free.shape == (3, 3) and free.sum() == 5 * 48


def test_folder_errors_state_the_problem_without_flags(tmp_path) -> None:
    """Library messages name files and folders, not command-line flags; ``about`` says what an
    entry script may add, also for errors raised in worker processes."""
    names = ["a", "b"]
    for n in names:
        save_label_png(tmp_path / "gt" / f"{n}.png", np.zeros((2, 3), np.uint8))
        save_label_png(tmp_path / "pred" / f"{n}.png", np.full((2, 3), 7, np.uint8))
    thresholds = threshold_range(0.1, 0.2, 0.1)
    cases = [
        (lambda: evaluate_labels(names, tmp_path / "nowhere", tmp_path / "gt", C3, 1, False),
         "prediction folder not found: ", "prediction_folder"),
        (lambda: evaluate_labels(names, tmp_path / "pred", tmp_path / "nowhere", C3, 1, False),
         "ground-truth folder not found: ", "ground_truth_folder"),
        (lambda: evaluate_labels(names + ["c"], tmp_path / "pred", tmp_path / "gt", C3, 1, False),
         "1 of 3 ground-truth masks missing", "ground_truth"),
        (lambda: evaluate_cams(names, tmp_path / "pred", tmp_path / "gt", C3, thresholds, False, 1, False),
         "a.png exists: this folder holds label maps, not CAM files", "labels_not_cams"),
        (lambda: evaluate_labels(names, tmp_path / "pred", tmp_path / "gt", C3, 2, False),
         "contains class id(s) 7 outside the 3-class range", "class_ids"),
    ]
    for call, phrase, about in cases:
        with pytest.raises(UserError) as err:
            call()
        assert phrase in str(err.value) and err.value.about == about
        assert "--" not in str(err.value)
    with pytest.raises(UserError, match="no background map") as err:
        argmax_labels(np.array([1]), np.zeros((1, 2, 2), np.float32), 3, "c.npz")
    assert err.value.about == "background_map" and "--" not in str(err.value)


def test_best_threshold_skips_nan_takes_the_first_of_ties_and_rounds():
    """The one rule every sweep's best background score follows (evaluation, validation, bench)."""
    t = np.array([0.3, 0.4, 0.5, 0.6], np.float32)
    assert best_threshold(t, np.array([0.2, np.nan, 0.7, 0.7])) == (2, 0.5)
    assert best_threshold(t, np.array([np.nan, 0.1, 0.05, np.nan])) == (1, 0.4)  # float32 0.4 rounded
    assert best_threshold(t, np.full(4, np.nan)) == (0, 0.3)

