"""The gpu tier, script part: the entry scripts' CUDA branches through their real command lines.

Run by ``make gpu-check`` (``python -m bench.gpu_suite``) on a CUDA machine; on the CPU every
test here skips with its reason. Tiny models on the generated dataset of ``conftest.py``; each
CUDA run is compared with the same command on the CPU or with an uninterrupted CUDA run:

- infer_bao.py's pseudo-labels and maps, and infer_seg.py's labels, CRF included (torch CRF on
  the GPU, in the main process): maps within 2e-3 (float16 files), labels equal wherever the
  CPU's top-two margin is above that (at least 75% of the pixels), and at least 99% of all label pixels
  equal; these runs start with cuDNN's TF32 off (``FP32``), so that the devices differ by
  summation order only (TF32 itself is run by ``--tf32`` below and measured by bench/gpu_check.py);
- train_bao.py killed with SIGKILL right after its first checkpoint and resumed with
  ``--resume auto`` ends with the uninterrupted run's weights: the distance between them at most
  0.1% of how far the last epoch moved the state (the dropped paths of every step come from the
  CUDA generator, whose state the checkpoint must restore; CUDA's atomic-add kernels keep two runs
  from being bit-identical). On the CPU the same test gives 0 and, with the generator's state left
  unrestored by hand, 0.6%: the bound tells a restored state from one that is not;
- ``torchrun --nproc_per_node 1`` with ``--device cuda``; two processes on NCCL where two GPUs are visible;
- ``--amp bf16``, ``--tf32`` and ``--compile default`` once each: finite losses, float32 weights,
  the math the log states.
"""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from core.palette import read_label_png
from data.camio import load_cams
from data.labels import read_list
from network.deeplab import build_segmentation_model
from tests.helpers import assert_labels_agree_where_clear, assert_maps_close, run_script

CUDA_REASON = "no CUDA device (the gpu tier runs under make gpu-check)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)]

# Runs an entry script as `python SCRIPT ARGS...` would, with cuDNN's TF32 convolutions off first
# (the scripts leave that setting as they find it; core.device.configure_math).
FP32 = ("import runpy, sys, torch; torch.backends.cudnn.allow_tf32 = False; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')")
# Runs a training script whose first checkpoint kills the process with SIGKILL once written.
KILL_AFTER_CHECKPOINT = (
    "import os, runpy, signal, sys\n"
    "from engine.loop import Engine\n"
    "saved = Engine.save_checkpoint\n"
    "def save_and_die(self):\n"
    "    saved(self)\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "Engine.save_checkpoint = save_and_die\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
MAP_TOL = 2e-3  # CAM files hold float16: about 5e-4 of rounding for maps in [-1, 1], on each device
PIXELS_EQUAL = 0.99  # of all label pixels, CUDA against the CPU
ENV = {"OMP_NUM_THREADS": "1"}


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _data(voc_root: Path, split: str = "train") -> list[str]:
    return ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--infer_list", str(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt")]


def _agreement(cpu_dir: Path, cuda_dir: Path, names: list[str]) -> float:
    """Share of label pixels equal in two folders of PNGs (same names, same sizes)."""
    equal = total = 0
    for name in names:
        a, b = read_label_png(cpu_dir / f"{name}.png"), read_label_png(cuda_dir / f"{name}.png")
        assert a.shape == b.shape, name
        equal += int((a == b).sum())
        total += a.size
    return equal / total


def test_infer_bao_pseudo_labels_on_cuda_agree_with_the_cpu(voc_root, tiny_bao_weights, tmp_path):
    """infer_bao.py on CUDA (batches of 4, pinned loader with 2 workers, channels_last, labels made
    on the device, the torch label-map CRF in the main process) against the same command on the CPU."""
    names = read_list(voc_root / "ImageSets" / "Segmentation" / "train.txt")[:6]
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = {kind: tmp_path / device / kind for kind in ("pred", "cam", "crf")}
        proc = run_script("-c", FP32, "infer_bao.py", *_data(voc_root), "--infer_list", str(tmp_path / "list.txt"),
                          "--weights", str(tiny_bao_weights), "--arch", "tiny", "--scales", "32,64",
                          "--batch_size", "4", "--num_workers", "2", "--crf_backend", "torch", "--device", device,
                          *(item for kind, folder in out[device].items() for item in (f"--out_{kind}", str(folder))),
                          env=ENV)
        _ok(proc)
    assert "float32 math on cuda" in proc.stdout  # core.device.configure_math's CUDA line
    skipped = total = 0
    for name in names:
        keys, cpu_maps = load_cams(out["cpu"]["cam"] / f"{name}.npz")
        cuda_keys, cuda_maps = load_cams(out["cuda"]["cam"] / f"{name}.npz")
        assert np.array_equal(keys, cuda_keys) and keys[0] == 0, name
        assert_maps_close(cpu_maps, cuda_maps, atol=MAP_TOL, what=f"maps of {name}")
        # per image no cap: an image whose maps are all -1 (dead random features) is one exact tie
        skipped += assert_labels_agree_where_clear(cpu_maps, read_label_png(out["cuda"]["pred"] / f"{name}.png"),
                                                   margin=MAP_TOL, what=name, keys=keys, max_skipped=1.0)
        total += cpu_maps[0].size
    assert skipped <= 0.25 * total, f"{skipped} of {total} pixels are near-ties: too few compared"
    for kind in ("pred", "crf"):
        share = _agreement(out["cpu"][kind], out["cuda"][kind], names)
        assert share >= PIXELS_EQUAL, f"{kind}: {100 * share:.3f}% of the pixels equal"
    crf, pred = out["cuda"]["crf"], out["cuda"]["pred"]
    assert any((read_label_png(crf / f"{n}.png") != read_label_png(pred / f"{n}.png")).any()
               for n in names)  # the CRF ran: it moved some labels


def test_infer_seg_on_cuda_agrees_with_the_cpu(voc_root, num_classes, tmp_path):
    """infer_seg.py on CUDA (batches of equal-size images, pinned loader, channels_last, the torch
    CRF on the GPU in the main process) against the same command on the CPU, seeded weights."""
    torch.manual_seed(0)
    weights = tmp_path / "seg.pth"
    torch.save(build_segmentation_model("deeplabv2", "tiny", num_classes, "frozen").state_dict(), weights)
    names = read_list(voc_root / "ImageSets" / "Segmentation" / "val.txt")
    out = {}
    for device in ("cpu", "cuda"):
        out[device] = {kind: tmp_path / device / kind for kind in ("pred", "crf")}
        proc = run_script("-c", FP32, "infer_seg.py", *_data(voc_root, "val"), "--weights", str(weights),
                          "--backbone", "tiny", "--batch_size", "3", "--num_workers", "1", "--crf_backend", "torch",
                          "--device", device, "--out_pred", str(out[device]["pred"]),
                          "--out_crf", str(out[device]["crf"]), env=ENV)
        _ok(proc)
        # batches of equal-size images on CUDA; one image at a time elsewhere
        assert ("--batch_size 3 ignored" in proc.stdout) == (device == "cpu"), proc.stdout
    for kind in ("pred", "crf"):
        share = _agreement(out["cpu"][kind], out["cuda"][kind], names)
        assert share >= PIXELS_EQUAL, f"{kind}: {100 * share:.3f}% of the pixels equal"


def _train_args(voc_root: Path, save: Path, weights: Path, *extra: str) -> list[str]:
    return ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "2", "--device", "cuda",
            "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--train_list", str(voc_root / "ImageSets" / "Segmentation" / "train.txt"), "--weights", str(weights),
            "--save_dir", str(save), "--log_every", "1", *extra]


def _records(run_dir: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def _flat(path: Path) -> torch.Tensor:
    state = torch.load(path, weights_only=True)
    return torch.cat([state[k].double().flatten() for k in sorted(state) if state[k].is_floating_point()])


def test_killed_cuda_training_resumes_to_the_uninterrupted_weights(voc_root, tiny_transcam_weights, tmp_path):
    """train_bao.py on CUDA (2 epochs of 3 steps, pinned loader with 2 workers, validation after each
    epoch): SIGKILLed right after its epoch-0 checkpoint, then resumed, it ends where an
    uninterrupted run ends; the checkpoint holds the CUDA generator's state."""
    val = ["--val_list", str(voc_root / "ImageSets" / "Segmentation" / "val.txt"), "--val_every", "1"]
    full = run_script("train_bao.py", *_train_args(voc_root, tmp_path / "full", tiny_transcam_weights,
                                                   "--max_epoches", "2", *val), env=ENV)
    _ok(full)
    full_dir = tmp_path / "full" / "bao"
    vals = _records(full_dir, "val")
    assert len(vals) == 2 and all(0 <= v["miou_pct"] <= 100 for v in vals)  # scoring/validation.py on CUDA
    assert all(math.isfinite(r["loss"]) for r in _records(full_dir, "step"))

    args = _train_args(voc_root, tmp_path / "cut", tiny_transcam_weights, "--max_epoches", "2", *val)
    killed = run_script("-c", KILL_AFTER_CHECKPOINT, "train_bao.py", *args, env=ENV)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    cut_dir = tmp_path / "cut" / "bao"
    checkpoint = torch.load(cut_dir / "checkpoint.pth", weights_only=True)
    assert checkpoint["position"] == {"epoch": 1, "step": 0, "global_step": 3}
    assert checkpoint["rng"][0]["cuda"].dtype == torch.uint8 and checkpoint["rng"][0]["cuda"].numel() > 0
    assert not (cut_dir / "bao_1epochs_modelt.pth").exists()
    resumed = run_script("train_bao.py", *args, "--resume", "auto", env=ENV)
    _ok(resumed)
    assert "resumed" in resumed.stdout + (cut_dir / "log.txt").read_text()
    for kind in ("models", "modelt"):
        end, start = _flat(full_dir / f"bao_1epochs_{kind}.pth"), _flat(full_dir / f"bao_0epochs_{kind}.pth")
        moved = float((end - start).norm())
        assert moved > 0, kind
        gap = float((_flat(cut_dir / f"bao_1epochs_{kind}.pth") - end).norm())
        assert gap <= 1e-3 * moved, \
            f"{kind}: resumed weights {gap:.3g} from the uninterrupted run's (the last epoch moved {moved:.3g})"


def test_torchrun_one_process_on_cuda(voc_root, tiny_transcam_weights, tmp_path):
    """train_bao.py under ``torch.distributed.run --nproc_per_node 1`` with --device cuda: the
    launcher's environment is read, the run trains on the GPU and saves its files."""
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train_bao.py",
                      *_train_args(voc_root, tmp_path, tiny_transcam_weights, "--max_steps", "2"), env=ENV)
    _ok(proc)
    log = (tmp_path / "bao" / "log.txt").read_text()
    assert "on cuda x1" in log, log
    assert torch.load(tmp_path / "bao" / "checkpoint.pth", weights_only=True)["position"]["global_step"] == 2


def test_two_processes_on_nccl_end_identical(voc_root, tiny_transcam_weights, tmp_path):
    """Two train_bao.py processes on NCCL (one GPU each) end with identical models."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices for NCCL between processes ({torch.cuda.device_count()} visible)")
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_bao.py",
                      *_train_args(voc_root, tmp_path, tiny_transcam_weights, "--max_epoches", "1"), env=ENV)
    _ok(proc)
    ranks = _records(tmp_path / "bao", "ranks")
    assert len(ranks) == 1 and ranks[0]["world_size"] == 2 and ranks[0]["identical"]
    assert "on cuda:0 x2" in (tmp_path / "bao" / "log.txt").read_text()


@pytest.mark.parametrize("flag, logged", [
    (("--amp", "bf16"), "(amp torch.bfloat16)"),
    (("--tf32",), "matmuls TF32 (--tf32)"),
    (("--compile", "default"), "float32 math on cuda"),
], ids=["amp-bf16", "tf32", "compile"])
def test_speed_flags_train_on_cuda(voc_root, tiny_transcam_weights, tmp_path, flag, logged):
    """Each opt-in speed flag once on CUDA: one epoch of 3 BAO steps with finite losses, float32 weights with the
    plain keys of the published layout (no compile wrapper's prefix), the math the log states."""
    proc = run_script("train_bao.py", *_train_args(voc_root, tmp_path, tiny_transcam_weights, "--max_epoches", "1",
                                                   *flag), env=ENV)
    _ok(proc)
    run_dir = tmp_path / "bao"
    log = (run_dir / "log.txt").read_text()
    assert logged in log, log
    steps = _records(run_dir, "step")
    assert len(steps) == 3 and all(math.isfinite(r[k]) for r in steps for k in ("loss", "loss_cls", "loss_pcl"))
    state = torch.load(run_dir / "bao_0epochs_models.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert not [k for k in state if "_orig_mod" in k]
