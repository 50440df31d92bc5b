"""One writer per run folder: an OS-level lock held for as long as a run runs.

A run (a training run directory, the protocol runner's ``--run_dir``, the demo's ``--out``)
takes :class:`RunLock` on its folder before it writes anything there. The lock is an
exclusive ``flock`` on ``<folder>/.lock``: the kernel drops it when the process ends, however
it ends (SIGKILL included), so a dead run never blocks the next one. The file records the
holder (command, PID, host, start time) for the message a second process gets, and for
read-only callers (:func:`lock_holder`, e.g. a ``--status``).

``flock`` is enforced among the processes of one machine; on a shared filesystem without
lock support (NFS without a lock manager, some cluster filesystems) two machines may both
take it. Only POSIX systems have ``fcntl``; elsewhere the lock is not taken.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from core.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_NAME = ".lock"
# A read-only probe (lock_holder) holds a shared lock for microseconds; a process taking the
# lock retries this long before it calls the folder busy, so that a probe never refuses a run.
PROBE_GRACE_S = 0.5


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """What holds ``folder``'s lock: ``{"command", "pid", "host", "start"}`` (``{}`` while the
    holder has not written it yet), or None when nobody does. Reads only; never blocks."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)


def in_use_hint(*flags: str) -> str:
    """The remedy a run refused for a folder in use is told, naming the ``flags`` that choose another
    folder: ``in_use_hint("--run_dir")`` -> "wait for it to end, stop it, or give another --run_dir"."""
    return f"wait for it to end, stop it, or give another {' or '.join(flags)}"


def refuse_if_locked(folder: str | os.PathLike, remedy: str) -> None:
    """Raise :class:`RunLock`'s refusal now if ``folder`` is locked (a read-only check, for an
    early and accurate message; only :class:`RunLock` makes a run exclusive)."""
    holder = lock_holder(folder)
    if holder is not None:
        raise _in_use(folder, holder, remedy)


def _in_use(folder: str | os.PathLike, holder: dict, remedy: str) -> UserError:
    return UserError(f"{folder} is in use by another run ({describe(holder)}); {remedy}")


def describe(holder: dict) -> str:
    """One line on a lock's holder: ``PID 12 on host, started 2024-05-01 10:00:00: python train_bao.py ...``."""
    parts = []
    if "pid" in holder:
        parts.append(f"PID {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else ""))
    if holder.get("start"):
        parts.append(f"started {holder['start']}")
    text = ", ".join(parts) or "a process that has not recorded itself yet"
    command = " ".join(str(holder.get("command", "")).split())  # one line, whatever the arguments hold
    if command:
        text += f": {command[:297] + '...' if len(command) > 300 else command}"
    return text


class RunLock:
    """Exclusive lock on ``folder`` (created when missing) while the ``with`` block runs.

    Entering raises :class:`core.errors.UserError` when another process holds it: one line with
    what runs there (:func:`describe`) and ``remedy`` (:func:`in_use_hint`). Only the lock file is
    created before the lock is taken, and a refused process changes nothing in the folder. Leaving
    removes the lock file, and the folders that entering created when nothing else was written in
    them (a run refused later, for its flags or data, leaves no folder behind).
    """

    def __init__(self, folder: str | os.PathLike, remedy: str):
        self.folder = Path(folder)
        self.remedy = remedy
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd, fcntl.LOCK_EX)
                if _same_file(fd, self.path):
                    if locked:
                        break
                    if time.monotonic() > deadline:
                        raise _in_use(self.folder, _read_holder(fd), self.remedy)
                    time.sleep(0.05)
            except BaseException:
                os.close(fd)
                self._remove_created()
                raise
            # The holder removed the file (it ended) or it is held and being retried: open again.
            os.close(fd)
        self._fd = fd
        holder = {"command": shlex.join([sys.executable, *sys.argv]), "pid": os.getpid(),
                  "host": socket.gethostname(), "start": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._fd is None:
            return
        # Unlinked while still held: a process that opened the old file finds it gone
        # (_same_file) and opens the path again, so two never hold two files at once.
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # for the copies of the descriptor in forked children too
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there (or another process did)
                return


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a finishing holder unlinks it)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode())
    except (OSError, ValueError):  # not written yet, or written by something else
        return {}
    return holder if isinstance(holder, dict) else {}
