"""bench/bench_protocol.py through its command line, as the CPU smoke run its docstring gives."""
from __future__ import annotations

import re

from tests.helpers import run_script
import pytest

pytestmark = pytest.mark.slow  # the whole module: tests/README.md, tiers

SMOKE = ["-m", "bench.bench_protocol", "--device", "cpu", "--arch", "tiny", "--seg_backbone", "tiny", "--num_train",
         "8", "--num_val", "4", "--size", "64", "--batch_size", "4", "--crop_size", "64", "--scales", "32,64",
         "--seg_iters", "12", "--seg_batch", "4", "--seg_crop", "48", "--seg_scales", "1.0", "--no_write"]


def test_cpu_smoke_run_times_every_stage_and_scales_them_to_voc(tmp_path):
    proc = run_script(*SMOKE, "--work_dir", str(tmp_path / "work"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout[proc.stdout.index("## The protocol runner's stages, timed"):]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in report.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}
    assert set(rows) == {"transcam", "bao", "pseudo_score", "eval_score", "cnn_score", "pseudo_seg", "seg_train",
                         "seg_val", "seg_test"}
    for stage, cells in rows.items():
        assert re.fullmatch(r"[\d.]+ (min|h) \|", cells[-1]), (stage, cells)
        if stage != "eval_score":
            assert re.fullmatch(r"[\d.]+ img/s", cells[3]) and float(cells[3].split()[0]) > 0, (stage, cells)
    # the VOC estimate scales the measured rate: 10 epochs of 10,582 images for BAO
    rate = float(rows["bao"][3].split()[0])
    assert rows["bao"][-1] == f"{10 * 10582 / rate / 60:.1f} min |" or rows["bao"][-1].endswith("h |")
    assert "--scales 32,64" in report and (tmp_path / "work" / "run" / "results.md").is_file()
