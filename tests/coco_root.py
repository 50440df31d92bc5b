"""Build small MS COCO 2014 roots for tests (imported by tests/test_coco14.py and
tests/test_coco_pipeline.py).

A root holds ``train2014/`` and ``val2014/`` JPEGs named ``COCO_<split>2014_<12-digit id>.jpg``
and ``annotations/instances_<split>2014.json`` with the 80 official categories, like the
real download.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data.classes import COCO_CATEGORY_IDS, COCO_CLASSES

# image id -> (split, height, width)
ImageTable = dict[int, tuple[str, int, int]]


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Polygon (flat x, y list) of an axis-aligned rectangle."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box_mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    """(h, w) uint8 mask, 1 inside ``rows`` x ``cols``."""
    m = np.zeros((h, w), np.uint8)
    m[rows, cols] = 1
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE (string counts) of a (H, W) 0/1 mask."""
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"counts": rle["counts"].decode("ascii"), "size": list(mask.shape)}


def annotation(ann_id: int, image_id: int, category_id: int, segmentation, crowd: int = 0,
               area: float = 0.0) -> dict:
    """One instance annotation; ``area`` and ``bbox`` are filler (the painter must not use them)."""
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": crowd, "area": area, "bbox": [0, 0, 1, 1]}


def stem(images: ImageTable, image_id: int) -> str:
    """File stem of ``image_id``, e.g. ``COCO_val2014_000000000004``."""
    return f"COCO_{images[image_id][0]}2014_{image_id:012d}"


def write_coco_root(root: Path, images: ImageTable, annotations: list[dict], seed: int = 0) -> Path:
    """Write random-noise JPEGs and the instances JSON of both splits under ``root``; return it.

    Each split's JSON holds that split's images and their annotations, and all 80 categories.
    """
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": c, "name": n, "supercategory": "x"} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir()
        entries = []
        for image_id, (s, h, w) in images.items():
            if s != split:
                continue
            name = f"{stem(images, image_id)}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{split}2014" / name)
            entries.append({"id": image_id, "file_name": name, "height": h, "width": w})
        ids = {e["id"] for e in entries}
        data = {"images": entries, "annotations": [a for a in annotations if a["image_id"] in ids],
                "categories": categories}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    return root
