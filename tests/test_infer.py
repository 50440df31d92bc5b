"""infer_bao.py end to end on the generated dataset with tiny models: outputs, resume,
interruption, TransCAM CAMs and the refusal of bad inputs.

Most runs call the script's own ``get_args_parser`` / ``main`` / ``run_cli`` in-process
(the same path as the command line, without paying the interpreter and torch start-up per
case); the interrupted run and two error cases run as real subprocesses.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.fileio import is_temporary
from core.palette import read_label_png
from data.camio import load_cams
from data.labels import ImageLabels, read_list
from tests.helpers import ROOT, assert_maps_close, assert_refused, call_main, run_script
from tool.labelrule import lowest_absent


def _common(voc_root: Path, weights: Path, scales: str = "32,64") -> list[str]:
    return ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"),
            "--infer_list", str(voc_root / "ImageSets/Segmentation/train.txt"), "--weights", str(weights),
            "--arch", "tiny", "--scales", scales, "--num_workers", "0", "--batch_size", "1", "--device", "cpu"]


def _infer(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run infer_bao like its command line, in-process: (exit status, stdout, stderr)."""
    return call_main("infer_bao", argv, capsys)

def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def bao_run(voc_root, tiny_bao_weights, tmp_path_factory) -> Path:
    """One full command-line run writing label PNGs, CRF PNGs and maps."""
    out = tmp_path_factory.mktemp("infer")
    proc = run_script("infer_bao.py", *_common(voc_root, tiny_bao_weights), "--out_pred", str(out / "pred"),
                   "--out_crf", str(out / "crf"), "--out_cam", str(out / "cam"), "--crf_workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "12 to do" in proc.stdout
    return out


@pytest.mark.slow
def test_crf_in_worker_processes_equals_inline(bao_run, voc_root, tiny_bao_weights, tmp_path, capsys):
    """bao_run's CRF ran in two worker processes; in the main process the PNGs are the same bytes."""
    code, _, err = _infer([*_common(voc_root, tiny_bao_weights), "--out_crf", str(tmp_path / "crf"),
                           "--crf_workers", "0"], capsys)
    assert code == 0, err
    assert _files(tmp_path / "crf") == _files(bao_run / "crf")


@pytest.fixture(scope="module")
def torch_crf_run(voc_root, tiny_bao_weights, tmp_path_factory) -> Path:
    """The CRF PNGs of --crf_backend torch on the CPU, in one worker process (one torch thread)."""
    out = tmp_path_factory.mktemp("infer_torch_crf") / "crf"
    proc = run_script("infer_bao.py", *_common(voc_root, tiny_bao_weights), "--out_crf", str(out), "--crf_backend",
                   "torch", "--crf_workers", "1")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_torch_crf_backend_agrees_with_pydensecrf(bao_run, torch_crf_run, voc_root):
    """bao_run's CRF is pydensecrf2's (auto, where it is installed): the torch CRF gives the same
    label on >= 99.5% of the pixels (crf/densecrf.py; they differ only where marginals tie)."""
    pytest.importorskip("pydensecrf.densecrf", reason="compares with pydensecrf2, which is not installed")
    equal = total = 0
    for name in read_list(voc_root / "ImageSets/Segmentation/train.txt"):
        ref, ours = read_label_png(bao_run / "crf" / f"{name}.png"), read_label_png(torch_crf_run / f"{name}.png")
        assert ref.shape == ours.shape
        equal, total = equal + int((ref == ours).sum()), total + ref.size
    assert equal / total >= 0.995, equal / total


def _hide_pydensecrf(tmp_path: Path) -> dict[str, str]:
    """The environment of a subprocess (and of its worker processes) where ``import pydensecrf``
    fails as where pydensecrf2 is not installed: a package of that name first on the path,
    raising ImportError."""
    package = tmp_path / "hidden" / "pydensecrf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('pydensecrf hidden by the test')\n")
    return {"PYTHONPATH": os.pathsep.join([str(package.parent), str(ROOT)])}


@pytest.mark.slow
def test_without_pydensecrf_auto_runs_the_torch_crf_and_pydensecrf_is_refused(torch_crf_run, voc_root,
                                                                               tiny_bao_weights, tmp_path):
    env = _hide_pydensecrf(tmp_path)
    probe = run_script("-c", "from crf.params import pydensecrf_installed, resolve_backend; "
                          "print(pydensecrf_installed(), resolve_backend('auto'))", env=env)
    assert probe.returncode == 0 and probe.stdout.split() == ["False", "torch"], probe.stderr
    out = tmp_path / "crf"
    auto = run_script("infer_bao.py", *_common(voc_root, tiny_bao_weights), "--out_crf", str(out), "--crf_workers", "1",
                   env=env)
    assert auto.returncode == 0, auto.stderr
    names = read_list(voc_root / "ImageSets/Segmentation/train.txt")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)
    assert _files(out) == _files(torch_crf_run)  # auto ran the torch CRF
    refused_dir = tmp_path / "refused"
    refused = run_script("infer_bao.py", *_common(voc_root, tiny_bao_weights), "--out_crf", str(refused_dir),
                      "--crf_backend", "pydensecrf", env=env)
    assert_refused(refused.returncode, refused.stderr, "needs pydensecrf2, which is not installed",
                   "`pip install pydensecrf2`", "--crf_backend torch")
    assert not refused_dir.exists()  # refused before any work


def test_outputs_have_image_size_and_only_present_ids(bao_run, voc_root):
    labels = ImageLabels.load(voc_root / "cls_labels.json")
    names = read_list(voc_root / "ImageSets/Segmentation/train.txt")
    dtypes = set()
    assert sorted(p.stem for p in (bao_run / "pred").iterdir()) == sorted(names)
    for name in names:
        with Image.open(voc_root / "JPEGImages" / f"{name}.jpg") as im:
            size = im.size[::-1]
        with Image.open(bao_run / "pred" / f"{name}.png") as png:
            assert png.mode == "P"  # palette PNG: viewable and holding class ids
        pred = read_label_png(bao_run / "pred" / f"{name}.png")
        crf = read_label_png(bao_run / "crf" / f"{name}.png")
        assert pred.shape == size and crf.shape == size
        # the present classes, and the lowest absent one (score -1 in the published argmax)
        allowed = {0, *labels.ids[name], lowest_absent([0, *labels.ids[name]], labels.num_fg + 1)}
        assert set(np.unique(pred).tolist()) <= allowed
        assert set(np.unique(crf).tolist()) <= allowed
        keys, cams = load_cams(bao_run / "cam" / f"{name}.npz")
        assert keys.tolist() == [0, *labels.ids[name]]
        assert cams.shape == (len(keys),) + size
        assert cams.max() <= 1 and (cams.min(axis=(1, 2)) < 0).all()  # published: minima end negative
        # The PNG is the argmax of the stored maps wherever float16 storage cannot swap the winner.
        top2 = np.sort(cams, axis=0)[-2:]
        clear = (top2[1] - top2[0] > 1e-2) & (top2[1] > -1)
        assert np.array_equal(pred[clear], keys[np.argmax(cams, axis=0)][clear])
        dtypes.add(np.load(bao_run / "cam" / f"{name}.npz")["cams"].dtype)
    # float16 where the values fit, float32 for maps whose normalised minimum is beyond its range
    assert dtypes <= {np.dtype(np.float16), np.dtype(np.float32)} and np.dtype(np.float16) in dtypes


def test_resume_skips_done_images_and_redoes_missing_ones(bao_run, voc_root, tiny_bao_weights, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(bao_run, out)
    before = {kind: _files(out / kind) for kind in ("pred", "cam")}
    names = sorted(before["pred"])
    for name in names[:3]:
        (out / "pred" / name).unlink()
    (out / "cam" / names[5].replace(".png", ".npz")).unlink()
    kept = out / "pred" / names[8]
    stamp = kept.stat().st_mtime_ns
    code, stdout, _ = _infer(_common(voc_root, tiny_bao_weights) + ["--out_pred", str(out / "pred"),
                                                                   "--out_cam", str(out / "cam")], capsys)
    assert code == 0
    assert "8 already done (skipped), 4 to do" in stdout
    assert kept.stat().st_mtime_ns == stamp  # a finished image is not rewritten
    assert {kind: _files(out / kind) for kind in ("pred", "cam")} == before


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_files(voc_root, tiny_bao_weights, tmp_path, capsys):
    # Larger scales make each image take ~0.1 s, so the kill lands mid-run.
    args = _common(voc_root, tiny_bao_weights, scales="128,256")
    killed = tmp_path / "killed"
    cmd = [sys.executable, "infer_bao.py", *args, "--out_pred", str(killed / "pred"), "--out_cam", str(killed / "cam")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    def finished() -> int:
        return len([p for p in (killed / "pred").glob("*.png") if not is_temporary(p.name)])

    while not (killed / "pred").is_dir() or not finished():
        assert proc.poll() is None and time.monotonic() < deadline, "inference ended before it could be interrupted"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = [p for p in killed.rglob("*") if p.is_file() and not is_temporary(p.name)]
    assert 0 < len([p for p in partial if p.suffix == ".png"]) < 12
    for path in partial:  # whatever carries an output name is complete
        if path.suffix == ".png":
            assert read_label_png(path).ndim == 2
        else:
            load_cams(path)

    code, stdout, _ = _infer(args + ["--out_pred", str(killed / "pred"), "--out_cam", str(killed / "cam")], capsys)
    assert code == 0 and "already done (skipped)" in stdout
    assert not [p for p in killed.rglob("*") if is_temporary(p.name)]  # stale temporaries cleaned
    clean = tmp_path / "clean"
    assert _infer(args + ["--out_pred", str(clean / "pred"), "--out_cam", str(clean / "cam")], capsys)[0] == 0
    for kind in ("pred", "cam"):
        assert _files(killed / kind) == _files(clean / kind)


def test_background_winning_everywhere_gives_all_background(voc_root, tiny_bao_weights, tmp_path, capsys):
    state = torch.load(tiny_bao_weights, weights_only=True)
    # No CNN class evidence: every foreground CAM is 0, the learned background map is >= 0.
    state["conv_cls_head.weight"].zero_()
    state["conv_cls_head.bias"].zero_()
    weights = tmp_path / "bg_wins.pth"
    torch.save(state, weights)
    out = tmp_path / "pred"
    assert _infer(_common(voc_root, weights) + ["--out_pred", str(out), "--out_cam", str(tmp_path / "cam")],
                  capsys)[0] == 0
    files = list(out.iterdir())
    assert len(files) == 12
    background = 0
    for path in files:
        keys, cams = load_cams(tmp_path / "cam" / f"{path.stem}.npz")
        assert (cams[1:] == -1).all()  # zero maps normalise to -1, as the absent classes' do
        # Background wins wherever its normalised map is above -1; at its "dead" pixels below -1
        # (minimum m with 2 m > max) all classes tie at -1 and the lowest id, 1, wins, as published.
        pred = read_label_png(path)
        assert np.array_equal(pred, np.where(cams[0] < -1, 1, 0))
        background += (pred == 0).mean() / len(files)
    assert background > 0.9


def test_transcam_writes_foreground_cams_and_thresholded_labels(voc_root, tiny_transcam_weights, tmp_path, capsys):
    labels = ImageLabels.load(voc_root / "cls_labels.json")
    code, _, _ = _infer(_common(voc_root, tiny_transcam_weights) + [
        "--method", "transcam", "--out_cam", str(tmp_path / "cam"), "--out_pred", str(tmp_path / "pred"),
        "--t", "0.4"], capsys)
    assert code == 0
    for path in (tmp_path / "cam").iterdir():
        keys, cams = load_cams(path)
        assert keys.tolist() == labels.ids[path.stem]  # foreground only, no background map
        pred = read_label_png(tmp_path / "pred" / f"{path.stem}.png")
        fg = cams.max(axis=0) > 0.4 + 1e-2
        assert pred[fg].all() and not pred[cams.max(axis=0) < 0.4 - 1e-2].any()


def test_cnn_ablation_writes_unrefined_cams(voc_root, tiny_transcam_weights, tmp_path, capsys):
    """--method cnn writes the CNN CAMs X = conv_cls_head(F) before attention refinement (the maps
    whose spatial mean is conv_logits), not the refined TransCAM CAMs. The expectation is read with a
    hook on conv_cls_head during the published forward, independently of forward_cnn_cams."""
    from network.checkpoint import load_weights
    from network.conformer_CAM import Net_tiny

    labels = ImageLabels.load(voc_root / "cls_labels.json")
    code, _, _ = _infer(_common(voc_root, tiny_transcam_weights, scales="32") + [
        "--method", "cnn", "--out_cam", str(tmp_path / "cam")], capsys)
    assert code == 0
    model = Net_tiny(num_classes=labels.num_fg + 1)
    load_weights(model, tiny_transcam_weights, purpose="transcam")
    model.eval()
    hooked: list[torch.Tensor] = []
    model.conv_cls_head.register_forward_hook(lambda _m, _i, out: hooked.append(out))

    class Unrefined(torch.nn.Module):
        """The published forward, with its CAMs replaced by the hooked head output."""

        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y=None):
            hooked.clear()
            out = self.net(x, y)
            assert torch.allclose(hooked[0].mean(dim=(2, 3)), out.conv_logits, atol=1e-5)
            return out._replace(cams=hooked[0])

    # Where refinement changes the maps (not where a class map is negative everywhere, so -1 either
    # way), writing the refined maps would fail the comparison.
    _assert_written_maps_are_unrefined(voc_root, labels, tmp_path / "cam", "transcam", Unrefined(), model, ())


def _assert_written_maps_are_unrefined(voc_root: Path, labels: ImageLabels, folder: Path, method: str,
                                       unrefined_net: torch.nn.Module, refined_net: torch.nn.Module,
                                       leading_keys: tuple[int, ...]) -> None:
    """The maps infer_bao.py wrote to ``folder`` are ``unrefined_net``'s (keys: ``leading_keys`` then the
    image's classes), and differ from ``refined_net``'s in at least half the images (so writing the
    refined maps would fail)."""
    from data.datasets import InferenceDataset
    from data.layout import DatasetLayout
    from tool.predict import MultiScalePredictor, iterate_batches

    names = read_list(voc_root / "ImageSets/Segmentation/train.txt")
    dataset = InferenceDataset(DatasetLayout.voc(voc_root), names, labels, scales=(32,), flip=True)
    cpu = torch.device("cpu")
    unrefined, refined = MultiScalePredictor(unrefined_net, method, cpu), MultiScalePredictor(refined_net, method, cpu)
    differs = 0
    for batch in iterate_batches(dataset, 4, 0, cpu):
        for name, (keys, expected), (_, other) in zip(batch["names"], unrefined(batch), refined(batch)):
            got_keys, got = load_cams(folder / f"{name}.npz")
            assert got_keys.tolist() == keys.tolist() == [*leading_keys, *labels.ids[name]]
            # written by a batch-1 run, recomputed here in batches of 4; stored as float16
            assert_maps_close(expected, got, 2e-3, name, rtol=1e-5)
            differs += not np.allclose(got, other.numpy(), atol=2e-3)
    assert differs >= len(names) // 2


def test_refine_none_writes_the_maps_of_the_unrefined_heads(voc_root, tiny_bao_weights, tmp_path, capsys):
    """--refine none: BAO's maps are [classifier_x's background, conv_cls_head's foreground] as the heads
    give them, read with hooks during the default (refined) forward; the TransCAM CAMs are then the
    CNN CAMs of --method cnn, file for file."""
    from network.checkpoint import load_weights
    from network.conformer_CAM import Net_tiny

    labels = ImageLabels.load(voc_root / "cls_labels.json")
    common = _common(voc_root, tiny_bao_weights, scales="32")
    for method in ("bao", "transcam"):
        code, _, err = _infer(common + ["--method", method, "--refine", "none", "--out_cam", str(tmp_path / method)],
                              capsys)
        assert code == 0, err
    code, _, err = _infer(common + ["--method", "cnn", "--out_cam", str(tmp_path / "cnn")], capsys)
    assert code == 0, err
    assert _files(tmp_path / "transcam") == _files(tmp_path / "cnn")

    model = Net_tiny(num_classes=labels.num_fg + 1)
    load_weights(model, tiny_bao_weights, purpose="bao")
    model.eval()
    heads: dict[str, torch.Tensor] = {}
    for head in ("conv_cls_head", "classifier_x"):
        getattr(model, head).register_forward_hook(lambda _m, _i, out, head=head: heads.__setitem__(head, out))

    class Unrefined(torch.nn.Module):
        """The default forward, with its BAO map rebuilt from the hooked head outputs."""

        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y=None):
            out = self.net(x, y)
            return out._replace(bao=torch.cat([heads["classifier_x"][:, :1], heads["conv_cls_head"][:, 1:]], dim=1))

    _assert_written_maps_are_unrefined(voc_root, labels, tmp_path / "bao", "bao", Unrefined(), model, (0,))


def test_background_diagnostic_scores_the_published_labels_as_written(bao_run, voc_root, tiny_bao_weights, capsys):
    """protocol/background_diag.py's "published" background is BAO's own rule: its mIoU is that of the PNGs
    infer_bao.py wrote (same weights, scales and masks)."""
    from protocol.background_diag import get_args_parser, main
    from tool.background import BACKGROUNDS
    from data.classes import ClassSet
    from data.datasets import read_mask
    from data.layout import load_dataset
    from scoring.metrics import confusion, scores

    spec = load_dataset("voc", voc_root, label_file=voc_root / "cls_labels.json")
    names = read_list(voc_root / "ImageSets/Segmentation/train.txt")
    classes = ClassSet(spec.class_names)
    conf = sum(confusion(read_mask(spec.layout, n), read_label_png(bao_run / "pred" / f"{n}.png"), classes)
               for n in names)
    args = get_args_parser().parse_args([
        "--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json"), "--weights",
        str(tiny_bao_weights), "--arch", "tiny", "--list", str(voc_root / "ImageSets/Segmentation/train.txt"),
        "--scales", "32,64", "--device", "cpu"])
    result = main(args)
    assert set(BACKGROUNDS) == {"published", "softmax", "centred"} <= result.keys()
    assert result["published"]["miou"] == pytest.approx(scores(conf, classes)["miou"], abs=1e-12)
    assert "background softmax" in capsys.readouterr().out


def _bad_files(tmp_path: Path, voc_root: Path, num_classes: int) -> dict[str, Path]:
    from network.conformer_CAM import Net_tiny

    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save(Net_tiny(num_classes=num_classes + 2).state_dict(), tmp_path / "other_classes.pth")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    (tmp_path / "ghost.txt").write_text("ghost_image\n")
    (tmp_path / "unlabelled.txt").write_text("synth_000000\nnot_in_labels\n")
    raw = json.loads((voc_root / "cls_labels.json").read_text())
    raw["labels"]["ghost_image"] = [1]
    (tmp_path / "labels_ghost.json").write_text(json.dumps(raw))
    (tmp_path / "a_file").write_text("")
    return {p.stem: p for p in tmp_path.iterdir()}


ERROR_CASES = {
    # case: (argument changes, expected message part)
    "weights missing": ({"--weights": "{tmp}/nope.pth"}, "weights file not found"),
    "not a checkpoint": ({"--weights": "{tmp}/text.pth"}, "not a readable PyTorch checkpoint"),
    "other class count": ({"--weights": "{tmp}/other_classes.pth"}, "different number of classes"),
    "other arch": ({"--arch": "ti"}, "does not fit this model"),
    "transcam weights for bao": ({"--weights": "{transcam}"}, "is a TransCAM checkpoint"),
    "unknown arch": ({"--arch": "huge"}, "unknown --arch 'huge'"),
    "dataset root missing": ({"--voc12_root": "{tmp}/no_voc"}, "does not exist"),
    "list missing": ({"--infer_list": "{tmp}/no_list.txt"}, "list file not found"),
    "list empty": ({"--infer_list": "{tmp}/empty.txt"}, "is empty"),
    "name without image": ({"--infer_list": "{tmp}/ghost.txt", "--label_file": "{tmp}/labels_ghost.json"},
                           "images of"),
    "name without label": ({"--infer_list": "{tmp}/unlabelled.txt"}, "have no image-level label"),
    "output parent is a file": ({"--out_pred": "{tmp}/a_file/pred"}, "cannot create or write output folder"),
    "transcam png without t": ({"--method": "transcam", "--weights": "{transcam}"}, "need a background threshold --t"),
    "threshold for bao": ({"--t": "0.5"}, "BAO labels need no threshold"),
    "negative batch": ({"--batch_size": "-2"}, "argument --batch_size: must be >= 1"),
    "unknown method": ({"--method": "gradcam"}, "argument --method: invalid choice"),
    "empty scales": ({"--scales": ","}, "argument --scales: needs at least one scale"),
    "scale not multiple of 16": ({"--scales": "256,500"}, "multiples of 16"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_inputs_are_refused_before_any_output(case, voc_root, num_classes, tiny_bao_weights,
                                                  tiny_transcam_weights, tmp_path, capsys):
    _bad_files(tmp_path, voc_root, num_classes)
    changes, message = ERROR_CASES[case]
    argv = _common(voc_root, tiny_bao_weights) + ["--out_pred", str(tmp_path / "out" / "pred")]
    for flag, value in changes.items():
        value = value.format(tmp=tmp_path, transcam=tiny_transcam_weights)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, _, err = _infer(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


@pytest.mark.slow
def test_command_line_error_exits_cleanly(voc_root, tmp_path):
    missing = run_script("infer_bao.py", *_common(voc_root, tmp_path / "missing.pth"), "--out_pred", str(tmp_path / "o"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: weights file not found") and "Traceback" not in missing.stderr
    assert not (tmp_path / "o").exists()


def test_label_file_from_the_run_is_named_in_help_and_error(voc_root, tiny_bao_weights, tmp_path, capsys):
    """--label_file left out comes from the args.json beside --weights: --help says so, and a list
    with names that label file lacks is refused naming the label file read."""
    from infer_bao import get_args_parser

    (action,) = [a for a in get_args_parser()._actions if "--label_file" in a.option_strings]
    assert "args.json beside --weights" in action.help and "voc12/cls_labels.json" in action.help
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_bao_weights, run / "bao.pth")
    raw = json.loads((voc_root / "cls_labels.json").read_text())
    raw["labels"] = {"synth_000000": raw["labels"]["synth_000000"]}
    (tmp_path / "few.json").write_text(json.dumps(raw))
    (run / "args.json").write_text(json.dumps({"label_file": str(tmp_path / "few.json")}))
    argv = _common(voc_root, run / "bao.pth") + ["--out_pred", str(tmp_path / "pred")]
    del argv[argv.index("--label_file"):argv.index("--label_file") + 2]
    code, _, err = _infer(argv, capsys)
    assert_refused(code, err, "have no image-level label in " + str(tmp_path / "few.json"))


@pytest.mark.slow
def test_torchrun_shards_the_list_and_writes_the_same_files(bao_run, voc_root, tiny_bao_weights, tmp_path):
    out = tmp_path / "ddp"
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "infer_bao.py",
                   *_common(voc_root, tiny_bao_weights), "--out_pred", str(out / "pred"), "--out_cam", str(out / "cam"))
    assert proc.returncode == 0, proc.stderr
    assert "rank 0 of 2 takes 6" in proc.stdout
    for kind in ("pred", "cam"):
        assert _files(out / kind) == _files(bao_run / kind)


def test_corrupt_image_is_reported_without_worker_traceback(voc_root, tiny_bao_weights, tmp_path, capsys):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    names = read_list(voc_root / "ImageSets/Segmentation/train.txt")
    jpeg = root / "JPEGImages" / f"{names[2]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    argv = _common(root, tiny_bao_weights) + ["--out_pred", str(tmp_path / "pred")]
    argv[argv.index("--num_workers") + 1] = "1"  # the error crosses a DataLoader worker
    code, _, err = _infer(argv, capsys)
    assert code == 2
    assert f"error: cannot read image {jpeg}" in err and "Traceback" not in err
    done = sorted(p.stem for p in (tmp_path / "pred").iterdir())
    assert done == names[:2]  # images before the corrupt one are finished and kept, nothing partial
