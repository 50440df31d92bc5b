"""bench/gpu_check.py through its command line, as the CPU smoke run its docstring gives."""
from __future__ import annotations

import math

from tests.helpers import run_cli

SMOKE = ["-m", "bench.gpu_check", "--device", "cpu", "--arch", "tiny", "--batch_size", "2", "--crop_size", "64",
         "--train_steps", "1", "--warmup", "1", "--infer_images", "2", "--infer_size", "64", "--scales", "32,64",
         "--no_write", "--skip_ddp", "--seg_backbone", "tiny", "--seg_batch_size", "2", "--seg_crop_size", "64",
         "--seg_images", "1"]


def test_cpu_smoke_run_reports_both_precisions():
    proc = run_cli(*SMOKE, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("fp32", "bf16"):
            rows[cells[0]] = cells
    assert set(rows) == {"fp32", "bf16"}, proc.stdout
    for variant, (_, train_ips, train_mem, infer_ips, infer_mem) in rows.items():
        for value in (float(train_ips), float(infer_ips)):
            assert math.isfinite(value) and value > 0, (variant, proc.stdout)
        assert train_mem == infer_mem == "n/a"  # no CUDA peak memory on the CPU
    assert "losses finite: yes" in proc.stdout
    assert "all float32: yes" in proc.stdout
    assert "pseudo-labels changed by bf16" in proc.stdout
    assert "skipped (--skip_ddp)" in proc.stdout
    seg_rows = [line for line in proc.stdout.splitlines() if line.startswith("| fp32 |") or line.startswith("| bf16 |")]
    assert len(seg_rows) == 4  # the Conformer table and the segmentation table
    for line in seg_rows[2:]:
        _, train_ips, _, infer_ips, _ = [c.strip() for c in line.strip().strip("|").split("|")]
        assert float(train_ips) > 0 and float(infer_ips) > 0, proc.stdout
    assert proc.stdout.count("segmentation training") >= 2 and "weights all float32: yes" in proc.stdout
