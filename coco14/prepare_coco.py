"""Prepare MS COCO 2014 for BAO: list files, image-level labels and ground-truth masks.

Reads ``<coco_root>/{train,val}2014/`` and ``<coco_root>/annotations/instances_{train,val}2014.json``
and writes:

- ``<out_dir>/train.txt``, ``<out_dir>/val.txt``: the image file stems
  (``COCO_train2014_000000279803``), sorted, every image of the annotation file included
  (images without annotations too);
- ``<out_dir>/train_labelled.txt``, ``<out_dir>/val_labelled.txt``: the images with at least
  one labelled class (on val 40,137 of 40,504: the list WSSS papers score COCO val on);
- ``<out_dir>/cls_labels.json``: image-level labels (:class:`data.labels.ImageLabels`, 80
  foreground classes, contiguous ids 1..80 in sorted category-id order), the union of
  all splits prepared so far: a run over some splits merges into an existing file;
- ``<mask_dir>/<stem>.png``: ground-truth label maps (palette PNGs), and
  ``<mask_dir>/convention.json`` recording how they were made.

Mask conventions (``--convention``):

- ``contiguous`` (ours, the default): 0 background, 1..80 = the categories in sorted
  category-id order (class set ``data.classes.COCO``); evaluated with 81 classes.
- ``raw``: 0 background, pixel value = raw COCO category id 1..90 (class set
  ``data.classes.COCO_RAW``); evaluated with 91 ids, the ten unused ids never occur.
Mixing the two silently gives a wrong mIoU, so a mask folder holds one convention only:
the script refuses to write into a folder whose ``convention.json`` says otherwise.

How the instances become one label map (the same for both conventions):

- Each instance is decoded with pycocotools (polygons, uncompressed RLE, compressed RLE).
  Polygons with fewer than three points enclose no area and are skipped (pycocotools
  would misread a 4-number polygon as a box).
- Overlaps: the smaller instance ends on top. Instances are painted by decoded pixel
  area, largest first; equal areas are painted in annotation-id order (the higher id
  ends on top), so the result does not depend on the order in the JSON.
- Crowd annotations (``iscrowd=1``): their region is set to 255 (ignore) except where a
  non-crowd instance covers it, which keeps its class. A crowd region is a group of
  objects of its category without instance outlines, so its pixels are neither
  background nor reliably one object; ignoring them keeps evaluation from counting them
  either way. The crowd's category does count in the image-level label (the objects are
  in the image).
- Images without annotations get an all-background (all-zero) mask and an empty label.

Resumable: masks that already exist are skipped (all outputs are written atomically, so
an existing file is complete); ``--overwrite`` rewrites them. Masks are painted by several
processes (``--workers``) with a progress bar.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from apps.cli import positive_int
from core.errors import UserError, run_guarded
from core.fileio import atomic_path, is_temporary, remove_temporaries
from core.palette import IGNORE_INDEX, save_label_png
from core.workers import TaskPool, default_workers
from data.classes import COCO, COCO_CATEGORY_IDS, COCO_CONVENTIONS, CONVENTION_FILE
from data.labels import ImageLabels, write_list
from data.layout import DEFAULT_LABEL_FILES, DatasetLayout

SPLITS = ("train", "val")
CONVENTIONS = tuple(COCO_CONVENTIONS)  # the first is the default
CROWD_POLICY = (
    "crowd regions are 255 (ignore) except where a non-crowd instance covers them; "
    "crowd categories count in the image-level label"
)
OVERLAP_POLICY = "smaller instance on top (painted by decoded area, largest first; ties by annotation id)"
LABEL_FILE = DEFAULT_LABEL_FILES["coco"]  # where training looks for the labels by default
# Largest image an annotation file may declare (a 16384 x 16384 one; COCO's are at most 640
# pixels a side): the painter allocates the declared size, so a corrupt one could take all memory.
MAX_PIXELS = 1 << 28

# One instance as sent to a worker: (annotation id, pixel value, is crowd, segmentation).
Instance = tuple[int, int, bool, Any]
# One mask to write: (output path, height, width, instances).
MaskTask = tuple[str, int, int, list[Instance]]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write COCO 2014 list files, image-level labels and ground-truth masks",
    )
    parser.add_argument("--coco_root", required=True,
                        help="COCO root holding train2014/, val2014/ and annotations/instances_{train,val}2014.json")
    parser.add_argument("--out_dir", default=str(LABEL_FILE.parent),
                        help=f"folder for train.txt, val.txt and {LABEL_FILE.name} (default: {LABEL_FILE.parent})")
    parser.add_argument("--mask_dir", default=None,
                        help="folder for the ground-truth PNG masks and convention.json "
                             "(default: <coco_root>/SegmentationClass)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="splits to prepare; labels of other splits already in cls_labels.json are kept")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="processes painting masks (1 = paint in this process; default: the usable CPUs "
                             "minus one)")
    parser.add_argument("--convention", choices=CONVENTIONS, default=CONVENTIONS[0],
                        help="mask ids: contiguous (0 bg, 1..80 by sorted category id, 81-class evaluation) "
                             "or raw (0 bg, raw category id 1..90, 91-class evaluation)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite masks that already exist instead of skipping them")
    return parser


def category_values(convention: str) -> dict[int, int]:
    """Map raw COCO category id -> mask pixel value under ``convention``."""
    if convention == "contiguous":
        return {cat: i + 1 for i, cat in enumerate(COCO_CATEGORY_IDS)}
    return {cat: cat for cat in COCO_CATEGORY_IDS}


def convention_record(convention: str) -> dict[str, Any]:
    """The content of ``convention.json`` for masks written under ``convention``.

    ``class_names[v]`` names pixel value ``v`` (length ``num_classes``); ``values[i]`` is the
    pixel value of raw category id ``category_ids[i]``.
    """
    values = category_values(convention)
    names = COCO_CONVENTIONS[convention].names
    return {
        "convention": convention,
        "num_classes": len(names),
        "background": 0,
        "ignore": IGNORE_INDEX,
        "category_ids": list(COCO_CATEGORY_IDS),
        "values": [values[c] for c in COCO_CATEGORY_IDS],
        "class_names": list(names),
        "crowd": CROWD_POLICY,
        "overlap": OVERLAP_POLICY,
    }


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict | None:
    """Turn a COCO segmentation (polygons, uncompressed or compressed RLE) into one RLE.

    Returns None when nothing is left to paint (only degenerate polygons). The input is
    assumed valid (see :func:`check_segmentation`).
    """
    if isinstance(segm, list):
        # A polygon needs 3 points (6 numbers); shorter ones have no area, and pycocotools
        # would take a 4-number one for a box.
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def paint_mask(height: int, width: int, instances: list[Instance]) -> np.ndarray:
    """Paint instances into an (height, width) uint8 label map.

    Crowd regions become 255 first; non-crowd instances are then painted largest decoded
    area first (ties: lower annotation id first), so smaller instances end on top and any
    instance overrides a crowd region.
    """
    label = np.zeros((height, width), np.uint8)
    things = []
    for ann_id, value, crowd, segm in instances:
        rle = segmentation_to_rle(segm, height, width)
        if rle is None:
            continue
        if crowd:
            label[mask_utils.decode(rle) > 0] = IGNORE_INDEX
        else:
            things.append((-int(mask_utils.area(rle)), ann_id, value, rle))
    for _, _, value, rle in sorted(things, key=lambda t: (t[0], t[1])):
        label[mask_utils.decode(rle) > 0] = value
    return label


def _write_mask(task: MaskTask) -> None:
    """Worker: paint one image's mask and write it atomically.

    The task carries the image's own annotations rather than each worker loading the COCO
    API in an initializer: the main process has parsed the JSON already, a per-image list
    pickles in microseconds, and every worker re-reading the 450 MB train file would cost
    seconds and gigabytes each.
    """
    path, height, width, instances = task
    save_label_png(path, paint_mask(height, width, instances))


def split_paths(coco_root: Path, split: str) -> tuple[Path, Path]:
    """Return (image folder, instances JSON) of ``split``; raise a :class:`UserError` if absent."""
    image_dir = coco_root / f"{split}2014"
    if not image_dir.is_dir():
        raise UserError(f"image folder not found: {image_dir}; unpack {split}2014.zip in the COCO root")
    ann_path = coco_root / "annotations" / f"instances_{split}2014.json"
    if not ann_path.is_file():
        raise UserError(f"annotation file not found: {ann_path}; download annotations_trainval2014.zip "
                        "and unpack it in the COCO root")
    return image_dir, ann_path


def load_instances(path: Path) -> dict[str, Any]:
    """Read a COCO instances JSON; an unreadable or malformed file is a :class:`UserError`."""
    print(f"reading {path}", flush=True)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deep to parse
        raise UserError(f"annotation file {path} is not valid JSON ({err}); download it again") from None
    except OSError as err:
        raise UserError(f"cannot read annotation file {path}: {err.strerror or err}") from None
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO instances file (expected 'images', 'annotations' "
                        "and 'categories' lists)")
    return data


def check_categories(categories: list[dict], path: Path) -> None:
    """Require exactly the 80 COCO categories (ids and names of ``data.classes``)."""
    try:
        found = {int(c["id"]): str(c["name"]) for c in categories}
    except (KeyError, TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: malformed 'categories' entry (each needs an 'id' and a 'name')") from None
    expected = dict(zip(COCO_CATEGORY_IDS, COCO.names[1:]))
    if sorted(found) != sorted(expected):
        extra = sorted(set(found) - set(expected))
        missing = sorted(set(expected) - set(found))
        raise UserError(f"{path}: categories differ from the 80 COCO 2014 categories "
                        f"(unexpected ids {extra}, missing ids {missing}); use the official instances file")
    for cat, name in expected.items():
        if found[cat] != name:
            raise UserError(f"{path}: category {cat} is named {found[cat]!r}, expected {name!r}; "
                            "use the official instances file")


def check_segmentation(ann: dict, height: int, width: int, path: Path) -> None:
    """Raise a :class:`UserError` unless ``ann`` has a segmentation pycocotools can decode."""
    segm = ann.get("segmentation")
    where = f"{path}: annotation {ann.get('id')}"
    if isinstance(segm, list):
        # pycocotools needs memory in proportion to the coordinates (and NaN has no bound).
        limit = 2 * max(height, width)
        if not all(isinstance(p, list) and all(isinstance(v, (int, float)) and abs(v) <= limit for v in p)
                   for p in segm):
            raise UserError(f"{where} has a malformed polygon list (expected lists of x, y numbers, each "
                            f"within -{limit}..{limit}, twice the image size)")
        return
    if not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
        raise UserError(f"{where} has no polygon or RLE segmentation")
    if segm["size"] != [height, width]:
        raise UserError(f"{where}: RLE size {segm['size']} differs from its image size [{height}, {width}]")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != height * width:
            raise UserError(f"{where}: uncompressed RLE counts must be integers >= 0 summing to "
                            f"{height * width} (the image's pixel count)")
    elif isinstance(counts, str):
        runs = rle_string_runs(counts)
        if runs is None or sum(runs) != height * width:
            raise UserError(f"{where}: compressed RLE counts do not decode to runs covering the image's "
                            f"{height * width} pixels")
    else:
        raise UserError(f"{where}: RLE counts must be a list or a string")


def rle_string_runs(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' ``rleFrString``), or None when
    it is malformed: a character outside '0'..'o', a number cut short, a negative run.

    pycocotools decodes such strings without complaint: the pixels after runs that stop short
    of the image come from uninitialised memory.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value = shift = 0
        more = True
        while more:
            if pos == len(counts):
                return None
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and char & 0x10:
                value |= -1 << shift  # the sign of a difference
        if len(runs) > 2:  # runs after the third are stored as differences to the one two before
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return runs


def collect_split(coco_root: Path, split: str, values: dict[int, int],
                  mask_dir: Path) -> tuple[list[str], dict[str, list[int]], list[MaskTask]]:
    """Read one split's annotations.

    Returns the sorted image stems, their contiguous label ids (1..80) and one
    :data:`MaskTask` per image (not yet filtered for existing masks).
    """
    image_dir, ann_path = split_paths(coco_root, split)
    data = load_instances(ann_path)
    check_categories(data["categories"], ann_path)

    try:
        images = {int(im["id"]): (Path(im["file_name"]).stem, im["file_name"], int(im["height"]), int(im["width"]))
                  for im in data["images"]}
    except (KeyError, TypeError, ValueError, OverflowError):
        raise UserError(f"{ann_path}: malformed 'images' entry (each needs id, file_name, height, width)") from None
    for _, file_name, height, width in images.values():
        if not (height > 0 and width > 0 and height * width <= MAX_PIXELS):
            raise UserError(f"{ann_path}: image {file_name} has height {height} and width {width}; both must be "
                            f"positive, the area at most {MAX_PIXELS} pixels")
    on_disk = set(os.listdir(image_dir))
    missing = sorted(file_name for _, file_name, _, _ in images.values() if file_name not in on_disk)
    if missing:
        raise UserError(f"{len(missing)} image(s) of {ann_path} are missing from {image_dir} "
                        f"(first: {missing[0]}); unpack the complete {split}2014.zip")

    contiguous = category_values("contiguous")
    per_image: dict[int, list[Instance]] = {i: [] for i in images}
    labels: dict[str, set[int]] = {stem: set() for stem, _, _, _ in images.values()}
    for ann in data["annotations"]:
        try:
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            ann_id, crowd = int(ann["id"]), bool(ann.get("iscrowd", 0))
        except (KeyError, TypeError, ValueError, OverflowError):
            which = ann.get("id") if isinstance(ann, dict) else ann
            raise UserError(f"{ann_path}: malformed annotation {which!r} (needs id, image_id, category_id)") from None
        if image_id not in images:
            raise UserError(f"{ann_path}: annotation {ann_id} refers to unknown image id {image_id}")
        if cat not in values:
            raise UserError(f"{ann_path}: annotation {ann_id} has unknown category id {cat}")
        stem, _, height, width = images[image_id]
        check_segmentation(ann, height, width, ann_path)
        per_image[image_id].append((ann_id, values[cat], crowd, ann["segmentation"]))
        labels[stem].add(contiguous[cat])

    tasks = [(str(mask_dir / f"{stem}.png"), height, width, per_image[image_id])
             for image_id, (stem, _, height, width) in images.items()]
    tasks.sort(key=lambda t: t[0])
    return sorted(labels), {s: sorted(v) for s, v in labels.items()}, tasks


def check_mask_dir(mask_dir: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Check that ``mask_dir`` can take masks of ``record``'s convention; nothing is written.

    A folder that already holds masks must have been written with the same record: other
    settings, or PNGs of unknown origin (no convention.json, unless ``overwrite``), are
    refused so that one folder never mixes conventions.
    """
    conv_path = mask_dir / CONVENTION_FILE
    pngs = [n for n in os.listdir(mask_dir) if n.endswith(".png") and not is_temporary(n)] \
        if mask_dir.is_dir() else []
    if pngs and conv_path.is_file():
        try:
            existing = json.loads(conv_path.read_text())
        except (ValueError, OSError):
            raise UserError(f"{conv_path} is unreadable, so the convention of the masks beside it is "
                            "unknown; choose another --mask_dir or remove that folder") from None
        found = existing.get("convention") if isinstance(existing, dict) else None
        if found != record["convention"]:
            raise UserError(f"{mask_dir} holds masks in the {found!r} convention ({conv_path}); writing "
                            f"{record['convention']!r} masks there would mix them; choose another "
                            "--mask_dir or --convention")
        if existing != record:
            raise UserError(f"{mask_dir} holds masks written with other settings ({conv_path}); "
                            "choose another --mask_dir or remove that folder")
    elif pngs and not overwrite:
        raise UserError(f"{mask_dir} holds {len(pngs)} PNG(s) but no {CONVENTION_FILE}, so their "
                        "convention is unknown; choose another --mask_dir, or pass --overwrite to "
                        "rewrite the masks of the prepared splits")


def write_masks(tasks: list[MaskTask], pool: TaskPool, desc: str) -> None:
    """Paint and write the masks of ``tasks`` in ``pool``, showing progress."""
    for _ in tqdm(pool.map(_write_mask, tasks), total=len(tasks), desc=desc, unit="img"):
        pass


def merge_labels(path: Path, new: dict[str, list[int]]) -> ImageLabels:
    """Add ``new`` labels to the label file at ``path`` (kept entries of other splits)."""
    classes = list(COCO.names[1:])
    ids: dict[str, list[int]] = {}
    if path.is_file():
        old = ImageLabels.load(path, num_fg=len(classes))
        if old.classes != classes:
            raise UserError(f"{path} lists other classes than the 80 COCO classes; remove it or "
                            "choose another --out_dir")
        ids.update(old.ids)
    ids.update(new)
    return ImageLabels(classes, ids)


def main(args: argparse.Namespace) -> None:
    """Check the inputs and the mask folder, then prepare each split in turn."""
    coco_root = Path(args.coco_root)
    if not coco_root.is_dir():
        raise UserError(f"COCO root not found: {coco_root}; pass the folder holding train2014/, "
                        "val2014/ and annotations/")
    out_dir = Path(args.out_dir)
    mask_dir = DatasetLayout.coco(coco_root, args.mask_dir).mask_dirs[0]
    values = category_values(args.convention)
    record = convention_record(args.convention)
    splits = list(dict.fromkeys(args.splits))
    for split in splits:  # fail on a missing folder or file before any work
        split_paths(coco_root, split)
    check_mask_dir(mask_dir, record, args.overwrite)

    # Fork the workers now, while this process is small: forked later, each would share
    # (and, as its garbage collector touches them, copy) the gigabytes of parsed JSON. A first
    # task starts them all (a pool of forked workers starts every one on its first task).
    # Workers receive each image's own annotations with its task instead (see _write_mask).
    # They ignore Ctrl-C: the main process stops, and leaving the block waits for the running masks.
    started: set[str] = set()
    try:
        with TaskPool(args.workers if args.workers > 1 else 0, start="fork") as pool:
            list(pool.map(int, [0]))
            for split in splits:
                # One split at a time, so only one parsed annotation file is in memory.
                stems, labels, tasks = collect_split(coco_root, split, values, mask_dir)
                if split == splits[0]:  # its annotations accepted, no mask yet: a rejected input creates nothing
                    with atomic_path(mask_dir / CONVENTION_FILE) as tmp:
                        Path(tmp).write_text(json.dumps(record, indent=1) + "\n")
                started.update(stems)
                remove_temporaries(mask_dir, ".png", set(stems))  # left by an earlier, killed run
                todo = tasks if args.overwrite else [t for t in tasks if not os.path.exists(t[0])]
                write_masks(todo, pool, f"{split} masks")
                write_list(out_dir / f"{split}.txt", stems)
                write_list(out_dir / f"{split}_labelled.txt", [n for n in stems if labels[n]])
                merge_labels(out_dir / LABEL_FILE.name, labels).save(out_dir / LABEL_FILE.name)
                empty = sum(1 for v in labels.values() if not v)
                print(f"{split}: {len(stems)} images ({empty} without annotations), {len(todo)} masks "
                      f"written, {len(tasks) - len(todo)} already present", flush=True)
    except BaseException:
        # Terminated workers may have stopped in the middle of a write: remove their temporary
        # files (of this run's images only; another run may be writing other splits here).
        remove_temporaries(mask_dir, ".png", started)
        raise
    print(f"lists and labels in {out_dir}, {args.convention} masks in {mask_dir}")


if __name__ == "__main__":
    run_guarded(main, get_args_parser().parse_args())
