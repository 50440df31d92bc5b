"""The record of an evaluation: one line appended to a log file per run, and the JSON report."""
from __future__ import annotations

import json
import os
from pathlib import Path

from core.errors import UserError
from core.fileio import atomic_path


def append_log(logfile: str, report: dict, fields: list[str]) -> None:
    """Append one tab-separated line to ``logfile`` (nothing when it is ''): the report's timestamp,
    comment, type, then ``fields`` (the scores), the image count and the prediction folder.

    Raises:
        UserError (about "logfile"): the file cannot be appended to.
    """
    if not logfile:
        return
    comment = " ".join(report["comment"].split())  # keep the record on one line
    line = "\t".join([report["timestamp"], comment, report["type"], *fields,
                      f"n={report['num_images']}", f"predict_dir={report['predict_dir']}"]) + "\n"
    # A single O_APPEND write of one line: concurrent runs cannot overwrite each other's lines
    # (rewriting the file atomically could), and an interruption cannot leave half a line.
    try:
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise UserError(f"cannot append to the log file {logfile}: {err.strerror or err}", about="logfile") from None


def write_report(path: str, report: dict) -> None:
    """Write ``report`` as indented JSON to ``path``, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1) + "\n")
