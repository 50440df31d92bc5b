"""Class sets: the class ids a label map may hold and their names.

A :class:`ClassSet` is chosen explicitly (a dataset, a mask convention, a label file),
never guessed from a class count. Index 0 is background. PASCAL VOC 2012 has 21 classes
(:data:`VOC`). MS COCO 2014 masks come in two conventions: contiguous ids, where category
ids (1..90, ten unused) map to 1..80 in sorted-id order (:data:`COCO`, 81 classes;
``COCO_CATEGORY_IDS[i-1]`` is the raw id of contiguous id ``i``), and raw category ids
(:data:`COCO_RAW`, 91 ids of which the ten unused ones are no class).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from core.errors import UserError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

_COCO = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CATEGORY_IDS = tuple(i for i, _ in _COCO)
COCO_CLASSES = ("background",) + tuple(n for _, n in _COCO)
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)

MAX_CLASSES = 255  # ids are stored in uint8 label maps and 255 is the ignore value

# coco14/prepare_coco.py records the id convention of the masks it writes in this file,
# beside them; evaluation reads it to choose the class set.
CONVENTION_FILE = "convention.json"

# Raw-id convention (91 classes): index = raw category id, unused ids named "unused-<id>".
COCO_RAW_CLASSES = ("background",) + tuple(dict(_COCO).get(i, f"unused-{i}") for i in range(1, 91))


@dataclass(frozen=True)
class ClassSet:
    """The classes of a label map: ids 0..C-1, named ``names`` (background first), of which
    the ids in ``unused`` are no class (they never occur; e.g. the ten unused COCO category
    ids of the raw-id convention)."""

    names: tuple[str, ...]
    unused: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "unused", tuple(sorted({int(i) for i in self.unused})))
        if len(self.names) < 2:
            raise ValueError(f"a class set needs background and at least one class, got {self.names}")
        if any(not 0 < i < len(self.names) for i in self.unused):
            raise ValueError(f"unused ids {self.unused} must lie in 1..{len(self.names) - 1}")

    @property
    def num_classes(self) -> int:
        """C, the number of ids (background and unused ids included)."""
        return len(self.names)

    @property
    def valid(self) -> np.ndarray:
        """(C,) bool: True for the ids that are classes (all but ``unused``)."""
        valid = np.ones(self.num_classes, bool)
        valid[list(self.unused)] = False
        return valid


def generic(num_classes: int) -> ClassSet:
    """``num_classes`` classes without known names: background, class1, class2, ..."""
    return ClassSet(("background",) + tuple(f"class{i}" for i in range(1, num_classes)))


def from_foreground(classes: Iterable[str]) -> ClassSet:
    """The class set of a label file's foreground class list (background prepended)."""
    return ClassSet(("background",) + tuple(classes))


VOC = ClassSet(VOC_CLASSES)
COCO = ClassSet(COCO_CLASSES)
COCO_RAW = ClassSet(COCO_RAW_CLASSES, COCO_UNUSED_IDS)

# Dataset kind -> its class set; COCO mask convention (as recorded in convention.json) -> class set.
DATASET_CLASSES = {"voc": VOC, "coco": COCO}
COCO_CONVENTIONS = {"contiguous": COCO, "raw": COCO_RAW}


def convention_classes(record: dict) -> ClassSet:
    """The class set of masks described by a convention record (``convention.json``, with
    ``convention``, ``num_classes`` and optionally ``class_names``): a COCO convention gives
    its class set (unused ids included), another one its names or generic names."""
    names = record.get("class_names")
    known = COCO_CONVENTIONS.get(record["convention"])
    if known is not None and known.num_classes == record["num_classes"]:
        return ClassSet(tuple(names) if names else known.names, known.unused)
    return ClassSet(tuple(names)) if names else generic(record["num_classes"])


def read_mask_convention(gt_dir: str | os.PathLike) -> dict | None:
    """The id convention recorded beside ground-truth masks, or None when ``gt_dir`` has none.

    ``coco14/prepare_coco.py`` writes ``<mask_dir>/convention.json``; the returned record has
    at least ``convention`` (str), ``num_classes`` (int, that of the COCO convention of this
    name) and, when present, ``class_names`` (``num_classes`` names, background first); its
    class set is :func:`convention_classes`. A damaged file raises :class:`UserError`.
    """
    path = Path(gt_dir) / CONVENTION_FILE
    if not path.is_file():
        return None
    redo = ("rewrite it by running coco14.prepare_coco again for this mask folder and convention "
            "(existing masks are kept)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path} ({err}), which records the class-id convention of the masks "
                        f"beside it; {redo}") from None
    ok = (isinstance(record, dict) and isinstance(record.get("convention"), str)
          and isinstance(record.get("num_classes"), int) and 2 <= record["num_classes"] <= MAX_CLASSES)
    names = record.get("class_names") if ok else None
    if ok and names is not None:
        ok = (isinstance(names, list) and len(names) == record["num_classes"]
              and all(isinstance(n, str) for n in names))
    known = COCO_CONVENTIONS.get(record["convention"]) if ok else None
    if not ok or (known is not None and known.num_classes != record["num_classes"]):
        counts = ", ".join(f"{c.num_classes} for {n!r}" for n, c in COCO_CONVENTIONS.items())
        raise UserError(f"{path} is not a mask convention record (expected 'convention', 'num_classes' "
                        f"between 2 and {MAX_CLASSES} ({counts}) and optionally one class name per class); "
                        f"{redo}")
    return record


# Where a class set came from (resolve_class_set), in the order in which they decide.
CLASS_SOURCES = ("mask_convention", "convention", "label_file", "dataset_label_file", "dataset", "count")


class ClassSetConflict(UserError):
    """Two sources of the class set disagree: ``given`` (a source of :data:`CLASS_SOURCES`, or
    ``"count"``) contradicts ``source``, the one that decides, whose class set is ``classes``."""

    def __init__(self, given: str, source: str, classes: ClassSet):
        super().__init__(f"the {given.replace('_', ' ')} contradicts the {source.replace('_', ' ')}, which "
                         f"means {classes.num_classes} classes", about="class_set")
        self.given, self.source, self.classes = given, source, classes


def resolve_class_set(mask_convention: dict | None = None, convention: str | None = None,
                      label_file: ClassSet | None = None, dataset_label_file: ClassSet | None = None,
                      dataset: str = "voc", count: int | None = None) -> tuple[ClassSet, str]:
    """The class set of an evaluation and its source (one of :data:`CLASS_SOURCES`).

    The first source present decides: the convention record beside the masks
    (:func:`read_mask_convention`), a COCO ``convention`` name, a given label file's classes,
    the dataset's own label file (the one in its root), else ``dataset`` ("voc" or "coco").
    A class ``count`` must agree with the deciding set; with the VOC default, another count
    gives that many classes with generic names (the data defines no names). A ``convention``
    must agree with the record, a given label file with a convention. A disagreement raises
    :class:`ClassSetConflict`.
    """
    fixed = None
    if mask_convention is not None:
        if convention is not None and convention != mask_convention["convention"]:
            raise ClassSetConflict("convention", "mask_convention", convention_classes(mask_convention))
        fixed, source = convention_classes(mask_convention), "mask_convention"
    elif convention is not None:
        fixed, source = COCO_CONVENTIONS[convention], "convention"
    if fixed is not None:
        if count is not None and count != fixed.num_classes:
            raise ClassSetConflict("count", source, fixed)
        if label_file is not None and label_file.num_classes != fixed.num_classes:
            raise ClassSetConflict("label_file", source, fixed)
        return fixed, source
    for labels, source in ((label_file, "label_file"), (dataset_label_file, "dataset_label_file")):
        if labels is not None:
            if count is not None and count != labels.num_classes:
                raise ClassSetConflict("count", source, labels)
            return labels, source
    classes = DATASET_CLASSES[dataset]
    if count is None or count == classes.num_classes:
        return classes, "dataset"
    if dataset == "coco":
        raise ClassSetConflict("count", "dataset", classes)
    return generic(count), "count"
