"""train_bao.py through its real command line: outputs, exact resume, Ctrl-C, faults,
flag checks and a two-process DistributedDataParallel run (gloo on CPU).

Tiny settings everywhere: arch ``tiny``, 64x64 crops, batch 4 on the 12 generated
training images, so an epoch is 3 steps.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from network.checkpoint import load_weights
from network.conformer_CAM import Net_tiny
from data.datasets import ClassificationDataset
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout
from data.transforms import TrainAugment
from tests.helpers import ROOT, assert_no_partial_files, assert_refused, call_main, deadline, run_script
from core.device import Runtime
from engine.resume import ResumableSampler, make_loader, release_workers, state_digest


def _args(voc_root: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0",
            "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--train_list", str(voc_root / "ImageSets" / "Segmentation" / "train.txt"),
            "--save_dir", str(save_dir), *extra]


def _records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def full_run(voc_root, tiny_transcam_weights, tmp_path_factory) -> Path:
    """Two uninterrupted BAO epochs (6 steps), logging every step."""
    save = tmp_path_factory.mktemp("full")
    proc = run_script("train_bao.py", *_args(voc_root, save, "--weights", str(tiny_transcam_weights),
                                          "--max_epoches", "2", "--log_every", "1"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return save / "bao"


def test_bao_run_writes_published_files_and_finite_losses(full_run, num_classes):
    expected = {"args.json", "log.txt", "log.jsonl", "checkpoint.pth", "tb"}
    for ep in (0, 1):  # published names: epochs counted from 0
        expected |= {f"bao_{ep}epochs_modelt.pth", f"bao_{ep}epochs_models.pth"}
    assert {p.name for p in full_run.iterdir()} == expected
    assert list((full_run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((full_run / "args.json").read_text())["max_epoches"] == 2

    steps = _records(full_run, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_cls", "loss_pcl", "images_per_s"))
        assert r["loss"] == pytest.approx(r["loss_cls"] + r["loss_pcl"], rel=1e-5)  # l_pcl = 1
        assert r["lr"] == 5e-5
    # first epoch: copy (m = 0); second: cosine from 0.9995 over its 3 steps
    assert [r["ema_momentum"] for r in steps[:3]] == [0.0, 0.0, 0.0]
    assert [r["ema_momentum"] for r in steps[3:]] == pytest.approx(
        [1 - 0.0005 * (math.cos(math.pi * i / 3) + 1) / 2 for i in range(3)])
    log = (full_run / "log.txt").read_text()
    assert "4 missing, kept at initialisation" in log  # the LoadReport of the TransCAM weights
    assert "float32 math: the CPU's (no TF32)" in log  # core.device.configure_math's line

    # The plain files are published-layout BAO weights; teacher and student differ after EMA.
    for name in ("bao_1epochs_modelt.pth", "bao_1epochs_models.pth"):
        load_weights(Net_tiny(num_classes=num_classes), full_run / name, purpose="bao")
    assert not _same_weights(full_run / "bao_1epochs_modelt.pth", full_run / "bao_1epochs_models.pth")
    ckpt = torch.load(full_run / "checkpoint.pth", weights_only=True)
    assert ckpt["position"] == {"epoch": 2, "step": 0, "global_step": 6}
    assert {"student", "teacher", "optimizer", "scaler", "rng", "args"} <= ckpt.keys()


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(full_run, voc_root, tiny_transcam_weights, tmp_path):
    args = _args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "2")
    first = run_script("train_bao.py", *args, "--max_steps", "4")  # stops inside the second epoch
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "bao"
    assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["position"]["step"] == 1
    second = run_script("train_bao.py", *args, "--resume", "auto")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout
    for name in ("bao_1epochs_modelt.pth", "bao_1epochs_models.pth"):
        assert _same_weights(run_dir / name, full_run / name), name


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resumes(voc_root, tiny_transcam_weights, tmp_path):
    args = _args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "50",
                 "--log_every", "1")
    proc = subprocess.Popen([sys.executable, "train_bao.py", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "bao" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and '"step"' in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "resumable checkpoint" in out + err
    run_dir = tmp_path / "bao"
    assert_no_partial_files(run_dir)
    done = torch.load(run_dir / "checkpoint.pth", weights_only=True)["position"]["global_step"]
    assert done >= 1

    resumed = run_script("train_bao.py", *args, "--resume", "auto", "--max_steps", str(done + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["position"]["global_step"] == done + 2


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(full_run, voc_root, tiny_transcam_weights, tmp_path):
    proc = run_script("train_bao.py", *_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights),
                                          "--max_epoches", "2", "--debug_fault", "nan:5"))
    assert_refused(proc.returncode, proc.stderr, "non-finite loss at epoch 2, step 2", "last good checkpoint", "--resume")
    run_dir = tmp_path / "bao"
    assert_no_partial_files(run_dir)
    assert not (run_dir / "bao_1epochs_models.pth").exists()
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert ckpt["position"] == {"epoch": 1, "step": 0, "global_step": 3}
    assert _same_weights(run_dir / "bao_0epochs_models.pth", full_run / "bao_0epochs_models.pth")
    assert _records(run_dir, "error")

    # the remedy the message names: a lower --lr, continuing from the last good checkpoint
    resumed = run_script("train_bao.py", *_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights),
                                             "--max_epoches", "2", "--resume", "auto", "--lr", "1e-5"))
    assert resumed.returncode == 0, resumed.stderr
    assert "changed on resume: --lr 5e-05 -> 1e-05" in (run_dir / "log.txt").read_text()
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert ckpt["position"]["epoch"] == 2
    assert all(g["lr"] == 1e-5 for g in ckpt["optimizer"]["param_groups"])


@pytest.mark.slow
def test_out_of_memory_names_the_flags_to_lower(voc_root, tiny_transcam_weights, tmp_path):
    proc = run_script("train_bao.py", *_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights),
                                          "--debug_fault", "oom:1"))
    assert_refused(proc.returncode, proc.stderr, "out of memory", "--batch_size", "--crop_size")
    assert not (tmp_path / "bao" / "checkpoint.pth").exists()


@pytest.mark.slow
def test_transcam_stage_from_scratch(voc_root, tmp_path, num_classes):
    proc = run_script("train_bao.py", *_args(voc_root, tmp_path, "--method", "transcam", "--from_scratch",
                                          "--max_epoches", "1", "--val_every", "1",
                                          "--val_list", str(voc_root / "ImageSets/Segmentation/val.txt")))
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "transcam"
    assert (run_dir / "transcam_0epochs.pth").is_file()
    steps = _records(run_dir, "step")
    assert steps and all("loss_pcl" not in r and "ema_momentum" not in r for r in steps)
    # No background map: validated at the best background score of the default sweep.
    (val,) = _records(run_dir, "val")
    assert val["rule"] == "best background score" and 0.05 <= val["best_t"] <= 0.95 and 0 < val["miou_pct"] < 100
    # Saved in the published TransCAM layout: the BAO heads are absent, as BAO training expects.
    report = load_weights(Net_tiny(num_classes=num_classes), run_dir / "transcam_0epochs.pth", purpose="transcam")
    assert len(report.missing) == 4


@pytest.mark.parametrize("extra,phrase", [
    (["--batch_size", "-2"], "argument --batch_size: must be >= 1, got -2"),
    (["--crop_size", "60"], "--crop_size must be a multiple of 16"),
    (["--arch", "huge"], "unknown --arch 'huge'"),
    (["--resume", "missing.pth"], "checkpoint to resume not found"),
    (["--from_scratch"], "contradict"),
    (["--eps", "1.5"], "--eps"),
    (["--debug_fault", "nan"], "--debug_fault"),
    (["--method", "cam"], "invalid choice: 'cam'"),
    (["--val_every", "1", "--val_list", "no_list.txt"], "validation list not found: no_list.txt"),
    (["--val_scales", "100"], "argument --val_scales: scales must be positive multiples of 16"),
    (["--weights", None], "weights file not found"),
    (["--weights", "", "--method", "transcam"], "give --weights (ImageNet Conformer weights) or, to train from "
                                                "random initialisation, --from_scratch"),
])
def test_bad_flags_are_refused_before_any_work(voc_root, tiny_transcam_weights, tmp_path, capsys, extra, phrase):
    # the last --weights wins: None stands for a missing file, "" for no weights
    extra = [str(tmp_path / "missing.pth") if e is None else e for e in extra]
    argv = _args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), *extra)
    code, _, err = call_main("train_bao", argv, capsys)
    assert_refused(code, err, phrase)
    assert not (tmp_path / "bao").exists()


@pytest.mark.slow
def test_bad_flags_through_the_process(voc_root, tiny_transcam_weights, tmp_path):
    proc = run_script("train_bao.py", *_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights),
                                          "--crop_size", "100"))
    assert_refused(proc.returncode, proc.stderr, "--crop_size must be a multiple of 16")
    assert not (tmp_path / "bao").exists()


def test_resume_refuses_changed_settings(full_run, voc_root, tmp_path, capsys):
    argv = _args(voc_root, tmp_path, "--resume", str(full_run / "checkpoint.pth"), "--batch_size", "2")
    code, _, err = call_main("train_bao", argv, capsys)
    assert_refused(code, err, "--batch_size 4 (now 2)")
    assert not (tmp_path / "bao").exists()


def test_refine_is_recorded_and_a_resume_with_the_other_setting_is_refused(full_run, voc_root, tmp_path, capsys):
    assert json.loads((full_run / "args.json").read_text())["refine"] == "attention"
    assert torch.load(full_run / "checkpoint.pth", weights_only=True)["args"]["refine"] == "attention"
    argv = _args(voc_root, tmp_path, "--resume", str(full_run / "checkpoint.pth"), "--refine", "none")
    code, _, err = call_main("train_bao", argv, capsys)
    assert_refused(code, err, "--refine attention (now none)")
    assert not (tmp_path / "bao").exists()


def test_checkpoint_from_before_refine_resumes_as_attention(full_run, voc_root, tmp_path, capsys):
    """A checkpoint written before --refine existed (no such setting saved) was refined by attention."""
    old = torch.load(full_run / "checkpoint.pth", weights_only=True)
    del old["args"]["refine"]
    torch.save(old, tmp_path / "old.pth")
    base = _args(voc_root, tmp_path, "--resume", str(tmp_path / "old.pth"), "--max_epoches", "2")
    code, _, err = call_main("train_bao", [*base, "--refine", "none"], capsys)
    assert_refused(code, err, "--refine attention (now none)")
    code, out, err = call_main("train_bao", base, capsys)  # all epochs done: resumes and ends at once
    assert code == 0, err


def test_transcam_stage_trains_the_same_weights_without_refinement(voc_root, tmp_path, capsys):
    """The TransCAM loss reads only the logits, which refinement does not touch: --refine none trains
    the same weights (the demo's regime without refinement shares the TransCAM stage)."""
    weights = {}
    for refine in ("attention", "none"):
        argv = _args(voc_root, tmp_path / refine, "--method", "transcam", "--from_scratch", "--max_epoches", "1",
                     "--refine", refine)
        code, _, err = call_main("train_bao", argv, capsys)
        assert code == 0, err
        weights[refine] = tmp_path / refine / "transcam" / "transcam_0epochs.pth"
    assert json.loads((tmp_path / "none" / "transcam" / "args.json").read_text())["refine"] == "none"
    assert _same_weights(weights["attention"], weights["none"])


def test_resume_refuses_plain_weights(voc_root, tiny_transcam_weights, tmp_path, capsys):
    argv = _args(voc_root, tmp_path, "--resume", str(tiny_transcam_weights))
    code, _, err = call_main("train_bao", argv, capsys)
    assert_refused(code, err, "not a resumable checkpoint")


def test_resumable_sampler_skips_exactly_the_batches_done():
    sampler = ResumableSampler(list(range(10)), num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    sampler.set_start(4)
    assert list(sampler) == order[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    sampler.set_start(0)
    assert list(sampler) != order
    keyed = ResumableSampler(list(range(10)), num_replicas=1, rank=0, seed=3, epoch_keys=True)
    keyed.set_epoch(2)
    keyed.set_start(4)
    assert list(keyed) == [(2, i) for i in order[4:]]


def test_persistent_loader_workers_draw_the_crops_of_each_epoch(voc_root):
    """make_loader with a worker keeps it across epochs (persistent_workers), and the worker still
    draws each epoch's own augmentation: the batches equal the dataset's samples keyed by
    (epoch, index), in the order of torch.randperm seeded with seed + epoch (the sampler's),
    and those of a loader without workers; a resumed epoch (start 4) yields the rest of them."""
    names = read_list(voc_root / "ImageSets" / "Segmentation" / "train.txt")
    dataset = ClassificationDataset(DatasetLayout.voc(voc_root), names, ImageLabels.load(voc_root / "cls_labels.json"),
                                    TrainAugment(crop_size=32, resize_long=(24, 72)), seed=5)
    cpu = Runtime(device=torch.device("cpu"))
    inline, inline_sampler = make_loader(dataset, default_collate, cpu, per_rank_batch=4, num_workers=0, seed=1)
    pooled, pooled_sampler = make_loader(dataset, default_collate, cpu, per_rank_batch=4, num_workers=1, seed=1)
    assert pooled.persistent_workers
    workers = None
    first_batches = []
    try:
        for epoch, start in ((0, 0), (1, 0), (2, 4)):
            for sampler in (inline_sampler, pooled_sampler):
                sampler.set_epoch(epoch)
                sampler.set_start(start)
            order = torch.randperm(len(names), generator=torch.Generator().manual_seed(1 + epoch)).tolist()[start:]
            expected = [torch.stack([dataset[(epoch, i)]["img"] for i in order[k:k + 4]])
                        for k in range(0, len(order), 4)]
            with deadline(60, f"epoch {epoch} through a loader worker"):
                got = [batch["img"] for batch in pooled]
            assert len(got) == len(expected) == (len(names) - start) // 4
            assert all(torch.equal(g, e) for g, e in zip(got, expected)), epoch
            assert all(torch.equal(b["img"], e) for b, e in zip(inline, expected)), epoch
            pids = [w.pid for w in pooled._iterator._workers]
            assert workers in (None, pids), "the loader started new workers"
            workers = pids
            first_batches.append(got[0])
    finally:  # a failed assertion keeps the loader alive: its waiting worker would hang the exit
        release_workers(pooled)
    assert not torch.equal(first_batches[0], first_batches[1])


@pytest.mark.slow
def test_validation_logs_val_miou_in_percent_and_leaves_training_unchanged(full_run, voc_root, tiny_transcam_weights,
                                                                 tmp_path, capsys):
    val = str(voc_root / "ImageSets/Segmentation/val.txt")
    proc = run_script("train_bao.py", *_args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights),
                                          "--max_epoches", "2", "--val_list", val, "--val_every", "1"))
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "bao"
    vals = _records(run_dir, "val")
    assert [(r["epoch"], r["step"], r["images"], r["rule"]) for r in vals] == [
        (1, 3, 6, "threshold-free"), (2, 6, 6, "threshold-free")]
    assert all(0 < r["miou_pct"] < 100 for r in vals)
    # printed in percent, as every other mIoU (the value is checked against the evaluation below)
    assert f"validation after epoch 2: images 6, rule threshold-free, miou_pct {vals[1]['miou_pct']:.4g}" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    assert [(e.step, e.value) for e in tb.Scalars("val/miou_pct")] == [(r["step"], pytest.approx(r["miou_pct"])) for r in vals]
    # Validating changes nothing of the training: the run without it ended with the same weights.
    for name in ("bao_1epochs_modelt.pth", "bao_1epochs_models.pth"):
        assert _same_weights(run_dir / name, full_run / name), name
    # The logged mIoU is that of the saved teacher's threshold-free pseudo-labels, as infer_bao.py
    # writes them (at the validation's single scale, the crop size) and evaluation_bao.py scores them.
    common = ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json")]
    code, _, err = call_main("infer_bao", [*common, "--weights", str(run_dir / "bao_1epochs_modelt.pth"), "--arch",
                                           "tiny", "--scales", "64", "--num_workers", "0", "--device", "cpu",
                                           "--infer_list", val, "--out_pred", str(tmp_path / "pred")], capsys)
    assert code == 0, err
    code, _, err = call_main("evaluation_bao", [*common, "--predict_dir", str(tmp_path / "pred"), "--list", val,
                                                "--logfile", "", "--no_progress", "--json", str(tmp_path / "e.json")],
                             capsys)
    assert code == 0, err
    # (the training model is not channels_last as inference's is: allow a rounding-flipped pixel)
    assert vals[1]["miou_pct"] == pytest.approx(100 * json.loads((tmp_path / "e.json").read_text())["result"]["miou"],
                                                abs=0.1)


def test_inference_takes_the_model_settings_of_the_run_beside_the_weights(full_run, voc_root, tmp_path, capsys):
    """infer_bao.py without --arch/--refine/--network reads them from the args.json beside --weights
    (full_run trained --arch tiny); flags given on the command line win over that file."""
    names = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()[:2]
    listed = tmp_path / "two.txt"
    listed.write_text("\n".join(names) + "\n")
    common = ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"), "--scales", "64",
              "--num_workers", "0", "--device", "cpu", "--infer_list", str(listed)]
    weights = "bao_1epochs_modelt.pth"
    code, out, err = call_main("infer_bao", [*common, "--weights", str(full_run / weights),
                                             "--out_pred", str(tmp_path / "from_run")], capsys)
    assert code == 0, err
    assert (f"model settings from {full_run / 'args.json'} (the run that wrote --weights): "
            "--network network.conformer_CAM, --arch tiny, --refine attention\n") in out
    # The same weights beside an args.json naming other settings: the flags given are used, not the file's.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(full_run / weights, other / weights)
    (other / "args.json").write_text(json.dumps({"arch": "bs", "refine": "none", "network": "no.such.module"}))
    code, out, err = call_main("infer_bao", [*common, "--weights", str(other / weights), "--arch", "tiny",
                                             "--refine", "attention", "--network", "network.conformer_CAM",
                                             "--out_pred", str(tmp_path / "explicit")], capsys)
    assert code == 0, err
    assert "model settings from" not in out
    for name in names:
        assert (tmp_path / "explicit" / f"{name}.png").read_bytes() == (tmp_path / "from_run" / f"{name}.png").read_bytes()


@pytest.mark.slow
def test_validation_without_masks_says_so_and_trains(voc_root, tiny_transcam_weights, tmp_path):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root, ignore=shutil.ignore_patterns("SegmentationClass*"))
    args = _args(root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "1", "--val_every", "1",
                 "--val_list", str(root / "ImageSets/Segmentation/val.txt"))
    proc = run_script("train_bao.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert "no validation: no image of --val_list" in proc.stdout and "has a ground-truth mask" in proc.stdout
    assert not _records(tmp_path / "bao", "val") and (tmp_path / "bao" / "bao_0epochs_modelt.pth").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_end_identical(voc_root, tiny_transcam_weights, tmp_path, num_classes):
    # validated every epoch too: each process scores its share of the list, the counts are summed
    val = str(voc_root / "ImageSets/Segmentation/val.txt")
    args = _args(voc_root, tmp_path, "--weights", str(tiny_transcam_weights), "--max_epoches", "1",
                 "--val_list", val, "--val_every", "1")
    args[args.index("--batch_size") + 1] = "2"  # one image per process: where the class token's gradient was a view
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_bao.py", *args,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # DDP copies (and warns about) every gradient whose strides differ from its bucket's
    assert "Grad strides do not match" not in proc.stdout + proc.stderr
    run_dir = tmp_path / "bao"
    vals = _records(run_dir, "val")
    assert len(vals) == 1 and vals[0]["images"] == 6 and 0 < vals[0]["miou_pct"] < 100
    ranks = _records(run_dir, "ranks")
    assert len(ranks) == 1 and ranks[0]["world_size"] == 2 and ranks[0]["identical"]
    (student0, teacher0), (student1, teacher1) = ranks[0]["digests"]
    assert (student0, teacher0) == (student1, teacher1)
    # the digests are those of the saved files
    model = Net_tiny(num_classes=num_classes)
    load_weights(model, run_dir / "bao_0epochs_models.pth", purpose="bao")
    assert state_digest(model) == student0
    load_weights(model, run_dir / "bao_0epochs_modelt.pth", purpose="bao")
    assert state_digest(model) == teacher0
    assert "x2" in proc.stdout  # both processes took part: "on cpu x2"
