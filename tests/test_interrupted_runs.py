"""Runs cut off in the middle, then run again, end exactly as uninterrupted runs do.

- ``coco14.prepare_coco`` killed with SIGKILL (nothing of it runs any more: no cleanup, no
  ``finally``) while its workers paint masks, one of them half-way through writing a file;
  the rerun finishes, and every mask, list and label file is byte-identical to an
  uninterrupted run's.
- A two-process ``torchrun`` training (gloo on the CPU) stopped inside its second epoch with
  ``--max_steps`` and resumed with ``--resume auto`` ends with the same weights, tensor for
  tensor, as an uninterrupted two-process run.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.fileio import is_temporary
from data.classes import COCO_CATEGORY_IDS
from tests.coco_root import annotation, box_mask, compressed_rle, rect, uncompressed_rle, write_coco_root
from tests.helpers import ROOT, run_script

# ------------------------------------------------------------------- COCO preparation

# Runs prepare_coco's command line with the mask writer replaced: the writes of masks of
# split argv[1] go through as usual until the (argv[2] + 1)-th in one worker process, which
# writes half a temporary file and then kills its whole process group (the run) with SIGKILL.
KILL_WHILE_PAINTING = """
import multiprocessing, os, signal, sys
from pathlib import Path

import coco14.prepare_coco as prepare
from core.fileio import atomic_path

split, allowed = sys.argv[1], int(sys.argv[2])
written = 0
save = prepare.save_label_png


def save_or_die(path, label):
    global written
    if f"_{split}2014_" in Path(path).name:
        written += 1
        if written > allowed:
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(b"\\x89PNG\\r\\n\\x1a\\n half a mask")
                os.killpg(0, signal.SIGKILL)
    save(path, label)


prepare.save_label_png = save_or_die
multiprocessing.set_start_method("fork")  # the workers inherit the replacement
prepare.run_guarded(prepare.main, prepare.get_args_parser().parse_args(sys.argv[3:]))
"""
SPLIT_SIZES = {"train": 40, "val": 12}


@pytest.fixture(scope="module")
def coco_reference(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A COCO root of small images with polygons, compressed RLE and crowds, and an
    uninterrupted preparation of it: (root, out_dir, mask_dir)."""
    rng = np.random.default_rng(0)
    images, anns = {}, []
    for split, count in SPLIT_SIZES.items():
        for i in range(count):
            image_id = len(images) + 1
            height, width = (int(v) for v in rng.integers(20, 41, 2))
            images[image_id] = (split, height, width)
            for _ in range(rng.integers(0, 4)):
                cat = int(rng.choice(COCO_CATEGORY_IDS))
                y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
                y1, x1 = int(rng.integers(y0 + 2, height)), int(rng.integers(x0 + 2, width))
                kind = rng.integers(3)
                if kind == 0:
                    segm, crowd = [rect(x0, y0, x1, y1)], 0
                elif kind == 1:
                    segm, crowd = compressed_rle(box_mask(height, width, slice(y0, y1), slice(x0, x1))), 0
                else:
                    segm, crowd = uncompressed_rle(box_mask(height, width, slice(y0, y1), slice(x0, x1))), 1
                anns.append(annotation(len(anns) + 1, image_id, cat, segm, crowd=crowd))
    root = write_coco_root(tmp_path_factory.mktemp("coco") / "coco", images, anns)
    out, masks = root.parent / "out", root.parent / "masks"
    proc = run_script("-m", "coco14.prepare_coco", *_prepare_args(root, out, masks))
    assert proc.returncode == 0, proc.stderr
    return root, out, masks


def _prepare_args(root: Path, out: Path, masks: Path) -> list[str]:
    return ["--coco_root", str(root), "--out_dir", str(out), "--mask_dir", str(masks), "--workers", "2"]


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("split", ["train", "val"])  # val: after train's lists and labels are written
def test_prepare_coco_killed_while_painting_reruns_to_identical_files(split, coco_reference, tmp_path):
    root, ref_out, ref_masks = coco_reference
    out, masks = tmp_path / "out", tmp_path / "masks"
    args = _prepare_args(root, out, masks)
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_PAINTING, split, "5", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    painted = list(masks.glob(f"COCO_{split}2014_*.png"))
    assert 5 <= len(painted) < SPLIT_SIZES[split]  # in the middle of the split
    assert [p for p in masks.iterdir() if is_temporary(p.name)]  # and of a write
    assert sorted(_contents(out)) == ([] if split == "train" else ["cls_labels.json", "train.txt", "train_labelled.txt"])

    rerun = run_script("-m", "coco14.prepare_coco", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(painted)} already present" in rerun.stdout
    for got, expected in ((out, ref_out), (masks, ref_masks)):
        got, expected = _contents(got), _contents(expected)
        assert sorted(got) == sorted(expected)
        assert [name for name in got if got[name] != expected[name]] == []


# ----------------------------------------------------------------------------- training

def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """train_bao.py in two processes on the CPU (gloo), on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                   "train_bao.py", *args, env={"OMP_NUM_THREADS": "1"}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_training_stopped_mid_epoch_resumes_to_identical_weights(voc_root, tiny_transcam_weights,
                                                                             tmp_path):
    # 12 images, batch 4 over two processes: 3 steps per epoch; loader workers draw the crops.
    args = ["--arch", "tiny", "--crop_size", "64", "--batch_size", "4", "--num_workers", "1", "--device", "cpu",
            "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--train_list", str(voc_root / "ImageSets/Segmentation/train.txt"),
            "--weights", str(tiny_transcam_weights), "--max_epoches", "2"]
    _torchrun(*args, "--save_dir", str(tmp_path / "uninterrupted"))
    _torchrun(*args, "--save_dir", str(tmp_path / "resumed"), "--max_steps", "4")
    run = tmp_path / "resumed" / "bao"
    assert torch.load(run / "checkpoint.pth", weights_only=True)["position"] == {"epoch": 1, "step": 1,
                                                                                  "global_step": 4}
    assert not (run / "bao_1epochs_models.pth").exists()
    resumed = _torchrun(*args, "--save_dir", str(tmp_path / "resumed"), "--resume", "auto")
    assert "resumed" in resumed.stdout and "epoch 2, step 1 of 3" in resumed.stdout
    for name in ("bao_0epochs_modelt.pth", "bao_0epochs_models.pth", "bao_1epochs_modelt.pth",
                 "bao_1epochs_models.pth"):
        got = torch.load(run / name, weights_only=True)
        expected = torch.load(tmp_path / "uninterrupted" / "bao" / name, weights_only=True)
        assert got.keys() == expected.keys(), name
        assert [k for k in got if not torch.equal(got[k], expected[k])] == [], name
