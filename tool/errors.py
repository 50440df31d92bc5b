"""User-facing errors: one clear line, a non-zero exit, no traceback.

Library code raises :class:`UserError` for anything a user can cause (a missing file, a
wrong checkpoint, a bad list). Entry scripts wrap ``main`` with :func:`run_cli`, which
prints ``error: <message>`` on stderr and exits with status 2; Ctrl-C exits with status 130.
Worker processes call :func:`ignore_sigint` so that Ctrl-C reaches the main process only,
which stops cleanly, instead of each worker dying with its own traceback.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and what to do."""


def run_cli(main: Callable[[object], object], args: object) -> None:
    """Run ``main(args)``; turn :class:`UserError` and Ctrl-C into a clean exit."""
    try:
        main(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def ignore_sigint(*_args: object) -> None:
    """Make this (worker) process ignore Ctrl-C; usable as a DataLoader ``worker_init_fn``
    or a ``multiprocessing.Pool`` initializer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
