"""bench/bench_crf.py through its command line, as a smoke test on one tiny image (its figures
are bench/RESULTS.md's, from full-size runs; the torch CRF's agreement with pydensecrf2 is
tested in tests/test_densecrf.py): it runs, writes the same PNGs in one process and in its
pool, and prints every row of its tables."""
from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import run_cli


def test_smoke_run_on_one_tiny_image_prints_every_row():
    pytest.importorskip("pydensecrf.densecrf", reason="the benchmark times pydensecrf2, which is not installed")
    proc = run_cli("-m", "bench.bench_crf", "--images", "1", "--size", "48", "--workers", "0", "--threads", "1",
                   "--results", "", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 generated images of about 48 px" in proc.stdout
    assert "PNGs byte-identical: yes" in proc.stdout
    assert "| 0 worker processes (ours, `--crf_workers`) |" in proc.stdout
    assert "| torch on the CPU, 1 threads, 1 images per call |" in proc.stdout
    if not torch.cuda.is_available():
        assert "| torch on CUDA | pending (no GPU at hand) |" in proc.stdout
    assert re.search(r"Torch labels equal to pydensecrf2's PNGs: [\d.]+%", proc.stdout)
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith(("| label maps", "| noisy softmax", "| smooth random"))]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 7
        assert all(0 <= float(c) <= 100 for c in cells[1:5])  # pixels equal and mIoUs, percent
        assert abs(float(cells[5])) <= 100 and float(cells[6]) >= 0  # mIoU difference, marginals' difference
