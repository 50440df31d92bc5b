"""Mixed precision, proven on the CPU: ``--amp bf16`` through every stage on the tiny model.

float32 is the default everywhere (the published precision); bf16 autocast is the speed
option, and CPU autocast runs the same code path a GPU run takes. fp16 needs CUDA.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.palette import read_label_png
from data.camio import load_cams
from data.labels import ImageLabels, read_list
from network.conformer_CAM import Net_tiny
from tests.helpers import assert_refused, call_main, run_script
from core.device import autocast
from tool.teacher import make_teacher
from tool.training import bao_losses, transcam_losses


def _train_args(voc_root: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--train_list", str(voc_root / "ImageSets" / "Segmentation" / "train.txt"),
            "--save_dir", str(save_dir), "--max_epoches", "1", "--log_every", "1", *extra]


def _step_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]


def _all_float32(path: Path) -> bool:
    state = torch.load(path, weights_only=True)
    return all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_default_precision_is_float32_everywhere():
    for script in ("train_bao", "infer_bao", "visual_bao"):
        import importlib

        parser = importlib.import_module(script).get_args_parser()
        assert parser.get_default("amp") == "off", script


def test_losses_under_bf16_autocast_are_float32_and_finite():
    torch.manual_seed(0)
    student = Net_tiny(num_classes=4).train()
    teacher = make_teacher(student)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with autocast(x.device, torch.bfloat16):
        assert student(x, y).am.dtype == torch.bfloat16  # autocast really runs in bf16 on the CPU
    for losses in (bao_losses(student, teacher, x, y, 0.4, 1.0, torch.bfloat16),
                   transcam_losses(student, x, y, torch.bfloat16)):
        for name, value in losses.items():
            assert value.dtype == torch.float32 and torch.isfinite(value), name
    bao_losses(student, teacher, x, y, 0.4, 1.0, torch.bfloat16)["loss"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in student.parameters())


@pytest.mark.slow
def test_bf16_training_both_stages_saves_float32_weights(voc_root, tmp_path):
    tc = run_script("train_bao.py", *_train_args(voc_root, tmp_path, "--method", "transcam", "--from_scratch",
                                              "--amp", "bf16"))
    assert tc.returncode == 0, tc.stderr
    tc_weights = tmp_path / "transcam" / "transcam_0epochs.pth"
    bao = run_script("train_bao.py", *_train_args(voc_root, tmp_path, "--weights", str(tc_weights), "--amp", "bf16"))
    assert bao.returncode == 0, bao.stderr
    for run, keys in (("transcam", ("loss", "loss_cls")), ("bao", ("loss", "loss_cls", "loss_pcl"))):
        steps = _step_records(tmp_path / run)
        assert len(steps) == 3
        assert all(math.isfinite(r[k]) for r in steps for k in keys)
        assert "amp torch.bfloat16" in (tmp_path / run / "log.txt").read_text()
    for name in ("transcam/transcam_0epochs.pth", "bao/bao_0epochs_modelt.pth", "bao/bao_0epochs_models.pth"):
        assert _all_float32(tmp_path / name), name
    ckpt = torch.load(tmp_path / "bao" / "checkpoint.pth", weights_only=True)
    for part in ("student", "teacher"):
        assert all(v.dtype == torch.float32 for v in ckpt[part].values() if v.is_floating_point()), part


def test_bf16_inference_and_visualisation(voc_root, tiny_bao_weights, tmp_path, capsys):
    labels = ImageLabels.load(voc_root / "cls_labels.json")
    common = ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
              "--weights", str(tiny_bao_weights), "--arch", "tiny", "--scales", "32,64", "--num_workers", "0",
              "--device", "cpu", "--amp", "bf16"]
    code, out, err = call_main("infer_bao", common + [
        "--infer_list", str(voc_root / "ImageSets/Segmentation/train.txt"),
        "--out_pred", str(tmp_path / "pred"), "--out_cam", str(tmp_path / "cam")], capsys)
    assert code == 0, err
    names = read_list(voc_root / "ImageSets/Segmentation/train.txt")
    for name in names:
        keys, cams = load_cams(tmp_path / "cam" / f"{name}.npz")
        pred = read_label_png(tmp_path / "pred" / f"{name}.png")
        assert keys.tolist() == [0, *labels.ids[name]]
        assert cams.shape == (len(keys),) + pred.shape and np.isfinite(cams).all()
        assert cams.max() <= 1
    code, _, err = call_main("visual_bao", common + ["--names", names[0], "--out_dir", str(tmp_path / "vis")], capsys)
    assert code == 0, err
    assert (tmp_path / "vis" / f"{names[0]}_sheet.png").stat().st_size > 0


def test_fp16_on_cpu_is_refused_before_any_output(voc_root, tiny_bao_weights, tmp_path, capsys):
    code, _, err = call_main("infer_bao", [
        "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
        "--weights", str(tiny_bao_weights), "--arch", "tiny", "--device", "cpu", "--amp", "fp16",
        "--out_pred", str(tmp_path / "pred"), "--infer_list", str(voc_root / "ImageSets/Segmentation/train.txt")],
        capsys)
    assert_refused(code, err, "--amp fp16 needs a CUDA device", "--amp bf16")
    assert not (tmp_path / "pred").exists()
