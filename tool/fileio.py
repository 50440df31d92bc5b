"""Atomic file output: write to a temporary file in the same folder, then rename.

An interrupted run therefore never leaves a truncated file under the final name, and a
resumed run can trust that every existing output is complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from tool.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix (``x.png`` -> ``.x.png.tmpXXXX.png``) so
    writers that choose a format by extension still work. On any exception the temporary
    file is removed. Permission and disk-full errors are re-raised as :class:`UserError`
    naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs should be readable as usual
    except OSError as err:
        raise _user_error(err, path) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _user_error(err, path) from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, writer: Callable[[str], object]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def is_temporary(name: str) -> bool:
    """True for the temporary files :func:`atomic_path` creates (to skip or clean them)."""
    return name.startswith(".") and ".tmp" in name


def _remove(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(tmp)


def _user_error(err: OSError, path: Path) -> UserError:
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: permission denied; choose a folder you can write to")
    if err.errno == errno.ENOSPC:
        return UserError(f"cannot write {path}: the disk is full; free space or choose another folder")
    return UserError(f"cannot write {path}: {err.strerror or err}")
