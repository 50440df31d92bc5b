"""Shared fixtures: a small generated VOC-format dataset and tiny-model checkpoints.

Everything is built once per test session in a temporary folder, so the suite never reads
outside the repository.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests run tiny models on a 2-core machine: one thread each avoids oversubscription when
# pytest and the CLI subprocesses it starts run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """A generated dataset in the VOC 2012 layout (JPEGImages, SegmentationClass, ...)."""
    from data.synthetic import generate

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


def signal_state() -> dict[str, object]:
    """This process's Python handlers of SIGINT and SIGTERM, and (Linux) the standard signals (1-31)
    ignored and blocked at the C level, which every process it starts inherits (an ignored Ctrl-C
    included). The real-time signals (32 and up) are left out: the C library reserves some for its
    threads, and a library's thread changed one between two tests (once in CI, inside the bf16
    training test, which touches no signal)."""
    import signal

    state: dict[str, object] = {"SIGINT": signal.getsignal(signal.SIGINT), "SIGTERM": signal.getsignal(signal.SIGTERM)}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("SigIgn", "SigBlk"):
                state[key] = f"{int(value.strip(), 16) & STANDARD_SIGNALS:08x}"
    return state


STANDARD_SIGNALS = (1 << 31) - 1  # bit n - 1 of /proc's signal masks is signal n: signals 1 to 31


_SIGNALS_BEFORE = pytest.StashKey[dict]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_SIGNALS_BEFORE] = signal_state()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every test, its fixtures' set-up and tear-down included, leaves the test process's signal
    handling as it found it (a library call restores every handler it changes; an ignored Ctrl-C
    would be inherited by every script the later tests start, which then cannot be interrupted):
    otherwise its tear-down fails, naming what changed."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" and report.passed and _SIGNALS_BEFORE in item.stash:
        before, after = item.stash[_SIGNALS_BEFORE], signal_state()
        if after != before:
            report.outcome = "failed"
            report.longrepr = f"signal handling changed by this test or its fixtures: {before} -> {after}"
