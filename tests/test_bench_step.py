"""The benchmarks time the training step the scripts run: for "this version" bench_train.py,
bench_seg.py and gpu_check.py call the very functions the engine (engine.step.train_step) and the
training scripts' step functions (tool.training.*_batch_losses) call, and each timed step goes
through them; only the published baseline is their own reimplementation."""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Callable

import pytest
import torch

import bench.bench_seg as bench_seg
import bench.bench_train as bench_train
import bench.gpu_train as gpu_train
import engine.loop
import train_bao
import train_seg
from bench.gpu_common import VARIANTS
from tests.helpers import call_main


def _count(module, name: str, calls: Counter, monkeypatch) -> None:
    """Replace ``module.name`` by a wrapper that counts its calls and calls it."""
    original: Callable = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch):
    """The benchmarks set the thread count of their own process; this one's stays as it is."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)


def test_the_benchmarks_use_the_functions_the_engine_and_scripts_call():
    for bench in (bench_train, bench_seg, gpu_train):
        assert bench.train_step is engine.loop.train_step, bench.__name__
    assert bench_train.bao_batch_losses is gpu_train.bao_batch_losses is train_bao.bao_batch_losses
    assert bench_seg.seg_batch_losses is gpu_train.seg_batch_losses is train_seg.seg_batch_losses


def test_the_training_scripts_run_those_functions(voc_root, tmp_path, monkeypatch, capsys):
    """What the benchmarks time is what a training run does: each of its steps goes through them."""
    calls = Counter()
    _count(engine.loop, "train_step", calls, monkeypatch)
    _count(train_bao, "bao_batch_losses", calls, monkeypatch)
    _count(train_seg, "seg_batch_losses", calls, monkeypatch)
    data = ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"), "--train_list",
            str(voc_root / "ImageSets" / "Segmentation" / "train.txt"), "--num_workers", "0", "--from_scratch",
            "--batch_size", "2", "--save_dir", str(tmp_path)]
    code, _, err = call_main("train_bao", [*data, "--arch", "tiny", "--crop_size", "32", "--max_steps", "2"], capsys)
    assert code == 0, err
    code, _, err = call_main("train_seg", [*data, "--label_dir", str(voc_root / "SegmentationClass"), "--backbone",
                                           "tiny", "--bn", "train", "--crop_size", "33", "--max_iters", "1"], capsys)
    assert code == 0, err
    assert calls == Counter({"train_step": 3, "bao_batch_losses": 2, "seg_batch_losses": 1})


@pytest.mark.parametrize("variant, expected", [("ours", 3), ("published", 0)])
def test_bench_train_times_the_engine_step(variant, expected, tmp_path, monkeypatch):
    calls = Counter()
    _count(bench_train, "train_step", calls, monkeypatch)
    _count(bench_train, "bao_batch_losses", calls, monkeypatch)
    out = tmp_path / f"{variant}.json"
    bench_train.main(bench_train.get_args_parser().parse_args(
        ["--variant", variant, "--arch", "tiny", "--batch_size", "1", "--crop_size", "32", "--steps", "2",
         "--warmup", "1", "--threads", "1", "--out", str(out)]))
    assert calls == Counter({"train_step": expected, "bao_batch_losses": expected})
    assert json.loads(out.read_text())["images_per_s"] > 0
    # The published loop's anomaly detection ends with it: left on, it would change later backwards.
    assert not torch.is_anomaly_enabled()


def test_bench_seg_times_the_engine_step(tmp_path, monkeypatch):
    calls = Counter()
    _count(bench_seg, "train_step", calls, monkeypatch)
    _count(bench_seg, "seg_batch_losses", calls, monkeypatch)
    out = tmp_path / "train.json"
    bench_seg.main(bench_seg.get_args_parser().parse_args(
        ["--variant", "train-frozen", "--backbone", "tiny", "--batch_size", "1", "--crop_size", "33", "--steps", "1",
         "--threads", "1", "--out", str(out)]))
    assert calls == Counter({"train_step": 2, "seg_batch_losses": 2})  # a warm-up and a timed step
    assert json.loads(out.read_text())["seconds"] > 0


@pytest.mark.parametrize("variant, expected", [("fp32", 2), ("published", 0)])
def test_gpu_check_times_the_engine_step(variant, expected, monkeypatch):
    calls = Counter()
    for name in ("train_step", "bao_batch_losses", "seg_batch_losses"):
        _count(gpu_train, name, calls, monkeypatch)
    args = argparse.Namespace(arch="tiny", batch_size=1, crop_size=32, seed=0, warmup=1, train_steps=1,
                              seg_backbone="tiny", seg_batch_size=1, seg_crop_size=33)
    cpu = torch.device("cpu")
    bao = gpu_train.train_bao(args, cpu, VARIANTS[variant], gpu_train.train_batch(args, cpu))
    seg = gpu_train.train_seg(args, cpu, VARIANTS[variant])
    assert calls == Counter({"train_step": 2 * expected, "bao_batch_losses": expected,
                             "seg_batch_losses": expected})
    assert bao.finite and seg.finite and bao.images_per_s > 0 and seg.images_per_s > 0
