"""bench/bench_crf.py through its command line: both variants write the same PNGs."""
from __future__ import annotations

from tests.helpers import run_cli


def test_one_image_in_one_process_and_in_a_worker():
    proc = run_cli("-m", "bench.bench_crf", "--images", "1", "--workers", "1", "--results", "", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PNGs byte-identical: yes" in proc.stdout
    assert "| 1 worker processes (ours, `--crf_workers`) |" in proc.stdout
