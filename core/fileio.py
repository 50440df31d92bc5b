"""Atomic file output: write to a temporary file in the same folder, then rename.

An interrupted run therefore never leaves a truncated file under the final name, and a
resumed run can trust that every existing output is complete.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

from core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix (``x.png`` -> ``.x.png.<random>.tmp.png``) so
    writers that choose a format by extension still work. On any exception the temporary
    file is removed. Permission and disk-full errors are re-raised as :class:`UserError`
    naming the path.

    The name is chosen before the file is created, and the file is created inside the block
    that removes it: Ctrl-C can land between any two steps (with ``tempfile.mkstemp`` it could
    land after the file existed but before its name was known, leaving it behind).
    """
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never take over an existing file; mode 0o666 less the umask, as for any new file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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


def remove_temporaries(folder: str | os.PathLike, suffix: str, stems: set[str]) -> int:
    """Delete the temporary files an interrupted run left for the outputs ``<stem><suffix>``
    of ``stems`` in ``folder``; return how many were removed.

    :func:`atomic_path` names them ``.<final name>.<random>.tmp<suffix>``. Only those of
    ``stems`` are touched, so processes writing other files into the same folder at the same
    time are not disturbed. A missing folder has nothing to clean.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if is_temporary(entry.name) and entry.name.endswith(f".tmp{suffix}"):
            final = entry.name[1:].rsplit(".", 3)[0]
            if final.endswith(suffix) and final[:len(final) - len(suffix)] in stems:
                _remove(entry.path)
                removed += 1
    return removed


def _remove(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(tmp)


def _user_error(err: OSError, path: Path) -> UserError:
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: permission denied; choose a folder you can write to")
    if err.errno == errno.ENOSPC:
        return UserError(f"cannot write {path}: the disk is full; free space or choose another folder")
    if err.errno in (errno.EEXIST, errno.ENOTDIR):  # creating its folder met a file of that name
        return UserError(f"cannot write {path}: a part of its folder path is a file, not a folder; "
                         "choose another path")
    return UserError(f"cannot write {path}: {err.strerror or err}")


def prepare_output_dir(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Create an output folder now, so that an unusable path fails before any work is done.

    ``target``, when given, is the file that will be written into ``folder``; errors then
    name it instead of the folder.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as err:
        if target is not None:
            raise _user_error(err, Path(target)) from None
        raise UserError(f"cannot create or write output folder {folder}: {err.strerror or err}; "
                        "choose another path") from None


def unfinished(folders: dict[Path, str], names: list[str], overwrite: bool,
               sync: Callable[[], None] = lambda: None) -> list[str]:
    """The names of ``names`` whose outputs are not all written yet, after preparing the folders.

    Args:
        folders: output folder -> suffix of its files (``<name><suffix>``).
        names: this process's share of the list; only their stale temporaries are removed, so
            processes writing other names into the same folders are not disturbed.
        overwrite: every name is unfinished (recompute all).
        sync: called after the folders exist and before any is scanned (a barrier across ranks).
    """
    for folder in folders:
        prepare_output_dir(folder)
    sync()
    for folder, suffix in folders.items():
        remove_temporaries(folder, suffix, set(names))
    return [n for n in names if overwrite or not all((f / f"{n}{s}").is_file() for f, s in folders.items())]
