"""bench/bench_crf.py through its command line: both variants write the same PNGs, and the torch
CRF agrees with pydensecrf2 on both uses."""
from __future__ import annotations

import re

import torch

from tests.helpers import run_cli


def test_one_image_in_one_process_and_in_a_worker():
    proc = run_cli("-m", "bench.bench_crf", "--images", "1", "--workers", "1", "--results", "", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PNGs byte-identical: yes" in proc.stdout
    assert "| 1 worker processes (ours, `--crf_workers`) |" in proc.stdout
    assert "| torch on the CPU, 2 threads, 1 images per call |" in proc.stdout
    if not torch.cuda.is_available():
        assert "| torch on CUDA | pending (no GPU at hand) |" in proc.stdout
    png_same = re.search(r"Torch labels equal to pydensecrf2's PNGs: ([\d.]+)%", proc.stdout)
    assert png_same and float(png_same.group(1)) >= 99.5
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith(("| label maps", "| noisy softmax", "| smooth random"))]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) >= 99.5 and float(cells[2]) >= 99.5  # mean and worst image
        assert abs(float(cells[5])) <= 0.1  # mIoU difference, points
        assert float(cells[6]) < 1e-3  # marginals' largest difference
