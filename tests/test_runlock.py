"""One writer per run folder (core.runlock), and stopping by signal.

- The lock: a second process is refused with one line naming the holder, and changes nothing;
  a SIGKILLed holder leaves no lock behind; a refused or finished run removes what the lock made.
- train_bao.py and the protocol runner started twice on one folder: the second is refused and
  changes no file; the first runner ends as an undisturbed run does; a SIGKILLed first training
  is resumed by a rerun to the undisturbed run's weights.
- SIGTERM to training (resumable checkpoint) and to infer_bao.py with CRF workers (complete files
  only): one line, exit 143, no process of the run left; after SIGKILL of the main process too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.fileio import is_temporary
from core.palette import read_label_png
from core.runlock import LOCK_NAME, RunLock, lock_holder
from tests.helpers import ROOT, assert_no_partial_files, assert_refused, run_script

# Holds the lock on argv[1] until the file argv[2] exists (or forever).
HOLD = """
import sys, time
from pathlib import Path
from core.runlock import RunLock
with RunLock(sys.argv[1], "wait for it"):
    print("locked", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{what}: the process ended ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``folder``: its mtime and bytes (folders: their mtime)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in [folder, *folder.rglob("*")]}


def _refused_line(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert_refused(proc.returncode, proc.stderr, "is in use by another run", *phrases)


# ------------------------------------------------------------------------------- the lock

def test_second_process_is_refused_with_the_holder_and_changes_nothing(tmp_path):
    folder, go = tmp_path / "run", tmp_path / "go"
    holder = _start(HOLD, str(folder), str(go))
    assert holder.stdout.readline() == "locked\n"
    info = lock_holder(folder)
    assert info["pid"] == holder.pid and info["host"] and info["start"] and "-c" in info["command"]
    before = _snapshot(folder)
    second = run_script("-c", "import sys; from core.errors import run_guarded; from core.runlock import RunLock\n"
                     "def main(_):\n    with RunLock(sys.argv[1], 'or give another --out'):\n        print('ran')\n"
                     "run_guarded(main, None)", str(folder))
    _refused_line(second, f"PID {holder.pid} on {info['host']}", f"started {info['start']}", "or give another --out")
    assert "ran" not in second.stdout
    assert _snapshot(folder) == before
    with pytest.raises(UserError, match=f"PID {holder.pid}"):  # in this process too
        RunLock(folder, "wait").__enter__()
    go.touch()
    assert holder.wait(30) == 0
    assert lock_holder(folder) is None and not (folder / LOCK_NAME).exists()
    with RunLock(folder, "wait"):  # free again
        assert lock_holder(folder)["pid"] == os.getpid()


def test_a_sigkilled_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = _start(HOLD, str(folder), str(tmp_path / "never"))
    assert holder.stdout.readline() == "locked\n"
    holder.kill()
    holder.wait()
    assert (folder / LOCK_NAME).exists()  # the file stays, its lock went with the process
    assert lock_holder(folder) is None
    with RunLock(folder, "wait"):
        assert lock_holder(folder)["pid"] == os.getpid()


def test_the_lock_removes_the_folders_it_made_when_nothing_was_written(tmp_path):
    with pytest.raises(ValueError):
        with RunLock(tmp_path / "a" / "b", "wait"):
            raise ValueError("refused for its flags")
    assert list(tmp_path.iterdir()) == []
    with RunLock(tmp_path / "a" / "b", "wait"):
        (tmp_path / "a" / "b" / "out.txt").write_text("x")
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out.txt"]
    assert lock_holder(tmp_path / "missing") is None


# ------------------------------------------------------------------------------ training

# train_bao.py whose first process waits, holding its run directory, before optimisation step
# argv[1] (1-based) until the file argv[2] exists.
PAUSED_TRAINING = """
import sys, time
from pathlib import Path
import train_bao
from apps.cli import run_cli

pause_at, go = int(sys.argv[1]), Path(sys.argv[2])
step = train_bao.BAOTraining._step


def paused_step(self, engine, batch):
    if engine.pos.global_step + 1 == pause_at:
        Path(str(go) + ".waiting").touch()
        while not go.exists():
            time.sleep(0.01)
    return step(self, engine, batch)


train_bao.BAOTraining._step = paused_step
sys.argv = ["train_bao.py", *sys.argv[3:]]
run_cli(train_bao.main, train_bao.get_args_parser().parse_args())
"""


def _train_args(voc_root: Path, weights: Path, save_dir: Path, *extra: str) -> list[str]:
    # 12 images, batch 4: 3 steps per epoch, 2 epochs.
    return ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--train_list", str(voc_root / "ImageSets" / "Segmentation" / "train.txt"), "--weights", str(weights),
            "--max_epoches", "2", "--save_dir", str(save_dir), *extra]


WEIGHT_FILES = ("bao_0epochs_modelt.pth", "bao_0epochs_models.pth", "bao_1epochs_modelt.pth", "bao_1epochs_models.pth")


def _same_weights(got: Path, expected: Path) -> None:
    for name in WEIGHT_FILES:
        a, b = torch.load(got / name, weights_only=True), torch.load(expected / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def undisturbed(voc_root, tiny_transcam_weights, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("undisturbed")
    proc = run_script("train_bao.py", *_train_args(voc_root, tiny_transcam_weights, save))
    assert proc.returncode == 0, proc.stderr
    return save / "bao"


@pytest.mark.slow
def test_training_started_twice_refuses_the_second_and_a_sigkilled_first_resumes(
        voc_root, tiny_transcam_weights, undisturbed, tmp_path):
    go = tmp_path / "go"
    args = _train_args(voc_root, tiny_transcam_weights, tmp_path / "runs")
    first = _start(PAUSED_TRAINING, "5", str(go), *args)  # paused inside epoch 2, epoch 1 saved
    _wait_for(Path(str(go) + ".waiting").exists, first, "the first run did not reach its second epoch")
    run_dir = tmp_path / "runs" / "bao"
    assert lock_holder(run_dir)["pid"] == first.pid
    before = _snapshot(run_dir)
    for extra in ([], ["--resume", "auto"]):  # refused before --resume looks at the first run's checkpoint
        second = run_script("train_bao.py", *args, *extra)
        _refused_line(second, f"PID {first.pid}", "train_bao.py", "--session_name or --save_dir")
        assert _snapshot(run_dir) == before
    first.kill()
    first.wait()
    rerun = run_script("train_bao.py", *args, "--resume", "auto")
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout and "at end of epoch 1" in rerun.stdout
    _same_weights(run_dir, undisturbed)
    assert {p.name for p in run_dir.iterdir()} == {p.name for p in undisturbed.iterdir()}  # no lock file left


def _descendants(pid: int) -> set[int]:
    """The living processes below ``pid`` (from /proc: parent PIDs)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                living.add(pid)
        except OSError:
            pass
    return living


def _all_gone(pids: set[int], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pids), [Path(f"/proc/{p}/cmdline").read_bytes() for p in _alive(pids)]


def _last_line(err: str) -> str:
    return err.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_training_with_a_resumable_checkpoint(voc_root, tiny_transcam_weights, tmp_path):
    args = _train_args(voc_root, tiny_transcam_weights, tmp_path, "--max_epoches", "100", "--log_every", "1")
    args[args.index("--num_workers") + 1] = "1"
    proc = subprocess.Popen([sys.executable, "train_bao.py", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    log = tmp_path / "bao" / "log.jsonl"
    _wait_for(lambda: log.is_file() and '"step"' in log.read_text(), proc, "training did not start")
    workers = _descendants(proc.pid)
    assert workers  # the loader worker
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and _last_line(err) == "terminated (SIGTERM)"
    assert "SIGTERM received" in out and "resumable checkpoint" in out
    assert torch.load(tmp_path / "bao" / "checkpoint.pth", weights_only=True)["position"]["global_step"] >= 1
    assert_no_partial_files(tmp_path / "bao")
    assert lock_holder(tmp_path / "bao") is None
    _all_gone(workers)


# ----------------------------------------------------------------------------- inference

def _crf_inference(voc_root: Path, weights: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "infer_bao.py", "--voc12_root", str(voc_root), "--label_file",
           str(voc_root / "cls_labels.json"), "--infer_list", str(voc_root / "ImageSets/Segmentation/train.txt"),
           "--weights", str(weights), "--arch", "tiny", "--scales", "64,128", "--num_workers", "0", "--batch_size",
           "1", "--device", "cpu", "--out_crf", str(out), "--crf_workers", "2"]
    return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_inference_leaves_complete_files_and_no_worker(voc_root, tiny_bao_weights, tmp_path, sig):
    out = tmp_path / "crf"
    proc = _crf_inference(voc_root, tiny_bao_weights, out)
    # CRF workers and the multiprocessing resource tracker: two or more processes below the main one.
    _wait_for(lambda: len(_descendants(proc.pid)) >= 3 and out.is_dir()
              and any(not is_temporary(p.name) for p in out.glob("*.png")), proc, "inference did not start")
    workers = _descendants(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert "Traceback" not in err and _last_line(err) == "terminated (SIGTERM)"
    else:
        assert proc.returncode == -signal.SIGKILL
    _all_gone(workers)
    done = [p for p in out.iterdir() if not is_temporary(p.name)]
    assert 0 < len(done) <= 12
    for path in done:  # whatever carries an output name is complete
        assert read_label_png(path).ndim == 2
    if sig == signal.SIGTERM:  # the running CRF tasks finished their files; no temporary is left
        assert_no_partial_files(out)


# ------------------------------------------------------------------------------- the runner

# The protocol runner on the tiny dataset up to the BAO stage; argv: voc_root, weights, run_dir,
# and a file: the runner waits, holding its run folder, until it exists ("" : no wait).
RUNNER = """
import sys, time
from pathlib import Path
from apps.cli import run_cli
from protocol import pipeline, stagerun

voc_root, weights, run_dir, go = sys.argv[1:5]
sets = Path(voc_root) / "ImageSets" / "Segmentation"
train = ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0", "--max_epoches", "2"]
protocol = pipeline.Protocol(lists={"train": str(sets / "train.txt"), "score": str(sets / "val.txt")},
                             settings={"bao": train})
run_stage = stagerun.run_stage


def paused(plan, stage, ports):
    while go and not Path(go).exists():
        Path(go + ".waiting").touch()
        time.sleep(0.01)
    run_stage(plan, stage, ports)


stagerun.run_stage = paused


def main(args):
    pipeline.run(pipeline.make_plan(args, protocol), show_table=False)


argv = ["--run_dir", run_dir, "--weights", weights, "--device", "cpu", "--voc12_root", voc_root, "--label_file",
        str(Path(voc_root) / "cls_labels.json"), "--until", "bao"]
run_cli(main, pipeline.get_args_parser().parse_args(argv))
"""


@pytest.mark.slow
def test_runner_started_twice_refuses_the_second_and_status_reads_the_run(
        voc_root, tiny_transcam_weights, undisturbed, tmp_path):
    run_dir, go = tmp_path / "protocol", tmp_path / "go"
    first = _start(RUNNER, str(voc_root), str(tiny_transcam_weights), str(run_dir), str(go))
    _wait_for(Path(str(go) + ".waiting").exists, first, "the first runner did not start")
    before = _snapshot(run_dir)
    second = run_script("-c", RUNNER, str(voc_root), str(tiny_transcam_weights), str(run_dir), "")
    _refused_line(second, f"PID {first.pid}", "give another --run_dir")
    status = run_script("-m", "protocol.pipeline", "--run_dir", str(run_dir), "--status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"a run is in progress: PID {first.pid} on ")
    assert json.loads((run_dir / "run.json").read_text())["start"] == "transcam"  # status read the recorded run
    assert _snapshot(run_dir) == before
    go.touch()
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    _same_weights(run_dir / "bao" / "bao", undisturbed)
    assert not (run_dir / LOCK_NAME).exists()
    status = run_script("-m", "protocol.pipeline", "--run_dir", str(run_dir), "--status")
    assert "in progress" not in status.stdout and "bao            done" in status.stdout


# The runner with a one-stage table: a script that writes its PID, then sleeps without a word (a
# stage whose output pipe would never tell it that the runner is gone). argv: voc_root, run_dir.
SILENT_STAGE_RUNNER = """
import sys
from pathlib import Path
from apps.cli import run_cli
from protocol import pipeline, stagerun
from protocol.plan import Stage

voc_root, run_dir = sys.argv[1:3]
sets = Path(voc_root) / "ImageSets" / "Segmentation"
protocol = pipeline.Protocol(lists={"train": str(sets / "train.txt"), "score": str(sets / "val.txt")})
code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
silent = Stage("silent", ("-c",), lambda plan: [["-c", code, str(Path(run_dir) / "stage.pid")]],
               reads=("train",))


def main(args):
    pipeline.run(pipeline.make_plan(args, protocol, stages=(silent,)), show_table=False)


argv = ["--run_dir", run_dir, "--start", "scratch", "--device", "cpu", "--voc12_root", voc_root]
run_cli(main, pipeline.get_args_parser().parse_args(argv))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl")
def test_a_sigkilled_runner_takes_a_silent_stage_with_it(voc_root, tmp_path):
    run_dir = tmp_path / "protocol"
    pid_file = run_dir / "stage.pid"
    runner = _start(SILENT_STAGE_RUNNER, str(voc_root), str(run_dir))
    _wait_for(lambda: pid_file.is_file() and pid_file.read_text(), runner, "the stage did not start")
    stage = {int(pid_file.read_text())}
    assert _alive(stage)
    runner.kill()
    runner.communicate(timeout=30)
    _all_gone(stage, within=5)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl")
def test_a_sigkilled_runner_takes_its_stage_with_it_and_the_rerun_completes(
        voc_root, tiny_transcam_weights, undisturbed, tmp_path):
    """kill -9 of the runner cannot be passed on: the stage's script dies with it, and its workers with
    the script; within 5 s nothing of the run is left. The same command then continues the run to the
    weights of an undisturbed one. (This stage also writes to the runner's pipe, which ends it soon
    enough by itself; the silent stage above is the one only the kernel's parent-death signal ends.)"""
    run_dir = tmp_path / "protocol"
    runner = _start(RUNNER, str(voc_root), str(tiny_transcam_weights), str(run_dir), "")
    log = run_dir / "bao" / "bao" / "log.jsonl"
    _wait_for(lambda: log.is_file() and _descendants(runner.pid), runner, "the bao stage did not start")
    stage = _descendants(runner.pid)
    runner.kill()
    runner.communicate(timeout=30)
    _all_gone(stage, within=5)
    rerun = run_script("-c", RUNNER, str(voc_root), str(tiny_transcam_weights), str(run_dir), "")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _same_weights(run_dir / "bao" / "bao", undisturbed)
    assert (run_dir / "stages" / "bao.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_sent_to_the_runner_alone_stops_its_stage_with_a_resumable_checkpoint(
        voc_root, tiny_transcam_weights, tmp_path):
    """The stage's script runs in a process group of its own and the runner passes a stop on: a
    SIGINT to the runner alone (`kill -INT`, or a terminal's Ctrl-C, which now reaches the runner
    alone) stops the training stage at once with its checkpoint, not at the stage's end."""
    run_dir = tmp_path / "protocol"
    long_bao = RUNNER.replace('"--max_epoches", "2"', '"--max_epoches", "200", "--log_every", "1"')
    runner = _start(long_bao, str(voc_root), str(tiny_transcam_weights), str(run_dir), "")
    log = run_dir / "bao" / "bao" / "log.jsonl"
    _wait_for(lambda: log.is_file() and '"step"' in log.read_text(), runner, "the bao stage did not start training")
    stage = _descendants(runner.pid)
    assert stage
    runner.send_signal(signal.SIGINT)
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 130, err[-2000:]
    assert "Traceback" not in err and _last_line(err) == "interrupted"
    assert "resumable checkpoint" in out  # the stage's own report, passed through
    assert torch.load(run_dir / "bao" / "bao" / "checkpoint.pth", weights_only=True)["position"]["global_step"] >= 1
    assert not (run_dir / "stages" / "bao.json").exists()
    _all_gone(stage)
