"""Running one stage of a protocol run (protocol/pipeline.py): its command lines as programs to start
(:func:`programs`: one process, or torch's launcher on several, protocol/launch.py), run with their
output teed to the stage's log (:func:`run_stage`), stopped as the runner is stopped, and the stage
marked done (:func:`mark_done`); what ``--status`` says of each stage (:func:`status`).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from core.errors import UserError, die_with_parent, stop_signal
from core.fileio import atomic_path
from data.layout import REPO_ROOT
from protocol.launch import PORTS_USED, program, shell_line
from protocol.plan import Plan, commands
from protocol.results import write_table


def done_file(plan: Plan, stage: str) -> Path:
    return plan.home(stage) / "stages" / f"{stage}.json"


def status(plan: Plan) -> list[tuple[str, str]]:
    """(stage, "done in N s" | "partly done (resumes)" | "to do" | its record's ``absent``) for every stage."""
    states = []
    for record in plan.stages:
        stage, done = record.name, done_file(plan, record.name)
        if not plan.runs(stage):
            states.append((stage, record.absent))
        elif done.is_file():
            seconds = json.loads(done.read_text())["seconds"]
            states.append((stage, "done (its printed commands)" if seconds is None else f"done in {seconds:.0f} s"))
        elif plan.out(stage).exists():
            states.append((stage, "partly done (resumes)"))
        else:
            states.append((stage, "to do"))
    return states


def programs(plan: Plan, stage: str, ports: Iterator[int]) -> list[tuple[list[str], bool]]:
    """The stage's command lines as programs to start, in order, each with whether it runs on every
    process (a several-process line, through torch's launcher; its rendezvous port the next of ``ports``)."""
    record, out = plan.stage(stage), []
    for cmd in commands(plan, stage):
        ranked = cmd[0] in record.ranked and plan.launch.world_size > 1
        script = REPO_ROOT / cmd[0]  # absolute: the printed lines run from the user's folder
        line = [str(script) if script.is_file() else cmd[0], *cmd[1:]]
        out.append((program(plan.launch.prefix(next(ports) % PORTS_USED) if ranked else [], line), ranked))
    return out


def run_stage(plan: Plan, stage: str, ports: Iterator[int]) -> None:
    """Run the stage's commands, teeing their output to ``logs/<stage>.log``; write the results when its
    record says so; mark it done. On node r > 0 of several: its several-process lines alone, logged
    to ``logs/<stage>.node<r>.log``, and nothing marked."""
    start, leads = time.time(), plan.launch.leads
    log_name = f"{stage}.log" if leads else f"{stage}.node{plan.launch.node_rank}.log"
    log_path = plan.home(stage) / "logs" / log_name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan.out(stage).mkdir(parents=True, exist_ok=True)
    launched = plan.launch.world_size > 1
    argvs = [(argv, ranked) for argv, ranked in programs(plan, stage, ports) if leads or ranked]
    with open(log_path, "ab") as log:
        for argv, ranked in argvs:
            log.write(f"$ {shell_line(argv)}\n".encode())
            log.flush()
            # In a process group of its own: a terminal's Ctrl-C reaches the runner alone, which
            # passes every stop on (_stop_stage), however it was sent. A runner that cannot pass a
            # stop on (kill -9) takes the script with it, and the script its workers; torch's
            # launcher is sent SIGTERM instead, which it passes to its ranks (a rank still starting
            # has no parent-death signal of its own yet) before it ends.
            death = signal.SIGTERM if ranked and launched else signal.SIGKILL
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    process_group=0, preexec_fn=functools.partial(die_with_parent, os.getpid(), death))
            try:
                _pass_output(proc, log)
            except KeyboardInterrupt:
                _stop_stage(proc, log)
                raise
            if proc.wait() != 0:
                raise UserError(f"stage {stage} failed (exit {proc.returncode}); its output is in {log_path}; fix the "
                                "cause and rerun the same command, which continues from this stage")
    if leads:
        mark_done(plan, stage, time.time() - start)


def mark_done(plan: Plan, stage: str, seconds: float | None) -> None:
    """The end of a stage: the results when its record writes them, then its done marker."""
    if plan.stage(stage).writes_results:
        write_table(plan)
    with atomic_path(done_file(plan, stage)) as tmp:
        Path(tmp).write_text(json.dumps({"seconds": seconds, "commands": commands(plan, stage)}, indent=1) + "\n")


def _stop_stage(proc: subprocess.Popen, log) -> None:
    """Stop the stage's script as the runner was stopped (Ctrl-C or ``kill -INT``: SIGINT; SIGTERM:
    SIGTERM) and let it save, passing its output on until it ends; a second stop while it saves is
    passed on too, as a terminal would pass it. torch's launcher passes the stop to its ranks."""
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
