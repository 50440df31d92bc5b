"""Fuzzing the readers of user files: each gets random bytes and text, an empty file, its valid
file cut at many offsets and with bytes replaced, and, for the text and JSON formats, edited
text and documents with one value swapped for a value of any type.

The property, for every input: the reader returns a result that keeps its contract (the
original content when the file is the valid one), or raises one :class:`core.errors.UserError`
whose one-line message names the file; never another exception, never a warning or anything
on stderr, never a file written. The inputs come from seeded generators, so a failure names
a case that reproduces; the whole file runs in seconds.

Readers: list files and image-level label JSON (``data.labels``), label-map PNGs
(``core.palette.read_label_png``) and ground-truth masks (``data.datasets.read_mask``), CAM
files (``data.camio.load_cams``), COCO instances JSON (``coco14.prepare_coco.collect_split``,
which reads and checks it for the mask painter) and checkpoints
(``network.checkpoint.safe_load`` and ``load_weights``).
"""
from __future__ import annotations

import copy
import json
import math
import random
import string
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from coco14.prepare_coco import MAX_PIXELS, category_values, collect_split, paint_mask, rle_string_runs
from core.errors import UserError
from core.palette import IGNORE_INDEX, read_label_png, save_label_png
from data.camio import load_cams, save_cams
from data.datasets import read_mask
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout
from network.checkpoint import LoadReport, load_weights, safe_load
from network.conformer_CAM import Net_tiny
from tests.coco_root import annotation, box_mask, compressed_rle, rect, uncompressed_rle, write_coco_root

# (what the input is, its bytes)
Case = tuple[str, bytes]
# What a successful read must satisfy: (result, whether the file was the valid one) -> what is
# wrong, or None.
Contract = Callable[[Any, bool], "str | None"]

# Characters that mean something to the parsers: separators, comments, quotes, line ends
# Python splits on but files rarely hold, a byte-order mark, NUL, non-ASCII.
NASTY = ["\x00", "\r", "\n", " ", "\t", "/", ".", "#", ",", '"', "\\", "{", "]", "\ufeff", "\u2028", "é", "0", "-"]
# Replacement values for JSON documents: every type, limits, NaN and infinities (Python's
# json reads and writes them), strings that look like data.
JSON_VALUES = [None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 64, -2 ** 63, 1.5, -0.0, math.nan, math.inf,
               -math.inf, "", "x", "person", "0d0", "\x00", [], {}, [1, 2], [[1, 2, 3]], [[1e300, 0, 5, 0, 5, 5]],
               {"a": 1}]


# ------------------------------------------------------------------------------ inputs

def byte_cases(valid: bytes, rng: random.Random, cuts: int = 150, flips: int = 150) -> Iterator[Case]:
    """The valid file, an empty one, random bytes and text, and ``valid`` cut short (at every
    offset when it has at most ``cuts`` bytes, else at ``cuts`` random ones) or with 1-3
    bytes replaced by random ones (``flips`` times)."""
    yield "the valid file", valid
    yield "an empty file", b""
    for n in (1, 2, 16, 300, 5000):
        yield f"{n} random bytes", rng.randbytes(n)
    yield "random text", "".join(rng.choice(string.printable) for _ in range(300)).encode()
    yield "Latin-1 text", "caf\xe9 na\xefve\n".encode("latin-1")
    ends = range(1, len(valid)) if len(valid) <= cuts else sorted(rng.sample(range(1, len(valid)), cuts))
    for end in ends:
        yield f"cut after {end} bytes", valid[:end]
    for _ in range(flips):
        data = bytearray(valid)
        changes = [(rng.randrange(len(data)), rng.randrange(256)) for _ in range(rng.randint(1, 3))]
        for pos, value in changes:
            data[pos] = value
        yield f"bytes (position, value) {changes} replaced", bytes(data)


def text_cases(text: str, rng: random.Random, n: int = 150) -> Iterator[Case]:
    """``text`` with a character deleted, inserted or replaced (often one of :data:`NASTY`),
    or a line doubled or dropped."""
    lines = text.splitlines(keepends=True)
    for _ in range(n):
        i, j = rng.randrange(len(text)), rng.randrange(len(lines))
        char = rng.choice(NASTY + [rng.choice(string.printable)])
        edit = rng.randrange(5)
        if edit == 0:
            yield f"character {i} deleted", (text[:i] + text[i + 1:]).encode()
        elif edit == 1:
            yield f"{char!r} inserted at {i}", (text[:i] + char + text[i:]).encode()
        elif edit == 2:
            yield f"character {i} replaced by {char!r}", (text[:i] + char + text[i + 1:]).encode()
        elif edit == 3:
            yield f"line {j} doubled", "".join(lines[:j + 1] + lines[j:]).encode()
        else:
            yield f"line {j} dropped", "".join(lines[:j] + lines[j + 1:]).encode()


def json_cases(doc: Any, rng: random.Random, n: int = 200) -> Iterator[Case]:
    """``doc`` with one value (at any depth, the root included) replaced by one of
    :data:`JSON_VALUES` or dropped from its container; and a document nested too deep to parse."""
    slots = list(_slots(doc, ()))
    for _ in range(n):
        where = rng.choice(slots)
        new = copy.deepcopy(doc)
        if where and rng.random() < 0.2:
            del _at(new, where[:-1])[where[-1]]
            yield f"{list(where)} dropped", json.dumps(new).encode()
        else:
            value = rng.choice(JSON_VALUES)
            if where:
                _at(new, where[:-1])[where[-1]] = copy.deepcopy(value)
            else:
                new = copy.deepcopy(value)
            yield f"{list(where)} = {value!r}", json.dumps(new).encode()
    yield "100000 nested lists", b"[" * 100000 + b"]" * 100000


def _slots(doc: Any, where: tuple) -> Iterator[tuple]:
    yield where
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _slots(value, where + (key,))


def _at(doc: Any, where: tuple) -> Any:
    for key in where:
        doc = doc[key]
    return doc


# ----------------------------------------------------------------------------- property

def check_reader(read: Callable[[Path], Any], path: Path, cases: Iterable[Case], contract: Contract,
                 valid: bytes, capfd, watch: Path | None = None) -> None:
    """Write each case to ``path``, call ``read(path)`` and assert the property of the module
    docstring; ``watch`` (default: the file's folder) must hold the same files afterwards.
    Every failing case is listed."""
    watch = watch or path.parent
    failures, count = [], 0
    for what, data in cases:
        count += 1
        path.write_bytes(data)
        before = _files(watch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                problem = contract(read(path), data == valid)
            except UserError as err:
                text = str(err)
                problem = None if str(path) in text and "\n" not in text else f"UserError {text!r}"
            except Exception as err:  # noqa: BLE001 - any other exception is what the property forbids
                frames = traceback.extract_tb(err.__traceback__)
                problem = f"{type(err).__name__}: {str(err)[:200]} (at {Path(frames[-1].filename).name}:" \
                          f"{frames[-1].lineno})"
        if caught:
            problem = problem or f"warning {caught[0].category.__name__}: {caught[0].message}"
        if _files(watch) != before:
            problem = problem or f"files written: {sorted(_files(watch) ^ before)}"
        if problem:
            failures.append(f"{what}: {problem}")
    assert not failures, f"{len(failures)} of {count} inputs broke the reader:\n" + "\n".join(failures[:30])
    assert not capfd.readouterr().err


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _array_contract(expected: np.ndarray, shape: tuple[int, ...] | None = None) -> Contract:
    def contract(result: Any, original: bool) -> str | None:
        if not (isinstance(result, np.ndarray) and result.dtype == np.uint8 and result.ndim == 2):
            return f"not an (H, W) uint8 array: {type(result).__name__} {getattr(result, 'shape', '')}"
        if shape is not None and result.shape != shape:
            return f"shape {result.shape}, not {shape}"
        if original and not np.array_equal(result, expected):
            return "the valid file read differently"
        return None
    return contract


# ------------------------------------------------------------------------ text formats

def test_list_files(tmp_path, capfd):
    text = ("# training images\n2007_000032\n/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n"
            "\n  2008_000123  \nimg.with.dots\n")
    expected = ["2007_000032", "2007_000039", "2008_000123", "img.with.dots"]

    def contract(names: Any, original: bool) -> str | None:
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            return f"not a non-empty list of names: {names!r}"
        if any(not n or n != "".join(n.split()) for n in names):
            return f"an empty name or one with white space: {names!r}"
        return "the valid file read differently" if original and names != expected else None

    rng = random.Random("list")
    valid = text.encode()
    cases = [*byte_cases(valid, rng), *text_cases(text, rng, 300)]
    check_reader(read_list, tmp_path / "train.txt", cases, contract, valid, capfd)


def test_image_level_label_json(tmp_path, capfd):
    path = tmp_path / "cls_labels.json"
    ImageLabels(["cat", "dog", "car"], {"a": [1], "b": [2, 3], "c": []}).save(path)
    valid = path.read_bytes()

    def contract(labels: Any, original: bool) -> str | None:
        if not (isinstance(labels.classes, list) and all(isinstance(c, str) for c in labels.classes)):
            return f"classes {labels.classes!r} are not a list of names"
        for name, ids in labels.ids.items():
            if not isinstance(name, str) or any(type(i) is not int or not 1 <= i <= labels.num_fg for i in ids):
                return f"image {name!r} has ids {ids!r}, not class ids 1..{labels.num_fg}"
            if labels.vector(name).shape != (labels.num_fg,):
                return f"the vector of {name!r} has the wrong length"
        if original and (labels.classes, labels.ids) != (["cat", "dog", "car"], {"a": [1], "b": [2, 3], "c": []}):
            return "the valid file read differently"
        return None

    rng = random.Random("labels")
    cases = [*byte_cases(valid, rng), *text_cases(valid.decode(), rng), *json_cases(json.loads(valid), rng, 300)]
    check_reader(ImageLabels.load, path, cases, contract, valid, capfd)


# ---------------------------------------------------------------------------- images

@pytest.mark.parametrize("mode", ["P", "L", "I;16"])
def test_label_map_png(mode, tmp_path, capfd):
    label = np.random.default_rng(0).choice([0, 1, 5, 20, IGNORE_INDEX], size=(11, 13)).astype(np.uint8)
    path = tmp_path / "label.png"
    if mode == "P":
        save_label_png(path, label)
    else:
        Image.fromarray(label if mode == "L" else label.astype(np.uint16)).save(path)
    valid = path.read_bytes()
    with Image.open(path) as img:
        assert img.mode == mode
    check_reader(read_label_png, path, byte_cases(valid, random.Random(f"png {mode}")), _array_contract(label),
                 valid, capfd)


def test_ground_truth_mask(tmp_path, capfd):
    mask = np.random.default_rng(1).choice([0, 3, IGNORE_INDEX], size=(9, 14)).astype(np.uint8)
    root = tmp_path / "VOC2012"
    path = root / "SegmentationClass" / "x.png"
    save_label_png(path, mask)
    valid = path.read_bytes()
    layout = DatasetLayout.voc(root)
    check_reader(lambda _: read_mask(layout, "x", (9, 14)), path, byte_cases(valid, random.Random("mask"), 100, 100),
                 _array_contract(mask, (9, 14)), valid, capfd, watch=root)


# ------------------------------------------------------------------------------- CAMs

@pytest.mark.parametrize("half", [True, False])
def test_cam_files(half, tmp_path, capfd):
    keys = np.array([0, 3, 5])
    cams = np.random.default_rng(2).random((3, 6, 7), dtype=np.float32)
    path = tmp_path / "x.npz"
    save_cams(path, keys, cams, half=half)
    valid = path.read_bytes()
    stored = cams.astype(np.float16).astype(np.float32) if half else cams

    def contract(result: Any, original: bool) -> str | None:
        got_keys, got = result
        if not (got_keys.dtype == np.int64 and got_keys.ndim == 1 and np.all(np.diff(got_keys) > 0)
                and (got_keys.size == 0 or got_keys[0] >= 0)):
            return f"keys {got_keys!r} are not increasing class ids"
        if not (got.dtype == np.float32 and got.ndim == 3 and got.shape[0] == got_keys.size and np.isfinite(got).all()):
            return f"maps of dtype {got.dtype}, shape {got.shape} for {got_keys.size} keys"
        if original and not (np.array_equal(got_keys, keys) and np.array_equal(got, stored)):
            return "the valid file read differently"
        return None

    check_reader(load_cams, path, byte_cases(valid, random.Random(f"cams {half}"), 200, 200), contract, valid, capfd)


# ------------------------------------------------------------------------------- COCO

# image id -> (split, height, width); image 3 has no annotation.
COCO_IMAGES = {1: ("val", 20, 24), 2: ("val", 18, 22), 3: ("val", 16, 16)}
COCO_VALUES = category_values("contiguous")


def _coco_annotations() -> list[dict]:
    return [annotation(10, 1, 18, [rect(4, 3, 12, 11)]),
            annotation(11, 1, 1, [rect(1, 1, 20, 18), [14, 2, 22, 2, 22, 9]]),
            annotation(20, 2, 3, compressed_rle(box_mask(18, 22, slice(2, 9), slice(3, 15)))),
            annotation(21, 2, 6, uncompressed_rle(box_mask(18, 22, slice(5, 16), slice(8, 20))), crowd=1)]


def _check_tasks(result: Any, expected: Any, original: bool) -> str | None:
    """Contract of ``collect_split``: consistent stems and labels, and mask tasks the painter
    turns into masks of known values."""
    stems, labels, tasks = result
    if stems != sorted(labels) or any(not all(type(i) is int and 1 <= i <= 80 for i in v) or v != sorted(v)
                                      for v in labels.values()):
        return f"stems {stems} and labels {labels} disagree or hold ids outside 1..80"
    allowed = {0, IGNORE_INDEX, *COCO_VALUES.values()}
    if len({t[0] for t in tasks}) != len(tasks):
        return "two images write the same mask"
    for path, height, width, instances in tasks:
        if not (type(height) is int and type(width) is int and height > 0 and width > 0
                and height * width <= MAX_PIXELS):
            return f"{path}: image size {height!r} x {width!r} accepted"
        for _, value, _, segm in instances:
            if value not in allowed:
                return f"{path}: pixel value {value!r}"
            limit = 2 * max(height, width)
            if isinstance(segm, list) and not all(math.isfinite(v) and abs(v) <= limit for p in segm for v in p):
                return f"{path}: polygon coordinates beyond the image accepted (painting them needs memory " \
                       "in proportion)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools' own, under numpy 2
                painted = paint_mask(height, width, instances)
        except Exception as err:  # noqa: BLE001 - the reader let through what the painter cannot paint
            return f"{path}: the painter fails on what the reader accepted: {type(err).__name__}: {err}"
        if not set(np.unique(painted).tolist()) <= allowed:
            return f"{path}: painted values {np.unique(painted).tolist()}"
    if original and (stems, labels, [t[:3] for t in tasks]) != (expected[0], expected[1], [t[:3] for t in expected[2]]):
        return "the valid file read differently"
    return None


def test_coco_instances_json(tmp_path, capfd):
    root = write_coco_root(tmp_path / "coco", COCO_IMAGES, _coco_annotations())
    path = root / "annotations" / "instances_val2014.json"
    valid = path.read_bytes()

    def read(_: Path) -> Any:
        return collect_split(root, "val", COCO_VALUES, root / "SegmentationClass")

    expected = read(path)
    capfd.readouterr()
    rng = random.Random("coco")
    cases = [*byte_cases(valid, rng, 200, 200), *json_cases(json.loads(valid), rng, 500)]
    check_reader(read, path, cases, lambda result, original: _check_tasks(result, expected, original), valid, capfd,
                 watch=root)


# What the fuzzing found the reader let through, and the painter could not paint: pycocotools
# needs memory in proportion to polygon coordinates (a NaN one took all memory), and paints
# the pixels after compressed runs that stop short of the image from uninitialised memory.
UNPAINTABLE = {
    "NaN coordinate": ([[math.nan, 0, 10, 0, 10, 10]], "malformed polygon list"),
    "far-off coordinate": ([[1e12, 0, 10, 0, 10, 10]], "each within -44..44, twice the image size"),
    "negative run": ({"counts": [-5, 18 * 22 + 5], "size": [18, 22]}, "integers >= 0"),
    "size not a list": ({"counts": [18 * 22], "size": 396}, "RLE size 396 differs"),
    "compressed runs stopping short": ({"counts": "04", "size": [18, 22]}, "compressed RLE counts do not decode"),
    "compressed number cut short": ({"counts": "0d", "size": [18, 22]}, "compressed RLE counts do not decode"),
}


@pytest.mark.parametrize("case", sorted(UNPAINTABLE))
def test_coco_segmentations_the_painter_cannot_paint_are_refused(case, tmp_path):
    segmentation, phrase = UNPAINTABLE[case]
    root = write_coco_root(tmp_path / "coco", COCO_IMAGES, [annotation(20, 2, 3, segmentation)])
    with pytest.raises(UserError, match=f"instances_val2014.json: annotation 20.*{phrase}"):
        collect_split(root, "val", COCO_VALUES, root / "SegmentationClass")


def test_rle_string_runs_decodes_what_pycocotools_encodes():
    rng = np.random.default_rng(3)
    for _ in range(300):
        height, width = rng.integers(1, 40, 2)
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        runs = rle_string_runs(compressed_rle(mask)["counts"])
        assert runs is not None and sum(runs) == height * width
        np.testing.assert_array_equal(np.repeat(np.arange(len(runs)) % 2, runs), mask.flatten(order="F"))
    assert rle_string_runs("0d") is None and rle_string_runs("0~") is None  # cut inside a number; not a digit


# ------------------------------------------------------------------------ checkpoints

def test_checkpoint_safe_load(tmp_path, capfd):
    path = tmp_path / "ckpt.pth"
    obj = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.arange(5)}, "epoch": 3, "name": "run"}
    torch.save(obj, path)
    valid = path.read_bytes()

    def contract(result: Any, original: bool) -> str | None:
        if original and not (result.keys() == obj.keys() and result["epoch"] == 3 and all(
                torch.equal(result["model"][k], v) for k, v in obj["model"].items())):
            return "the valid file read differently"
        return None

    cases = byte_cases(valid, random.Random("safe_load"), len(valid), 300)  # cut at every offset
    check_reader(lambda p: safe_load(p, "weights file"), path, cases, contract, valid, capfd)


def test_checkpoint_load_weights(tmp_path, capfd):
    torch.manual_seed(0)
    state = Net_tiny(num_classes=4).state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    valid = path.read_bytes()
    model = Net_tiny(num_classes=4)

    def contract(report: Any, original: bool) -> str | None:
        if not isinstance(report, LoadReport):
            return f"returned {report!r}"
        loaded = model.state_dict()
        if original and not all(torch.equal(loaded[k], v) for k, v in state.items()):
            return "the valid file read differently"
        return None

    cases = byte_cases(valid, random.Random("load_weights"), 60, 60)
    check_reader(lambda p: load_weights(model, p, purpose="bao"), path, cases, contract, valid, capfd)
