"""A training run's resumable ``checkpoint.pth`` given as ``--weights`` to infer_bao.py and visual_bao.py.

README: a BAO run's checkpoint loads its teacher (as ``*_modelt.pth`` does), a TransCAM run's its
model; the student and the optimiser are not read. The checkpoint here holds a student and a teacher
that give different maps, so a script that loaded the student (or mixed them) writes other files.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from network.conformer_CAM import Net_tiny
from tests.helpers import call_main


def _tiny_state(num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Net_tiny(num_classes=num_classes).state_dict()


@pytest.fixture(scope="module")
def bao_checkpoint(tmp_path_factory, num_classes) -> dict[str, Path]:
    """A BAO run's checkpoint (student, teacher, optimiser, position) and the teacher and student
    saved alone, as the run's epoch files."""
    folder = tmp_path_factory.mktemp("ckpt")
    student, teacher = _tiny_state(num_classes, 3), _tiny_state(num_classes, 4)
    paths = {"checkpoint": folder / "checkpoint.pth", "teacher": folder / "bao_0epochs_modelt.pth",
             "student": folder / "bao_0epochs_models.pth"}
    torch.save({"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []},
                "position": {"epoch": 1, "step": 0, "global_step": 3}}, paths["checkpoint"])
    torch.save(teacher, paths["teacher"])
    torch.save(student, paths["student"])
    return paths


def _common(voc_root: Path, weights: Path) -> list[str]:
    return ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--weights", str(weights), "--arch", "tiny", "--scales", "32,64", "--num_workers", "0",
            "--device", "cpu"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _infer_maps(voc_root: Path, weights: Path, out: Path, capsys) -> dict[str, bytes]:
    code, _, err = call_main("infer_bao", [*_common(voc_root, weights), "--infer_list",
                                           str(voc_root / "ImageSets/Segmentation/val.txt"), "--batch_size", "1",
                                           "--out_cam", str(out), "--out_pred", str(out / "pred")], capsys)
    assert code == 0, err
    return _files(out)


def _visual_sheets(voc_root: Path, weights: Path, out: Path, capsys) -> dict[str, bytes]:
    code, _, err = call_main("visual_bao", [*_common(voc_root, weights), "--list",
                                            str(voc_root / "ImageSets/Segmentation/val.txt"), "--out_dir", str(out)],
                             capsys)
    assert code == 0, err
    return _files(out)


@pytest.mark.parametrize("run", [_infer_maps, _visual_sheets], ids=["infer_bao", "visual_bao"])
def test_bao_checkpoint_loads_the_teacher(run, bao_checkpoint, voc_root, tmp_path, capsys):
    from_checkpoint = run(voc_root, bao_checkpoint["checkpoint"], tmp_path / "ckpt", capsys)
    from_teacher = run(voc_root, bao_checkpoint["teacher"], tmp_path / "teacher", capsys)
    from_student = run(voc_root, bao_checkpoint["student"], tmp_path / "student", capsys)
    assert from_checkpoint and from_checkpoint == from_teacher
    assert from_student != from_teacher  # the two networks tell themselves apart in these files


def test_transcam_checkpoint_loads_its_model(tmp_path, voc_root, num_classes, capsys):
    model = {k: v for k, v in _tiny_state(num_classes, 5).items() if not k.startswith(("label_enc", "classifier_x"))}
    other = {k: v for k, v in _tiny_state(num_classes, 6).items() if k in model}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "checkpoint.pth")
    torch.save(model, tmp_path / "transcam_0epochs.pth")
    torch.save(other, tmp_path / "other.pth")
    runs = {}
    for name in ("checkpoint.pth", "transcam_0epochs.pth", "other.pth"):
        code, _, err = call_main("infer_bao", [*_common(voc_root, tmp_path / name), "--method", "transcam",
                                               "--infer_list", str(voc_root / "ImageSets/Segmentation/val.txt"),
                                               "--out_cam", str(tmp_path / f"out_{name}")], capsys)
        assert code == 0, err
        runs[name] = _files(tmp_path / f"out_{name}")
    assert runs["checkpoint.pth"] and runs["checkpoint.pth"] == runs["transcam_0epochs.pth"]
    assert runs["other.pth"] != runs["transcam_0epochs.pth"]
