"""The VOC colour palette and label-map PNG I/O.

Label maps are written as palette-mode ("P") PNGs: each pixel stores the class id, and
the palette makes the file viewable. This is the format of VOC SegmentationClass, so our
pseudo-labels and the ground truth are read by the same code.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from core.errors import UserError
from core.fileio import atomic_path

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map: (n, 3) uint8, id 0 black, 255 cream (ignore)."""
    ids = np.arange(n)
    rgb = np.zeros((n, 3), np.uint8)
    for bit in range(8):
        for ch in range(3):
            rgb[:, ch] |= (((ids >> (3 * bit + ch)) & 1) << (7 - bit)).astype(np.uint8)
    return rgb


# (256, 3) uint8, built once: the PNG palette here and the colour label maps of tool.overlay.
PALETTE = voc_palette()
PALETTE.flags.writeable = False


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an (H, W) integer label map (ids 0..255) as a VOC palette PNG, atomically."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("label ids must lie in 0..255 to be stored in a PNG")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(PALETTE.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label-map PNG as (H, W) uint8 class ids.

    Accepts palette ("P") and single-channel ("L") PNGs. A colour (RGB) PNG holds colours,
    not class ids, and is refused with a message saying so.
    """
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if mode in ("I;16", "I"):
                arr = np.array(img)
                if arr.max(initial=0) > 255:
                    raise UserError(f"{path}: label ids above 255 cannot be VOC/COCO class ids")
                return arr.astype(np.uint8)
    except FileNotFoundError:
        raise UserError(f"label map not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # as data.images.read_image
        raise UserError(f"cannot read label map {path}: {err}") from None
    raise UserError(
        f"{path} is a {mode} image: label maps must be palette (P) or grayscale (L) PNGs holding "
        "class ids, not colours; write predictions with infer_bao.py or convert the colours to ids"
    )
