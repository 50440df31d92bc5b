"""Machine description and the sections of bench/RESULTS.md, shared by the benchmarks."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from core.fileio import atomic_path
from data.layout import REPO_ROOT

RESULTS_FILE = REPO_ROOT / "bench" / "RESULTS.md"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One sentence: date, CPU, cores, load, Python, torch and GPU (when torch is importable)."""
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_text = f", torch {torch.__version__}, {gpu}"
    except ImportError:
        torch_text = ""
    return (f"Run {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {cpu_name()}, {os.cpu_count()} "
            f"cores (1-min load average {os.getloadavg()[0]:.2f} at the end; the machine is shared), "
            f"Python {platform.python_version()}{torch_text}.")


def write_section(path: str | os.PathLike, key: str, body: str) -> None:
    """Replace (or append) the section ``key`` of the results file, atomically.

    Sections sit between ``<!-- key:begin -->`` and ``<!-- key:end -->`` so each benchmark
    rewrites only its own part.
    """
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    file = Path(path)
    text = file.read_text() if file.is_file() else "# Benchmark results\n"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with atomic_path(file) as tmp:
        Path(tmp).write_text(text)
