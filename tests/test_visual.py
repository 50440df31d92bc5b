"""visual_bao.py end to end (overlays and summary sheets) and the drawing helpers of tool/overlay.py."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.labels import ImageLabels
from tests.helpers import call_main, run_script
from tool.overlay import (LABEL_BAND, colorize_labels, jet_overlay, read_rgb, save_rgb, stack_sheet_files,
                          stacked_sheets, summary_sheet)

TITLE = 22  # title strip height of a sheet cell (tool/overlay.py)


def _args(voc_root, weights, out_dir, *extra: str) -> list[str]:
    return ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--list", str(voc_root / "ImageSets/Segmentation/val.txt"), "--weights", str(weights),
            "--arch", "tiny", "--scales", "32,64", "--num_workers", "0", "--device", "cpu", "--out_dir", str(out_dir), *extra]


def _visual(argv: list[str], capsys) -> tuple[int, str]:
    """Run visual_bao like its command line, in-process: (exit status, stderr)."""
    code, _, err = call_main("visual_bao", argv, capsys)
    return code, err

def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size[::-1]


def test_writes_overlays_and_sheets(voc_root, tiny_bao_weights, tmp_path):
    labels = ImageLabels.load(voc_root / "cls_labels.json")
    names = ["synth_000012", "synth_000014"]
    proc = run_script("visual_bao.py", *_args(voc_root, tiny_bao_weights, tmp_path, "--names", ",".join(names)))
    assert proc.returncode == 0, proc.stderr
    classes = labels.classes
    expected = set()
    for name in names:
        expected |= {f"{name}_bg.jpg", f"{name}_sheet.png"} | {f"{name}_{classes[i - 1]}.jpg" for i in labels.ids[name]}
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in names:
        h, w = _size(voc_root / "JPEGImages" / f"{name}.jpg")
        assert _size(tmp_path / f"{name}_bg.jpg") == (h, w)
        # image, ground truth, pseudo-label, background map, one map per class; 4 per row,
        # panels enlarged by an integer factor to at least 192 pixels wide
        panels = 4 + len(labels.ids[name])
        f = -(-192 // w)
        rows = -(-panels // 4)
        assert _size(tmp_path / f"{name}_sheet.png") == (TITLE + rows * (f * h + TITLE), 4 * f * w)


def test_transcam_sheet_without_threshold_has_no_pseudo_label(voc_root, tiny_transcam_weights, tmp_path, capsys):
    code, err = _visual(_args(voc_root, tiny_transcam_weights, tmp_path, "--method", "transcam", "--max_images", "1"),
                        capsys)
    assert code == 0, err
    name = "synth_000012"
    n_fg = len(ImageLabels.load(voc_root / "cls_labels.json").ids[name])
    assert not (tmp_path / f"{name}_bg.jpg").exists()
    assert len(list(tmp_path.glob(f"{name}_*.jpg"))) == n_fg
    h, w = _size(voc_root / "JPEGImages" / f"{name}.jpg")
    panels = 2 + n_fg  # image, ground truth, class maps
    f = -(-192 // w)
    rows = -(-panels // 4)
    assert _size(tmp_path / f"{name}_sheet.png") == (TITLE + rows * (f * h + TITLE), min(panels, 4) * f * w)


def test_sheet_title_names_the_regime(voc_root, tiny_bao_weights, tmp_path, capsys):
    from visual_bao import sheet_title

    assert sheet_title("x", "bao", "attention") == "x: BAO maps, attention-refined (published)"
    assert sheet_title("x", "bao", "none") == "x: BAO maps, without attention refinement (--refine none, ablation)"
    assert sheet_title("x", "transcam", "none").startswith("x: TransCAM CAMs, without attention refinement")
    assert sheet_title("x", "cnn", "attention") == "x: CNN CAMs, before attention refinement (--method cnn)"
    sheets = {}
    for refine in ("attention", "none"):
        code, err = _visual(_args(voc_root, tiny_bao_weights, tmp_path / refine, "--names", "synth_000012",
                                  "--refine", refine), capsys)
        assert code == 0, err
        sheets[refine] = np.asarray(Image.open(tmp_path / refine / "synth_000012_sheet.png"))
    # The same grid under another title strip.
    assert sheets["attention"].shape == sheets["none"].shape
    assert not np.array_equal(sheets["attention"][:TITLE], sheets["none"][:TITLE])


@pytest.mark.parametrize("extra, message", [
    (("--names", "nowhere"), "have no image-level label"),
    (("--max_images", "0"), "argument --max_images: must be >= 1"),
    (("--t", "0.3"), "BAO labels need no threshold"),
])
def test_bad_inputs_are_refused(extra, message, voc_root, tiny_bao_weights, tmp_path, capsys):
    code, err = _visual(_args(voc_root, tiny_bao_weights, tmp_path / "out", *extra), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_dir_is_refused(voc_root, tiny_bao_weights, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    code, err = _visual(_args(voc_root, tiny_bao_weights, tmp_path / "a_file" / "vis", "--max_images", "1"), capsys)
    assert code == 2 and "cannot create or write output folder" in err


def test_jet_overlay_blends_heat_and_image():
    image = np.full((2, 3, 3), 100, np.uint8)
    out = jet_overlay(image, np.zeros((2, 3)))
    # JET at 0 is RGB (0, 0, 128): 0.6 * (0, 0, 128) + 0.4 * 100 = (40, 40, 116.8)
    assert out.tolist() == np.broadcast_to(np.array([40, 40, 117], np.uint8), (2, 3, 3)).tolist()
    with pytest.raises(ValueError, match="sizes differ"):
        jet_overlay(image, np.zeros((3, 3)))


def test_colorize_labels_uses_the_voc_palette():
    out = colorize_labels(np.array([[0, 1, 15, 255]]))
    assert out.tolist() == [[[0, 0, 0], [128, 0, 0], [192, 128, 128], [224, 224, 192]]]


def test_summary_sheet_layout():
    panels = [(f"p{i}", np.full((10, 200, 3), i * 40, np.uint8)) for i in range(5)]
    sheet = summary_sheet(panels, columns=3)
    assert sheet.shape == (2 * (10 + TITLE), 3 * 200, 3)
    assert (sheet[TITLE:TITLE + 10, 200:400] == 40).all()  # second panel in place
    assert (sheet[10 + 2 * TITLE:, 400:] == 255).all()  # empty last cell stays white
    titled = summary_sheet(panels, columns=3, title="what the maps are")
    assert titled.shape == (TITLE + 2 * (10 + TITLE), 3 * 200, 3)
    assert np.array_equal(titled[TITLE:], sheet)  # the grid moves down by one title strip
    assert (titled[:TITLE] < 128).any()  # the title is written


def test_stacked_sheets_put_each_sheet_under_its_label():
    top, bottom = np.full((30, 50, 3), 10, np.uint8), np.full((20, 40, 3), 200, np.uint8)
    sheet = stacked_sheets([("attention refinement (published)", top), ("no refinement", bottom)])
    assert sheet.shape == (LABEL_BAND + 30 + LABEL_BAND + 20, 50, 3)  # as wide as the widest sheet
    assert np.array_equal(sheet[LABEL_BAND:LABEL_BAND + 30], top)
    lower = 2 * LABEL_BAND + 30
    assert (sheet[lower:, :40] == 200).all() and (sheet[lower:, 40:] == 255).all()  # narrower: white beside it
    for band in (sheet[:LABEL_BAND], sheet[LABEL_BAND + 30:lower]):
        assert (band == 60).mean() > 0.5 and (band > 200).any()  # a dark band with white text on it
    assert not np.array_equal(sheet[:LABEL_BAND], sheet[LABEL_BAND + 30:lower])  # each with its own label
    with pytest.raises(ValueError):
        stacked_sheets([])


def test_stack_sheet_files_writes_one_sheet_per_shared_image(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rng = np.random.default_rng(0)
    sheets = {}
    for folder, names in ((a, ("x", "y")), (b, ("x", "z"))):
        for name in names:
            sheets[folder, name] = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            save_rgb(folder / f"{name}_sheet.png", sheets[folder, name])
        save_rgb(folder / f"{name}_bg.jpg", sheets[folder, name])  # overlays beside the sheets are not sheets
    written = stack_sheet_files([("A", a), ("B", b)], tmp_path / "out", "regimes_")
    assert written == [tmp_path / "out" / "regimes_x.png"]  # the only image with a sheet in both folders
    assert np.array_equal(read_rgb(written[0]), stacked_sheets([("A", sheets[a, "x"]), ("B", sheets[b, "x"])]))
