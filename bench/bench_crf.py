"""Benchmark: the segmentation stage's dense CRF, in one process against worker processes.

infer_seg.py refines every val and test image with the DeepLab-V2 CRF (10 mean-field
iterations, 21 classes), seconds per 500 x 375 image on one CPU core, while the GPU needs a
fraction of that for the image's probabilities. The usual loop refines the images one after
the other in the inference process; ours hands them to ``--crf_workers`` processes
(:class:`core.workers.TaskPool`, what infer_seg.py and infer_bao.py use). Both refine the same
images (generated photographs' stand-ins of about 448 px with smooth random probabilities) and write
the same PNGs, which the benchmark checks byte for byte.

    python -m bench.bench_crf                  # 16 images, workers: the usable CPUs minus one
    python -m bench.bench_crf --images 4 --workers 1 --results ''

Results go to the ``bench_crf`` section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from apps.cli import non_negative_int, positive_int, run_cli
from apps.report import RESULTS_FILE, machine_line, write_section
from core.workers import TaskPool, default_workers
from data.images import read_image
from data.labels import read_list
from data.synthetic import generate
from tool.crf import CRFParams
from tool.segmentation import write_label_pngs

NUM_CLASSES = 21


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time the dense CRF of infer_seg.py in one process and in "
                                                 "worker processes.")
    parser.add_argument("--images", type=positive_int, default=16, help="images refined per variant")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="worker processes of ours (default: the usable CPUs minus one, infer_seg.py's)")
    parser.add_argument("--results", default=str(RESULTS_FILE),
                        help="markdown file whose bench_crf section is replaced ('' to skip)")
    return parser


def _inputs(count: int, folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (H, W, 3) uint8, probs (21, H, W) float32) pairs: the generated dataset's photographs'
    stand-ins (data/synthetic.py, about 448 px, like VOC's 500 x 375) with smooth random
    probabilities (the CRF's cost depends on the image's colours, so not random pixels)."""
    generate(folder, count, 0, size=448, seed=0, overwrite=True)
    rng = np.random.default_rng(0)
    pairs = []
    for name in read_list(folder / "ImageSets" / "Segmentation" / "train.txt"):
        image = read_image(folder / "JPEGImages" / f"{name}.jpg")
        h, w = image.shape[:2]
        coarse = rng.normal(size=(NUM_CLASSES, h // 32 + 1, w // 32 + 1)).astype(np.float32) * 3
        logits = np.kron(coarse, np.ones((32, 32), np.float32))[:, :h, :w]
        probs = np.exp(logits - logits.max(0))
        pairs.append((image, probs / probs.sum(0)))
    return pairs


def _refine(pairs: list[tuple[np.ndarray, np.ndarray]], folder: Path, workers: int) -> float:
    """Seconds to refine and write every pair with ``workers`` processes (0: in this one)."""
    start = time.perf_counter()
    with TaskPool(workers) as pool:
        for i, (image, probs) in enumerate(pairs):
            pool.submit(write_label_pngs, f"{i:04d}", image, probs, {"crf": folder}, "crf", CRFParams())
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> str:
    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        pairs = _inputs(args.images, Path(tmp) / "VOC2012")
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        one.mkdir(), many.mkdir()
        print(f"{args.images} images, one process ...", flush=True)
        serial = _refine(pairs, one, 0)
        print(f"  {serial:.1f} s\n{args.images} images, {workers} worker processes ...", flush=True)
        pooled = _refine(pairs, many, workers)  # includes starting the workers
        print(f"  {pooled:.1f} s", flush=True)
        same = all((one / p.name).read_bytes() == p.read_bytes() for p in sorted(many.iterdir())) and \
            len(list(many.iterdir())) == args.images
    body = (f"## Dense CRF of the segmentation stage (bench/bench_crf.py)\n\n{machine_line()}\n"
            f"{args.images} generated images of about 448 px (protocol/make_dataset.py), 21 classes of smooth random "
            f"probabilities, infer_seg.py's CRF (10 iterations, Gaussian 3/1, "
            f"bilateral 4/67/3) and PNG writing; worker processes timed from their start.\n\n"
            "| variant | seconds | images/s |\n|---|---|---|\n"
            f"| one process, one image after the other (usual loop) | {serial:.1f} | {args.images / serial:.2f} |\n"
            f"| {workers} worker processes (ours, `--crf_workers`) | {pooled:.1f} | {args.images / pooled:.2f} |\n\n"
            f"Speed-up {serial / pooled:.2f}x; PNGs byte-identical: {'yes' if same else 'NO'}.\n")
    print("\n" + body)
    if args.results:
        write_section(args.results, "bench_crf", body)
    if not same:
        raise SystemExit(1)
    return body


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
