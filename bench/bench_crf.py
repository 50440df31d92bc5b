"""Benchmark: the segmentation stage's dense CRF, in one process against worker processes.

infer_seg.py refines every val and test image with the DeepLab-V2 CRF (10 mean-field
iterations, 21 classes), seconds per 500 x 375 image on one CPU core, while the GPU needs a
fraction of that for the image's probabilities. The usual loop refines the images one after
the other in the inference process; ours hands them to ``--crf_workers`` processes
(:class:`core.workers.TaskPool`, what infer_seg.py and infer_bao.py use). Both refine the same
images (generated photographs' stand-ins of about 448 px with smooth random probabilities) and write
the same PNGs, which the benchmark checks byte for byte.

The same run times the torch re-implementation (tool/densecrf.py) on the same images, on the
CPU (``--threads`` threads) and on CUDA when a GPU is at hand, and measures how closely it
agrees with pydensecrf2 on inputs like the pipeline's, for both CRF uses: label maps (the
generated ground truth degraded like pseudo-labels: boundaries shifted by erosion and
dilation, blobs of wrong classes; gt_prob 0.7 and the published pairwise terms) and softmax
probabilities (a blurred noisy softmax around the ground truth; DeepLab-V2's terms):
pixels with pydensecrf2's label, mIoU of each against the masks, the marginals' largest
difference.

    python -m bench.bench_crf                  # 16 images, workers: the usable CPUs minus one
    python -m bench.bench_crf --images 4 --workers 1 --results ''
    python -m bench.bench_crf --images 1 --size 48 --workers 1 --results ''   # smoke test: runs, no figures

Results go to the ``bench_crf`` section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from apps.cli import non_negative_int, positive_int, run_cli
from apps.report import RESULTS_FILE, machine_line, write_section
from core.palette import IGNORE_INDEX, read_label_png
from core.workers import TaskPool, default_workers
from data.images import read_image
from data.labels import read_list
from data.synthetic import generate
from tool import densecrf
from tool.crf import CRFParams, crf_label_marginals, crf_refine_probs
from tool.segmentation import write_label_pngs

NUM_CLASSES = 21


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time the dense CRF of infer_seg.py in one process and in "
                                                 "worker processes.")
    parser.add_argument("--images", type=positive_int, default=16, help="images refined per variant")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="worker processes of ours (default: the usable CPUs minus one, infer_seg.py's)")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads of the torch CRF")
    parser.add_argument("--size", type=positive_int, default=448,
                        help="nominal side of the generated images (data/synthetic.py; default: %(default)s, about "
                             "VOC's 500 x 375; a small size is for a smoke test, not for figures)")
    parser.add_argument("--results", default=str(RESULTS_FILE),
                        help="markdown file whose bench_crf section is replaced ('' to skip)")
    return parser


def _inputs(count: int, folder: Path, size: int = 448) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image (H, W, 3) uint8, probs (21, H, W) float32, mask (H, W) uint8) triples: the generated
    dataset's photographs' stand-ins (data/synthetic.py, about 448 px, like VOC's 500 x 375)
    with smooth random probabilities (the CRF's cost depends on the image's colours, so not
    random pixels), and their ground truth (255 on the boundary band)."""
    generate(folder, count, 0, size=size, seed=0, overwrite=True)
    rng = np.random.default_rng(0)
    triples = []
    for name in read_list(folder / "ImageSets" / "Segmentation" / "train.txt"):
        image = read_image(folder / "JPEGImages" / f"{name}.jpg")
        h, w = image.shape[:2]
        coarse = rng.normal(size=(NUM_CLASSES, h // 32 + 1, w // 32 + 1)).astype(np.float32) * 3
        logits = np.kron(coarse, np.ones((32, 32), np.float32))[:, :h, :w]
        probs = np.exp(logits - logits.max(0))
        triples.append((image, probs / probs.sum(0), read_label_png(folder / "SegmentationClass" / f"{name}.png")))
    return triples


def _degraded_labels(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 pseudo-label-like map from a mask: each object's boundary moved (dilated or
    eroded by up to 9 px), the ignore band given to its nearest class, and blobs of wrong classes."""
    labels = mask.copy()
    labels[labels == IGNORE_INDEX] = 0
    out = np.zeros_like(labels)
    for c in np.unique(labels[labels > 0]):
        region = (labels == c).astype(np.uint8)
        k = int(rng.integers(3, 10))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
        region = cv2.dilate(region, kernel) if rng.random() < 0.5 else cv2.erode(region, kernel)
        out[region > 0] = c
    h, w = out.shape
    present = np.unique(labels)
    for _ in range(int(rng.integers(4, 9))):
        y, x, r = int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(8, 30))
        cv2.circle(out, (x, y), r, int(rng.choice(present)), -1)
    return out


def _noisy_softmax(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(21, H, W) float32 softmax of blurred logits: 4 for the mask's class plus smooth noise, so
    that boundaries are soft and some regions wrong, like a small segmentation model's output."""
    labels = mask.copy()
    labels[labels == IGNORE_INDEX] = 0
    h, w = labels.shape
    logits = np.zeros((NUM_CLASSES, h, w), np.float32)
    logits[labels, np.arange(h)[:, None], np.arange(w)[None, :]] = 4.0
    coarse = rng.normal(size=(NUM_CLASSES, h // 24 + 1, w // 24 + 1)).astype(np.float32) * 0.8
    logits += np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_CUBIC) for c in coarse])
    logits = np.stack([cv2.GaussianBlur(c, (0, 0), 4) for c in logits])
    probs = np.exp(logits - logits.max(0))
    return probs / probs.sum(0)


def _miou(pred: np.ndarray, mask: np.ndarray) -> float:
    """Mean IoU (percent) over the classes present in the mask or the prediction, 255 ignored."""
    keep = mask != IGNORE_INDEX
    conf = np.bincount(mask[keep].astype(np.int64) * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES ** 2)
    conf = conf.reshape(NUM_CLASSES, NUM_CLASSES)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    return float(100 * np.mean(np.diag(conf)[union > 0] / union[union > 0]))


def _agreement(uses: dict[str, tuple[list[np.ndarray], list[np.ndarray]]], masks: list[np.ndarray]) -> list[str]:
    """Table rows comparing the two backends' marginals per use: {use: (pydensecrf's, torch's)}."""
    rows = []
    for use, (ref, ours) in uses.items():
        same = [float((r.argmax(0) == o.argmax(0)).mean()) for r, o in zip(ref, ours)]
        diff = max(float(np.abs(r - o).max()) for r, o in zip(ref, ours))
        miou_ref = np.mean([_miou(r.argmax(0), m) for r, m in zip(ref, masks)])
        miou_ours = np.mean([_miou(o.argmax(0), m) for o, m in zip(ours, masks)])
        rows.append(f"| {use} | {100 * np.mean(same):.3f} | {100 * min(same):.3f} | {miou_ref:.2f} | {miou_ours:.2f} | "
                    f"{miou_ours - miou_ref:+.3f} | {diff:.2e} |")
    return rows


def _refine(pairs: list[tuple[np.ndarray, np.ndarray]], folder: Path, workers: int) -> float:
    """Seconds to refine and write every pair with ``workers`` processes (0: in this one)."""
    start = time.perf_counter()
    with TaskPool(workers) as pool:
        for i, (image, probs) in enumerate(pairs):
            pool.submit(write_label_pngs, f"{i:04d}", image, probs, {"crf": folder}, "crf", CRFParams())
    return time.perf_counter() - start


def _time_torch(pairs: list[tuple[np.ndarray, np.ndarray]], device: str) -> tuple[float, list[np.ndarray]]:
    """Seconds for the torch CRF to refine every pair's probabilities on ``device`` (one lattice per
    group of images, :data:`tool.densecrf.PIXELS_PER_CALL`), and the refined probabilities."""
    densecrf.crf_refine_probs_batch([pairs[0][0][:32, :32]], [pairs[0][1][:, :32, :32]], device=device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = densecrf.crf_refine_probs_batch([p[0] for p in pairs], [p[1] for p in pairs], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(args: argparse.Namespace) -> str:
    workers = default_workers() if args.workers is None else args.workers
    torch.set_num_threads(args.threads)
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        triples = _inputs(n, Path(tmp) / "VOC2012", args.size)
        pairs = [(image, probs) for image, probs, _ in triples]
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        one.mkdir(), many.mkdir()
        print(f"{n} images, one process ...", flush=True)
        serial = _refine(pairs, one, 0)
        print(f"  {serial:.1f} s\n{n} images, {workers} worker processes ...", flush=True)
        pooled = _refine(pairs, many, workers)  # includes starting the workers
        print(f"  {pooled:.1f} s", flush=True)
        same = all((one / p.name).read_bytes() == p.read_bytes() for p in sorted(many.iterdir())) and \
            len(list(many.iterdir())) == n
        reference = [read_label_png(one / f"{i:04d}.png") for i in range(n)] if same else []

    print(f"{n} images, pydensecrf2's CRF alone, one process ...", flush=True)
    start = time.perf_counter()
    ref_probs = [crf_refine_probs(image, probs, backend="pydensecrf") for image, probs in pairs]
    crf_alone = time.perf_counter() - start
    print(f"  {crf_alone:.1f} s\n{n} images, torch CRF on the CPU ({args.threads} threads) ...", flush=True)
    cpu, cpu_probs = _time_torch(pairs, "cpu")
    print(f"  {cpu:.1f} s", flush=True)
    if torch.cuda.is_available():
        cuda, _ = _time_torch(pairs, "cuda")
        cuda_row = (f"| torch on CUDA ({torch.cuda.get_device_name(0)}), {n} images per call | {cuda:.2f} | "
                    f"{n / cuda:.2f} | - |")
    else:
        cuda_row = "| torch on CUDA | pending (no GPU at hand) | pending | - |"
    png_same = [float((q.argmax(0) == r).mean()) for q, r in zip(cpu_probs, reference)]

    print(f"agreement on {n} images: label maps and softmax probabilities ...", flush=True)
    rng = np.random.default_rng(1)
    masks = [mask for _, _, mask in triples]
    labels = [_degraded_labels(mask, rng) for mask in masks]
    softmax = [_noisy_softmax(mask, rng) for mask in masks]
    images = [image for image, _, _ in triples]
    uses = {
        "label maps (degraded masks), gt_prob 0.7, Gaussian 3/3, bilateral 50/5/10":
            ([crf_label_marginals(i, lab, NUM_CLASSES, backend="pydensecrf") for i, lab in zip(images, labels)],
             densecrf.crf_label_marginals_batch(images, labels, NUM_CLASSES)),
        "noisy softmax, DeepLab-V2 (Gaussian 1/3, bilateral 67/3/4)":
            ([crf_refine_probs(i, p, backend="pydensecrf") for i, p in zip(images, softmax)],
             densecrf.crf_refine_probs_batch(images, softmax)),
        "smooth random probabilities (the timed inputs), DeepLab-V2": (ref_probs, cpu_probs),
    }
    rows = _agreement(uses, masks)
    input_miou = (np.mean([_miou(lab, m) for lab, m in zip(labels, masks)]),
                  np.mean([_miou(p.argmax(0), m) for p, m in zip(softmax, masks)]))

    body = (f"## Dense CRF of the segmentation stage (bench/bench_crf.py)\n\n{machine_line()}\n"
            f"{n} generated images of about {args.size} px (data/synthetic.py), 21 classes of smooth random "
            f"probabilities, infer_seg.py's CRF (10 iterations, Gaussian 3/1, "
            f"bilateral 4/67/3) and PNG writing; worker processes timed from their start.\n\n"
            "| variant | seconds | images/s |\n|---|---|---|\n"
            f"| one process, one image after the other (usual loop) | {serial:.1f} | {n / serial:.2f} |\n"
            f"| {workers} worker processes (ours, `--crf_workers`) | {pooled:.1f} | {n / pooled:.2f} |\n\n"
            f"Speed-up {serial / pooled:.2f}x; PNGs byte-identical: {'yes' if same else 'NO'}.\n\n"
            "### pydensecrf2 and the torch CRF (tool/densecrf.py)\n\n"
            "The CRF alone (no PNG writing) on the same images and probabilities; per core: images/s divided "
            "by the cores used.\n\n"
            "| backend | seconds | images/s | images/s per core |\n|---|---|---|---|\n"
            f"| pydensecrf2, one process | {crf_alone:.1f} | {n / crf_alone:.2f} | {n / crf_alone:.2f} |\n"
            f"| torch on the CPU, {args.threads} threads, {n} images per call | {cpu:.1f} | {n / cpu:.2f} | "
            f"{n / cpu / args.threads:.2f} |\n{cuda_row}\n\n"
            f"Torch CPU per core / pydensecrf2: {crf_alone / cpu / args.threads:.2f}x. "
            f"Torch labels equal to pydensecrf2's PNGs: "
            f"{f'{100 * np.mean(png_same):.3f}%' if png_same else 'not compared (PNGs differ)'}.\n\n"
            "Agreement (goal: >= 99.5% of pixels with pydensecrf2's label, mIoU within 0.1 point). Label maps: "
            "the masks with every object dilated or eroded by 3-9 px and 4-8 discs of wrong classes "
            f"(input mIoU {input_miou[0]:.2f}; stand-ins for BAO pseudo-labels, no trained model run); softmax: "
            f"4 on the mask's class plus smooth noise, blurred (input mIoU {input_miou[1]:.2f}; a stand-in for a "
            "segmentation model's output).\n\n"
            "| inputs | pixels equal (mean %) | worst image (%) | mIoU pydensecrf2 | mIoU torch | difference | "
            "marginals max abs diff |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "Where they differ: float summation order only (the lattice is built with the C++'s float32 "
            "operations, so the same lattice points and weights; splatting sums each point's pixels in "
            "another order, and torch's exp and log are not the C library's); a label flips only where two "
            "labels' marginals tie to about 1e-4.\n")
    print("\n" + body)
    if args.results:
        write_section(args.results, "bench_crf", body)
    if not same:
        raise SystemExit(1)
    return body


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
