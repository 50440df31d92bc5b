"""The plan of one protocol run: what a stage is (:class:`Stage`, one record of the stage table in
protocol/stages.py), a run's lists, settings, folders and stage table (:class:`Plan`), a stage's
command lines (:func:`commands`), checked by the scripts' own parsers (:func:`check_commands`) and,
before the first stage, against the data and weights the stages need (:func:`check_prerequisites`);
the run's definition kept in ``run.json`` (:func:`definition`, :func:`check_definition`).

Nothing here names a stage: every stage-specific fact is a field of its record, which this module,
the runner (protocol/pipeline.py), ``--status``, the results (protocol/results.py) and the demo read.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from apps.cli import dataset_from_args
from core.errors import UserError
from core.fileio import atomic_path
from crf.params import resolve_backend
from data.labels import read_list
from protocol.launch import Launch
from protocol.protocol_file import LIST_KEYS, Protocol

# What a stage may need besides its lists (Stage.needs), checked before the first stage runs:
# "weights": --weights (unless --start scratch); "transcam_weights": the TransCAM weights it reads,
# --weights with --start transcam (else a stage's output); "backbone": --backbone_weights (unless
# --seg_from_scratch).
NEEDS = ("weights", "transcam_weights", "backbone")


class Figure(NamedTuple):
    """One result a stage writes for the table: row ``row`` of :data:`protocol.rows.ROWS` from the JSON
    ``file`` (in the stage's folder) of evaluation_bao.py, read as ``read``: "result" (its threshold-free
    mIoU), "best" (its sweep's best threshold) or "fixed" (its sweep at the protocol's ``fixed_t``)."""

    row: str
    file: str
    read: str


@dataclass(frozen=True)
class Stage:
    """One stage of the protocol: one record of the stage table, all that is specific to it.

    Attributes:
        name: its folder ``<run_dir>/<name>``, log and done-marker name; ``--from`` / ``--until`` take it.
        scripts: the entry scripts its command lines run (each line's first word).
        commands: ``plan -> command lines`` (run in order), known in full before any stage runs (the
            weights an earlier stage will write are named by its command line).
        ranked: the scripts of its command lines that run on every process of a several-process run
            (``--nproc_per_node``, ``--nnodes``: through torch's launcher); the others run once, on node 0.
        trains: its results depend on the number of processes (a training: the ranks' batches and
            random streams); a run is not continued with another number while such a stage is left to run.
        reads: the list keys its command lines read (checked before it runs); it has work only in a plan
            that has them all.
        masks: the list keys whose ground-truth masks it reads (checked before it runs).
        when: a further condition of having work (None: none).
        shared: whether it is common to the seeds of a ``--seeds`` run (run once in the root; None: never).
        needs: what else it needs first (:data:`NEEDS`).
        settings: the protocol's settings keys its command lines take.
        figures: the results it writes for the table.
        upload: an archive of its output (in its folder) for an evaluation server: the table names it, with
            the published figure of the stage's name in :data:`protocol.rows.PUBLISHED`, and the list it reads first.
        writes_results: the runner writes ``results.json`` and ``results.md`` (protocol/results.py) after
            its command lines, prints the table when a run reaches it, and then writes a ``--seeds`` table.
        extra: optional: runs only where the protocol names it in ``extras``.
        absent: what ``--status`` says where it has no work.
    """

    name: str
    scripts: tuple[str, ...]
    commands: Callable[[Plan], list[list[str]]]
    ranked: tuple[str, ...] = ()
    trains: bool = False
    reads: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    when: Callable[[Plan], bool] | None = None
    shared: Callable[[Plan], bool] | None = None
    needs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    figures: tuple[Figure, ...] = ()
    upload: str | None = None
    writes_results: bool = False
    extra: bool = False
    absent: str = "not in this run"


@dataclass
class Plan:
    """The lists, settings, folders and stage table of one run (what :func:`commands` turns into command lines).

    ``run_dir`` is this run's folder (``<root>/seed<S>`` for one seed of ``--seeds``); ``root`` the
    folder of the stages shared by the seeds (:meth:`shared`) and of ``run.json``; ``seed``: the
    ``--seed`` given to the training scripts (None: their default); ``stages``: the stage table, in
    order; ``given``: each list as the protocol spells it (for the messages on a missing list);
    ``launch``: the processes and machines its model stages run on.
    """

    args: argparse.Namespace
    protocol: Protocol
    run_dir: Path
    lists: dict[str, str]
    root: Path
    stages: tuple[Stage, ...]
    seed: int | None = None
    given: dict[str, str] = field(default_factory=dict)
    launch: Launch = Launch()

    @property
    def names(self) -> list[str]:
        """The stages' names, in order."""
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage:
        """The record of stage ``name``."""
        for record in self.stages:
            if record.name == name:
                return record
        raise ValueError(f"no stage {name!r} in this plan's table ({', '.join(self.names)})")

    def shared(self, stage: str) -> bool:
        """Whether ``stage`` is common to the seeds of the root (run once there)."""
        share = self.stage(stage).shared
        return self.root != self.run_dir and share is not None and share(self)

    def home(self, stage: str) -> Path:
        """The folder of ``stage``'s output, marker and log."""
        return self.root if self.shared(stage) else self.run_dir

    def out(self, stage: str) -> Path:
        return self.home(stage) / stage

    def settings(self, key: str) -> list[str]:
        """The protocol's extra flags of settings key ``key``."""
        return list(self.protocol.settings.get(key, []))

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` has work in this plan: named by the protocol when optional, its lists in the
        plan, its own condition met."""
        record = self.stage(stage)
        if record.extra and stage not in self.protocol.extras:
            return False
        return all(k in self.lists for k in record.reads) and (record.when is None or record.when(self))


def cams_name(plan: Plan) -> str:
    """What the TransCAM stage's CAMs are in this run: refined by attention, or the CNN CAMs."""
    return "TransCAM CAMs" if plan.args.refine == "attention" else "CNN CAMs (TransCAM CAMs unrefined)"


def commands(plan: Plan, stage: str) -> list[list[str]]:
    """The entry-script command lines of ``stage`` (run in order; [] when the stage has nothing to do)."""
    return plan.stage(stage).commands(plan) if plan.runs(stage) else []


def script_parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Entry script -> its ``get_args_parser`` (imported here: the scripts import torch)."""
    import evaluation_bao
    import infer_bao
    import infer_seg
    import train_bao
    import train_seg
    import visual_bao

    return {f"{m.__name__}.py": m.get_args_parser
            for m in (train_bao, infer_bao, evaluation_bao, visual_bao, train_seg, infer_seg)}


def check_commands(plan: Plan) -> None:
    """Parse every command line of the plan with its script's own parser: a flag the script does not
    know, or a bad value, is one UserError naming the stage, before any stage runs. A line of a program
    that is not an entry script (a stage a test adds) is left to that program."""
    parsers = script_parsers()
    for record in plan.stages:
        for cmd in commands(plan, record.name):
            if cmd[0] not in record.scripts:
                raise ValueError(f"stage {record.name} runs {cmd[0]}, which its record does not name in scripts")
            if cmd[0] not in parsers:
                continue
            parser = parsers[cmd[0]]()
            keys = " / ".join(record.settings) or "none"

            def refuse(message: str, stage: str = record.name, script: str = cmd[0], keys: str = keys) -> None:
                raise UserError(f"stage {stage}: {script} refuses its command line: {message} (check the protocol's "
                                f"settings that reach it: {keys})")

            parser.error = refuse  # argparse reports every parse error through error()
            parsed, world = parser.parse_args(cmd[1:]), plan.launch.world_size
            if record.trains and cmd[0] in record.ranked and parsed.batch_size % world:
                raise UserError(f"stage {record.name}: {cmd[0]}'s --batch_size {parsed.batch_size} is the global batch "
                                f"and does not divide by the {world} processes ({plan.launch.describe()}); change "
                                f"the number of processes or the protocol's batch size (settings: {keys})")


def _missing_list(plan: Plan, key: str) -> UserError:
    """The refusal of a list file that is not there: the path tried, and where it came from."""
    path, given = plan.lists[key], plan.given.get(key, plan.lists[key])
    hint = " (python -m coco14.prepare_coco writes the COCO lists)" if plan.args.dataset == "coco" else ""
    if given != path and not given.startswith(("{repo}", "{root}")):
        hint += f" (the protocol's {given!r}, resolved from the protocol file's folder {plan.protocol.base})"
    elif given != path:
        hint += f" (the protocol's {given!r})"
    return UserError(f"the {key} list {path} is missing{hint}")


def check_prerequisites(plan: Plan, stages: list[str]) -> None:
    """Everything the ``stages`` to run need (their records' needs, lists and masks), checked before the
    first one starts (one UserError)."""
    a = plan.args
    records = [plan.stage(s) for s in stages if plan.runs(s)]
    needs = {n for r in records for n in r.needs}
    needs_start = a.start != "scratch" and (
        "weights" in needs or (a.start == "transcam" and "transcam_weights" in needs))
    if a.start == "scratch" and a.weights:
        raise UserError("--start scratch trains the TransCAM stage from random initialisation: drop --weights")
    if needs_start and not a.weights:
        raise UserError(f"give --weights ({'TransCAM' if a.start == 'transcam' else 'ImageNet Conformer'} weights)")
    if needs_start and not Path(a.weights).is_file():
        raise UserError(f"weights file not found: {a.weights}")
    if "backbone" in needs and not a.seg_from_scratch:
        if not a.backbone_weights:
            raise UserError("give --backbone_weights (ImageNet ResNet-101, torchvision's layout) or --seg_from_scratch")
        if not Path(a.backbone_weights).is_file():
            raise UserError(f"backbone weights not found: {a.backbone_weights}")
    spec = dataset_from_args(a)
    read = {k for r in records for k in r.reads}
    masks = {k for r in records for k in r.masks}
    for key in (k for k in LIST_KEYS if k in read | masks and k in plan.lists):
        path = plan.lists[key]
        if not Path(path).is_file():
            raise _missing_list(plan, key)
        names = read_list(path)
        spec.layout.check(names, path)
        if key in masks:
            spec.layout.check_masks(names, path)


def definition(plan: Plan) -> dict:
    """What makes a run's results what they are: kept in ``run.json``, and a rerun must agree with it."""
    p = plan.protocol
    return {"dataset": plan.args.dataset, "refine": plan.args.refine, "start": plan.args.start,
            "seg_from_scratch": plan.args.seg_from_scratch, "crf_backend": resolve_backend(plan.args.crf_backend),
            "lists": plan.lists, "settings": p.settings,
            "extras": list(p.extras), "fixed_t": p.fixed_t, "published": p.published,
            "seed": plan.seed if plan.run_dir == plan.root else "one folder per seed",
            "processes": plan.launch.world_size, "nodes": plan.launch.nnodes}


def _differences(before, now, name: str) -> list[str]:
    """``name old -> new`` for every value that differs, descending into dicts (``settings.bao ...``)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in sorted(set(before) | set(now), key=str)
                for d in _differences(before.get(k), now.get(k), f"{name}.{k}" if name else str(k))]
    return [] if before == now else [f"{name} {before} -> {now}"]


def check_definition(plan: Plan, todo: Sequence[str] = ()) -> None:
    """Write ``run.json`` on a new run; refuse a rerun whose :func:`definition` differs (its finished
    stages would be mixed with stages of other settings), naming every setting that differs.

    The number of processes (and of machines) is the one setting a rerun may change, once no training
    stage is among the stages ``todo`` (inference shards its list by image and gives the same files on
    any number; training does not): ``run.json`` keeps the numbers that trained."""
    path = plan.root / "run.json"
    now = definition(plan)
    if path.is_file():
        # a run made before "published", "seed", "crf_backend", "processes" and "nodes" were recorded had none
        # of them (published figures change no result; its CRF was the one "auto" gives here; one process)
        before = {"published": now["published"], "seed": None, "crf_backend": now["crf_backend"], "processes": 1,
                  "nodes": 1, **json.loads(path.read_text())}
        changed = _differences({**before, "processes": now["processes"], "nodes": now["nodes"]}, now, "")
        if changed:
            raise UserError(f"{plan.root} holds a run made with other settings ({'; '.join(changed)}); rerun it "
                            "with the same flags and protocol, or give another --run_dir")
        training = [s for s in todo if plan.runs(s) and plan.stage(s).trains]
        if before["processes"] != now["processes"] and training:
            raise UserError(f"{plan.root} trains on {before['processes']} processes (run.json) and its training stage "
                            f"{', '.join(training)} is left to run, which {now['processes']} would train otherwise: "
                            f"rerun with {before['processes']} processes in all (--nproc_per_node x --nnodes), or give "
                            "another --run_dir")
        return
    plan.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(now, indent=1) + "\n")
