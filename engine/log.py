"""Training run logs: a text log, a JSON-lines log and TensorBoard scalars.

All three live under the run directory (TensorBoard under its own folder). Only the
process that logs (rank 0) creates a :class:`RunLog`; other ranks pass ``enabled=False``
and every call is then a no-op, so the training loop needs no rank checks around logging.
Logs are appended one complete line at a time and flushed, so an interrupted run leaves
every line it wrote readable and a resumed run continues the same files.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    """Append-only logs of one run.

    Args:
        run_dir: folder receiving ``log.txt`` and ``log.jsonl``.
        tb_dir: TensorBoard folder, or None for no TensorBoard scalars.
        enabled: False on processes that must not write (non-zero ranks).
    """

    def __init__(self, run_dir: str | os.PathLike, tb_dir: str | os.PathLike | None, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._text = self._json = self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._text = open(self.run_dir / "log.txt", "a", encoding="utf-8")
        self._json = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")
        if tb_dir is not None:
            # Imported here: TensorBoard is slow to import and only rank 0 needs it.
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tb_dir))

    def message(self, text: str) -> None:
        """Print ``text`` (without breaking a tqdm bar) and append it to ``log.txt``."""
        if not self.enabled:
            return
        tqdm.write(text)
        self._write_text(text)

    def record(self, event: str, values: dict[str, Any], step: int | None = None,
               scalars: dict[str, float] | None = None) -> None:
        """Append ``{"event": event, "time": ..., "step": step, **values}`` to ``log.jsonl``,
        a one-line summary to ``log.txt``, and ``scalars`` (tag -> value) to TensorBoard at
        ``step``."""
        if not self.enabled:
            return
        entry = {"event": event, "time": round(time.time(), 3)}
        if step is not None:
            entry["step"] = step
        entry.update(values)
        self._json.write(json.dumps(entry, default=_jsonable) + "\n")
        self._json.flush()
        self._write_text(f"{event} " + " ".join(f"{k}={_fmt(v)}" for k, v in entry.items()
                                                if k not in ("event", "time") and not isinstance(v, dict)))
        if self._tb is not None and scalars and step is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()

    def close(self) -> None:
        """Close the files (safe to call twice)."""
        for handle in (self._text, self._json, self._tb):
            if handle is not None:
                handle.close()
        self._text = self._json = self._tb = None

    def _write_text(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._text.write(f"{stamp} {text}\n")
        self._text.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot log a {type(value).__name__} as JSON")
