"""Shared fixtures: a small generated VOC-format dataset and tiny-model checkpoints.

Everything is built once per test session in a temporary folder, so the suite never reads
outside the repository.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests run tiny models on a 2-core machine: one thread each avoids oversubscription when
# pytest and the CLI subprocesses it starts run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """A generated dataset in the VOC 2012 layout (JPEGImages, SegmentationClass, ...)."""
    from tool.make_dataset import generate

    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    generate(root, num_train=12, num_val=6, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def num_classes(voc_root) -> int:
    """Class count (background included) of the generated dataset, from its label file."""
    from data.labels import ImageLabels

    return ImageLabels.load(voc_root / "cls_labels.json").num_fg + 1


def _save_tiny(path: Path, num_classes: int, seed: int, drop_bao_heads: bool) -> Path:
    from network.checkpoint import BAO_HEADS
    from network.conformer_CAM import Net_tiny

    torch.manual_seed(seed)
    state = Net_tiny(num_classes=num_classes).state_dict()
    if drop_bao_heads:
        state = {k: v for k, v in state.items() if not k.startswith(BAO_HEADS)}
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def tiny_bao_weights(tmp_path_factory, num_classes) -> Path:
    """A randomly initialised tiny BAO checkpoint (all heads) for the generated dataset."""
    return _save_tiny(tmp_path_factory.mktemp("w") / "tiny_bao.pth", num_classes, 0, False)


@pytest.fixture(scope="session")
def tiny_transcam_weights(tmp_path_factory, num_classes) -> Path:
    """A tiny TransCAM-style checkpoint: the BAO heads label_enc/classifier_x removed."""
    return _save_tiny(tmp_path_factory.mktemp("w") / "tiny_transcam.pth", num_classes, 1, True)


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an entry script or module with the test interpreter; returns the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def call_main(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run an entry script like its command line but in-process (no interpreter start-up).

    ``script`` is the module name (e.g. ``"infer_bao"``); returns (exit status, stdout, stderr).
    """
    from tool.errors import run_cli as run_entry

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
    """No temporary file of tool.fileio anywhere below ``folder``, and every output complete."""
    from tool.camio import load_cams
    from tool.fileio import is_temporary
    from tool.palette import read_label_png

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
