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
LABEL_BAND = 28  # height of the band naming each sheet of :func:`stacked_sheets`
_BAND_GREY, _BAND_SCALE = 60, 0.6


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


def stacked_sheets(sheets: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Stack sheets of one image (e.g. one per refinement regime) top to bottom, each under a band
    naming it, for a side-by-side look at the same panels.

    Args:
        sheets: (label, (H_i, W_i, 3) uint8 RGB) pairs, e.g. :func:`summary_sheet` outputs.
    Returns:
        (sum_i (B + H_i), max_i W_i, 3) uint8 RGB with B = :data:`LABEL_BAND` the band height: for
        each sheet a dark band with its label in white, then the sheet, left-aligned, white to the
        right of a narrower sheet.
    """
    if not sheets:
        raise ValueError("nothing to stack")
    width = max(sheet.shape[1] for _, sheet in sheets)
    parts = []
    for label, sheet in sheets:
        band = np.full((LABEL_BAND, width, 3), _BAND_GREY, np.uint8)
        cv2.putText(band, _fit(label, width, _BAND_SCALE), (4, LABEL_BAND - 8), cv2.FONT_HERSHEY_SIMPLEX,
                    _BAND_SCALE, (255, 255, 255), 1, cv2.LINE_AA)
        padded = np.full((sheet.shape[0], width, 3), 255, np.uint8)
        padded[:, :sheet.shape[1]] = sheet
        parts += [band, padded]
    return np.concatenate(parts)


def stack_sheet_files(folders: list[tuple[str, str | os.PathLike]], out_dir: str | os.PathLike,
                      prefix: str) -> list[Path]:
    """For every image with a ``<name>_sheet.png`` in each of ``folders`` (label, folder), write
    :func:`stacked_sheets` of them, in the order given, to ``<out_dir>/<prefix><name>.png``.

    Returns the written paths, sorted by image name (none when the folders share no image).
    """
    found = [{p.name[:-len("_sheet.png")] for p in Path(folder).glob("*_sheet.png")} for _, folder in folders]
    written = []
    for name in sorted(set.intersection(*found)) if found else []:
        sheets = [(label, read_rgb(Path(folder) / f"{name}_sheet.png")) for label, folder in folders]
        path = Path(out_dir) / f"{prefix}{name}.png"
        save_rgb(path, stacked_sheets(sheets))
        written.append(path)
    return written


def _fit(text: str, width: int, scale: float) -> str:
    """Shorten ``text`` with '..' until it fits ``width`` pixels."""
    while len(text) > 2 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 6:
        text = text[:-3] + ".."
    return text


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


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
