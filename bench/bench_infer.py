"""Benchmark: our multi-scale BAO inference against the published approach, on the same weights.

- ours: the code path of infer_bao.py: ``InferenceDataset`` batches, ``tool.predict``
  (one forward per scale and chunk, inference mode, channels-last, attention summed block
  by block inside the model, only the present classes upsampled and accumulated);
- published approach: batch 1, six separate forward passes per image (3 scales x flip)
  under ``no_grad``, the attention maps of all blocks stacked into one tensor, then
  averaged over heads and summed; every class channel upsampled, masked and summed in
  NumPy.

Each variant runs in its own process, so its peak resident memory (``ru_maxrss``) is its
own; the figure reported is the peak minus the memory after loading the model and images.
Both write their label maps, and the parent compares them pixel by pixel. The weights are
a seeded random initialisation (no trained weights are needed to measure speed, memory and
agreement; both variants use the same ones).

    python bench/bench_infer.py                  # Conformer-S, 4 VOC-size images, 256,512,768
    python bench/bench_infer.py --images 2 --arch tiny --scales 64,128   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from apps.cli import parse_scales, positive_int, run_cli
from bench.report import RESULTS_FILE, cpu_name, write_section
from core.device import memory_layout
from core.errors import UserError
from data.datasets import InferenceDataset
from data.images import read_image
from data.labels import ImageLabels, read_list
from data.layout import DatasetLayout
from data.synthetic import generate
from data.transforms import multiscale_inputs
from network.conformer_CAM import ARCHS
from tool.predict import DEFAULT_SCALES, MultiScalePredictor, iterate_batches


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time infer_bao's inference against the published approach.")
    parser.add_argument("--arch", default="sm", choices=sorted(ARCHS), help="model size (default: sm)")
    parser.add_argument("--images", type=positive_int, default=4, help="number of generated images (default: 4)")
    parser.add_argument("--size", type=positive_int, default=448,
                        help="nominal image side; sides are drawn in [0.75, 1.25] x size (default: 448, VOC-like)")
    parser.add_argument("--scales", type=parse_scales, default=DEFAULT_SCALES,
                        help="inference scales (default: 256,512,768)")
    parser.add_argument("--batch_size", type=positive_int, default=4, help="our images per batch (default: 4)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads for both (default: 2)")
    parser.add_argument("--results", default=str(RESULTS_FILE),
                        help="markdown file whose inference section is replaced by this run ('' to skip)")
    parser.add_argument("--variant", choices=("ours", "reference"), default=None,
                        help="internal: run one variant in this process")
    parser.add_argument("--work_dir", default=None, help="internal: folder with the data and results")
    return parser


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, DatasetLayout, ImageLabels, list[str]]:
    torch.set_num_threads(args.threads)
    root = Path(args.work_dir) / "VOC2012"
    labels = ImageLabels.load(root / "cls_labels.json")
    torch.manual_seed(0)
    model = ARCHS[args.arch](num_classes=labels.num_fg + 1).eval()
    names = read_list(root / "ImageSets" / "Segmentation" / "train.txt")
    return model, DatasetLayout.voc(root), labels, names


def _run_ours(model, layout, labels, names, args) -> dict[str, np.ndarray]:
    """name -> (K', H, W) float32 normalised maps of the present classes (background first)."""
    cpu = torch.device("cpu")
    model = model.to(memory_format=memory_layout(cpu, "cam_prediction"))  # as tool.predict.load_model
    dataset = InferenceDataset(layout, names, labels, scales=args.scales, flip=True)
    predictor = MultiScalePredictor(model, "bao", cpu)
    out = {}
    for batch in iterate_batches(dataset, args.batch_size, 0, cpu):
        for name, (keys, maps) in zip(batch["names"], predictor(batch)):
            out[name] = maps.numpy()
    return out


def _published_forward(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The published forward: every block's attention kept, stacked, head-averaged, summed."""
    attn_weights = []
    x_base = F.max_pool2d(F.relu(model.bn1(model.conv1(x))), 3, 2, 1)
    feats, _ = model.conv_1(x_base)
    x_t = model.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
    x_t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x_t], dim=1)
    x_t, attn = model.trans_1(x_t)
    attn_weights.append(attn)
    for blk in model.blocks:
        feats, x_t, attn = blk(feats, x_t)
        attn_weights.append(attn)
    stacked = torch.stack(attn_weights)  # (depth, B, heads, 1+N, 1+N)
    attn_sum = stacked.mean(dim=2).sum(dim=0)[:, 1:, 1:]
    cams = model.refine(model.conv_cls_head(feats), attn_sum)
    am = model.refine(model.classifier_x(feats * model.label_enc(y)[:, :, None, None]), attn_sum)
    return torch.cat([am[:, :1], cams[:, 1:]], dim=1)


def _run_reference(model, layout, labels, names, args) -> dict[str, np.ndarray]:
    """name -> (K', H, W) float32 normalised maps, computed the published way."""
    out = {}
    with torch.no_grad():
        for name in names:
            img = read_image(layout.image_path(name))
            h, w = img.shape[:2]
            y = torch.from_numpy(labels.vector(name))[None]
            mask = np.concatenate([[1.0], labels.vector(name)]).astype(np.float32)[:, None, None]
            cam_list = []
            for _, views in multiscale_inputs(img, args.scales):
                for v in range(views.shape[0]):
                    bao = _published_forward(model, views[v:v + 1], y)
                    cam = F.interpolate(bao, (h, w), mode="bilinear", align_corners=False)[0].numpy() * mask
                    cam_list.append(np.flip(cam, -1) if v == 1 else cam)
            sum_cam = np.sum(cam_list, axis=0)
            sum_cam[sum_cam < 0] = 0
            keys = np.concatenate([[0], np.flatnonzero(mask[1:, 0, 0]) + 1])
            cams = sum_cam[keys]
            cam_min = cams.min(axis=(1, 2), keepdims=True)
            cam_max = cams.max(axis=(1, 2), keepdims=True)
            cams[cams < cam_min + 1e-5] = 0
            out[name] = (cams - cam_min - 1e-5) / (cam_max - cam_min + 1e-5)
    return out


def _variant(args: argparse.Namespace) -> None:
    """Child process: run one variant, write its maps and measurements."""
    model, layout, labels, names = _setup(args)
    [read_image(layout.image_path(n)) for n in names]  # warm the page cache, as for the other variant
    base = _maxrss_mb()
    start = time.perf_counter()
    run = _run_ours if args.variant == "ours" else _run_reference
    out = run(model, layout, labels, names, args)
    seconds = time.perf_counter() - start
    work = Path(args.work_dir)
    np.savez(work / f"{args.variant}_maps.npz", **out)
    (work / f"{args.variant}.json").write_text(json.dumps(
        {"seconds": seconds, "base_mb": base, "peak_mb": _maxrss_mb(), "images": len(names)}))


def _child(args: argparse.Namespace, variant: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--work_dir", str(work), "--arch", args.arch,
           "--scales", ",".join(map(str, args.scales)), "--batch_size", str(args.batch_size),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"the {variant} run failed:\n{proc.stderr[-2000:]}")
    return json.loads((work / f"{variant}.json").read_text())


def _compare(ours: np.lib.npyio.NpzFile, ref: np.lib.npyio.NpzFile) -> dict:
    """Agreement of the two variants' normalised maps and of their argmax labels.

    Where labels differ, ``max_margin`` is the largest gap, in the reference maps, between
    the best and the second-best class at those pixels: a gap at the level of the maps'
    difference means the pixel is a near-tie decided by rounding, not a different result.
    """
    same = total = identical = 0
    max_diff = max_margin = 0.0
    for name in ref.files:
        a, b = ours[name], ref[name]
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        la, lb = a.argmax(axis=0), b.argmax(axis=0)
        equal = la == lb
        same += int(equal.sum())
        total += equal.size
        identical += bool(equal.all())
        if not equal.all():
            top2 = np.sort(b, axis=0)[-2:]
            max_margin = max(max_margin, float((top2[1] - top2[0])[~equal].max()))
    return {"images": len(ref.files), "identical": identical, "pixels": same / total, "max_diff": max_diff,
            "max_margin": max_margin}


def main(args: argparse.Namespace) -> None:
    if args.variant:
        _variant(args)
        return
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        work = Path(tmp)
        generate(work / "VOC2012", num_train=args.images, num_val=0, size=args.size, seed=0)
        sizes = [read_image(p).shape[:2] for p in sorted((work / "VOC2012" / "JPEGImages").iterdir())]
        results = {v: _child(args, v, work) for v in ("reference", "ours")}
        agreement = _compare(np.load(work / "ours_maps.npz"), np.load(work / "reference_maps.npz"))

    per_img = {v: r["seconds"] / r["images"] for v, r in results.items()}
    mem = {v: r["peak_mb"] - r["base_mb"] for v, r in results.items()}
    speedup = per_img["reference"] / per_img["ours"]
    saving = 1.0 - mem["ours"] / mem["reference"]
    cuda = "no GPU in this session: CPU only" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    scales = ",".join(map(str, args.scales))
    body = f"""## Inference (bench/bench_infer.py)

Run {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {cpu_name()}, {os.cpu_count()} cores, {args.threads} torch threads (1-min load average {load:.2f} at start; the machine is shared), {cuda}. Python {platform.python_version()}, torch {torch.__version__}.
Command: `python bench/bench_infer.py --arch {args.arch} --images {args.images} --size {args.size} --scales {scales} --batch_size {args.batch_size} --threads {args.threads}`

Conformer `{args.arch}` with seeded random weights (the same in both), {args.images} generated images of {min(s[0] for s in sizes)}-{max(s[0] for s in sizes)} x {min(s[1] for s in sizes)}-{max(s[1] for s in sizes)} pixels, scales {scales} with flips ({2 * len(args.scales)} forward passes per image). Published approach: batch 1, one forward per scale and flip under no_grad, the attention maps of all blocks stacked then averaged and summed, all class channels upsampled and summed in NumPy. Ours: infer_bao's path (batch {args.batch_size}, forwards chunked to at most one image and its flip at 768 (the default --forward_pixels), inference_mode, channels-last, running attention sum, present classes only). Peak memory = peak RSS of the variant's own process minus its RSS after loading the model and images.

| variant | s / image | peak memory above baseline |
|---|---|---|
| published approach | {per_img['reference']:.2f} | {mem['reference']:.0f} MB |
| ours | {per_img['ours']:.2f} | {mem['ours']:.0f} MB |
| ratio | {speedup:.2f}x faster (target >= 1.3x) | {100 * saving:.0f}% less (target >= 35%) |

Agreement: normalised maps differ by at most {agreement['max_diff']:.2e}; labels identical in {agreement['identical']} of {agreement['images']} images, {100 * agreement['pixels']:.4f}% of pixels equal; where they differ, the reference's best and second-best classes are at most {agreement['max_margin']:.2e} apart (near-ties decided by float rounding: summation order, batching and memory layout differ). Random weights give nearly flat maps (attention close to uniform), whose small differences per-channel min/max normalisation magnifies.
"""
    print(body)
    if args.results:
        write_section(args.results, "bench_infer", body)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
