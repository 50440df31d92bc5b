"""Heat-map overlays, colour label maps and per-image summary sheets (method spec section 6).

Everything works on (H, W, 3) uint8 RGB arrays; files are written atomically, the format
chosen by the file suffix (.jpg, .png).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from core.fileio import atomic_path
from core.palette import PALETTE

HEAT_WEIGHT = 0.6  # heat map share of an overlay; the image gets the rest
_TITLE_HEIGHT = 22


def jet_overlay(image: np.ndarray, heat: np.ndarray, heat_weight: float = HEAT_WEIGHT) -> np.ndarray:
    """Blend a JET-coloured map onto an image.

    Args:
        image: (H, W, 3) uint8 RGB.
        heat: (H, W) map with values in [0, 1] (clipped).
        heat_weight: weight of the heat colours, the image gets ``1 - heat_weight``.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    if heat.shape != image.shape[:2]:
        raise ValueError(f"map {heat.shape} and image {image.shape[:2]} sizes differ")
    levels = np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(colours, heat_weight, image, 1.0 - heat_weight, 0.0)


def colorize_labels(label: np.ndarray) -> np.ndarray:
    """(H, W) class ids 0..255 -> (H, W, 3) uint8 RGB in the VOC palette (255 = ignore, cream)."""
    return PALETTE[np.asarray(label, dtype=np.uint8)]


def summary_sheet(panels: list[tuple[str, np.ndarray]], columns: int = 4, min_width: int = 192,
                  title: str | None = None) -> np.ndarray:
    """Tile titled panels of one image into a grid.

    Args:
        panels: (title, (H, W, 3) uint8 RGB) pairs, all of the same size.
        columns: panels per row.
        min_width: panels narrower than this are enlarged by an integer factor (nearest
            neighbour, so label maps keep their exact colours) to leave room for titles.
        title: a line over the whole sheet (what the maps are), or None for none.
    Returns:
        (t + rows * (f * H + title), min(n, columns) * f * W, 3) uint8 RGB with f the
        enlargement factor and t the title strip (0 without ``title``), white where no panel is.
    """
    if not panels:
        raise ValueError("a summary sheet needs at least one panel")
    src_h, src_w = panels[0][1].shape[:2]
    factor = max(1, -(-min_width // src_w))
    h, w = src_h * factor, src_w * factor
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    cell_h = h + _TITLE_HEIGHT
    top = _TITLE_HEIGHT if title is not None else 0
    sheet = np.full((top + rows * cell_h, columns * w, 3), 255, np.uint8)
    scale = 0.45
    if title is not None:
        cv2.putText(sheet, _fit(title, columns * w, scale), (3, _TITLE_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (title, panel) in enumerate(panels):
        if panel.shape[:2] != (src_h, src_w):
            raise ValueError(f"panel {title!r} is {panel.shape[:2]}, expected {(src_h, src_w)}")
        if factor > 1:
            panel = cv2.resize(panel, (w, h), interpolation=cv2.INTER_NEAREST)
        y, x = top + (i // columns) * cell_h, (i % columns) * w
        sheet[y + _TITLE_HEIGHT:y + cell_h, x:x + w] = panel
        cv2.putText(sheet, _fit(title, w, scale), (x + 3, y + _TITLE_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def _fit(text: str, width: int, scale: float) -> str:
    """Shorten ``text`` with '..' until it fits ``width`` pixels."""
    while len(text) > 2 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 6:
        text = text[:-3] + ".."
    return text


def save_rgb(path: str | os.PathLike, image: np.ndarray, jpeg_quality: int = 90) -> None:
    """Write an (H, W, 3) uint8 RGB image atomically; format from the suffix (.jpg/.jpeg/.png)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jpg", ".jpeg", ".png"):
        raise ValueError(f"unsupported image suffix {suffix!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix != ".png" else []
    ok, data = cv2.imencode(suffix, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode {path}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.tobytes())
