"""``make gpu-check`` (bench/gpu_suite.py) on the CPU: the command's smoke run, and the gpu tier's skips."""
from __future__ import annotations

import re

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow  # the whole module: a 43 s smoke run and a 6 s pytest run (tests/README.md, tiers)
REASON = "no CUDA device (the gpu tier runs under make gpu-check)"


def _section(text: str, key: str) -> str:
    found = re.search(f"<!-- {key}:begin -->\n(.*?)\n<!-- {key}:end -->", text, re.S)
    assert found, f"no {key} section"
    return found.group(1)


def test_smoke_run_writes_each_part_as_it_goes_and_cuts_the_part_over_budget(tmp_path):
    """The suite with the smallest sizes on the CPU: the tier (all skipped), gpu_check and the CRF
    run and write their sections; with a 40 s budget the protocol part is stopped at its limit and
    leaves no section, the suite's table saying so; the end prints the results under the device's name."""
    out = tmp_path / "out"
    proc = run_script("-m", "bench.gpu_suite", "--smoke", "--out", str(out), "--budget", "40",
                      "--parts", "gpu_tier", "gpu_check", "bench_crf", "bench_protocol", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"RESULTS.md", "gpu_tier.log", "gpu_check.log", "bench_crf.log",
                                               "bench_protocol.log"}
    results = (out / "RESULTS.md").read_text()
    tier = _section(results, "gpu_tier")
    rows = [line for line in tier.splitlines() if line.startswith("| `tests/")]
    assert len(rows) >= 10 and all(line.endswith("| SKIPPED |") for line in rows), tier
    assert f"- skipped, {len(rows)} test(s): {REASON}" in tier
    check = _section(results, "gpu_check")
    assert re.search(r"^\| fp32 \| [\d.]+ \| n/a \| [\d.]+ \| n/a \|$", check, re.M), check
    assert "Partial" not in check and "not reached" not in check
    assert "## The torch CRF on cpu" in _section(results, "bench_crf_device")
    assert "bench_protocol:begin" not in results
    suite = _section(results, "gpu_suite")
    for part in ("gpu_tier", "gpu_check", "bench_crf"):
        assert re.search(rf"^\| {part} \| passed \| \d+ \| \d+ \|$", suite, re.M), suite
    assert re.search(r"^\| bench_protocol \| cut at its \d+ s limit \| \d+ \| \d+ \|$", suite, re.M), suite
    assert "finished." in suite
    tail = proc.stdout[proc.stdout.index("for bench/RESULTS.md: CPU ("):]
    assert _section(tail, "gpu_check") == check


def test_pytest_m_gpu_reports_every_gpu_test_skipped_with_its_reason():
    """On a machine without CUDA, ``pytest -m gpu`` selects the tier's tests and skips each one with the reason."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the gpu tier runs instead of skipping")
    proc = run_script("-m", "pytest", "-m", "gpu", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider",
                      "tests/test_gpu_numerics.py", "tests/test_gpu_scripts.py", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r"(\d+) skipped in [\d.]+s", summary.strip("= "))
    assert found and int(found.group(1)) >= 15, summary
    skips = re.findall(r"^SKIPPED \[(\d+)\] tests/test_gpu_\w+\.py:\d+: (.*)$", proc.stdout, re.M)
    assert sum(int(n) for n, _ in skips) == int(found.group(1)) and {r for _, r in skips} == {REASON}, proc.stdout
