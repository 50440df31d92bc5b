"""Helpers shared by the tests: running entry scripts (as subprocesses or in-process) and the
assertions every refusal and every interrupted run must satisfy."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry script or module with the test interpreter; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def call_main(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run an entry script like its command line but in-process (no interpreter start-up).

    ``script`` is the module name (e.g. ``"infer_bao"``); returns (exit status, stdout, stderr).
    """
    from apps.cli import run_cli as run_entry

    module = importlib.import_module(script)
    code = 0
    try:
        run_entry(module.main, module.get_args_parser().parse_args(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, *phrases: str, status: int = 2) -> None:
    """Exit ``status``, no traceback, and one ``error:`` line holding every phrase."""
    assert code == status, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error: " in line]
    assert len(errors) == 1, err
    for phrase in phrases:
        assert phrase in errors[0], err


def assert_no_partial_files(folder: Path) -> None:
    """No temporary file of core.fileio anywhere below ``folder``, and every output complete."""
    from core.fileio import is_temporary
    from core.palette import read_label_png
    from data.camio import load_cams

    if not folder.exists():
        return
    for path in folder.rglob("*"):
        assert not is_temporary(path.name), path
        if path.suffix == ".png":
            read_label_png(path)
        elif path.suffix == ".npz":
            load_cams(path)
        elif path.suffix == ".pth":
            torch.load(path, weights_only=True)
