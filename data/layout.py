"""Where a dataset keeps its images, ground-truth masks and annotations.

PASCAL VOC 2012 (``<root>`` is ``VOCdevkit/VOC2012``)::

    <root>/JPEGImages/<name>.jpg
    <root>/SegmentationClassAug/<name>.png   (preferred when present)
    <root>/SegmentationClass/<name>.png
    <root>/Annotations/<name>.xml

MS COCO 2014::

    <root>/train2014/<name>.jpg   names starting with COCO_train2014_
    <root>/val2014/<name>.jpg     names starting with COCO_val2014_ (others: both searched)
    <mask dir>/<name>.png         default <root>/SegmentationClass, written by coco14

:func:`load_dataset` gives a :class:`DatasetSpec` (layout, image-level labels, class names);
the entry scripts' dataset flags are defined in :mod:`apps.cli`.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from data.labels import ImageLabels

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LABEL_FILES = {
    "voc": REPO_ROOT / "voc12" / "cls_labels.json",
    "coco": REPO_ROOT / "coco14" / "cls_labels.json",
}
# Images the inference scripts process by default: the training images (pseudo-labels are
# made for them); coco14/train.txt is written by coco14/prepare_coco.py.
DEFAULT_INFER_LISTS = {
    "voc": REPO_ROOT / "voc12" / "train.txt",
    "coco": REPO_ROOT / "coco14" / "train.txt",
}
DEFAULT_VOC_ROOT = "VOCdevkit/VOC2012"
# A dataset's own image-level label file, in its root (data/synthetic.py writes one); it names
# the dataset's classes.
DATASET_LABEL_FILE = "cls_labels.json"


@dataclass(frozen=True)
class DatasetLayout:
    """File locations of one dataset; build it with :meth:`voc` or :meth:`coco`.

    Attributes:
        kind: "voc" or "coco".
        root: dataset root folder.
        image_dirs: folders searched for ``<name><image_suffix>``, in order.
        mask_dirs: folders searched for ``<name>.png`` ground-truth masks, in order.
        annotation_dir: folder of VOC XML annotations, or None (COCO).
        prefix_dirs: name prefix -> the one image folder of names with that prefix.
        image_suffix: image file suffix.
    """

    kind: str
    root: Path
    image_dirs: tuple[Path, ...]
    mask_dirs: tuple[Path, ...]
    annotation_dir: Path | None = None
    prefix_dirs: dict[str, Path] = field(default_factory=dict)
    image_suffix: str = ".jpg"

    @classmethod
    def voc(cls, root: str | os.PathLike) -> "DatasetLayout":
        """Layout of a PASCAL VOC 2012 root (the folder holding JPEGImages)."""
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"VOC root {root} does not exist; it is the folder that holds JPEGImages "
                            "(e.g. VOCdevkit/VOC2012)", about="root")
        return cls(
            kind="voc",
            root=root,
            image_dirs=(root / "JPEGImages",),
            mask_dirs=(root / "SegmentationClassAug", root / "SegmentationClass"),
            annotation_dir=root / "Annotations",
        )

    @classmethod
    def coco(cls, root: str | os.PathLike, mask_dir: str | os.PathLike | None = None) -> "DatasetLayout":
        """Layout of an MS COCO 2014 root (the folder holding train2014/ and val2014/)."""
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"COCO root {root} does not exist; it is the folder that holds train2014/ and "
                            "val2014/", about="root")
        train, val = root / "train2014", root / "val2014"
        return cls(
            kind="coco",
            root=root,
            image_dirs=(train, val),
            mask_dirs=(Path(mask_dir) if mask_dir is not None else root / "SegmentationClass",),
            prefix_dirs={"COCO_train2014_": train, "COCO_val2014_": val},
        )

    def _image_candidates(self, name: str) -> list[Path]:
        for prefix, folder in self.prefix_dirs.items():
            if name.startswith(prefix):
                return [folder / f"{name}{self.image_suffix}"]
        return [folder / f"{name}{self.image_suffix}" for folder in self.image_dirs]

    def image_path(self, name: str) -> Path:
        """Path of ``name``'s image: the existing file, else where it was expected first."""
        candidates = self._image_candidates(name)
        for path in candidates:
            if path.is_file():
                return path
        return candidates[0]

    def mask_path(self, name: str) -> Path | None:
        """Path of ``name``'s ground-truth mask PNG, or None when no mask folder has it."""
        for folder in self.mask_dirs:
            path = folder / f"{name}.png"
            if path.is_file():
                return path
        return None

    def mask_folder(self) -> Path:
        """The ground-truth folder evaluated as a whole: the first of ``mask_dirs`` that exists
        (VOC: SegmentationClassAug when present, else SegmentationClass)."""
        return next((folder for folder in self.mask_dirs if folder.is_dir()), self.mask_dirs[-1])

    def label_file(self) -> Path | None:
        """The dataset's own label file, ``<root>/cls_labels.json``, or None when the root has none."""
        path = self.root / DATASET_LABEL_FILE
        return path if path.is_file() else None

    def annotation_path(self, name: str) -> Path:
        """Path of ``name``'s VOC XML annotation (VOC layout only)."""
        if self.annotation_dir is None:
            raise UserError(f"the {self.kind} layout has no XML annotations; use a label file instead")
        return self.annotation_dir / f"{name}.xml"

    def check(self, names: list[str], source: str = "the list") -> None:
        """Raise one :class:`UserError` if any image of ``names`` (the names of ``source``, a list
        file's path in the entry scripts) is missing; about "root" when the root has no image folder,
        for the entry script to name its root flag (``apps.cli.run_cli``)."""
        if not any(folder.is_dir() for folder in self.image_dirs):
            folders = " or ".join(str(f) for f in self.image_dirs)
            raise UserError(f"no image folder in {self.root} (expected {folders}): not a dataset root", about="root")
        missing = [n for n in names if not self.image_path(n).is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} of {len(names)} images of {source} are missing "
                f"(first: {missing[0]}, expected at {self.image_path(missing[0])}); "
                "check the dataset root and the list"
            )

    def check_masks(self, names: list[str], source: str = "the list") -> None:
        """Raise one :class:`UserError` if any ground-truth mask of ``names`` is missing."""
        missing = [n for n in names if self.mask_path(n) is None]
        if missing:
            folders = " or ".join(str(f) for f in self.mask_dirs)
            raise UserError(
                f"{len(missing)} of {len(names)} images of {source} have no ground-truth mask "
                f"(first: {missing[0]}, looked in {folders}); check the mask folder and the list"
            )


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset chosen on the command line.

    Attributes:
        layout: file locations.
        labels: image-level labels (foreground ids 1..C-1).
        class_names: C names, index 0 "background", then the label file's classes.
        num_classes: C = foreground classes of the label file + 1 (background).
    """

    layout: DatasetLayout
    labels: ImageLabels
    class_names: tuple[str, ...]
    num_classes: int

    def check(self, names: list[str], source: str = "the list") -> None:
        """Raise a :class:`UserError` if a name of ``names`` lacks a label or an image."""
        self.labels.check_names(names, source)
        self.layout.check(names, source)


def load_dataset(kind: str, root: str | os.PathLike, label_file: str | os.PathLike | None = None,
                 coco_mask_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """The layout and image-level labels of a dataset.

    Args:
        kind: "voc" or "coco".
        root: the dataset root (VOC: the folder holding JPEGImages; COCO: train2014/ and val2014/).
        label_file: image-level label JSON (default: the repository's file for ``kind``).
        coco_mask_dir: COCO mask folder (default: ``<root>/SegmentationClass``).
    """
    layout = DatasetLayout.voc(root) if kind == "voc" else DatasetLayout.coco(root, coco_mask_dir)
    labels = ImageLabels.load(label_file if label_file else DEFAULT_LABEL_FILES[kind])
    return DatasetSpec(
        layout=layout,
        labels=labels,
        class_names=("background",) + tuple(labels.classes),
        num_classes=labels.num_fg + 1,
    )


def labels_from_annotations(layout: DatasetLayout, names: list[str], classes: list[str]) -> ImageLabels:
    """Image-level labels from VOC XML annotations.

    Every ``<object><name>`` of an image counts, difficult and truncated objects included
    (as in the usual VOC ``cls_labels``); ``<part><name>`` elements (head, hand, ...) do not.

    Args:
        layout: a VOC layout.
        names: images to read.
        classes: foreground class names; an object named ``classes[i]`` gets id ``i + 1``.

    Raises:
        UserError: a missing or malformed XML file, or an object of a class not in ``classes``.
    """
    index = {c: i + 1 for i, c in enumerate(classes)}
    ids: dict[str, list[int]] = {}
    for name in names:
        path = layout.annotation_path(name)
        try:
            tree = ET.parse(path)
        except FileNotFoundError:
            raise UserError(f"annotation not found: {path}") from None
        except (ET.ParseError, OSError) as err:
            raise UserError(f"cannot read annotation {path}: {err}") from None
        found = set()
        for obj in tree.getroot().findall("object"):
            cls_name = (obj.findtext("name") or "").strip()
            if cls_name not in index:
                raise UserError(
                    f"{path}: object class {cls_name!r} is not one of the {len(classes)} classes "
                    f"({', '.join(classes)})"
                )
            found.add(index[cls_name])
        ids[name] = sorted(found)
    return ImageLabels(classes, ids)
