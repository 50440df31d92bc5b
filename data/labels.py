"""List files and image-level labels.

List files: one image per line, either a bare name (``2007_000032``) or the published
form ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``; both give the
name ``2007_000032``.

Image-level labels: a JSON file (no pickle) ``{"classes": [names of the foreground
classes], "labels": {name: [class ids]}}`` where class ids are the segmentation ids,
1..C-1 (0 is background and never listed). In memory a label is a float32 vector of
length C-1 with 1 at index id-1, the layout the losses and the label encoder use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.fileio import atomic_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def read_list(path: str | os.PathLike) -> list[str]:
    """Read a list file and return image names, in order, without folders or suffixes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"list file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no name
    except UnicodeDecodeError as err:
        raise UserError(f"list file {path} is not UTF-8 text (undecodable byte at offset {err.start}); "
                        "a list holds one image name per line") from None
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        is_path = "/" in first or Path(first).suffix.lower() in IMAGE_SUFFIXES
        name = Path(first).stem if is_path else first
        if not name:  # "/" alone: a folder, no file
            raise UserError(f"{path} line {number}: {first!r} names no image")
        names.append(name)
    if not names:
        raise UserError(f"list file {path} is empty")
    return names


def write_list(path: str | os.PathLike, names: list[str]) -> None:
    """Write bare image names, one per line, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(f"{n}\n" for n in names))


class ImageLabels:
    """Image-level labels of one dataset.

    Attributes:
        classes: foreground class names, index i has segmentation id i+1.
        ids: name -> sorted list of foreground ids (1..C-1).
        path: the file they were read from (:meth:`load`), named by the errors; None when built in memory.
    """

    def __init__(self, classes: list[str], ids: dict[str, list[int]], path: Path | None = None):
        self.classes = list(classes)
        self.ids = {k: sorted(int(i) for i in v) for k, v in ids.items()}
        self.path = path

    def _where(self) -> str:
        """The label file for messages: its path, or "the label file" when built in memory."""
        return str(self.path) if self.path is not None else "the label file"

    @property
    def num_fg(self) -> int:
        """Number of foreground classes (C-1)."""
        return len(self.classes)

    def __contains__(self, name: str) -> bool:
        return name in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def vector(self, name: str) -> np.ndarray:
        """(C-1,) float32 multi-hot vector of ``name``'s foreground classes."""
        try:
            ids = self.ids[name]
        except KeyError:
            raise UserError(f"image {name!r} has no image-level label in {self._where()}") from None
        vec = np.zeros(self.num_fg, np.float32)
        vec[np.asarray(ids, dtype=np.int64) - 1] = 1.0
        return vec

    def check_names(self, names: list[str], source: str = "the list") -> None:
        """Raise a :class:`UserError` naming how many and which first names lack labels."""
        missing = [n for n in names if n not in self.ids]
        if missing:
            raise UserError(
                f"{len(missing)} image(s) of {source} have no image-level label in {self._where()} "
                f"(first: {missing[0]}); check the list and the label file"
            )

    @classmethod
    def from_vectors(cls, classes: list[str], vectors: dict[str, np.ndarray]) -> "ImageLabels":
        """Build from multi-hot vectors of length C-1 (the published ``cls_labels.npy`` layout)."""
        ids = {}
        for name, vec in vectors.items():
            vec = np.asarray(vec).reshape(-1)
            if vec.shape[0] != len(classes):
                raise UserError(
                    f"label vector of {name} has length {vec.shape[0]}, expected {len(classes)} "
                    "(one entry per foreground class)"
                )
            ids[str(name)] = (np.flatnonzero(vec > 0.5) + 1).tolist()
        return cls(classes, ids)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON label file atomically (one image per line, sorted by name)."""
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(self.ids[k])}" for k in sorted(self.ids))
        text = f'{{"classes": {json.dumps(self.classes)},\n"labels": {{\n{body}\n}}}}\n'
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text)

    @classmethod
    def load(cls, path: str | os.PathLike, num_fg: int | None = None) -> "ImageLabels":
        """Read a JSON label file; check the class count against ``num_fg`` when given."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"label file not found: {path}")
        not_labels = (f"{path} is not an image-level label file (expected JSON with 'classes', a list of class "
                      "names, and 'labels', image names -> lists of class ids)")
        try:
            raw = json.loads(path.read_text())
            classes, ids = raw["classes"], raw["labels"]
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep to parse
            raise UserError(not_labels) from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and isinstance(ids, dict)
                and all(isinstance(v, list) and all(type(i) is int for i in v) for v in ids.values())):
            raise UserError(not_labels)
        labels = cls(classes, ids, path)
        if num_fg is not None and labels.num_fg != num_fg:
            raise UserError(
                f"{path} has {labels.num_fg} foreground classes but {num_fg} were expected; "
                "use the label file of the dataset you chose"
            )
        for name, v in labels.ids.items():
            if any(i < 1 or i > labels.num_fg for i in v):
                raise UserError(f"{path}: image {name} has a class id outside 1..{labels.num_fg}")
        return labels
