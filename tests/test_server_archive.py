"""infer_seg.py --out_server: the evaluation-server archive holds every image of the list after a
resumed run, after a rerun with nothing left to do, and after a two-process run (torchrun).

The archive is what a user uploads; one written from the images of this run only (the rest done by
an earlier run, or by another rank) is short of images, and the server refuses it.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from network.deeplab import build_segmentation_model
from tests.helpers import run_script
from tool.segmentation import SERVER_ARCHIVE, VOC_SERVER_DIR

pytestmark = pytest.mark.slow  # the whole module: tests/README.md, tiers


@pytest.fixture(scope="module")
def seg_weights(tmp_path_factory, num_classes) -> Path:
    """Randomly initialised tiny DeepLab-V2 weights (no args.json beside them: the flags say what they are)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seg") / "seg.pth"
    torch.save(build_segmentation_model("deeplabv2", "tiny", num_classes, "train").state_dict(), path)
    return path


def _infer(voc_root: Path, weights: Path, server: Path) -> list[str]:
    return ["infer_seg.py", "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--weights", str(weights), "--model", "deeplabv2", "--backbone", "tiny", "--infer_list",
            str(voc_root / "ImageSets/Segmentation/val.txt"), "--scales", "1.0", "--num_workers", "0",
            "--device", "cpu", "--out_server", str(server), "--server_labels", "pred"]


def _archived(server: Path) -> list[str]:
    with tarfile.open(server / SERVER_ARCHIVE) as tar:
        return sorted(tar.getnames())


def _expected(voc_root: Path) -> list[str]:
    names = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    return sorted(f"{VOC_SERVER_DIR.as_posix()}/{n}.png" for n in names)


def test_archive_holds_the_whole_list_after_resume_and_rerun(voc_root, seg_weights, tmp_path):
    server = tmp_path / "server"
    first = run_script(*_infer(voc_root, seg_weights, server))
    assert first.returncode == 0, first.stderr
    assert _archived(server) == _expected(voc_root)
    # As an interrupted run leaves it: two images missing, no archive yet.
    names = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    for name in names[:2]:
        (server / VOC_SERVER_DIR / f"{name}.png").unlink()
    (server / SERVER_ARCHIVE).unlink()
    resumed = run_script(*_infer(voc_root, seg_weights, server))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(names) - 2} already done (skipped), 2 to do" in resumed.stdout
    assert _archived(server) == _expected(voc_root)
    # Nothing left to do: the archive is still there and still whole.
    (server / SERVER_ARCHIVE).unlink()
    again = run_script(*_infer(voc_root, seg_weights, server))
    assert again.returncode == 0, again.stderr
    assert f"{len(names)} already done (skipped), 0 to do" in again.stdout
    assert _archived(server) == _expected(voc_root)


def test_archive_holds_the_whole_list_after_a_two_process_run(voc_root, seg_weights, tmp_path):
    server = tmp_path / "server"
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   *_infer(voc_root, seg_weights, server))
    assert proc.returncode == 0, proc.stderr
    assert "rank 0 of 2" in proc.stdout
    assert _archived(server) == _expected(voc_root)
