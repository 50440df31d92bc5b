"""The whole WSSS protocol as one resumable command: from TransCAM (or ImageNet) weights to the results table.

    python -m protocol.pipeline --dataset voc --voc12_root VOCdevkit/VOC2012 --weights weights/transcam_voc.pth \\
        --backbone_weights weights/resnet101-63fe2227.pth --run_dir runs/protocol_voc
    python -m protocol.pipeline --run_dir runs/protocol_voc --status
    python -m protocol.pipeline --protocol my_protocol.json ... --seeds 0 1 2   # own lists/settings, three seeds

Each stage runs the real entry script (train_bao.py, infer_bao.py, evaluation_bao.py,
train_seg.py, infer_seg.py) in a subprocess, with the list the protocol names for it
(a protocol file: ``protocol/presets/<dataset>.json`` or ``--protocol FILE``, see
:func:`load_protocol`), its output in ``<run_dir>/<stage>/`` and its log in
``<run_dir>/logs/<stage>.log``. Every command line is parsed by its script's own
``get_args_parser()`` when the plan is made, so a flag a script does not know stops the run
before it starts. ``make demo`` is this runner's small preset on a generated dataset
(protocol/demo.py). A finished stage leaves ``<run_dir>/stages/<stage>.json``
and is skipped on a rerun; a stage interrupted inside continues where it stopped (training
with ``--resume auto``, inference skipping finished images). ``--from STAGE`` redoes that stage
and the following ones (their folders are removed first); ``--until STAGE`` stops after one.
Everything a stage needs (weights, dataset root, lists, masks) is checked before the first
stage starts.

Stages, in order (:data:`STAGES`): ``transcam`` (only with ``--start imagenet`` or ``scratch``:
the TransCAM stage from ImageNet Conformer weights or from random initialisation), ``bao``
(BAO from TransCAM weights), ``pseudo_score``
(BAO pseudo-labels and maps, and TransCAM CAMs, of the scoring list; the pseudo-labels' mIoU),
``eval_score`` (the background-threshold sweeps of TransCAM CAMs and BAO maps, with plots),
``pseudo_seg`` (pseudo-labels of the segmentation training list; nothing to do when it is the
scoring list, whose labels are reused), ``seg_train``, ``seg_val``
(segmentation of the val list, with and without CRF, scored), ``seg_test`` (VOC: the test set
in the evaluation server's layout and archive), ``table`` (``results.md`` and ``results.json``,
beside the published figures). A protocol may add optional stages (:attr:`Protocol.extras`, the
demo's): ``cnn_score`` (the CNN CAMs before attention refinement, swept: an ablation),
``overlays`` (overlay sheets) and ``seg_upper`` (the segmentation model trained on the
ground-truth masks and scored on val: the fully supervised upper bound). A protocol without
segmentation lists stops at the pseudo-labels.

``--seeds 0 1 2`` runs the protocol once per training seed (``--seed`` of train_bao.py and
train_seg.py), each in ``<run_dir>/seed<S>/``; stages that no training of the seed feeds (the
CNN CAM ablation from given TransCAM weights) run once in ``<run_dir>/``. The mean ± sample
standard deviation (n - 1) of every result row, with the per-seed values, goes to
``<run_dir>/seeds.md`` and ``seeds.json``.

``--refine none`` runs the ablation without attention refinement (train_bao.py's flag) in
every BAO and TransCAM stage; the TransCAM CAMs are then the CNN CAMs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from apps.cli import (DefaultsHelpFormatter, add_crf_backend_arg, add_dataset_args, add_refine_arg,
                      add_stages_device_arg, crf_backend_from_args, run_cli)
from core.errors import UserError, stop_signal
from core.fileio import atomic_path
from core.runlock import RunLock, describe, lock_holder
from data.layout import REPO_ROOT
# Re-exported for the runner's callers (bench/bench_protocol.py, the tests), beside what it uses itself.
from protocol.plan import (EXTRAS, STAGES, Plan, Protocol, check_definition, check_prerequisites,  # noqa: F401
                           commands, make_plan, make_plans, preset, recorded_plans, script_parsers)
from protocol.results import write_seed_table, write_table


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="folder of the whole run: every stage's outputs and logs")
    parser.add_argument("--status", action="store_true", help="show which stages are done, then exit")
    parser.add_argument("--protocol", default=None,
                        help="protocol file (JSON: lists per stage, per-stage flags, see protocol/presets/*.json); "
                             "default: protocol/presets/<--dataset>.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds: the protocol once per seed in <run_dir>/seed<S>/, then seeds.md and "
                             "seeds.json (mean ± sample sd over the seeds); default: one run, the scripts' seed")
    parser.add_argument("--weights", default=None,
                        help="starting weights: TransCAM weights (--start transcam) or ImageNet Conformer weights "
                             "(--start imagenet)")
    parser.add_argument("--start", choices=("transcam", "imagenet", "scratch"), default="transcam",
                        help="what --weights are: transcam skips the TransCAM stage; imagenet trains it first from "
                             "them; scratch trains it from random initialisation (no --weights)")
    parser.add_argument("--backbone_weights", default=None,
                        help="ImageNet ResNet-101 weights in torchvision's layout for the segmentation model")
    parser.add_argument("--seg_from_scratch", action="store_true",
                        help="train the segmentation model from random initialisation (no --backbone_weights)")
    parser.add_argument("--coco_val", choices=("labelled", "full"), default="labelled",
                        help="COCO val list of the segmentation score: the 40,137 images with a labelled class "
                             "(coco14/val_labelled.txt) or all 40,504 (the protocol's seg_val_full, coco14/val.txt)")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                        help="redo this stage and every later one (their outputs are removed first)")
    parser.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    add_stages_device_arg(parser)
    add_crf_backend_arg(parser)
    add_refine_arg(parser)
    add_dataset_args(parser)
    return parser


def _done_file(plan: Plan, stage: str) -> Path:
    return plan.home(stage) / "stages" / f"{stage}.json"


def status(plan: Plan) -> list[tuple[str, str]]:
    """(stage, "done in N s" | "partly done" | "to do" | "not in this run") for every stage."""
    states = []
    for stage in STAGES:
        done = _done_file(plan, stage)
        if not plan.runs(stage) and stage != "pseudo_seg":
            states.append((stage, "not in this run"))
        elif not plan.runs(stage):
            states.append((stage, "not in this run (the scoring list's pseudo-labels are reused)"))
        elif done.is_file():
            states.append((stage, f"done in {json.loads(done.read_text())['seconds']:.0f} s"))
        elif plan.out(stage).exists():
            states.append((stage, "partly done (resumes)"))
        else:
            states.append((stage, "to do"))
    return states


def _run_stage(plan: Plan, stage: str) -> None:
    """Run the stage's commands, teeing their output to ``logs/<stage>.log``; mark it done."""
    start = time.time()
    log_path = plan.home(stage) / "logs" / f"{stage}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan.out(stage).mkdir(parents=True, exist_ok=True)
    cmds = commands(plan, stage)
    with open(log_path, "ab") as log:
        for cmd in cmds:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            # In a process group of its own: a terminal's Ctrl-C reaches the runner alone, which
            # passes every stop on (_stop_stage), however it was sent.
            proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, process_group=0)
            try:
                _pass_output(proc, log)
            except KeyboardInterrupt:
                _stop_stage(proc, log)
                raise
            if proc.wait() != 0:
                raise UserError(f"stage {stage} failed (exit {proc.returncode}); its output is in {log_path}; fix the "
                                "cause and rerun the same command, which continues from this stage")
    if stage == "table":
        write_table(plan)
    with atomic_path(_done_file(plan, stage)) as tmp:
        Path(tmp).write_text(json.dumps({"seconds": time.time() - start, "commands": cmds}, indent=1) + "\n")


def _stop_stage(proc: subprocess.Popen, log) -> None:
    """Stop the stage's script as the runner was stopped (Ctrl-C or ``kill -INT``: SIGINT; SIGTERM:
    SIGTERM) and let it save, passing its output on until it ends; a second stop while it saves is
    passed on too, as a terminal would pass it."""
    while True:
        proc.send_signal(signal.SIGTERM if stop_signal() == signal.SIGTERM else signal.SIGINT)
        try:
            _pass_output(proc, log)
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def _pass_output(proc: subprocess.Popen, log) -> None:
    """Copy a stage's output to the screen and its log until it ends."""
    # Raw chunks, not lines: a progress bar redraws its line with carriage returns, which a
    # line reader would turn into one printed line per refresh.
    while chunk := proc.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        log.write(chunk)


RUN_DIR_IN_USE = "wait for it to end, stop it, or give another --run_dir"


def run(plan: Plan, show_table: bool = True, redo_shared: bool = True) -> None:
    """Run the stages that are not done (from ``--from``, up to ``--until``); print the table at the end.
    ``redo_shared`` False: ``--from`` leaves the stages shared by the seeds (another seed redid them).

    The run folder is locked for the whole run (:class:`core.runlock.RunLock`): a second runner
    on it is refused before it writes anything."""
    with RunLock(plan.run_dir, RUN_DIR_IN_USE):
        _run_stages(plan, show_table, redo_shared)


def _run_stages(plan: Plan, show_table: bool, redo_shared: bool) -> None:
    a = plan.args
    first = STAGES.index(a.from_stage) if a.from_stage else 0
    last = STAGES.index(a.until) if a.until else len(STAGES) - 1
    if first > last:
        raise UserError(f"--from {a.from_stage} comes after --until {a.until}")
    selected = list(STAGES[:last + 1])
    todo = [s for s in selected if STAGES.index(s) >= first or not _done_file(plan, s).is_file()]
    check_prerequisites(plan, todo)
    check_definition(plan)
    if a.from_stage:
        for stage in (s for s in STAGES[first:] if redo_shared or not plan.shared(s)):
            _done_file(plan, stage).unlink(missing_ok=True)
            shutil.rmtree(plan.out(stage), ignore_errors=True)
    for stage in selected:
        if not plan.runs(stage):
            continue
        if _done_file(plan, stage).is_file():
            print(f"== {stage}: done before, skipped", flush=True)
            continue
        print(f"\n== {stage}", flush=True)
        _run_stage(plan, stage)
    if selected[-1] == "table" and show_table:
        print("\n" + (plan.run_dir / "results.md").read_text())


def run_seeds(plans: list[Plan]) -> None:
    """Run every seed's plan (a shared stage once: the first seed runs it, the others find it done); with
    the table stage reached, write and print the seeds table in the root."""
    with RunLock(plans[0].root, RUN_DIR_IN_USE):  # each seed's folder is locked by run() too
        for plan in plans:
            print(f"\n=== seed {plan.seed}: {plan.run_dir}", flush=True)
            run(plan, show_table=False, redo_shared=plan is plans[0])  # --from redoes a shared stage once
        if plans[0].args.until in (None, "table"):
            print("\n" + write_seed_table(plans, plans[0].root))


def main(args: argparse.Namespace) -> None:
    if args.status:
        holder = lock_holder(args.run_dir)
        if holder is not None:
            print(f"a run is in progress: {describe(holder)}")
        for plan in recorded_plans(args):
            if plan.run_dir != plan.root:
                print(f"seed {plan.seed} ({plan.run_dir}):")
            for stage, state in status(plan):
                print(f"{stage:<14} {state}")
        return
    # pydensecrf2 asked for but missing stops the run before its first stage, not at seg_val
    crf_backend_from_args(args, args.crf_backend == "pydensecrf")
    plans = make_plans(args)
    os.makedirs(plans[0].root, exist_ok=True)
    if args.seeds:
        run_seeds(plans)
    else:
        run(plans[0])


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
