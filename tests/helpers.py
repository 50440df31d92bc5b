"""Helpers shared by the tests: running entry scripts (as subprocesses or in-process) and the
assertions every refusal and every interrupted run must satisfy."""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
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


class DeadlineExceeded(AssertionError):
    """Raised by :func:`deadline`; an AssertionError, so that no handler of the code under test
    (which may turn OSError, hence TimeoutError, into a UserError) swallows it."""


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail (:class:`DeadlineExceeded` naming ``what``) when the block runs longer than ``seconds``: a
    hang in Python code becomes a test failure instead of a stuck suite. Main thread only (SIGALRM)."""
    def expire(_signum, _frame):
        raise DeadlineExceeded(f"{what} did not finish within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# Comparisons across batch sizes, chunkings, devices or process counts. Such runs add the same
# numbers in another order, so floats agree only to rounding and an argmax may flip where the
# two best classes are within rounding of each other. Floats are compared with a tolerance,
# labels only where the reference's top-two margin is above float noise (the rule by which the
# published-rule parity of bench/bench_infer.py is judged); the near-ties skipped are reported.
FLOAT_NOISE_MARGIN = 1e-4  # normalised maps lie in [-1, 1]; batching changes them by about 1e-6


def assert_maps_close(ref: torch.Tensor | np.ndarray, other: torch.Tensor | np.ndarray, atol: float,
                      what: str = "", rtol: float = 0.0) -> None:
    """Maps of two runs that differ only in batching/device agree: ``|ref - other| <= atol + rtol |ref|``
    everywhere (same shape)."""
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    assert ref.shape == other.shape, (what, ref.shape, other.shape)
    excess = np.abs(ref - other) - (atol + rtol * np.abs(ref))
    worst = float(excess.max()) if ref.size else 0.0
    assert worst <= 0, f"{what}: maps differ by up to {worst:.3g} beyond the tolerance (atol {atol:g}, rtol {rtol:g})"


def assert_labels_agree_where_clear(ref_maps: torch.Tensor | np.ndarray, other_labels: torch.Tensor | np.ndarray,
                                    margin: float = FLOAT_NOISE_MARGIN, what: str = "", keys=None,
                                    max_skipped: float = 0.05) -> int:
    """``other_labels`` (H, W) equals the argmax of ``ref_maps`` (K, H, W) (mapped through ``keys``
    when given) wherever the reference's best and second-best channels are more than ``margin``
    apart. The skipped near-ties are printed (shown by ``pytest -rA`` / on failure) and returned;
    at most ``max_skipped`` of the pixels may be skipped, so that the rule cannot hide a real
    difference."""
    ref = np.asarray(ref_maps, np.float64)
    other = np.asarray(other_labels)
    best = ref.argmax(axis=0)
    if keys is not None:
        best = np.asarray(keys)[best]
    if ref.shape[0] < 2:
        clear = np.ones(best.shape, bool)
    else:
        top2 = np.sort(ref, axis=0)[-2:]
        clear = top2[1] - top2[0] > margin
    skipped = int((~clear).sum())
    if skipped:
        print(f"{what}: {skipped} near-tie pixel(s) (top-two margin <= {margin:g}) not compared")
    assert skipped <= max_skipped * clear.size, f"{what}: {skipped} of {clear.size} pixels are near-ties"
    wrong = int((clear & (best != other)).sum())
    assert wrong == 0, f"{what}: {wrong} pixel(s) with a clear winner have another label"
    return skipped
