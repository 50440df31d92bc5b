"""User-facing errors: one clear line, a non-zero exit, no traceback.

Library code raises :class:`UserError` for anything a user can cause (a missing file, a
wrong checkpoint, a bad list). Entry scripts wrap ``main`` with :func:`run_cli`, which
prints ``error: <message>`` on stderr and exits with status 2; Ctrl-C exits with status 130.
Worker processes call :func:`ignore_sigint` (DataLoader workers :func:`quiet_loader_worker`)
so that Ctrl-C reaches the main process only, which stops cleanly, instead of each worker
dying with its own traceback.
"""
from __future__ import annotations

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


def run_cli(main: Callable[[object], object], args: object, hints: Mapping[str, str] | None = None) -> None:
    """Run ``main(args)``; turn :class:`UserError` and Ctrl-C into a clean exit.

    ``hints`` maps an error's ``about`` to text appended to its message (the flag that fixes it).
    """
    try:
        main(args)
    except UserError as err:
        print(f"error: {err}{(hints or {}).get(err.about, '')}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def ignore_sigint(*_args: object) -> None:
    """Make this (worker) process ignore Ctrl-C; usable as a DataLoader ``worker_init_fn``
    or a ``multiprocessing.Pool`` initializer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_loader_worker(*_args: object) -> None:
    """DataLoader ``worker_init_fn``: ignore Ctrl-C (:func:`ignore_sigint`), and do not report
    a hand-over of a batch that the interrupted main process dropped.

    A worker hands the tensors of a batch to the main process as file descriptors, from a
    thread of ``multiprocessing.resource_sharer``. When Ctrl-C lands in the main process in
    the middle of a hand-over, the connection closes under that thread, which would print a
    ``ConnectionResetError`` (or ``EOFError``) traceback after the main process's one-line
    ``interrupted``. The thread reports through ``sys.excepthook``, which here passes on every
    other exception.
    """
    ignore_sigint()
    report = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            report(kind, value, tb)

    sys.excepthook = excepthook
