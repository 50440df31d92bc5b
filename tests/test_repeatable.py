"""On one machine, the same command and seed give identical results (issue 22). The protocol
runner's stages after training are checked byte for byte in tests/test_pipeline.py (two runs of
the same commands); the demo's start, the TransCAM stage from random initialisation, is checked
here: train_bao.py --method transcam --from_scratch run twice into two folders ends with
bit-identical models and optimizer state, and a third run with another seed does not."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import run_script
from tests.identity import checkpoint_tensors
import pytest

pytestmark = pytest.mark.slow  # the whole module: tests/README.md, tiers


def _train(voc_root: Path, save_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    proc = run_script("train_bao.py", "--method", "transcam", "--from_scratch", "--arch", "tiny", "--crop_size", "64",
                   "--batch_size", "4", "--num_workers", "1", "--max_steps", "2", "--seed", str(seed),
                   "--device", "cpu", "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
                   "--train_list", str(voc_root / "ImageSets" / "Segmentation" / "train.txt"),
                   "--save_dir", str(save_dir))
    assert proc.returncode == 0, proc.stderr
    return checkpoint_tensors(save_dir / "transcam" / "checkpoint.pth")


def test_same_command_and_seed_twice_gives_identical_weights(voc_root, tmp_path):
    first, second = _train(voc_root, tmp_path / "first", 5), _train(voc_root, tmp_path / "second", 5)
    assert first.keys() == second.keys() and any(k.startswith("optimizer/") for k in first)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    other = _train(voc_root, tmp_path / "other", 6)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.startswith("model/"))
