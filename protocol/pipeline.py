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

The stages, in order, are the records of the stage table (protocol/stages.py, :data:`STAGE_TABLE`;
docs/protocol.md lists them): each record says what the runner, ``--status``, the prerequisite
check and the results table need of its stage. ``transcam`` runs only with ``--start imagenet``
or ``scratch``; the optional stages (``cnn_score``, ``overlays``, ``seg_upper``) only where the
protocol names them in ``extras``; a protocol without segmentation lists stops at the
pseudo-labels. A plan can be made with another table (:func:`make_plan`'s ``stages``).

``--seeds 0 1 2`` runs the protocol once per training seed (``--seed`` of train_bao.py and
train_seg.py), each in ``<run_dir>/seed<S>/``; stages that no training of the seed feeds (the
CNN CAM ablation from given TransCAM weights) run once in ``<run_dir>/``. The mean ± sample
standard deviation (n - 1) of every result row, with the per-seed values, goes to
``<run_dir>/seeds.md`` and ``seeds.json``.

``--nproc_per_node N`` runs every training and inference stage on N processes through torch's
launcher (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``: on several machines, the same command
on each); ``--print_commands`` prints the command lines of the stages still to do as a bash script
(each stage closed by a ``--finish_stage`` line) instead of running them: docs/clusters.md.

``--refine none`` runs the ablation without attention refinement (train_bao.py's flag) in
every BAO and TransCAM stage; the TransCAM CAMs are then the CNN CAMs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from apps.cli import (DefaultsHelpFormatter, add_crf_backend_arg, add_dataset_args, add_refine_arg,
                      add_stages_device_arg, crf_backend_from_args, run_cli)
from core.errors import UserError
from core.runlock import RunLock, describe, in_use_hint, lock_holder
from data.layout import REPO_ROOT
from protocol import protocol_file, stagerun
from protocol.launch import PORTS_USED, launch_from_args, program, shell_line
# Re-exported for the runner's callers (bench/bench_protocol.py, the demo, the tests), beside what it uses itself.
from protocol.plan import (Plan, Stage, check_commands, check_definition, check_prerequisites, commands,  # noqa: F401
                           script_parsers)
from protocol.protocol_file import Protocol, fixed_t_problem
from protocol.results import check_seeds, write_seed_table
from protocol.stagerun import done_file, mark_done, programs, status
from protocol.stages import EXTRAS, SETTING_KEYS, STAGE_TABLE, STAGES  # noqa: F401

RUN_DIR_IN_USE = in_use_hint("--run_dir")


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
    parser.add_argument("--print_commands", action="store_true",
                        help="print the command line of every stage still to do, in order, as a bash script (the "
                             "torchrun form with several processes), and exit without running anything; each "
                             "stage ends with a --finish_stage line (docs/clusters.md)")
    parser.add_argument("--finish_stage", choices=STAGES, default=None,
                        help="mark a stage done whose command lines ran outside the runner (--print_commands): "
                             "write its results when it writes them, and its done marker")
    launch = parser.add_argument_group("several processes and machines (torchrun's names; docs/clusters.md)")
    launch.add_argument("--nproc_per_node", type=int, default=1,
                        help="processes per machine of every training and inference stage (one per GPU), started "
                             "with torch's launcher; the published global batch, learning rate and schedule stay")
    launch.add_argument("--nnodes", type=int, default=1,
                        help="machines: the same command on every one, the run folder on a shared filesystem")
    launch.add_argument("--node_rank", type=int, default=0,
                        help="this machine's number, 0 to --nnodes - 1; node 0 runs the one-process stages and "
                             "writes the run's state, the others run their ranks of the model stages")
    launch.add_argument("--rdzv_endpoint", default=None,
                        help=f"HOST:PORT of node 0, the same on every node (with --nnodes > 1); the run uses "
                             f"ports PORT to PORT+{PORTS_USED - 1}")
    add_stages_device_arg(parser)
    add_crf_backend_arg(parser)
    add_refine_arg(parser)
    add_dataset_args(parser)
    return parser


def load_protocol(path: str) -> Protocol:
    """A protocol file, checked by the schema (:func:`protocol.protocol_file.load_protocol`) against the
    stage table's optional stages and settings keys."""
    return protocol_file.load_protocol(path, EXTRAS, SETTING_KEYS)


def preset(name: str) -> Protocol:
    """A shipped protocol: "voc", "coco" or "demo" (protocol/presets/<name>.json)."""
    return load_protocol(str(protocol_file.PRESETS / f"{name}.json"))


def _resolve_list(value: str, protocol: Protocol, args: argparse.Namespace) -> str:
    """A protocol's list path as an absolute path (``{repo}``, ``{root}``, relative to the protocol's folder)."""
    if "{root}" in value:
        root = args.voc12_root if args.dataset == "voc" else args.coco_root
        if not root:
            raise UserError(f"the protocol's list {value} is in the dataset root: give --"
                            f"{'voc12_root' if args.dataset == 'voc' else 'coco_root'}")
        value = value.replace("{root}", str(Path(root).resolve()))
    value = value.replace("{repo}", str(REPO_ROOT))
    return str(Path(value) if Path(value).is_absolute() else Path(protocol.base) / value)


def make_plan(args: argparse.Namespace, protocol: Protocol | None = None, seed: int | None = None,
              run_dir: Path | None = None, check: bool = True, stages: Sequence[Stage] = STAGE_TABLE) -> Plan:
    """The run's plan: ``protocol`` (default: ``--protocol``, else the dataset's preset); ``seed`` and
    ``run_dir`` (default: ``<run_dir>/seed<S>`` with a seed, else ``--run_dir``) for one seed's run;
    ``stages``: the stage table (default: the protocol's, :data:`protocol.stages.STAGE_TABLE`).
    With ``check``, every stage's command line is parsed by its script's parser (:func:`check_commands`).
    Creates nothing."""
    protocol = protocol or (load_protocol(args.protocol) if args.protocol else preset(args.dataset))
    if problem := fixed_t_problem(protocol.fixed_t):
        raise UserError(f"the protocol's fixed_t {problem}")
    given = protocol.lists
    if ("seg_train" in given) != ("seg_val" in given):
        raise ValueError("a protocol names both segmentation lists or neither")
    lists = {k: given[k] for k in ("train", "score", "seg_train", "seg_val", "seg_test") if k in given}
    if "seg_val" in lists and args.dataset == "coco" and args.coco_val == "full":
        if "seg_val_full" not in given:
            raise UserError("--coco_val full: the protocol names no seg_val_full list")
        lists["seg_val"] = given["seg_val_full"]
    if "seg_train" not in lists:
        lists.pop("seg_test", None)
    resolved = {k: _resolve_list(v, protocol, args) for k, v in lists.items()}
    root = Path(args.run_dir).resolve()
    if run_dir is None:
        run_dir = root / f"seed{seed}" if seed is not None else root
    plan = Plan(args, protocol, Path(run_dir).resolve(), resolved, root, tuple(stages), seed, given=lists,
                launch=launch_from_args(args))
    if check:
        check_commands(plan)
    return plan


def make_plans(args: argparse.Namespace, protocol: Protocol | None = None) -> list[Plan]:
    """One plan, or one per ``--seeds`` (in ``<run_dir>/seed<S>``)."""
    if not args.seeds:
        return [make_plan(args, protocol)]
    check_seeds(args.seeds)
    return [make_plan(args, protocol, seed=s) for s in args.seeds]


def runner_args(run_dir: str | Path, **values: object) -> argparse.Namespace:
    """The runner's arguments of a run in ``run_dir``, for a caller that makes its plans itself (the demo):
    every flag at its default, the attributes ``values`` (typed values, not words) set."""
    args = get_args_parser().parse_args(["--run_dir", str(run_dir)])
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise ValueError(f"the runner has no argument {', '.join(unknown)}")
    vars(args).update(values)
    return args


def recorded_plans(args: argparse.Namespace) -> list[Plan]:
    """The plans of the run in ``args.run_dir`` as its ``run.json`` recorded them, whatever flags and
    preset (the demo's) made it: one, or one per ``seed<S>`` folder. A folder without ``run.json``
    holds no run: UserError."""
    root = Path(args.run_dir)
    path = root / "run.json"
    if not path.is_file():
        state = "does not exist" if not root.exists() else "holds no run (no run.json)"
        raise UserError(f"{root} {state}: give the --run_dir of a run (a run folder has run.json)")
    d = json.loads(path.read_text())
    protocol = Protocol(lists=d["lists"], published=d.get("published"), settings=d["settings"],
                        extras=tuple(d["extras"]), fixed_t=d["fixed_t"])
    recorded = argparse.Namespace(**{**vars(args), "dataset": d["dataset"], "refine": d["refine"],
                                     "start": d["start"], "seg_from_scratch": d["seg_from_scratch"],
                                     "crf_backend": d.get("crf_backend", args.crf_backend), "coco_val": "labelled"})
    if d.get("seed") != "one folder per seed":
        return [make_plan(recorded, protocol, seed=d.get("seed"), run_dir=root, check=False)]
    seeds = sorted(int(p.name[4:]) for p in root.glob("seed*") if p.name[4:].isdigit() and p.is_dir())
    return [make_plan(recorded, protocol, seed=s, check=False) for s in seeds]


def run(plan: Plan, show_table: bool = True, redo_shared: bool = True, ports: Iterator[int] | None = None) -> None:
    """Run the stages that are not done (from ``--from``, up to ``--until``); print the table at the end.
    ``redo_shared`` False: ``--from`` leaves the stages shared by the seeds (another seed redid them);
    ``ports``: the rendezvous ports' count over the run's several-process lines (of all its seeds).

    The run folder is locked for the whole run (:class:`core.runlock.RunLock`): a second runner
    on it is refused before it writes anything. Node r > 0 of several takes no lock and writes no
    state: node 0's runner does."""
    ports = itertools.count() if ports is None else ports
    if not plan.launch.leads:
        _run_stages(plan, show_table, redo_shared, ports)
        return
    with RunLock(plan.run_dir, RUN_DIR_IN_USE):
        _run_stages(plan, show_table, redo_shared, ports)


def _selected(plan: Plan) -> list[str]:
    """The stages up to ``--until`` (all without it), in order."""
    names = plan.names
    for flag, name in (("--from", plan.args.from_stage), ("--until", plan.args.until)):
        if name is not None and name not in names:
            raise UserError(f"{flag} {name}: no such stage in this run ({', '.join(names)})")
    return names[:names.index(plan.args.until) + 1] if plan.args.until else names


def _reaches_results(plan: Plan, selected: list[str]) -> bool:
    """Whether the ``selected`` stages write the run's results (results.md, results.json)."""
    return any(plan.stage(s).writes_results and plan.runs(s) for s in selected)


def _todo(plan: Plan, redo_shared: bool = True) -> list[str]:
    """The selected stages that this run will run (not done, or redone from ``--from``), in order;
    ``redo_shared`` False: a stage shared by the seeds is not redone (another seed redid it)."""
    a, selected = plan.args, _selected(plan)
    first = plan.names.index(a.from_stage) if a.from_stage else 0
    if first >= len(selected):
        raise UserError(f"--from {a.from_stage} comes after --until {a.until}")
    redone = [s for s in plan.names[first:] if a.from_stage and (redo_shared or not plan.shared(s))]
    return [s for s in selected if plan.runs(s) and (s in redone or not done_file(plan, s).is_file())]


def _run_stages(plan: Plan, show_table: bool, redo_shared: bool, ports: Iterator[int]) -> None:
    a, selected, todo = plan.args, _selected(plan), _todo(plan, redo_shared)
    check_prerequisites(plan, todo)
    if plan.launch.leads:
        check_definition(plan, todo)
        redone = plan.names[plan.names.index(a.from_stage):] if a.from_stage else []
        for stage in (s for s in redone if redo_shared or not plan.shared(s)):
            done_file(plan, stage).unlink(missing_ok=True)
            shutil.rmtree(plan.out(stage), ignore_errors=True)
    for stage in selected:
        if not plan.runs(stage):
            continue
        if stage not in todo or (plan.shared(stage) and not redo_shared and done_file(plan, stage).is_file()):
            print(f"== {stage}: done before, skipped", flush=True)
            continue
        print(f"\n== {stage}", flush=True)
        stagerun.run_stage(plan, stage, ports)
    if show_table and plan.launch.leads and _reaches_results(plan, selected):
        print("\n" + (plan.run_dir / "results.md").read_text())


def run_seeds(plans: list[Plan]) -> None:
    """Run every seed's plan (a shared stage once: the first seed runs it, the others find it done); when
    the runs reach their results, write and print the seeds table in the root."""
    ports = itertools.count()
    if not plans[0].launch.leads:
        for plan in plans:
            run(plan, show_table=False, redo_shared=plan is plans[0], ports=ports)
        return
    with RunLock(plans[0].root, RUN_DIR_IN_USE):  # each seed's folder is locked by run() too
        for plan in plans:
            print(f"\n=== seed {plan.seed}: {plan.run_dir}", flush=True)
            run(plan, show_table=False, redo_shared=plan is plans[0], ports=ports)  # --from redoes a shared stage once
        if _reaches_results(plans[0], _selected(plans[0])):
            print("\n" + write_seed_table(plans, plans[0].root))


def runner_argv(args: argparse.Namespace, **changes: object) -> list[str]:
    """The runner's command line of ``args`` (every flag not at its default), with ``changes`` (dest ->
    value; None or False leave a flag out)."""
    argv = []
    for action in get_args_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = changes.get(action.dest, getattr(args, action.dest, action.default))
        if value == action.default or value is None or value is False:
            continue
        flag = action.option_strings[0]
        argv += [flag] if action.nargs == 0 else [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


def print_commands(args: argparse.Namespace, plans: list[Plan]) -> None:
    """Print, as a bash script, the command lines of every stage still to do, in order: on node 0 each
    stage's lines, then its ``--finish_stage`` line, and at the end the runner's own command (every stage
    done: it prints the table); on node r > 0 the several-process lines alone."""
    ports, leads, seen = itertools.count(), plans[0].launch.leads, set()
    lines = ["#!/usr/bin/env bash", "# the stages still to do of: python -m protocol.pipeline "
             + shell_line(runner_argv(args)), "set -euo pipefail", f"cd {shell_line([os.getcwd()])}"]
    for plan in plans:
        for stage in _todo(plan, redo_shared=plan is plans[0]):
            if (plan.home(stage), stage) in seen:  # shared by the seeds: the first seed runs it
                continue
            seen.add((plan.home(stage), stage))
            argvs = [argv for argv, ranked in programs(plan, stage, ports) if leads or ranked]
            if argvs or leads:
                lines.append(f"# stage {stage}" + (f" (seed {plan.seed})" if plan.run_dir != plan.root else ""))
            lines += [shell_line(argv) for argv in argvs]
            if leads:
                seed = {"seeds": [plan.seed]} if plan.run_dir != plan.root else {}
                lines.append(shell_line(program(["-m", "protocol.pipeline"], runner_argv(
                    args, print_commands=False, from_stage=None, until=None, finish_stage=stage, **seed))))
    if leads:
        lines += ["# every stage done: the runner prints the table",
                  shell_line(program(["-m", "protocol.pipeline"], runner_argv(args, print_commands=False,
                                                                              from_stage=None)))]
    print("\n".join(lines))


def finish_stage(plan: Plan, stage: str) -> None:
    """Mark ``stage`` done after its command lines ran outside the runner (:func:`print_commands`)."""
    if not plan.runs(stage):
        raise UserError(f"--finish_stage {stage}: the stage is not in this run")
    with RunLock(plan.root, RUN_DIR_IN_USE):
        check_definition(plan)
        if commands(plan, stage) and not plan.out(stage).exists():
            raise UserError(f"--finish_stage {stage}: {plan.out(stage)} does not exist; run the stage's command "
                            "lines first")
        mark_done(plan, stage, None)
        print(f"== {stage}: marked done")


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
    # Nothing is created before here: the run folder is made by the lock, which removes it again when
    # the run is refused before its first stage wrote anything (its flags, data or weights).
    plans = make_plans(args)
    if args.print_commands:
        print_commands(args, plans)
    elif args.finish_stage:
        if len(plans) != 1:
            raise UserError("--finish_stage marks one run's stage: give the one seed (--seeds S) it belongs to")
        finish_stage(plans[0], args.finish_stage)
    elif args.seeds:
        run_seeds(plans)
    else:
        run(plans[0])


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
