"""The runner on several processes and machines (protocol/launch.py, protocol/torchrun.py): the model
stages through torch's launcher (gloo on CPU), two "nodes" on this machine, a SIGKILLed runner
inside a two-process stage, the printed commands run by bash, and the launch flags' refusals.

Every run sets OMP_NUM_THREADS=1: torch's launcher sets it for its ranks, and a one-process run on
another thread count adds its floats in another order (its CAMs then differ in the last bit).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from protocol import pipeline
from tests.helpers import ROOT, assert_refused, call_main, run_script

TRAIN = ["--arch", "tiny", "--max_epoches", "1", "--crop_size", "64", "--resize_long", "48", "80", "--batch_size", "4",
         "--num_workers", "0"]
INFER = ["--arch", "tiny", "--scales", "32,64", "--num_workers", "0"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
BAO = Path("bao") / "bao" / "bao_0epochs_modelt.pth"  # the last epoch's teacher: the weights the later stages read

# Measured on this VM (AMD EPYC, 2 cores) with the tiny settings above (3 AdamW steps): the weights of
# two processes and of one differ by up to 3.0e-4 (the steps moved them by 1.5e-4): each rank's batch
# normalisation sees its half of the global batch, as on several GPUs without synchronised batch norm.
TWO_VS_ONE_PARAM_TOL = 1e-3


@pytest.fixture(scope="module")
def protocol_json(voc_root, tmp_path_factory) -> Path:
    """A small protocol through the pseudo-labels and the table: BAO, pseudo_score, eval_score, table."""
    sets = voc_root / "ImageSets" / "Segmentation"
    path = tmp_path_factory.mktemp("protocol") / "small.json"
    path.write_text(json.dumps({"lists": {"train": str(sets / "train.txt"), "score": str(sets / "val.txt")},
                                "published": "voc", "settings": {"bao": TRAIN, "infer": INFER}}))
    return path


def _argv(voc_root: Path, weights: Path, protocol: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "protocol.pipeline", "--run_dir", str(run_dir), "--protocol", str(protocol), "--weights", str(weights),
            "--device", "cpu", "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"), *extra]


def _runner(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    done = run_script(*argv, env=ONE_THREAD, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def one_process(voc_root, tiny_transcam_weights, protocol_json, tmp_path_factory) -> Path:
    """The small protocol run by the runner on one process: the reference."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _runner(*_argv(voc_root, tiny_transcam_weights, protocol_json, run_dir))
    return run_dir


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["results"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------- inference: the same files on N = 2

@pytest.mark.slow
def test_two_processes_per_stage_give_the_pseudo_labels_and_scores_of_one(one_process, voc_root, tiny_transcam_weights,
                                                                         protocol_json, tmp_path):
    # the same BAO weights: the one-process run's finished BAO stage, then every later stage on two processes
    run_dir = tmp_path / "two"
    (run_dir / "stages").mkdir(parents=True)
    shutil.copytree(one_process / "bao", run_dir / "bao")
    shutil.copy(one_process / "stages" / "bao.json", run_dir / "stages")
    shutil.copy(one_process / "run.json", run_dir)  # trained on one process: resumed on two (no training left)
    out = _runner(*_argv(voc_root, tiny_transcam_weights, protocol_json, run_dir, "--nproc_per_node", "2")).stdout
    assert "== bao: done before, skipped" in out
    log = (run_dir / "logs" / "pseudo_score.log").read_text()
    assert log.count("protocol.torchrun --nproc_per_node 2 --standalone") == 2  # both infer_bao.py lines
    assert log.count("rank 0 of 2 takes 3") == 2 and "Traceback" not in log
    assert _results(run_dir) == _results(one_process)
    files = sorted(p.relative_to(one_process) for p in (one_process / "pseudo_score").rglob("*.p*"))
    assert len([p for p in files if p.suffix == ".png"]) == 6
    differing = [str(p) for p in files if (run_dir / p).read_bytes() != (one_process / p).read_bytes()]
    assert not differing, differing  # the pseudo-label PNGs, and the CAMs' .npz files
    for name in ("bao_maps.json", "transcam.json"):  # every threshold of the sweeps
        assert json.loads((run_dir / "eval_score" / name).read_text())["sweep"] == \
            json.loads((one_process / "eval_score" / name).read_text())["sweep"]


# ------------------------------------------- training: two processes, two nodes, a SIGKILLed runner

def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ranks(pid: int) -> list[int]:
    return [p for p in _descendants(pid) if b"train_bao.py" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
def test_two_process_training_two_nodes_and_a_stopped_runner(one_process, voc_root, tiny_transcam_weights,
                                                               protocol_json, tmp_path):
    until_bao = ("--until", "bao")
    two = tmp_path / "two"
    _runner(*_argv(voc_root, tiny_transcam_weights, protocol_json, two, "--nproc_per_node", "2", *until_bao))
    log = (two / "logs" / "bao.log").read_text()
    assert "bao training on cpu x2 (amp off): 12 images, 3 steps per epoch" in log and "done: 3 steps" in log
    reference = _weights(two / BAO)
    one = _weights(one_process / BAO)
    params = [k for k in one if one[k].is_floating_point() and "running_" not in k]
    worst = max((reference[k].double() - one[k].double()).abs().max().item() for k in params)
    assert 0 < worst <= TWO_VS_ONE_PARAM_TOL, worst

    # two nodes of one process each (this machine, a localhost rendezvous): the weights of one node of two
    nodes = tmp_path / "nodes"
    endpoint = ("--nnodes", "2", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}")
    argv = [sys.executable, *_argv(voc_root, tiny_transcam_weights, protocol_json, nodes, *endpoint, *until_bao)]
    env = {**os.environ, **ONE_THREAD}
    procs = [subprocess.Popen([*argv, "--node_rank", str(r)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert (nodes / "stages" / "bao.json").is_file() and (nodes / "logs" / "bao.node1.log").is_file()
    assert "--node_rank 1" in (nodes / "logs" / "bao.node1.log").read_text()
    assert not (nodes / "logs" / "pseudo_score.node1.log").exists()  # --until bao on every node
    weights = _weights(nodes / BAO)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)

    # the runner stopped by SIGTERM, then SIGKILLed, inside the two-process stage: SIGTERM ends it with
    # its status and one line, without torchrun's traceback; after either no process of the run is left
    killed = tmp_path / "killed"
    for stop in (signal.SIGTERM, signal.SIGKILL):
        runner = subprocess.Popen([sys.executable, *_argv(voc_root, tiny_transcam_weights, protocol_json, killed,
                                                          "--nproc_per_node", "2", *until_bao)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while len(_ranks(runner.pid)) < 2:
            assert runner.poll() is None and time.monotonic() < deadline, "the two ranks did not start"
            time.sleep(0.05)
        run = _descendants(runner.pid)  # torch's launcher and its two ranks
        assert len(run) >= 3
        runner.send_signal(stop)
        out = runner.communicate(timeout=60)[0].decode()
        gone_by = time.monotonic() + 5
        while any(_alive(p) for p in run) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not [p for p in run if _alive(p)], (stop, [_cmdline(p)[:120] for p in run if _alive(p)])
        if stop == signal.SIGTERM:
            assert runner.returncode == 128 + signal.SIGTERM and "Traceback" not in out, out[-3000:]
            assert "stopped by SIGTERM" in out and out.rstrip().endswith("terminated (SIGTERM)"), out[-3000:]
    assert not (killed / "stages" / "bao.json").exists()
    _runner(*_argv(voc_root, tiny_transcam_weights, protocol_json, killed, "--nproc_per_node", "2", *until_bao))
    weights = _weights(killed / BAO)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


# ------------------------------------------------------------------------------ --print_commands

@pytest.mark.slow
def test_printed_commands_run_by_bash_give_the_runner_s_results(one_process, voc_root, tiny_transcam_weights,
                                                               protocol_json, tmp_path, capsys):
    run_dir = tmp_path / "printed"
    argv = _argv(voc_root, tiny_transcam_weights, protocol_json, run_dir, "--print_commands")[2:]
    code, printed, err = call_main("protocol.pipeline", argv, capsys)
    assert code == 0, err
    assert not run_dir.exists()  # printing runs nothing
    lines = [line for line in printed.splitlines() if line and not line.startswith("#")]
    finishes = [line.split("--finish_stage ")[1].split()[0] for line in lines if "--finish_stage" in line]
    assert finishes == ["bao", "pseudo_score", "eval_score", "table"]
    # the BAO stage done (the one-process run's: its weights are the runner's), the printed rest run by bash
    (run_dir / "stages").mkdir(parents=True)
    shutil.copytree(one_process / "bao", run_dir / "bao")
    shutil.copy(one_process / "stages" / "bao.json", run_dir / "stages")
    code, printed, err = call_main("protocol.pipeline", argv, capsys)
    assert code == 0, err
    assert [line.split("--finish_stage ")[1].split()[0] for line in printed.splitlines() if "--finish_stage" in line] \
        == ["pseudo_score", "eval_score", "table"]
    script = tmp_path / "protocol.sh"
    script.write_text(printed)
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env={**os.environ, **ONE_THREAD}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _results(run_dir) == _results(one_process)
    assert "| BAO pseudo-labels, threshold-free |" in done.stdout
    code, status, err = call_main("protocol.pipeline", ["--run_dir", str(run_dir), "--status"], capsys)
    assert code == 0, err
    states = dict(line.split(None, 1) for line in status.splitlines())
    assert {s: state for s, state in states.items() if not state.startswith("not in this run")} == {
        "bao": states["bao"], **dict.fromkeys(["pseudo_score", "eval_score", "table"], "done (its printed commands)")}
    assert states["bao"].startswith("done in")
    code, again, err = call_main("protocol.pipeline", argv, capsys)
    assert code == 0 and "--finish_stage" not in again, err  # every stage done: only the runner's own line is left


def test_printed_commands_of_two_processes_and_of_a_second_node(voc_root, tiny_transcam_weights, protocol_json,
                                                                tmp_path, capsys):
    run_dir = tmp_path / "r"
    base = _argv(voc_root, tiny_transcam_weights, protocol_json, run_dir)[2:]
    code, out, err = call_main("protocol.pipeline", [*base, "--print_commands", "--nproc_per_node", "2"], capsys)
    assert code == 0, err
    launched = [line for line in out.splitlines() if "protocol.torchrun" in line]
    assert len(launched) == 3 and all("--nproc_per_node 2 --standalone" in line for line in launched)
    assert [line.split("protocol.torchrun")[1].split()[3].rsplit("/", 1)[-1] for line in launched] == [
        "train_bao.py", "infer_bao.py", "infer_bao.py"]
    assert sum("evaluation_bao.py" in line and "torchrun" not in line for line in out.splitlines()) == 3

    node = ["--nnodes", "2", "--rdzv_endpoint", "node0.cluster:29400", "--nproc_per_node", "2"]
    code, out, err = call_main("protocol.pipeline", [*base, "--print_commands", *node, "--node_rank", "1"], capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(lines) == 3 and all("--nnodes 2 --node_rank 1" in line for line in lines)  # the ranked lines only
    assert [line.split("--rdzv_endpoint ")[1].split()[0] for line in lines] == [
        "node0.cluster:29400", "node0.cluster:29401", "node0.cluster:29402"]  # one port per line
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("flags, phrases", [
    (["--nproc_per_node", "0"], ["--nproc_per_node 0", "at least 1"]),
    (["--nnodes", "2"], ["--nnodes 2", "--rdzv_endpoint"]),
    (["--nnodes", "2", "--rdzv_endpoint", "h:29500", "--node_rank", "2"], ["--node_rank 2", "0 to 1"]),
    (["--node_rank", "-1"], ["--node_rank -1", "out of range"]),
    (["--nnodes", "2", "--rdzv_endpoint", "h"], ["HOST:PORT"]),
    (["--nproc_per_node", "3"], ["--batch_size 4", "3 processes", "settings: train / bao"]),
])
def test_bad_launch_flags_are_refused_in_one_line_before_anything_is_written(flags, phrases, voc_root,
                                                                             tiny_transcam_weights, protocol_json,
                                                                             tmp_path, capsys):
    run_dir = tmp_path / "r"
    code, _, err = call_main("protocol.pipeline", _argv(voc_root, tiny_transcam_weights, protocol_json, run_dir,
                                                        *flags)[2:], capsys)
    assert_refused(code, err, *phrases)
    assert not run_dir.exists()


def test_more_processes_than_gpus_is_refused(voc_root, tiny_transcam_weights, protocol_json, tmp_path, capsys,
                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    argv = _argv(voc_root, tiny_transcam_weights, protocol_json, tmp_path / "r", "--nproc_per_node", "4")[2:]
    code, _, err = call_main("protocol.pipeline", [*argv, "--device", "cuda"], capsys)
    assert_refused(code, err, "--nproc_per_node 4", "2 GPUs", "at most 2")
    code, _, err = call_main("protocol.pipeline", [*argv, "--device", "cuda:1"], capsys)
    assert_refused(code, err, "--device cuda:1", "own GPU")
    assert not (tmp_path / "r").exists()


def test_another_number_of_processes_continues_only_once_training_is_done(voc_root, tiny_transcam_weights,
                                                                         protocol_json, tmp_path):
    def plan(*extra: str) -> pipeline.Plan:
        argv = _argv(voc_root, tiny_transcam_weights, protocol_json, tmp_path / "r", *extra)[2:]
        return pipeline.make_plan(pipeline.get_args_parser().parse_args(argv))

    pipeline.check_definition(plan(), ["bao"])
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())
    assert recorded["processes"] == recorded["nodes"] == 1
    with pytest.raises(UserError, match=r"trains on 1 processes .* training stage bao is left to run, which "
                                                 r"2 would train otherwise"):
        pipeline.check_definition(plan("--nproc_per_node", "2"), ["bao", "pseudo_score"])
    with pytest.raises(UserError, match="bao is left to run"):
        pipeline.check_definition(plan("--nnodes", "2", "--rdzv_endpoint", "h:1000"), ["bao"])
    pipeline.check_definition(plan("--nnodes", "2", "--rdzv_endpoint", "h:1000"), ["pseudo_score", "eval_score"])
    recorded = json.loads((tmp_path / "r" / "run.json").read_text())
    assert recorded["processes"] == recorded["nodes"] == 1  # the numbers that trained
