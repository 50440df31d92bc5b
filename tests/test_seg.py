"""The segmentation stage: models, backbone loading, schedule, frozen batch norm, multi-scale
inference, the server layout, and train_seg.py / infer_seg.py end to end on the generated dataset."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from core.errors import UserError
from core.palette import read_label_png, save_label_png
from data.transforms import scaled_input
from network.deeplab import (ASPP_V2_DILATIONS, build_segmentation_model, head_and_backbone_parameters,
                             load_backbone_weights, load_segmentation_weights)
from tests.helpers import assert_refused, call_main, run_script
from engine.resume import state_digest
from tool.segmentation import (VOC_SERVER_DIR, argmax_classes, batch_probs, multiscale_probs, poly_lr,
                               segmentation_loss, set_poly_lr)


# ----------------------------------------------------------------------------------- models
@pytest.mark.parametrize("backbone", ["tiny", "resnet101"])
def test_deeplabv2_output_stride_8(backbone):
    model = build_segmentation_model("deeplabv2", backbone, 5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 41, 56))
    assert out.shape == (2, 5, 6, 7)  # ceil(41 / 8), ceil(56 / 8)


@pytest.mark.parametrize("backbone", ["tiny", "resnet101"])
def test_deeplabv3_returns_logits_at_the_input_size(backbone):
    model = build_segmentation_model("deeplabv3", backbone, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 48))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 4, 40, 48)
    if backbone == "resnet101":  # torchvision's own DeepLab-V3 names (without the auxiliary head)
        reference = torchvision.models.segmentation.deeplabv3_resnet101(weights=None, weights_backbone=None,
                                                                       num_classes=4, aux_loss=False)
        assert set(model.state_dict()) == set(reference.state_dict())


def test_aspp_v2_dilations_and_sum():
    model = build_segmentation_model("deeplabv2", "tiny", 3).eval()
    assert ASPP_V2_DILATIONS == (6, 12, 18, 24)
    assert [c.dilation for c in model.aspp] == [(d, d) for d in (6, 12, 18, 24)]
    assert [c.padding for c in model.aspp] == [(d, d) for d in (6, 12, 18, 24)]
    assert all(c.kernel_size == (3, 3) and c.out_channels == 3 for c in model.aspp)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)["out"]
        expected = sum(F.conv2d(feats, c.weight, c.bias, padding=d, dilation=d)
                       for c, d in zip(model.aspp, (6, 12, 18, 24)))
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_resnet101_backbone_loads_a_torchvision_state_dict(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet101()
    with torch.no_grad():  # distinct, non-default statistics, so that loading them is visible
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet101.pth"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, path)  # a DDP-style file
    for bn in ("frozen", "train"):
        model = build_segmentation_model("deeplabv2", "resnet101", 21, bn)
        head_before = {k: v.clone() for k, v in model.aspp.state_dict().items()}
        report = load_backbone_weights(model, path, "resnet101")
        assert report.dropped == ["fc.bias", "fc.weight"]
        own = model.backbone.state_dict()
        ref = reference.state_dict()
        assert {k for k in ref if not k.startswith("fc.") and not k.endswith("num_batches_tracked")} == {
            k for k in own if not k.endswith("num_batches_tracked")}
        for k, v in own.items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(v, ref[k]), k
        assert all(torch.equal(v, head_before[k]) for k, v in model.aspp.state_dict().items())


def test_backbone_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    model = build_segmentation_model("deeplabv2", "resnet101", 21)
    with pytest.raises(UserError, match="does not fit the resnet101 backbone"):
        load_backbone_weights(model, path, "resnet101")
    whole = tmp_path / "seg.pth"
    torch.save(build_segmentation_model("deeplabv3", "tiny", 21).state_dict(), whole)
    with pytest.raises(UserError, match="whole segmentation model"):
        load_backbone_weights(build_segmentation_model("deeplabv3", "tiny", 21), whole, "tiny")


def test_segmentation_weights_move_between_batch_norm_modes(tmp_path):
    trained = build_segmentation_model("deeplabv2", "tiny", 6, "train")
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    path = tmp_path / "w.pth"
    torch.save(trained.state_dict(), path)
    frozen = build_segmentation_model("deeplabv2", "tiny", 6, "frozen")
    load_segmentation_weights(frozen, path)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(trained.eval()(x), frozen.eval()(x), atol=1e-5)
    with pytest.raises(UserError, match="trained for 6 classes, the dataset has 7"):
        load_segmentation_weights(build_segmentation_model("deeplabv2", "tiny", 7), path)
    with pytest.raises(UserError, match="does not fit this segmentation model"):
        load_segmentation_weights(build_segmentation_model("deeplabv3", "tiny", 6), path)


# --------------------------------------------------------------------------- training parts
def test_poly_schedule_and_head_rate_by_hand():
    assert poly_lr(2.5e-4, 0, 20000) == 2.5e-4
    assert poly_lr(2.5e-4, 10000, 20000) == pytest.approx(2.5e-4 * 0.5 ** 0.9)
    assert poly_lr(2.5e-4, 15000, 20000, 0.9) == pytest.approx(2.5e-4 * 0.25 ** 0.9)
    assert poly_lr(1.0, 20000, 20000) == 0.0
    model = build_segmentation_model("deeplabv2", "tiny", 3)
    backbone, head = head_and_backbone_parameters(model)
    assert {id(p) for p in head} == {id(p) for p in model.aspp.parameters()}
    assert len(backbone) + len(head) == len([p for p in model.parameters() if p.requires_grad])
    opt = torch.optim.SGD([{"params": backbone}, {"params": head}], lr=1.0)
    lrs = set_poly_lr(opt, [2.5e-4, 2.5e-3], 5, 10, 0.9)
    assert lrs == pytest.approx([2.5e-4 * 0.5 ** 0.9, 2.5e-3 * 0.5 ** 0.9])
    assert [g["lr"] for g in opt.param_groups] == lrs


def test_loss_ignores_255_and_is_zero_without_labelled_pixels():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    labels = torch.tensor([[[0, 255]]])
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    assert torch.allclose(segmentation_loss(logits, labels), expected)
    empty = segmentation_loss(logits, torch.full((1, 1, 2), 255))
    assert empty.item() == 0.0 and torch.isfinite(empty)
    empty.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_frozen_batch_norm_is_unchanged_by_a_training_step():
    torch.manual_seed(0)
    model = build_segmentation_model("deeplabv2", "tiny", 4, "frozen").train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: p.clone() for k, p in model.named_parameters()}
    assert buffers and all("running" in k or k.endswith(("weight", "bias")) for k in buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = segmentation_loss(model(torch.randn(2, 3, 48, 48)), torch.randint(0, 4, (2, 48, 48)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(not torch.equal(p, params[k]) for k, p in model.named_parameters())
    # the trained mode does update its statistics: the frozen one is a choice, not an accident
    trained = build_segmentation_model("deeplabv2", "tiny", 4, "train").train()
    before = trained.backbone.bn1.running_mean.clone()
    trained(torch.randn(2, 3, 48, 48))
    assert not torch.equal(before, trained.backbone.bn1.running_mean)


# -------------------------------------------------------------------------------- inference
class _Toy(nn.Module):
    """Logits at half resolution that depend on the position, so that flips matter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 2)
        ramp = torch.linspace(0, 1, pooled.shape[-1])
        return torch.stack([pooled[:, 0] + ramp, pooled[:, 1] - ramp, 0.5 * pooled[:, 2]], 1)


def test_multiscale_flip_probabilities_equal_a_hand_computed_average():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    model = _Toy()
    got = multiscale_probs(model, image, scales=(1.0, 2.0), flip=True)
    views = []
    for scale in (1.0, 2.0):
        x = scaled_input(image, scale)[None]
        for flipped in (False, True):
            inp = x.flip(-1) if flipped else x
            logits = F.interpolate(model(inp), size=(10, 14), mode="bilinear", align_corners=False)
            p = logits.softmax(1)[0]
            views.append(p.flip(-1) if flipped else p)
    expected = sum(views) / 4
    assert got.shape == (3, 10, 14)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(0), torch.ones(10, 14), atol=1e-5)
    single = multiscale_probs(model, image, scales=(1.0,), flip=False)
    assert not torch.allclose(single, expected, atol=1e-3)  # the other views did count


@pytest.mark.parametrize("flip", [True, False])
def test_a_batch_of_images_gets_each_image_s_own_probabilities(flip):
    """Per-sample arithmetic (the toy model): batched results are the one-image ones bit for bit, so
    the batch keeps each image with its own flip; a real model's convolutions may round differently
    with the batch size (which is why the CPU runs one image at a time), equal within rounding."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (12, 18, 3), dtype=np.uint8) for _ in range(3)]
    scales = (0.5, 1.0, 1.5)
    inputs = [torch.stack([scaled_input(im, s) for im in images]) for s in scales]
    batched = batch_probs(_Toy(), inputs, (12, 18), flip)
    assert batched.shape == (3, 3, 12, 18)
    for im, got in zip(images, batched):
        assert torch.equal(got, multiscale_probs(_Toy(), im, scales, flip))
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # the images differ
    torch.manual_seed(0)
    model = build_segmentation_model("deeplabv2", "tiny", 5, "frozen").eval()
    batched = batch_probs(model, inputs, (12, 18), flip)
    for im, got in zip(images, batched):
        torch.testing.assert_close(got, multiscale_probs(model, im, scales, flip), rtol=0, atol=1e-5)


def test_device_argmax_labels_are_numpy_s_argmax_ties_included():
    rng = np.random.default_rng(2)
    probs = rng.random((2, 6, 9, 11)).astype(np.float32)
    probs[:, :, :3] = np.round(probs[:, :, :3] * 2) / 2  # many ties: numpy takes the first class
    probs[0, :, 4, 4] = 0.25
    got = argmax_classes(torch.from_numpy(probs))
    assert got.dtype == torch.uint8 and got.shape == (2, 9, 11)
    for p, labels in zip(probs, got.numpy()):
        assert np.array_equal(labels, p.argmax(0).astype(np.uint8))
    assert got[0, 4, 4] == 0


def test_image_dataset_makes_the_scaled_inputs_in_the_loader(voc_root):
    from data.datasets import ImageDataset, collate_images
    from data.layout import DatasetLayout

    names = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()[:2]
    layout = DatasetLayout.voc(voc_root)
    plain = ImageDataset(layout, names)
    scaled = ImageDataset(layout, names, scales=(0.5, 1.25))
    assert "inputs" not in plain[0] and "inputs" not in collate_images([plain[0], plain[1]])
    items = [scaled[0], scaled[1]]
    assert np.array_equal(items[0]["image"], plain[0]["image"])
    for item in items:
        h, w = item["image"].shape[:2]
        assert [tuple(x.shape) for x in item["inputs"]] == [(3, round(h * s), round(w * s)) for s in (0.5, 1.25)]
        for x, s in zip(item["inputs"], (0.5, 1.25)):
            assert torch.equal(x, scaled_input(item["image"], s))
    batch = collate_images(items)
    assert batch["names"] == names and all(a is b["inputs"] for a, b in zip(batch["inputs"], items))


def _one_image_batch(name: str, h: int, w: int) -> dict:
    return {"names": [name], "images": [np.zeros((h, w, 3), np.uint8)], "inputs": [[torch.zeros(3, h, w)]]}


def test_equal_size_groups_batch_images_of_one_size_and_bound_what_waits():
    from infer_seg import HELD_BATCHES, equal_size_groups

    sizes = [(4, 6), (6, 4), (4, 6), (5, 5), (4, 6), (6, 4), (4, 6), (7, 7)]
    batches = [_one_image_batch(f"i{k}", *hw) for k, hw in enumerate(sizes)]
    groups = list(equal_size_groups(batches, 3))
    # a full group goes at once; the rest at the end, each with images of one size
    assert [[item["name"] for item in g] for g in groups] == [["i0", "i2", "i4"], ["i1", "i5"], ["i3"], ["i6"],
                                                              ["i7"]]
    assert all(len({item["image"].shape for item in g}) == 1 for g in groups)
    assert groups[0][1]["inputs"] is batches[2]["inputs"][0]
    # batch 1: every image at once, in the loader's order
    assert [[i["name"] for i in g] for g in equal_size_groups(batches, 1)] == [[f"i{k}"] for k in range(len(sizes))]

    # every image of its own size: never more than HELD_BATCHES * batch_size images wait
    read = []

    def loader():
        for k in range(30):
            read.append(k)
            yield _one_image_batch(f"d{k}", 4, 4 + k)

    done = 0
    for g in equal_size_groups(loader(), 2):
        assert len(read) - done <= HELD_BATCHES * 2
        done += len(g)
    assert done == 30
    with pytest.raises(UserError, match="cannot read"):
        list(equal_size_groups([_one_image_batch("a", 4, 4), {"error": "cannot read b.jpg"}], 2))


# ------------------------------------------------------------------------- CLI end to end
def _data(voc_root: Path) -> list[str]:
    return ["--voc12_root", str(voc_root), "--label_file", str(voc_root / "cls_labels.json")]


def _train(voc_root: Path, save_dir: Path, session: str, *extra: str, label_dir: Path | None = None) -> list[str]:
    return ["train_seg.py", *_data(voc_root), "--label_dir", str(label_dir or voc_root / "SegmentationClass"),
            "--train_list", str(voc_root / "ImageSets/Segmentation/train.txt"), "--backbone", "tiny",
            "--bn", "train", "--from_scratch", "--crop_size", "48", "--batch_size", "4", "--max_iters", "5",
            "--lr", "0.01", "--num_workers", "0", "--save_dir", str(save_dir), "--session_name", session,
            "--log_every", "1", *extra]


@pytest.mark.slow
def test_training_interrupted_and_resumed_ends_with_identical_weights(voc_root, tmp_path):
    ok = run_script(*_train(voc_root, tmp_path, "full"))
    assert ok.returncode == 0, ok.stderr
    full = torch.load(tmp_path / "full" / "full_final.pth", weights_only=True)
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    # 12 images, batch 4: 3 steps per epoch, 5 steps in 2 epochs (the second one cut by the schedule)
    assert ckpt["position"] == {"epoch": 2, "step": 0, "global_step": 5}
    lrs = [g["lr"] for g in ckpt["optimizer"]["param_groups"]]  # those of the last step, 4 of 0..4
    assert lrs == pytest.approx([0.01 * (1 - 4 / 5) ** 0.9, 0.1 * (1 - 4 / 5) ** 0.9])
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    step_lrs = {r["step"]: r["lr"] for r in records if r["event"] == "step"}
    assert step_lrs[1] == pytest.approx(0.01)  # step 1 (iteration 0) runs at the base rate
    assert step_lrs[3] == pytest.approx(0.01 * (1 - 2 / 5) ** 0.9)

    stopped = run_script(*_train(voc_root, tmp_path, "cut", "--max_steps", "2"))
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "cut" / "cut_final.pth").exists()
    mid = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert mid["position"] == {"epoch": 0, "step": 2, "global_step": 2}
    resumed = run_script(*_train(voc_root, tmp_path, "cut", "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    cut = torch.load(tmp_path / "cut" / "cut_final.pth", weights_only=True)
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    changed = run_script(*_train(voc_root, tmp_path, "cut", "--resume", "auto", "--crop_size", "64"))
    assert changed.returncode == 2 and "--crop_size 48 (now 64)" in changed.stderr


@pytest.mark.slow
def test_inference_writes_palette_pngs_crf_and_the_server_layout(voc_root, tmp_path, capsys):
    ok = run_script(*_train(voc_root, tmp_path, "m"))
    assert ok.returncode == 0, ok.stderr
    names = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    out = {k: tmp_path / k for k in ("pred", "crf", "server")}
    # No --backbone: infer_seg.py takes tiny (and --model) from the run's args.json beside the weights.
    infer = ["infer_seg.py", *_data(voc_root), "--weights", str(tmp_path / "m" / "m_final.pth"), "--infer_list", str(voc_root / "ImageSets/Segmentation/val.txt"), "--scales", "0.5,1.0",
             "--num_workers", "0", "--out_pred", str(out["pred"]), "--out_crf", str(out["crf"]),
             "--out_server", str(out["server"]), "--server_labels", "pred"]
    done = run_script(*infer)
    assert done.returncode == 0, done.stderr
    assert (f"model settings from {tmp_path / 'm' / 'args.json'} (the run that wrote --weights): "
            "--model deeplabv2, --backbone tiny\n") in done.stdout
    for name in names:
        size = Image.open(voc_root / "JPEGImages" / f"{name}.jpg").size
        for kind in ("pred", "crf"):
            with Image.open(out[kind] / f"{name}.png") as img:
                assert img.mode == "P" and img.size == size
        server = out["server"] / VOC_SERVER_DIR / f"{name}.png"
        assert np.array_equal(read_label_png(server), read_label_png(out["pred"] / f"{name}.png"))
    with tarfile.open(out["server"] / "results.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"results/VOC2012/Segmentation/comp6_test_cls/{n}.png" for n in names)
    again = run_script(*infer)
    assert again.returncode == 0 and f"{len(names)} already done (skipped), 0 to do" in again.stdout
    # the CRF ran in worker processes (the default); in the main process it writes the same bytes
    inline = run_script(*infer[:infer.index("--out_pred")], "--out_crf", str(tmp_path / "inline"), "--crf_workers", "0")
    assert inline.returncode == 0, inline.stderr
    assert all((tmp_path / "inline" / f"{n}.png").read_bytes() == (out["crf"] / f"{n}.png").read_bytes()
               for n in names)
    # --crf_backend torch (in the main process here): the labels of auto (pydensecrf2's where it is
    # installed, else the torch CRF's in worker processes) on >= 99.5% of the pixels
    code, _, err = call_main("infer_seg", [*infer[1:infer.index("--out_pred")], "--out_crf", str(tmp_path / "torch"),
                                           "--crf_backend", "torch", "--crf_workers", "0"], capsys)
    assert code == 0, err
    ref = [read_label_png(out["crf"] / f"{n}.png") for n in names]
    ours = [read_label_png(tmp_path / "torch" / f"{n}.png") for n in names]
    assert sum(int((r == o).sum()) for r, o in zip(ref, ours)) / sum(r.size for r in ref) >= 0.995
    # Given flags win over the args.json beside the weights: the same labels as from the run's own settings.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "m" / "m_final.pth", other / "m_final.pth")
    (other / "args.json").write_text(json.dumps({"model": "deeplabv3", "backbone": "resnet101"}))
    code, stdout, err = call_main("infer_seg", [*infer[1:infer.index("--out_pred")], "--weights",
                                                str(other / "m_final.pth"), "--model", "deeplabv2", "--backbone",
                                                "tiny", "--out_pred", str(tmp_path / "explicit")], capsys)
    assert code == 0, err
    assert "model settings from" not in stdout
    assert all((tmp_path / "explicit" / f"{n}.png").read_bytes() == (out["pred"] / f"{n}.png").read_bytes()
               for n in names)
    evaluated = run_script("evaluation_bao.py", "--predict_dir", str(out["crf"]), "--gt_dir",
                        str(voc_root / "SegmentationClass"), "--list", str(voc_root / "ImageSets/Segmentation/val.txt"),
                        "--label_file", str(voc_root / "cls_labels.json"), "--logfile", str(tmp_path / "log.txt"))
    assert evaluated.returncode == 0 and "mIoU" in evaluated.stdout


def test_inference_hands_crf_workers_shared_memory_and_frees_it(voc_root, num_classes, tmp_path, capsys,
                                                                 monkeypatch):
    """CRF worker processes receive the probabilities through shared-memory segments, one per
    image, all gone after the run; the labels are those of the CRF in the main process. On the CPU
    --batch_size is ignored (one image at a time, the published rounding): the same bytes."""
    import core.workers

    torch.manual_seed(5)
    torch.save(build_segmentation_model("deeplabv2", "tiny", num_classes).state_dict(), tmp_path / "seg.pth")
    names = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    common = ["--weights", str(tmp_path / "seg.pth"), "--backbone", "tiny", *_data(voc_root), "--infer_list",
              str(voc_root / "ImageSets/Segmentation/val.txt"), "--scales", "0.75,1.0", "--num_workers", "0",
              "--crf_backend", "torch", "--crf_iters", "2", "--device", "cpu"]
    created = []
    to_segment = core.workers._to_segment

    def recording(array):
        ref, segment = to_segment(array)
        created.append(segment.name)
        return ref, segment

    monkeypatch.setattr(core.workers, "_to_segment", recording)
    code, _, err = call_main("infer_seg", [*common, "--out_crf", str(tmp_path / "workers"), "--crf_workers", "1"],
                             capsys)
    assert code == 0, err
    assert len(created) == len(names)
    assert not any((Path(core.workers.SHM_DIR) / n.lstrip("/")).exists() for n in created)
    code, out, err = call_main("infer_seg", [*common, "--out_crf", str(tmp_path / "inline"), "--crf_workers", "0",
                                             "--out_pred", str(tmp_path / "pred"), "--batch_size", "4"], capsys)
    assert code == 0, err
    assert "--batch_size 4 ignored on cpu" in out
    assert len(created) == len(names)  # inline: the arrays themselves, no segment
    assert all((tmp_path / "workers" / f"{n}.png").read_bytes() == (tmp_path / "inline" / f"{n}.png").read_bytes()
               for n in names)
    code, _, err = call_main("infer_seg", [*common, "--out_pred", str(tmp_path / "pred1")], capsys)
    assert code == 0, err
    assert all((tmp_path / "pred" / f"{n}.png").read_bytes() == (tmp_path / "pred1" / f"{n}.png").read_bytes()
               for n in names)


# ---------------------------------------------------------------------------- bad inputs
@pytest.fixture()
def label_copy(voc_root, tmp_path) -> Path:
    folder = tmp_path / "labels"
    shutil.copytree(voc_root / "SegmentationClass", folder)
    return folder


def _first_train_name(voc_root: Path) -> str:
    return (voc_root / "ImageSets/Segmentation/train.txt").read_text().split()[0]


def test_missing_pseudo_label_is_refused(voc_root, tmp_path, label_copy, capsys):
    (label_copy / f"{_first_train_name(voc_root)}.png").unlink()
    code, _, err = call_main("train_seg", _train(voc_root, tmp_path / "runs", "x", label_dir=label_copy)[1:], capsys)
    assert_refused(code, err, "have no label map in", _first_train_name(voc_root))
    assert not (tmp_path / "runs").exists()


def test_label_of_another_size_is_refused(voc_root, tmp_path, label_copy, capsys):
    name = _first_train_name(voc_root)
    save_label_png(label_copy / f"{name}.png", np.zeros((7, 9), np.uint8))
    code, _, err = call_main("train_seg", _train(voc_root, tmp_path / "runs", "x", label_dir=label_copy)[1:], capsys)
    assert_refused(code, err, f"{name}.png is 9x7", "does not belong to this image")
    assert not (tmp_path / "runs").exists()


def test_label_ids_outside_the_classes_are_refused(voc_root, tmp_path, label_copy, num_classes, capsys):
    name = _first_train_name(voc_root)
    label = read_label_png(label_copy / f"{name}.png")
    label[0, 0] = num_classes  # one id past the last class; 255 stays allowed
    save_label_png(label_copy / f"{name}.png", label)
    code, _, err = call_main("train_seg", _train(voc_root, tmp_path / "runs", "x", label_dir=label_copy)[1:], capsys)
    assert_refused(code, err, f"holds class id {num_classes}, outside 0..{num_classes - 1}")
    assert not (tmp_path / "runs").exists()


def test_colour_png_labels_are_refused(voc_root, tmp_path, label_copy, capsys):
    name = _first_train_name(voc_root)
    with Image.open(label_copy / f"{name}.png") as img:
        img.convert("RGB").save(label_copy / f"{name}.png")
    code, _, err = call_main("train_seg", _train(voc_root, tmp_path / "runs", "x", label_dir=label_copy)[1:], capsys)
    assert_refused(code, err, "is a RGB image", "not colours")
    assert not (tmp_path / "runs").exists()


def test_backbone_file_of_another_architecture_is_refused(voc_root, tmp_path, tiny_bao_weights, capsys):
    argv = [a for a in _train(voc_root, tmp_path / "runs", "x")[1:] if a != "--from_scratch"]
    code, _, err = call_main("train_seg", [*argv, "--backbone_weights", str(tiny_bao_weights)], capsys)
    assert_refused(code, err, "does not fit the tiny backbone", "--backbone_weights")
    assert not (tmp_path / "runs").exists()


def test_from_scratch_trains_batch_norm_and_refuses_frozen(voc_root, tmp_path, capsys):
    """A fresh backbone under frozen batch norm has no normalisation (identity statistics): refused; without
    --bn, --from_scratch trains batch norm whatever the model's recipe."""
    argv = _train(voc_root, tmp_path / "runs", "x")[1:]
    bn = argv.index("--bn")
    code, _, err = call_main("train_seg", [*argv[:bn + 1], "frozen", *argv[bn + 2:]], capsys)
    assert_refused(code, err, "--from_scratch needs --bn train")
    assert not (tmp_path / "runs").exists()
    code, _, err = call_main("train_seg", [*argv[:bn], *argv[bn + 2:], "--max_iters", "1"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "runs" / "x" / "args.json").read_text())["bn"] == "train"


def test_inference_with_weights_of_another_model_is_refused(voc_root, tmp_path, tiny_bao_weights, capsys):
    argv = ["--weights", str(tiny_bao_weights), "--backbone", "tiny", *_data(voc_root), "--infer_list",
            str(voc_root / "ImageSets/Segmentation/val.txt"), "--out_pred", str(tmp_path / "pred"),
            "--num_workers", "0"]
    code, _, err = call_main("infer_seg", argv, capsys)
    assert_refused(code, err, "does not fit this segmentation model", "--model and --backbone")
    assert not (tmp_path / "pred").exists()


@pytest.mark.slow
def test_torchrun_two_processes_end_identical(voc_root, tmp_path, num_classes):
    """DDP over two processes (gloo): both ranks end with the saved weights, trained batch norm included."""
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   *_train(voc_root, tmp_path, "ddp", "--max_iters", "3"), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    ranks = [r for r in records if r["event"] == "ranks"]
    assert len(ranks) == 1 and ranks[0]["world_size"] == 2 and ranks[0]["identical"]
    model = build_segmentation_model("deeplabv2", "tiny", num_classes, "train")
    load_segmentation_weights(model, tmp_path / "ddp" / "ddp_final.pth")
    assert state_digest(model) == ranks[0]["digests"][0][0]


def test_a_batch_s_crf_in_one_call_writes_the_pngs_of_one_image_per_call(tmp_path):
    """infer_seg.py's CRF in the main process (a GPU's path): a whole batch in one lattice writes the files
    that one CRF call per image writes (torch CRF; the lattice keeps the images apart)."""
    from crf.params import CRFParams
    from tool.segmentation import write_label_pngs, write_label_pngs_batch

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (18, 24, 3), dtype=np.uint8) for _ in range(3)]
    logits = torch.from_numpy(rng.normal(size=(3, 4, 18, 24)).astype(np.float32))
    probs = F.interpolate(logits, scale_factor=0.25, mode="bilinear")  # smooth maps, as a model's
    probs = F.interpolate(probs, size=(18, 24), mode="bilinear").mul(4).softmax(1).numpy()
    names = ["a", "b", "c"]
    one = {k: tmp_path / "one" / k for k in ("pred", "crf")}
    batch = {k: tmp_path / "batch" / k for k in ("pred", "crf")}
    for folder in [*one.values(), *batch.values()]:
        folder.mkdir(parents=True)
    for name, image, p in zip(names, images, probs):
        write_label_pngs(name, image, p, one, "crf", CRFParams(), backend="torch")
    write_label_pngs_batch(names, images, probs, batch, "crf", CRFParams(), "cpu", pixels_per_call=10 ** 9)
    for kind in ("pred", "crf"):
        for name in names:
            assert (batch[kind] / f"{name}.png").read_bytes() == (one[kind] / f"{name}.png").read_bytes()
    crf = [read_label_png(one["crf"] / f"{n}.png") for n in names]
    pred = [read_label_png(one["pred"] / f"{n}.png") for n in names]
    assert any((c != p).any() for c, p in zip(crf, pred))  # the CRF changed labels: the comparison means something
