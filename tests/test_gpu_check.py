"""bench/gpu_check.py through its command line, as the CPU smoke run its docstring gives."""
from __future__ import annotations

import math

from tests.helpers import run_script
import pytest

pytestmark = pytest.mark.slow  # the whole module: tests/README.md, tiers

SMOKE = ["-m", "bench.gpu_check", "--device", "cpu", "--arch", "tiny", "--batch_size", "2", "--crop_size", "64",
         "--train_steps", "1", "--warmup", "1", "--infer_images", "2", "--infer_size", "64", "--scales", "32,64",
         "--no_write", "--skip_ddp", "--seg_backbone", "tiny", "--seg_batch_size", "2", "--seg_crop_size", "64",
         "--seg_images", "1", "--variants", "published", "fp32", "tf32", "--e2e_images", "6",
         "--e2e_size", "80", "60"]


def _rows(stdout: str, names: tuple[str, ...]) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|") and line.strip("| ").split("|")[0].strip() in names]


def test_cpu_smoke_run_reports_every_variant_and_the_end_to_end_runs():
    proc = run_script(*SMOKE, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    variants = ("published", "fp32", "tf32")  # bf16 on the CPU is slow; its path is the same code
    model_rows = _rows(out, variants)
    assert [r[0] for r in model_rows] == [*variants, *variants], out  # the Conformer table, the segmentation table
    for name, train_ips, train_mem, infer_ips, infer_mem in model_rows:
        for value in (float(train_ips), float(infer_ips)):
            assert math.isfinite(value) and value > 0, (name, out)
        assert train_mem == infer_mem == "n/a"  # no CUDA peak memory on the CPU
    assert out.count("losses finite: yes") == 6 and "losses finite: NO" not in out
    assert "all float32: yes" in out
    # every variant's labels are set against fp32's, in both tables
    assert "pseudo-labels of published that differ from fp32's" in out
    # tf32 changes nothing on the CPU: its labels are fp32's
    assert "pseudo-labels of tf32 that differ from fp32's (same weights and images): 0.0000% of pixels" in out
    assert "segmentation labels of tf32 that differ from fp32's: 0.0000% of pixels" in out
    assert "fp32 (this version) / published" in out and "tf32 " in out.split("Throughput ratios")[1]
    assert "skipped (--skip_ddp)" in out

    # end to end: both scripts, infer_bao's published loop against its defaults, labels compared
    e2e = _rows(out, ("published loop", "defaults", "--batch_size 4", "--tf32"))
    assert [r[0] for r in e2e] == ["published loop", "defaults", "--tf32", "defaults", "--batch_size 4", "--tf32"], out
    for name, rate, vs_published, vs_defaults, wall, agreement in e2e:
        assert float(rate) > 0 and float(wall) > 0, out
        assert vs_defaults.endswith("x"), out
        assert agreement == "reference" if name == "defaults" else agreement.endswith("%"), out
    assert e2e[0][2] == "1.00x" and e2e[3][2] == "n/a"  # infer_seg has no published-loop row
    # the published loop and the defaults compute the same float32 labels up to summation order;
    # infer_seg's --batch_size is ignored on the CPU, so its labels are the defaults'
    assert float(e2e[0][5].rstrip("%")) > 99.0, out
    assert e2e[4][5] == e2e[5][5] == e2e[2][5] == "100.0000%", out
