"""``make gpu-check``: everything a GPU must show, in one command that fits one short loan of a GPU.

    python -m bench.gpu_suite                                # on a CUDA machine: OUT = gpu_check_out/
    python -m bench.gpu_suite --out /tmp/gpu --parts bench_crf gpu_check   # a rerun of some parts
    python -m bench.gpu_suite --smoke --out /tmp/smoke      # CPU smoke of the command: smallest sizes

It runs, one after the other, each as a subprocess with its own time limit, writing its section
of ``OUT/RESULTS.md`` (bench/RESULTS.md's format: ``<!-- name:begin -->`` ... ``<!-- name:end -->``)
as it goes, and the ``gpu_suite`` section (each part's status and seconds) after each part:

1. ``gpu_tier``: ``pytest -m gpu`` on tests/test_gpu_*.py, every CUDA branch against the CPU
   (its section is rewritten after each test, so a cut leaves the outcomes so far);
2. ``gpu_check``: bench/gpu_check.py, the published loops against this version's fp32, --tf32
   and --amp bf16: BAO training and pseudo-label inference (Conformer-S, batch 8 at 512), the
   segmentation stage (DeepLab-V2 ResNet-101) and the DDP smoke run (two GPUs and more): the
   figures the GPU work promised (each stage >= 1.5x the published loop, numerics kept);
3. ``bench_crf``: bench/bench_crf.py --torch_only, the torch dense CRF on the GPU in images/s
   (goal >= 50) against the CPU's and pydensecrf2's per core;
4. ``gpu_check_compile``: gpu_check's --compile default against fp32 (compilation is slow, so it
   comes after the figures that need none);
5. ``bench_protocol``: bench/bench_protocol.py, the VOC protocol's time estimated from every stage;
6. ``gpu_check_e2e``: gpu_check --e2e_only, infer_bao.py and infer_seg.py end to end.

gpu_check writes its section after every measurement; bench_crf and bench_protocol write theirs
when they end. A part that fails leaves the next ones running; a part that reaches its limit is
stopped (its whole process group) and marked "cut". Each part's output goes to ``OUT/<part>.log``.
At the end the suite prints ``OUT/RESULTS.md`` (the sections to copy into bench/RESULTS.md) under
the GPU's name. Exit status 1 when the tier did not pass or a part failed.

Sizing: ``--budget`` (540 s, 9 minutes) is the whole command's, model set-up and process
start-ups included; each part has a limit of its own (:data:`PARTS`, seconds on one H100/H200),
and may use what earlier parts left unused while the later parts' limits stay reserved. The
limits are estimates from the 2026-11 H200 run of gpu_check (fp32 and bf16 of the sizes below took
about 40 s with set-up) and from the script start-ups (5-10 s each); the sizes were cut from the
scripts' defaults to fit: 5 timed steps after 2 warm-up ones, 8 inference images, 4 segmentation
images, the protocol on 96 + 16 images with 40 segmentation steps, 16 end-to-end images. Parts run in
the order of importance, so what a cut loses is the least needed. ``--smoke`` runs the same parts
with the smallest sizes on the CPU (the compile variant left out: torch.compile of even the tiny
model takes minutes there; the protocol part, with a 15 s limit, is cut: the cut path runs too).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from apps.cli import positive_int, run_cli
from bench.report import machine_line, write_section
from data.layout import REPO_ROOT

RESULTS_NAME = "RESULTS.md"
TIER_FILES = "tests/test_gpu_*.py"
# pytest -v's line of one outcome: "tests/x.py::test_y[id] SKIPPED [ 50%]"
RESULT_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
# pytest -rs's line of skipped tests: "SKIPPED [2] tests/x.py:12: reason"
SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):\d+: (.*)$")
MIN_START_S = 10  # a part that would get less than this is not started


@dataclass(frozen=True)
class Part:
    """One part: its name (its results section), its limits (CUDA, smoke) and its command's arguments."""

    name: str
    limit_s: int
    smoke_limit_s: int
    args: Callable[[argparse.Namespace, str], list[str]]  # (suite args, results file) -> args after `python`


def _tier(args: argparse.Namespace, results: str) -> list[str]:
    files = sorted(str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.glob(TIER_FILES))
    return ["-m", "pytest", "-m", "gpu", "-o", "addopts=", "-v", "-rs", "-p", "no:cacheprovider", *files]


def _gpu_check(args: argparse.Namespace, results: str) -> list[str]:
    common = ["-m", "bench.gpu_check", "--device", args.device, "--out", results, "--e2e_images", "0"]
    if args.smoke:
        return [*common, "--arch", "tiny", "--batch_size", "2", "--crop_size", "64", "--train_steps", "1",
                "--warmup", "1", "--infer_images", "2", "--infer_size", "64", "--scales", "32,64", "--skip_ddp",
                "--seg_backbone", "tiny", "--seg_batch_size", "2", "--seg_crop_size", "64", "--seg_images", "1",
                "--variants", "published", "fp32"]
    return [*common, "--train_steps", "5", "--warmup", "2", "--infer_images", "8", "--seg_images", "4",
            "--variants", "published", "fp32", "tf32", "bf16"]


def _bench_crf(args: argparse.Namespace, results: str) -> list[str]:
    sizes = ["--images", "1", "--size", "48"] if args.smoke else ["--images", "16", "--threads", "4"]
    return ["-m", "bench.bench_crf", "--torch_only", args.device, *sizes, "--results", results]


def _compile(args: argparse.Namespace, results: str) -> list[str]:
    gpu_check = _gpu_check(args, results)
    variants = ["fp32"] if args.smoke else ["fp32", "compile"]
    return [*gpu_check[:gpu_check.index("--variants")], "--variants", *variants, "--skip_ddp",
            "--section", "gpu_check_compile"]


def _protocol(args: argparse.Namespace, results: str) -> list[str]:
    common = ["-m", "bench.bench_protocol", "--device", args.device, "--out", results]
    if args.smoke:
        return [*common, "--arch", "tiny", "--seg_backbone", "tiny", "--num_train", "8", "--num_val", "4", "--size",
                "64", "--batch_size", "4", "--crop_size", "64", "--scales", "32,64", "--seg_iters", "12",
                "--seg_batch", "4", "--seg_crop", "48", "--seg_scales", "1.0"]
    return [*common, "--num_train", "96", "--num_val", "16", "--seg_iters", "40"]


def _e2e(args: argparse.Namespace, results: str) -> list[str]:
    common = ["-m", "bench.gpu_check", "--device", args.device, "--out", results, "--section", "gpu_check_e2e",
              "--e2e_only"]
    if args.smoke:
        return [*common, "--arch", "tiny", "--seg_backbone", "tiny", "--scales", "32,64", "--variants", "fp32",
                "--e2e_images", "3", "--e2e_size", "80", "60"]
    return [*common, "--variants", "published", "fp32", "tf32", "bf16", "--e2e_images", "16"]


# In the order of importance; the limits add up to the default --budget.
PARTS = (
    Part("gpu_tier", 200, 90, _tier),
    Part("gpu_check", 120, 60, _gpu_check),
    Part("bench_crf", 45, 30, _bench_crf),
    Part("gpu_check_compile", 75, 30, _compile),
    Part("bench_protocol", 70, 15, _protocol),
    Part("gpu_check_e2e", 30, 60, _e2e),
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the gpu tier and the GPU benchmarks within a time budget, "
                                                 "writing their results as they go. Run as: python -m bench.gpu_suite")
    parser.add_argument("--device", default=None,
                        help="device of every part: cuda, cuda:N, or cpu (default: cuda; cpu with --smoke)")
    parser.add_argument("--out", default="gpu_check_out",
                        help="folder of RESULTS.md (the sections) and each part's log (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest sizes and limits, for a CPU smoke run of this command")
    parser.add_argument("--budget", type=positive_int, default=None,
                        help="seconds for the whole command (default: 540, the sum of the parts' limits; "
                             "with --smoke the sum of their smoke limits)")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=[p.name for p in PARTS],
                        help="the parts to run, in the suite's order (default: all)")
    return parser


def _stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class TierRecord:
    """The gpu_tier section, rewritten after each test's outcome and after pytest's skip reasons."""

    def __init__(self, results: Path, command: list[str]):
        self.results, self.command, self.summary = results, command, "running"
        self.rows: list[str] = []
        self.skips: dict[str, int] = {}  # reason -> tests skipped for it

    def line(self, text: str) -> None:
        outcome, skipped = RESULT_LINE.match(text), SKIP_LINE.match(text.strip())
        if outcome:
            self.rows.append(f"| `{outcome.group(1)}` | {outcome.group(2)} |")
            self.write()
        elif skipped:
            reason = skipped.group(3)
            self.skips[reason] = self.skips.get(reason, 0) + int(skipped.group(1))
        elif text.startswith("=") and any(f" {word}" in text for word in ("passed", "skipped", "failed", "error")):
            self.summary = text.strip("= \n")

    def write(self) -> None:
        reasons = [f"- skipped, {count} test(s): {reason}" for reason, count in self.skips.items()]
        body = "\n".join(["## The gpu tier (pytest -m gpu)", "", machine_line(),
                          f"Command: `python {' '.join(self.command)}`; pytest's summary: {self.summary}.", "",
                          "| test | outcome |", "|---|---|", *self.rows, *([""] + reasons if reasons else [])])
        write_section(self.results, "gpu_tier", body)


def run_part(part: Part, cmd: list[str], limit: float, out: Path, results: Path) -> tuple[str, float]:
    """Run one part's command within ``limit`` seconds, its output to ``OUT/<part>.log`` and to
    this process's; returns (status, seconds)."""
    tier = TierRecord(results, cmd) if part.name == "gpu_tier" else None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    with open(out / f"{part.name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        timer = _Deadline(proc, limit)
        for text in proc.stdout:
            log.write(text)
            log.flush()
            print(f"  [{part.name}] {text}", end="", flush=True)
            if tier:
                tier.line(text)
        proc.wait()
        timer.cancel()
    seconds = time.monotonic() - start
    if tier:
        tier.write()
    if timer.fired:
        return f"cut at its {limit:.0f} s limit", seconds
    if tier and tier.summary == "running":
        return f"failed (exit {proc.returncode}, no pytest summary)", seconds
    return ("passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), seconds


class _Deadline:
    """Stop ``proc`` after ``seconds`` (a timer thread: the output loop may wait on a silent process)."""

    def __init__(self, proc: subprocess.Popen, seconds: float):
        import threading

        self.fired = False

        def fire() -> None:
            self.fired = True
            _stop(proc)

        self.timer = threading.Timer(seconds, fire)
        self.timer.daemon = True
        self.timer.start()

    def cancel(self) -> None:
        self.timer.cancel()


def _suite_section(results: Path, args: argparse.Namespace, rows: list[str], device_name: str, done: bool) -> None:
    state = "finished" if done else "running (a cut-off run leaves this)"
    body = "\n".join([f"## make gpu-check (bench/gpu_suite.py) on {device_name}", "", machine_line(),
                      f"Command: `python -m bench.gpu_suite {' '.join(sys.argv[1:])}`; budget {args.budget} s; "
                      f"{state}.", "", "| part | status | seconds | limit s |", "|---|---|---|---|", *rows])
    write_section(results, "gpu_suite", body)


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    import torch

    from bench.report import cpu_name
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_name()})"


def main(args: argparse.Namespace) -> None:
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    parts = [p for p in PARTS if p.name in args.parts]
    limits = {p.name: p.smoke_limit_s if args.smoke else p.limit_s for p in parts}
    args.budget = args.budget or sum(limits.values())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_NAME
    results.write_text("# GPU check results (bench/gpu_suite.py; sections for bench/RESULTS.md)\n")
    name = device_name(args.device)
    print(f"gpu_suite on {args.device} ({name}): {', '.join(limits)}; budget {args.budget} s; results in {results}",
          flush=True)
    end = time.monotonic() + args.budget
    rows, failed = [], False
    for i, part in enumerate(parts):
        left = end - time.monotonic()
        reserved = sum(limits[p.name] for p in parts[i + 1:])
        limit = min(left, max(limits[part.name], left - reserved))
        if limit < MIN_START_S:
            rows.append(f"| {part.name} | not run: the budget was spent | - | - |")
            _suite_section(results, args, rows, name, done=False)
            continue
        cmd = part.args(args, str(results))
        print(f"\n== {part.name} (limit {limit:.0f} s): python {' '.join(cmd)}", flush=True)
        status, seconds = run_part(part, cmd, limit, out, results)
        failed |= status.startswith("failed") or (part.name == "gpu_tier" and status != "passed")
        rows.append(f"| {part.name} | {status} | {seconds:.0f} | {limit:.0f} |")
        _suite_section(results, args, rows, name, done=False)
    _suite_section(results, args, rows, name, done=True)
    print(f"\n==================== for bench/RESULTS.md: {name} ====================\n", flush=True)
    print(results.read_text(), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
