"""Torch datasets over a list of names, a :class:`DatasetLayout` and :class:`ImageLabels`.

- :class:`ClassificationDataset`: augmented crops and label vectors for training.
- :class:`InferenceDataset`: multi-scale (and flipped) inputs for CAM / BAO inference;
  batch it with :func:`collate_inference`.
- :class:`SegmentationDataset`: ground-truth masks (and optionally images) for evaluation
  and visualisation.
- :class:`PseudoLabelDataset`: augmented crops and their label maps (pseudo-labels or
  masks) for the segmentation stage; :class:`ImageDataset`: images alone, for its inference.

Each constructor checks once that every name has an image (and a label where one is
used), so a wrong list fails at start-up with one clear message instead of mid-epoch.
A file that exists but cannot be decoded only shows when it is read: wrap the dataset in
:class:`ErrorsAsItems` and collate with :class:`CollateOrError`, so that the message
reaches the main process as it is, not inside a DataLoader worker's traceback.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.errors import UserError
from core.palette import IGNORE_INDEX, read_label_png
from data.images import read_image
from data.labels import ImageLabels
from data.layout import DatasetLayout
from data.transforms import SegAugment, TrainAugment, resized_scales, scaled_input, stack_scales


class _AugmentedDataset(Dataset, ABC):
    """Training samples over ``names`` whose random augmentation is a function of (seed, epoch, index).

    A sample is addressed by the key ``(epoch, index)`` (a plain ``index`` is epoch 0): its
    augmentation is drawn from ``np.random.default_rng([seed, epoch, index])`` (:meth:`rng`),
    so it depends neither on the worker that loads it nor on what was loaded before, and a
    run resumed at epoch ``epoch`` sees exactly the crops of an uninterrupted run. The epoch
    travels with the key, not as the dataset's state: DataLoader workers that persist across
    epochs (``persistent_workers=True``) draw each epoch's crops. The training loader's
    sampler yields these keys (:attr:`epoch_keys`; :func:`engine.resume.make_loader`).
    """

    # Tells engine.resume.make_loader to index with (epoch, index) keys.
    epoch_keys = True

    def __init__(self, layout: DatasetLayout, names: list[str], seed: int):
        self.layout = layout
        self.names = list(names)
        self.seed = int(seed)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        """The augmentation generator of sample ``index`` in ``epoch`` (0-based)."""
        return np.random.default_rng([self.seed, epoch, index])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.sample(int(index), self.rng(int(epoch), int(index)))

    @abstractmethod
    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Sample ``index`` augmented with ``rng``."""

    def __len__(self) -> int:
        return len(self.names)


class ClassificationDataset(_AugmentedDataset):
    """Training samples: ``{"name": str, "img": (3, S, S) float32, "label": (C-1,) float32}``,
    augmented reproducibly per (seed, epoch, index) (:class:`_AugmentedDataset`).
    """

    def __init__(self, layout: DatasetLayout, names: list[str], labels: ImageLabels,
                 transform: TrainAugment, seed: int = 0, source: str = "the list"):
        labels.check_names(names, source)
        layout.check(names, source)
        super().__init__(layout, names, seed)
        self.labels = labels
        self.transform = transform

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        name = self.names[index]
        img = self.transform(read_image(self.layout.image_path(name)), rng)
        return {"name": name, "img": img, "label": torch.from_numpy(self.labels.vector(name))}


class InferenceDataset(Dataset):
    """Multi-scale inference samples.

    Each item is ``{"name": str, "size": (H, W), "label": (C-1,) float32 tensor,
    "inputs": [(S, (3, S, S) uint8), ...], "views": V}`` (the resized image of each scale,
    :func:`data.transforms.resized_scales`; V = 2 with ``flip``, else 1), plus
    ``"image": (H, W, 3) uint8`` when ``return_image`` (for CRF and overlays). The inputs stay
    uint8 so that a quarter of the bytes travel to the model's device, which normalises and
    flips them (:func:`data.transforms.normalized_views`).
    """

    def __init__(self, layout: DatasetLayout, names: list[str], labels: ImageLabels,
                 scales: tuple[int, ...] = (256, 512, 768), flip: bool = True,
                 return_image: bool = False, source: str = "the list"):
        labels.check_names(names, source)
        layout.check(names, source)
        self.layout = layout
        self.names = list(names)
        self.labels = labels
        self.scales = tuple(int(s) for s in scales)
        self.flip = bool(flip)
        self.return_image = bool(return_image)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        img = read_image(self.layout.image_path(name))
        item = {
            "name": name,
            "size": (int(img.shape[0]), int(img.shape[1])),
            "label": torch.from_numpy(self.labels.vector(name)),
            "inputs": resized_scales(img, self.scales),
            "views": 2 if self.flip else 1,
        }
        if self.return_image:
            item["image"] = img
        return item


def collate_inference(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`InferenceDataset` items (a DataLoader ``collate_fn``).

    Returns:
        ``{"names": [B], "sizes": [B x (H, W)], "labels": (B, C-1) float32,
        "inputs": [(S, (B, 3, S, S) uint8), ...], "views": V}`` and ``"images"`` (list of B
        uint8 arrays) when the items hold images. Row b of each input is image b, resized;
        :func:`data.transforms.normalized_views` turns it into the network inputs of rows
        ``b * V`` (plain) and ``b * V + 1`` (flipped, when V = 2).
    """
    batch = {
        "names": [it["name"] for it in items],
        "sizes": [it["size"] for it in items],
        "labels": torch.stack([it["label"] for it in items]),
        "inputs": stack_scales([it["inputs"] for it in items]),
        "views": int(items[0]["views"]),
    }
    if "image" in items[0]:
        batch["images"] = [it["image"] for it in items]
    return batch


class SegmentationDataset(Dataset):
    """Ground-truth masks: ``{"name": str, "mask": (H, W) uint8}`` (255 = ignore), plus
    ``"image": (H, W, 3) uint8`` when ``return_image``; the image and mask sizes must agree.
    """

    def __init__(self, layout: DatasetLayout, names: list[str], return_image: bool = False,
                 source: str = "the list"):
        layout.check_masks(names, source)
        if return_image:
            layout.check(names, source)
        self.layout = layout
        self.names = list(names)
        self.return_image = bool(return_image)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        img = read_image(self.layout.image_path(name)) if self.return_image else None
        mask = read_mask(self.layout, name, None if img is None else img.shape[:2])
        if mask is None:
            raise UserError(f"ground-truth mask of {name} disappeared from {self.layout.root}")
        item: dict[str, Any] = {"name": name, "mask": mask}
        if img is not None:
            item["image"] = img
        return item


def read_mask(layout: DatasetLayout, name: str, image_size: tuple[int, int] | None = None) -> np.ndarray | None:
    """``name``'s ground-truth mask (H, W) uint8 (255 = ignore), or None when it has none.

    With ``image_size`` (H, W), a mask of another size is refused: it belongs to another image.
    """
    path = layout.mask_path(name)
    if path is None:
        return None
    mask = read_label_png(path)
    if image_size is not None and mask.shape != tuple(image_size):
        raise UserError(f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{image_size[1]}x{image_size[0]}; the mask does not belong to this image")
    return mask


def check_label_folder(label_dir: str | os.PathLike, names: list[str], layout: DatasetLayout, num_classes: int,
                       source: str = "the list") -> None:
    """Check that every name has a usable label map in ``label_dir``, before training starts.

    Refuses (one :class:`UserError`) a missing folder, missing files, and any map that
    :func:`read_label_map` refuses: unreadable, colour instead of class ids, of another size
    than its image, or holding an id that is no class. Every map is decoded (about 2 ms
    each); images are only opened for their size.
    """
    folder = Path(label_dir)
    if not folder.is_dir():
        raise UserError(f"label folder not found: {folder}", about="label_dir")
    missing = [n for n in names if not (folder / f"{n}.png").is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(names)} images of {source} have no label map in {folder} "
                        f"(first: {missing[0]}, expected {folder / (missing[0] + '.png')})", about="label_files")
    for name in names:
        image_path = layout.image_path(name)
        try:
            with Image.open(image_path) as img:
                width, height = img.size
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"cannot read image {image_path}: {err}") from None
        read_label_map(folder / f"{name}.png", num_classes, (height, width))


def read_label_map(path: str | os.PathLike, num_classes: int, image_size: tuple[int, int]) -> np.ndarray:
    """A training label map (H, W) uint8: ids 0..num_classes-1, 255 ignored.

    Raises:
        UserError: unreadable, of another size than the image (H, W), or holding an id that
            is no class.
    """
    label = read_label_png(path)
    if label.shape != tuple(image_size):
        raise UserError(f"{path} is {label.shape[1]}x{label.shape[0]} but its image is "
                        f"{image_size[1]}x{image_size[0]}; the label map does not belong to this image")
    ids = np.unique(label)
    bad = ids[(ids >= num_classes) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise UserError(f"{path} holds class id {int(bad[0])}, outside 0..{num_classes - 1} ({IGNORE_INDEX} = "
                        "ignore); it was made for another dataset or label file", about="label_ids")
    return label


class PseudoLabelDataset(_AugmentedDataset):
    """Segmentation training samples: ``{"name": str, "img": (3, S, S) float32, "label": (S, S) int64}``,
    augmented reproducibly per (seed, epoch, index) (:class:`_AugmentedDataset`).

    Labels are ``<label_dir>/<name>.png`` maps of class ids (255 ignored): pseudo-labels, or
    ground-truth masks for an upper bound.
    """

    def __init__(self, layout: DatasetLayout, names: list[str], label_dir: str | os.PathLike, num_classes: int,
                 transform: SegAugment, seed: int = 0, source: str = "the list"):
        layout.check(names, source)
        check_label_folder(label_dir, names, layout, num_classes, source)
        super().__init__(layout, names, seed)
        self.label_dir = Path(label_dir)
        self.num_classes = int(num_classes)
        self.transform = transform

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        name = self.names[index]
        img = read_image(self.layout.image_path(name))
        label = read_label_map(self.label_dir / f"{name}.png", self.num_classes, img.shape[:2])
        x, y = self.transform(img, label, rng)
        return {"name": name, "img": x, "label": y}


class ImageDataset(Dataset):
    """Images alone: ``{"name": str, "image": (H, W, 3) uint8}`` (segmentation inference), and
    with ``scales`` their network inputs at those factors of the original size,
    ``"inputs": [len(scales) x (3, h_s, w_s) float32]`` (:func:`data.transforms.scaled_input`),
    so that DataLoader workers rather than the main process resize and normalise.

    Batch with :func:`collate_images` (images differ in size).
    """

    def __init__(self, layout: DatasetLayout, names: list[str], source: str = "the list",
                 scales: tuple[float, ...] = ()):
        layout.check(names, source)
        self.layout = layout
        self.names = list(names)
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        item = {"name": name, "image": read_image(self.layout.image_path(name))}
        if self.scales:
            item["inputs"] = [scaled_input(item["image"], scale) for scale in self.scales]
        return item


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"names": [B], "images": [B x (H, W, 3) uint8]}`` and, when the items have them,
    ``"inputs": [B x [S x (3, h_s, w_s)]]`` (a DataLoader ``collate_fn``)."""
    batch = {"names": [it["name"] for it in items], "images": [it["image"] for it in items]}
    if items and "inputs" in items[0]:
        batch["inputs"] = [it["inputs"] for it in items]
    return batch


class ErrorsAsItems(Dataset):
    """Dataset wrapper returning ``{"error": message}`` instead of raising a :class:`UserError`.

    Through a DataLoader worker an exception arrives in the main process re-raised with the
    worker's traceback in its message; an item carries just the message.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.dataset[index]
        except UserError as err:
            return {"error": str(err)}


class CollateOrError:
    """DataLoader ``collate_fn`` for :class:`ErrorsAsItems`: ``{"error": first message}`` when
    an item of the batch failed, else ``collate(items)``. Raise it in the main process with
    :func:`raise_batch_error`."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        errors = [it["error"] for it in items if "error" in it]
        return {"error": errors[0]} if errors else self.collate(items)


def raise_batch_error(batch: dict[str, Any], hint: str = "") -> None:
    """Raise the :class:`UserError` a :class:`CollateOrError` batch carries (with ``hint``
    appended), if it carries one."""
    if "error" in batch:
        raise UserError(batch["error"] + hint)
