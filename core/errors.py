"""User-facing errors: one clear line, a non-zero exit, no traceback.

Library code raises :class:`UserError` for anything a user can cause (a missing file, a
wrong checkpoint, a bad list). Entry scripts run ``main`` under :func:`run_guarded` (most of them
through ``apps.cli.run_cli``, which adds the flags that fix an error), which prints
``error: <message>`` on stderr and exits with status 2; Ctrl-C exits with status 130.
SIGTERM (what job schedulers send before they kill) takes Ctrl-C's path (a training run saves
a resumable checkpoint, inference leaves complete files only) and exits with status 143.
Worker processes call :func:`worker_process_init` (DataLoader workers :func:`quiet_loader_worker`)
so that Ctrl-C reaches the main process only, which stops cleanly, instead of each worker
dying with its own traceback; and so that they die with the main process however it ends.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Callable, Mapping


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and what to do.

    Library code states the problem in its own terms; ``about`` optionally names what the
    error is about (e.g. "root", "label_file"), so that an entry script can add the flag
    that fixes it.
    """

    def __init__(self, message: str, about: str | None = None):
        super().__init__(message)
        self.about = about


def run_guarded(main: Callable[[object], object], args: object, hints: Mapping[str, str] | None = None) -> None:
    """Run ``main(args)``; turn :class:`UserError`, Ctrl-C and SIGTERM into a clean exit.

    ``hints`` maps an error's ``about`` to text appended to its message (the flag that fixes it).
    SIGTERM raises KeyboardInterrupt as Ctrl-C does (code that stops cleanly on Ctrl-C stops
    cleanly on it too); the exit status is then 143 instead of 130.
    """
    global _main_pid
    _main_pid = os.getpid()
    _received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        main(args)
    except UserError as err:
        print(f"error: {err}{(hints or {}).get(err.about, '')}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        terminated = signal.SIGTERM in _received
        print("terminated (SIGTERM)" if terminated else "interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM if terminated else 130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


_received: list[int] = []  # the stop signals of this run (SIGTERM sets the exit status)


def record_stop_signal(signum: int) -> None:
    """Note that signal ``signum`` stopped this run; a signal handler of its own (the training
    engine's) calls it so that :func:`run_guarded` exits with that signal's status."""
    _received.append(signum)


def stop_signal() -> int | None:
    """The first signal that stopped this run (:func:`record_stop_signal`), or None."""
    return _received[0] if _received else None


def _terminate(signum: int, _frame: object) -> None:
    if os.getpid() != _main_pid:  # a forked child inherited the handler: end as SIGTERM ends it by default
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    record_stop_signal(signum)
    raise KeyboardInterrupt


_main_pid = os.getpid()


def worker_process_init(*_args: object) -> None:
    """Initializer of a worker process (``multiprocessing.Pool``, ``ProcessPoolExecutor``):
    ignore Ctrl-C (the main process decides), end on SIGTERM (a pool terminates its workers
    with it; a forked worker would inherit the main process's handler) and die with the main
    process (:func:`die_with_parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def die_with_parent(parent_pid: int | None = None, signum: int = signal.SIGKILL) -> None:
    """Have the kernel SIGKILL this process when its parent ends, however the parent ends (SIGKILL
    included), so that no worker outlives its run. Linux only (``prctl(PR_SET_PDEATHSIG)``);
    elsewhere nothing changes. ``signum``: another signal to send instead (SIGTERM: a process that
    has children of its own to stop first).

    The parent is the thread that started this process: start workers from the main thread.
    ``parent_pid``: the parent's PID, for a process that is no multiprocessing child (a
    ``subprocess`` ``preexec_fn``, where the setting survives the exec of the new program); a
    parent already gone by then ends this process at once.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signum), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # The parent may have ended before prctl took effect: then no signal will come.
    if parent_pid is None and (parent := multiprocessing.parent_process()) is not None:
        parent_pid = parent.pid
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def quiet_loader_worker(*_args: object) -> None:
    """DataLoader ``worker_init_fn``: ignore Ctrl-C and SIGTERM (a scheduler sends it to every
    process of a job: the main process stops cleanly, the workers with it), die with the main
    process (:func:`worker_process_init`), and do not report a hand-over of a batch that the
    interrupted main process dropped.

    A worker hands the tensors of a batch to the main process as file descriptors, from a
    thread of ``multiprocessing.resource_sharer``. When Ctrl-C lands in the main process in
    the middle of a hand-over, the connection closes under that thread, which would print a
    ``ConnectionResetError`` (or ``EOFError``) traceback after the main process's one-line
    ``interrupted``. The thread reports through ``sys.excepthook``, which here passes on every
    other exception.
    """
    worker_process_init()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            report(kind, value, tb)

    sys.excepthook = excepthook
