"""Reading images as plain RGB arrays.

Images are read exactly as their pixels are stored: no EXIF rotation, because VOC and
COCO masks are aligned with the stored pixels, not with the displayed orientation.
Truncated files are errors (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left off): a
silently grey-filled half image would train and evaluate on wrong content.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from core.errors import UserError

# Integer modes holding more than 8 bits per pixel. They are scaled from the 16-bit
# range to 8 bits; "I" is how some readers deliver 16-bit grayscale data.
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an (H, W, 3) uint8 RGB array.

    Grayscale and palette images are expanded to RGB, the alpha channel of RGBA/LA images
    is dropped, CMYK and YCbCr are converted, and 16-bit images are scaled to 8 bits.

    Raises:
        UserError: the file is missing, is not an image, is corrupt or truncated, or has a
            pixel format that has no RGB meaning (the message names the file).
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes now, so a truncated file fails here and not later
            return _to_rgb(img, path)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(
            f"cannot read image {path}: {err}; the file is corrupt or truncated, "
            "replace it or remove its name from the list"
        ) from None


def _to_rgb(img: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """Convert a loaded PIL image of any common mode to (H, W, 3) uint8 RGB."""
    if img.mode in _WIDE_INT_MODES:
        wide = np.asarray(img).astype(np.int64)
        # 65535 -> 255 with rounding: x / 257 inverts the usual 8 -> 16 bit widening x * 257.
        gray = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except ValueError:
        raise UserError(
            f"{path} has pixel mode {img.mode}, which has no RGB conversion; "
            "save it as an 8-bit RGB or grayscale image"
        ) from None
