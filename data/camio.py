"""The CAM file format: one ``<name>.npz`` per image, written by inference, read by evaluation.

A file holds two arrays and nothing pickled (the published scripts stored a pickled dict
in ``.npy``, which needs ``allow_pickle`` and can run code when loaded):

- ``keys``: int64 (K,), strictly increasing class ids. 0 is the learned background map
  (BAO); 1..C-1 are foreground classes. TransCAM CAMs have no key 0.
- ``cams``: float16 or float32 (K, H, W), the normalised maps (``tool.cam.normalize_maps``:
  below 1, each channel's minimum slightly negative as published), ``cams[i]`` being the map
  of class ``keys[i]`` at the original image resolution.

An image without any foreground class has K = 0 (a BAO file then still holds key 0).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from core.errors import UserError
from core.fileio import atomic_path

CAM_SUFFIX = ".npz"
_REGENERATE = "regenerate the maps with this repository's infer_bao.py, which writes <name>.npz CAM files"


def save_cams(path: str | os.PathLike, keys: np.ndarray, cams: np.ndarray, half: bool = False) -> None:
    """Write ``keys`` (K,) and ``cams`` (K, H, W) to ``path`` (``.npz``), atomically.

    ``cams`` is stored as given when float16 or float32, other float types as float32. With
    ``half``, float32 maps are stored as float16 (half the disk use, precise enough for
    normalised maps) unless a value lies outside float16's range: the published
    normalisation gives ``-(min + 1e-5) / (max - min + 1e-5)`` at a channel's minimum, far below
    -65504 for a nearly constant map, and such files keep float32 so that every value survives.
    """
    if Path(path).suffix != CAM_SUFFIX:
        raise ValueError(f"CAM files end in {CAM_SUFFIX}, got {path}")
    keys = np.asarray(keys)
    cams = np.asarray(cams)
    if cams.dtype not in (np.float16, np.float32):
        cams = cams.astype(np.float32)
    if half and cams.dtype == np.float32 and (cams.size == 0 or np.abs(cams).max() <= np.finfo(np.float16).max):
        cams = cams.astype(np.float16)
    keys = _checked_keys(keys, cams, str(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # A file object, not a name: np.savez would append ".npz" to a name without it.
        np.savez(f, keys=keys, cams=cams)


def load_cams(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CAM file: ``keys`` int64 (K,) and ``cams`` float32 (K, H, W).

    Raises :class:`UserError` for a missing file, for files of another format (e.g. the
    published pickled ``.npy`` dictionaries) and for inconsistent or non-finite contents.
    """
    path = str(path)
    with contextlib.ExitStack() as files:
        try:
            # Opened here, not by np.load, which leaves the file open when a .npz is corrupt.
            data = np.load(files.enter_context(open(path, "rb")), allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"CAM file not found: {path}") from None
        except ValueError as err:
            if "pickle" in str(err):
                raise UserError(
                    f"{path} is a pickled file (the published CAM dictionaries); it is not read because "
                    f"unpickling can run code; {_REGENERATE}"
                ) from None
            raise UserError(f"{path} is not a CAM file ({err}); {_REGENERATE}") from None
        except Exception as err:  # noqa: BLE001 - see _unreadable
            raise _unreadable(path, err) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError(f"{path} holds a single array, not a CAM file ('keys' and 'cams'); {_REGENERATE}")
        with data:
            if set(data.files) != {"keys", "cams"}:
                raise UserError(
                    f"{path} holds arrays {sorted(data.files)}, not a CAM file ('keys' and 'cams'); {_REGENERATE}"
                )
            try:
                keys, cams = data["keys"], data["cams"]
            except Exception as err:  # noqa: BLE001 - see _unreadable
                raise _unreadable(path, err) from None
    if cams.dtype not in (np.float16, np.float32):
        raise UserError(f"{path}: 'cams' has dtype {cams.dtype}, expected float16 or float32; {_REGENERATE}")
    try:
        keys = _checked_keys(keys, cams, path)
    except ValueError as err:
        raise UserError(f"{err}; {_REGENERATE}") from None
    cams = cams.astype(np.float32, copy=False)
    if not np.isfinite(cams).all():
        raise UserError(f"{path}: the maps contain NaN or infinite values; {_REGENERATE}")
    return keys, cams


def _unreadable(path: str, err: Exception) -> UserError:
    """The error for a CAM file the zip or .npy reader fails on. A corrupt zip fails in many
    ways (BadZipFile, EOFError, NotImplementedError for a garbled compression method, zlib and
    lzma errors for garbled data, ...); all of them mean the same to the user."""
    return UserError(f"cannot read CAM file {path}: {str(err) or type(err).__name__}; {_REGENERATE}")


def _checked_keys(keys: np.ndarray, cams: np.ndarray, where: str) -> np.ndarray:
    """Validate the (keys, cams) pair and return keys as int64; ValueError says what is wrong."""
    if keys.ndim != 1 or not (np.issubdtype(keys.dtype, np.integer) or keys.size == 0):
        raise ValueError(f"{where}: 'keys' must be a 1-D integer array, got {keys.dtype} {keys.shape}")
    if cams.ndim != 3 or cams.shape[0] != keys.shape[0]:
        raise ValueError(f"{where}: 'cams' must have shape (K, H, W) with K = {keys.shape[0]} keys, got {cams.shape}")
    keys = keys.astype(np.int64)
    if keys.size and (keys[0] < 0 or np.any(np.diff(keys) <= 0)):
        raise ValueError(f"{where}: 'keys' must be strictly increasing class ids >= 0, got {keys.tolist()}")
    return keys
