"""bench/bench_crf.py through its command line, as a smoke test on one tiny image (its figures
are bench/RESULTS.md's, from full-size runs; the torch CRF's agreement with pydensecrf2 is
tested in tests/test_densecrf.py): it runs, writes the same PNGs in one process and in its
pool with either backend, takes a run's weights for the agreement table, and prints every row of
its tables."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import run_script


def _given_weights(folder: Path, bao_weights: Path, num_classes: int) -> tuple[Path, Path]:
    """A BAO run's and a segmentation run's weights with the args.json beside them (tiny random
    models stand in for trained ones)."""
    import shutil

    from network.deeplab import build_segmentation_model

    bao = folder / "bao" / "bao_final.pth"
    bao.parent.mkdir()
    shutil.copyfile(bao_weights, bao)
    (bao.parent / "args.json").write_text(json.dumps({"arch": "tiny"}))
    seg = folder / "seg" / "seg_final.pth"
    seg.parent.mkdir()
    torch.manual_seed(0)
    torch.save(build_segmentation_model("deeplabv2", "tiny", num_classes).state_dict(), seg)
    (seg.parent / "args.json").write_text(json.dumps({"model": "deeplabv2", "backbone": "tiny"}))
    return bao, seg


@pytest.mark.slow
def test_smoke_run_on_one_tiny_image_prints_every_row(tmp_path, tiny_bao_weights, num_classes):
    """Every row of both tables; --bao_weights / --seg_weights add the pseudo-labels infer_bao.py
    makes with a run's weights and a segmentation model's softmax to the agreement table."""
    pytest.importorskip("pydensecrf.densecrf", reason="the benchmark times pydensecrf2, which is not installed")
    bao, seg = _given_weights(tmp_path, tiny_bao_weights, num_classes)
    proc = run_script("-m", "bench.bench_crf", "--images", "1", "--size", "48", "--workers", "1", "--threads", "1",
                   "--repeats", "2", "--bao_weights", str(bao), "--seg_weights", str(seg), "--results", "",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 generated images of about 48 px" in proc.stdout
    assert "Workers' PNGs byte-identical to one process's: pydensecrf yes, torch yes." in proc.stdout
    for backend in ("pydensecrf", "torch"):
        assert f"| {backend} | one process, one image after the other |" in proc.stdout
        assert f"| {backend} | 1 worker processes (`--crf_workers`) |" in proc.stdout
    for use in ("label maps", "probabilities"):
        assert f"| {use} | pydensecrf2, one process |" in proc.stdout
        assert f"| {use} | torch on the CPU, 1 thread(s), one image per lattice |" in proc.stdout
    assert re.search(r"label maps [\d.]+x \(range [\d.]+-[\d.]+ over 2 repeats\); probabilities [\d.]+x", proc.stdout)
    if not torch.cuda.is_available():
        assert "| probabilities | torch on CUDA | pending (no GPU at hand) |" in proc.stdout
    assert re.search(r"Torch's labels equal to pydensecrf2's: [\d.]+% of the pixels", proc.stdout)
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith(("| label maps (degraded", "| noisy softmax", "| BAO pseudo-labels of", "| softmax of"))]
    assert len(rows) == 4, proc.stdout[-3000:]
    assert str(bao) in rows[2] and str(seg) in rows[3]
    assert "mIoU of the CRF's inputs against the masks:" in proc.stdout and "BAO pseudo-labels " in proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7
        assert all(0 <= float(c) <= 100 for c in cells[1:5])  # pixels equal and mIoUs, percent
        assert abs(float(cells[5])) <= 100 and float(cells[6]) >= 0  # mIoU difference, marginals' difference


@pytest.mark.slow
def test_torch_only_mode_times_the_torch_crf_on_a_device_without_pydensecrf(tmp_path):
    """--torch_only DEVICE (the GPU row's mode; pydensecrf2 not needed): every row, labels equal to
    the CPU's (on the CPU itself, one image per lattice or several: the same marginals up to float
    rounding), the section written; CUDA refused without a GPU."""
    results = tmp_path / "RESULTS.md"
    proc = run_script("-m", "bench.bench_crf", "--torch_only", "cpu", "--images", "2", "--size", "48",
                   "--results", str(results), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| label maps", "| probabilities"))]
    assert len(rows) == 4
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == cells[5] == "100.000" and float(cells[6]) < 1e-5
    assert "<!-- bench_crf_device:begin -->" in results.read_text()
    if not torch.cuda.is_available():
        proc = run_script("-m", "bench.bench_crf", "--torch_only", "cuda", "--results", "", timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip() == "error: --torch_only cuda: no CUDA device here"
