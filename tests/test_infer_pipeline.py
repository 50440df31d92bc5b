"""The throughput of pseudo-label inference (issue 23) without a changed number: one host<->device
transfer of each kind per batch (tool/predict.py), files written by a few threads while the next
batch runs (infer_bao.py, core.workers.TaskPool with threads), and cuDNN autotuning on CUDA only.
tests/test_identity.py checks that the written bytes did not change."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.fileio import is_temporary
from core.palette import read_label_png
from data.camio import load_cams
from data.datasets import collate_inference
from data.labels import read_list
from data.transforms import resized_scales
from network.conformer import ConformerOutput
from tests.helpers import ROOT, assert_refused, call_main
from tool.cam import pseudo_labels
from core.device import configure_math
from tool.predict import MultiScalePredictor, to_host

CPU = torch.device("cpu")
TRAIN_LIST = "ImageSets/Segmentation/train.txt"


class _PooledInput(nn.Module):
    """Maps that depend on the input (channel k mixes colour channels k % 3 and (k + 1) % 3, averaged over
    16 x 16 patches); calls nothing but torch ops on its input, so that the test counts only the predictor's
    own transfers."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        pooled = nn.functional.avg_pool2d(x, 16)
        maps = torch.stack([(k + 1) * pooled[:, k % 3] + k / 10 * pooled[:, (k + 1) % 3]
                            for k in range(self.num_classes)], dim=1)
        zeros = torch.zeros(x.shape[0], self.num_classes)
        return ConformerOutput(zeros, zeros, maps, maps, maps)


def _batch(count: int, scales: tuple[int, ...] = (32, 64)) -> dict:
    rng = np.random.default_rng(count)
    sizes = [(40, 56), (64, 48), (33, 70), (50, 50)][:count]
    labels = [[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0]][:count]
    return collate_inference([{"name": f"im{i}", "size": size, "label": torch.tensor(lab, dtype=torch.float32),
                               "inputs": resized_scales(rng.integers(0, 256, (*size, 3), dtype=np.uint8), scales),
                               "views": 2} for i, (size, lab) in enumerate(zip(sizes, labels))])


class _Counter:
    """Counts the calls of a tensor method (patched on torch.Tensor) whose arguments satisfy ``which``."""

    def __init__(self, monkeypatch, method: str, which=lambda args, kwargs: True):
        self.calls = 0
        real = getattr(torch.Tensor, method)

        def counting(tensor, *args, **kwargs):
            if which(args, kwargs):
                self.calls += 1
            return real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)


def _to_a_device(args, kwargs) -> bool:
    """A ``Tensor.to`` call that moves data (a device given), not a dtype cast."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)


@pytest.mark.parametrize("method", ["bao", "transcam"])
def test_inputs_labels_and_keys_go_to_the_device_once_per_batch(method, monkeypatch):
    """Labels and the present classes' index: one upload each per batch (BAO; TransCAM needs no labels),
    the uint8 inputs one per scale; however many images and forward chunks."""
    model = _PooledInput(num_classes=5)
    MultiScalePredictor(model, method, CPU)(_batch(1))  # the normalisation constants reach the device once
    uploads = _Counter(monkeypatch, "to", _to_a_device)
    counts = []
    for images, pixels in ((1, 10 ** 7), (4, 10 ** 7), (4, 1)):  # one chunk per scale; one input per forward
        before = uploads.calls
        MultiScalePredictor(model, method, CPU, forward_pixels=pixels).predict(_batch(images))
        counts.append(uploads.calls - before)
    assert counts == [(2 if method == "bao" else 1) + 2] * 3  # (labels +) index + 2 scales


def test_labels_and_maps_come_to_the_host_in_one_copy_each(monkeypatch):
    predictions = MultiScalePredictor(_PooledInput(num_classes=5), "bao", CPU).predict(_batch(4))
    expected = [(pseudo_labels(p.maps, p.keys, None, 5).numpy(), p.maps.numpy().copy()) for p in predictions]
    copies = _Counter(monkeypatch, "cpu")
    both = to_host(predictions, labels=True, maps=True, num_classes=5)
    assert copies.calls == 2  # not one per image
    assert to_host(predictions, labels=True, maps=False, num_classes=5)[0].maps is None and copies.calls == 3
    assert to_host(predictions, labels=False, maps=True)[0].label is None and copies.calls == 4
    for out, p, (label, maps) in zip(both, predictions, expected):
        assert out.keys.tolist() == p.keys.tolist()
        assert out.label.dtype == np.uint8 and np.array_equal(out.label, label)  # made on the device, same ids
        assert out.maps.dtype == np.float32 and out.maps.tobytes() == maps.tobytes()
    assert len({tuple(np.unique(out.label)) for out in both}) > 1  # images differ: a mix-up would show


def test_thresholded_transcam_labels_on_the_device_equal_the_per_image_ones():
    predictions = MultiScalePredictor(_PooledInput(num_classes=5), "transcam", CPU).predict(_batch(4))
    for out, p in zip(to_host(predictions, labels=True, maps=False, background_score=0.5), predictions):
        assert out.label.dtype == np.uint8 and np.array_equal(out.label, pseudo_labels(p.maps, p.keys, 0.5).numpy())
        assert out.label.any() and not out.label.all()  # background and classes: the threshold matters


def _infer_args(root: Path, weights: Path, *extra: str) -> list[str]:
    return ["--voc12_root", str(root), "--label_file", str(root / "cls_labels.json"),
            "--infer_list", str(root / TRAIN_LIST), "--weights", str(weights), "--arch", "tiny",
            "--scales", "32", "--num_workers", "0", "--batch_size", "2", "--device", "cpu", *extra]


def test_files_are_written_by_threads_while_the_next_batch_runs(voc_root, tiny_bao_weights, tmp_path, capsys,
                                                                monkeypatch):
    import infer_bao

    events: list[tuple[str, float, str]] = []
    save_png, predict = infer_bao.save_label_png, MultiScalePredictor.predict

    def slow_save(path, label):
        events.append(("write", time.monotonic(), threading.current_thread().name))
        if Path(path).stem == "synth_000000":
            time.sleep(1.0)  # the first batch's files take long: the second batch must not wait for them
        save_png(path, label)
        events.append(("written", time.monotonic(), Path(path).stem))

    def timed_predict(self, batch):
        events.append(("predict", time.monotonic(), batch["names"][0]))
        return predict(self, batch)

    monkeypatch.setattr(infer_bao, "save_label_png", slow_save)
    monkeypatch.setattr(MultiScalePredictor, "predict", timed_predict)
    out = tmp_path / "out"
    code, _, err = call_main("infer_bao", _infer_args(voc_root, tiny_bao_weights, "--out_pred", str(out / "pred"),
                                                      "--out_cam", str(out / "cam")), capsys)
    assert code == 0, err
    names = read_list(voc_root / TRAIN_LIST)
    assert sorted(p.name for p in (out / "pred").iterdir()) == sorted(f"{n}.png" for n in names)
    for name in names:
        assert read_label_png(out / "pred" / f"{name}.png").ndim == 2
        load_cams(out / "cam" / f"{name}.npz")
    writers = {thread for kind, _, thread in events if kind == "write"}
    assert writers and threading.main_thread().name not in writers
    first_written = next(t for kind, t, stem in events if kind == "written" and stem == "synth_000000")
    second_batch = next(t for kind, t, first in events if kind == "predict" and first == names[2])
    assert second_batch < first_written  # batch 2 ran while batch 1's files were being written
    assert f"{len(names)}/{len(names)}" in err  # the progress bar counted every image once written


def test_crf_pngs_with_the_writer_threads(voc_root, tiny_bao_weights, tmp_path, capsys):
    """The CRF (inline here) still writes one PNG per image beside the writer threads' files."""
    out = tmp_path / "out"
    code, _, err = call_main("infer_bao", _infer_args(voc_root, tiny_bao_weights, "--out_pred", str(out / "pred"),
                                                      "--out_crf", str(out / "crf"), "--crf_workers", "0",
                                                      "--crf_backend", "torch"), capsys)
    assert code == 0, err
    names = read_list(voc_root / TRAIN_LIST)
    for name in names:
        assert read_label_png(out / "crf" / f"{name}.png").shape == read_label_png(out / "pred" / f"{name}.png").shape
    assert f"{len(names)}/{len(names)}" in err


@pytest.mark.slow
def test_a_write_error_in_a_writer_thread_is_one_line_and_a_failed_exit(voc_root, tiny_bao_weights, tmp_path):
    """A folder where an image's PNG must go: the writer thread's error ends the real process with the one
    line of a write error (status 2, no traceback, no hanging thread), the files written before are
    complete and no temporary file is left."""
    names = read_list(voc_root / TRAIN_LIST)
    pred = tmp_path / "pred"
    blocked = pred / f"{names[5]}.png"
    blocked.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "infer_bao.py", *_infer_args(voc_root, tiny_bao_weights, "--out_pred",
                                                                        str(pred))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_refused(proc.returncode, proc.stderr, f"cannot write {blocked}")
    written = sorted(p.name for p in pred.iterdir() if p != blocked)
    assert not [n for n in written if is_temporary(n)]
    assert set(f"{n}.png" for n in names[:5]) <= set(written)  # every image before the failure is done
    for name in written:
        assert read_label_png(pred / name).ndim == 2


def test_cudnn_autotuning_and_tf32_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # a property of torch's module object: set back by hand
    try:
        matmul.allow_tf32 = False
        configure_math(CPU, tf32=True)
        assert torch.backends.cudnn.benchmark is False and matmul.allow_tf32 is False
        line = configure_math(torch.device("cuda", 0))  # a device name only: nothing runs there
        assert torch.backends.cudnn.benchmark is True and matmul.allow_tf32 is False
        assert "matmuls full float32 (as published" in line
        configure_math(torch.device("cuda", 0), tf32=True)
        assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = before
