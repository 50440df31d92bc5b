"""Data sharding under torchrun, for both training stages: with 2 processes each rank reads a shard of
its own, and the shards together are the epoch (every image of the list once), as one process reads it.

The samples each process loads are recorded by tests/shard_probe.py, which runs the real entry script.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow


def _train_bao(voc_root: Path, save_dir: Path, weights: Path) -> list[str]:
    return ["train_bao", "--method", "transcam", "--weights", str(weights), "--arch", "tiny", "--crop_size", "32",
            "--resize_long", "32", "64", "--batch_size", "4", "--max_epoches", "1", "--num_workers", "0",
            "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--train_list", str(voc_root / "ImageSets/Segmentation/train.txt"), "--save_dir", str(save_dir),
            "--device", "cpu"]


def _train_seg(voc_root: Path, save_dir: Path, _weights: Path) -> list[str]:
    return ["train_seg", "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--label_dir", str(voc_root / "SegmentationClass"), "--backbone", "tiny", "--bn", "train",
            "--from_scratch", "--crop_size", "32", "--batch_size", "4", "--max_iters", "3", "--num_workers", "0",
            "--train_list", str(voc_root / "ImageSets/Segmentation/train.txt"), "--save_dir", str(save_dir),
            "--device", "cpu"]


def _read(folder: Path, rank: int) -> list[str]:
    return [line.split(" ", 1)[1] for line in (folder / f"rank{rank}.txt").read_text().splitlines()]


@pytest.mark.parametrize("command", [_train_bao, _train_seg], ids=["train_bao", "train_seg"])
def test_two_ranks_read_disjoint_shards_that_make_the_epoch(command, voc_root, tiny_transcam_weights, tmp_path):
    names = (voc_root / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(names) % 4 == 0  # batch 4 over 2 ranks: no sample padded or dropped
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = run_script("-m", "tests.shard_probe", str(one), *command(voc_root, tmp_path / "run1", tiny_transcam_weights))
    assert single.returncode == 0, single.stderr[-3000:]
    assert Counter(_read(one, 0)) == Counter(names)  # one process: the epoch is the list, each image once
    double = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tests.shard_probe",
                        str(two), *command(voc_root, tmp_path / "run2", tiny_transcam_weights))
    assert double.returncode == 0, double.stderr[-3000:]
    shard0, shard1 = _read(two, 0), _read(two, 1)
    assert len(shard0) == len(shard1) == len(names) // 2
    assert not set(shard0) & set(shard1)
    assert Counter(shard0 + shard1) == Counter(names)
