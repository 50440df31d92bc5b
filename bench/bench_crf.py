"""Benchmark: the segmentation stage's dense CRF, in one process against worker processes, and
pydensecrf2 against the torch CRF (crf/densecrf.py).

infer_seg.py refines every val and test image with the DeepLab-V2 CRF (10 mean-field
iterations, 21 classes), seconds per 500 x 375 image on one CPU core, while the GPU needs a
fraction of that for the image's probabilities. The usual loop refines the images one after
the other in the inference process; ours hands them to ``--crf_workers`` processes
(:class:`core.workers.TaskPool`, what infer_seg.py and infer_bao.py use; the torch CRF with one
thread in each). Both backends refine the same images (generated photographs' stand-ins of
about 448 px with smooth random probabilities) and write PNGs as infer_seg.py does; the
benchmark checks that one process and the workers write the same bytes.

The same run times each CRF alone on the same images: pydensecrf2 in one process, torch on the
CPU (``--threads`` threads, one image per lattice) and on CUDA when a GPU is at hand (one image
per call, and several per lattice), and measures how closely it
agrees with pydensecrf2 on inputs like the pipeline's, for both CRF uses: label maps (the
generated ground truth degraded like pseudo-labels: boundaries shifted by erosion and
dilation, blobs of wrong classes; gt_prob 0.7 and the published pairwise terms) and softmax
probabilities (a blurred noisy softmax around the ground truth; DeepLab-V2's terms):
pixels with pydensecrf2's label, mIoU of each against the masks, the marginals' largest
difference.

    python -m bench.bench_crf                  # 16 images, workers: the usable CPUs minus one
    python -m bench.bench_crf --images 4 --workers 1 --results ''
    python -m bench.bench_crf --images 1 --size 48 --workers 1 --results ''   # smoke test: runs, no figures
    python -m bench.bench_crf --torch_only cuda      # the torch CRF on a GPU (no pydensecrf2 needed)

Results go to the ``bench_crf`` section of bench/RESULTS.md (``--torch_only``: ``bench_crf_device``).
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from apps.cli import non_negative_int, positive_int, run_cli
from bench.report import RESULTS_FILE, machine_line, write_section
from core.errors import UserError
from core.palette import IGNORE_INDEX, read_label_png
from core.workers import TaskPool, default_workers
from data.images import read_image
from data.labels import ImageLabels, read_list
from data.synthetic import generate
from crf import densecrf
from network.deeplab import build_segmentation_model, load_segmentation_weights
from crf.params import CRFParams, pydensecrf_installed
from crf.refine import crf_label_marginals, crf_refine_probs
from tool.segmentation import multiscale_probs, write_label_pngs
from engine.trainrun import read_run_args

NUM_CLASSES = 21
ROOT = Path(__file__).resolve().parents[1]
PER_CORE_IMAGES = 4  # pydensecrf2's images timed beside --torch_only


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time the dense CRF of infer_seg.py in one process and in "
                                                 "worker processes.")
    parser.add_argument("--images", type=positive_int, default=16, help="images refined per variant")
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="worker processes of ours (default: the usable CPUs minus one, infer_seg.py's)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads of the torch CRF timed alone (default: %(default)s, as in each CRF worker)")
    parser.add_argument("--size", type=positive_int, default=448,
                        help="nominal side of the generated images (data/synthetic.py; default: %(default)s, about "
                             "VOC's 500 x 375; a small size is for a smoke test, not for figures)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="times each CRF alone is timed, the backends alternating (median and range reported)")
    parser.add_argument("--bao_weights", default=None,
                        help="BAO weights of a training run (e.g. a `make demo` run's "
                             "demo_out/seed0/attention/bao/bao/*_10epochs_modelt.pth): the agreement is also measured "
                             "on the pseudo-labels infer_bao.py makes with them for the generated images")
    parser.add_argument("--seg_weights", default=None,
                        help="segmentation weights of a train_seg.py run (e.g. demo_out/seed0/attention/seg_train/seg/"
                             "seg_final.pth): the agreement is also measured on that model's softmax (infer_seg.py's "
                             "scales and flips)")
    parser.add_argument("--torch_only", default=None, metavar="DEVICE",
                        help="time only the torch CRF on DEVICE (e.g. cuda; pydensecrf2 is not needed), one image per "
                             "call and several per lattice, against the torch CRF on the CPU; writes the "
                             "bench_crf_device section")
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


def _refine(pairs: list[tuple[np.ndarray, np.ndarray]], folder: Path, workers: int, backend: str) -> float:
    """Seconds to refine and write every pair with ``workers`` processes (0: in this one), as
    infer_seg.py does (the torch CRF with one thread per process)."""
    threads = 1 if backend == "torch" else None
    start = time.perf_counter()
    with TaskPool(workers) as pool:
        for i, (image, probs) in enumerate(pairs):
            pool.submit(write_label_pngs, f"{i:04d}", image, probs, {"crf": folder}, "crf", CRFParams(), backend,
                        "cpu", threads)
    return time.perf_counter() - start


def _time_uses(images: list[np.ndarray], labels: list[np.ndarray], probs: list[np.ndarray],
               repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each CRF use (label maps, probabilities) and backend over all images, ``repeats``
    times with the backends alternating, so that the machine's drift touches both alike."""
    densecrf.crf_refine_probs(images[0][:32, :32], probs[0][:, :32, :32])  # warm-up
    runs = {
        ("labels", "pydensecrf"): lambda: [crf_label_marginals(i, lab, NUM_CLASSES, backend="pydensecrf")
                                           for i, lab in zip(images, labels)],
        ("labels", "torch"): lambda: densecrf.crf_label_marginals_batch(images, labels, NUM_CLASSES),
        ("probs", "pydensecrf"): lambda: [crf_refine_probs(i, p, backend="pydensecrf") for i, p in zip(images, probs)],
        ("probs", "torch"): lambda: densecrf.crf_refine_probs_batch(images, probs),
    }
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for r in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)
            print(f"  repeat {r + 1}/{repeats}, {key[0]}, {key[1]}: {seconds[key][-1]:.1f} s", flush=True)
    return seconds


def _timed(refine, images: list[np.ndarray], inputs: list[np.ndarray], extra: tuple, device: torch.device,
           pixels_per_call: int | None) -> tuple[float, list[np.ndarray]]:
    """Seconds for ``refine`` (a ``crf.densecrf`` ``*_batch`` function, ``extra`` its arguments after
    the inputs) on ``device`` over every image, after a warm-up on a 32-pixel crop, and its outputs."""
    refine([images[0][:32, :32]], [inputs[0][..., :32, :32]], *extra, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = refine(images, inputs, *extra, device=device, pixels_per_call=pixels_per_call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _bao_labels(weights: str, root: Path, names: list[str], out: Path) -> list[np.ndarray]:
    """The BAO pseudo-labels infer_bao.py makes with ``weights`` (its run's args.json gives the
    model) for the generated images, on the CPU."""
    command = [sys.executable, "infer_bao.py", "--weights", str(Path(weights).resolve()), "--voc12_root", str(root),
               "--label_file", str(root / "cls_labels.json"), "--infer_list",
               str(root / "ImageSets" / "Segmentation" / "train.txt"), "--out_pred", str(out), "--device", "cpu"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"infer_bao.py failed with {weights}:\n{proc.stderr[-2000:]}")
    return [read_label_png(out / f"{name}.png") for name in names]


def _seg_softmax(weights: str, images: list[np.ndarray], num_classes: int) -> list[np.ndarray]:
    """(C, H, W) probabilities of a train_seg.py model of ``num_classes`` (its run's args.json gives
    the model and backbone) for each image, at infer_seg.py's default scales with flips, on the CPU."""
    found = read_run_args(weights)
    if found is None:
        raise SystemExit(f"{weights}: no args.json beside it to tell the model and backbone")
    settings = found[1]
    model = build_segmentation_model(settings["model"], settings["backbone"], num_classes, "frozen")
    load_segmentation_weights(model, weights)
    model.eval()
    return [multiscale_probs(model, image).numpy() for image in images]


def _same_pngs(a: Path, b: Path, count: int) -> bool:
    """Whether folders ``a`` and ``b`` hold the same ``count`` PNGs, byte for byte."""
    names = sorted(p.name for p in a.iterdir())
    return len(names) == count and names == sorted(p.name for p in b.iterdir()) and \
        all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def _pydensecrf_per_core(images: list[np.ndarray], uses: dict[str, tuple]) -> str:
    """One sentence: pydensecrf2's images/s on one core of this machine for each use, on the first
    :data:`PER_CORE_IMAGES` images (seconds per image on a CPU: a few give its rate), or why not."""
    if not pydensecrf_installed():
        return "pydensecrf2 per core: not measured (pydensecrf2 is not installed here; see the bench_crf section)."
    refine = {densecrf.crf_label_marginals_batch: crf_label_marginals,
              densecrf.crf_refine_probs_batch: crf_refine_probs}
    k = min(len(images), PER_CORE_IMAGES)
    rates = []
    for use, (batch_refine, inputs, extra) in uses.items():
        start = time.perf_counter()
        for image, given in zip(images[:k], inputs[:k]):
            refine[batch_refine](image, given, *extra, backend="pydensecrf")
        rates.append(f"{use.split(',')[0]} {k / (time.perf_counter() - start):.2f} img/s")
    return f"pydensecrf2 per core (one process, the first {k} images, this machine's CPU): {'; '.join(rates)}."


def torch_only(args: argparse.Namespace) -> str:
    """``--torch_only DEVICE``: the torch CRF on DEVICE, both uses, one image per call and up to
    :data:`crf.densecrf.PIXELS_PER_CALL` pixels per lattice, against the torch CRF on the CPU (one
    image per lattice: the labels the CPU rows of the bench_crf section compare with pydensecrf2)."""
    device = torch.device(args.torch_only)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--torch_only {args.torch_only}: no CUDA device here")
    torch.set_num_threads(args.threads)
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        triples = _inputs(n, Path(tmp) / "VOC2012", args.size)
    images = [image for image, _, _ in triples]
    rng = np.random.default_rng(1)
    uses = {"label maps, gt_prob 0.7, Gaussian 3/3, bilateral 50/5/10":
            (densecrf.crf_label_marginals_batch, [_degraded_labels(mask, rng) for _, _, mask in triples],
             (NUM_CLASSES,)),
            "probabilities, DeepLab-V2 (Gaussian 1/3, bilateral 67/3/4)":
            (densecrf.crf_refine_probs_batch, [probs for _, probs, _ in triples], ())}
    rows = []
    for use, (refine, inputs, extra) in uses.items():
        print(f"{n} images, {use}: torch on the CPU ...", flush=True)
        reference = refine(images, inputs, *extra)
        for label, pixels in (("one image per call", 1), (f"up to {densecrf.PIXELS_PER_CALL:,} pixels per lattice",
                                                           densecrf.PIXELS_PER_CALL)):
            print(f"  on {device}, {label} ...", flush=True)
            seconds, out = _timed(refine, images, inputs, extra, device, pixels)
            same = [float((r.argmax(0) == o.argmax(0)).mean()) for r, o in zip(reference, out)]
            diff = max(float(np.abs(r - o).max()) for r, o in zip(reference, out))
            rows.append(f"| {use} | {label} | {seconds:.2f} | {n / seconds:.2f} | {100 * np.mean(same):.3f} | "
                        f"{100 * min(same):.3f} | {diff:.2e} |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    body = (f"## The torch CRF on {name} (bench/bench_crf.py --torch_only)\n\n{machine_line()}\n"
            f"Command: `python -m bench.bench_crf {shlex.join(sys.argv[1:])}`\n"
            f"{n} generated images of about {args.size} px, 21 labels, 10 iterations; labels compared with the "
            "torch CRF on the CPU (one image per lattice), which the bench_crf section compares with pydensecrf2.\n\n"
            "| use | variant | seconds | images/s | labels equal to the CPU's (mean %) | worst image (%) | "
            "marginals max abs diff |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            + _pydensecrf_per_core(images, uses) + "\n")
    print("\n" + body)
    if args.results:
        write_section(args.results, "bench_crf_device", body)
    return body


def main(args: argparse.Namespace) -> str:
    if args.torch_only:
        return torch_only(args)
    workers = default_workers() if args.workers is None else args.workers
    torch.set_num_threads(args.threads)
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "VOC2012"
        triples = _inputs(n, root, args.size)
        pairs = [(image, probs) for image, probs, _ in triples]
        times, same = {}, {}
        variants = (0,) if workers == 0 else (0, workers)
        for backend in ("pydensecrf", "torch"):
            one, many = Path(tmp) / f"{backend}_one", Path(tmp) / f"{backend}_many"
            one.mkdir(), many.mkdir()
            print(f"{n} images, {backend}, one process ...", flush=True)
            times[backend, 0] = _refine(pairs, one, 0, backend)
            print(f"  {times[backend, 0]:.1f} s", flush=True)
            if workers:
                print(f"{n} images, {backend}, {workers} worker processes ...", flush=True)
                times[backend, workers] = _refine(pairs, many, workers, backend)  # includes starting the workers
                print(f"  {times[backend, workers]:.1f} s", flush=True)
                same[backend] = _same_pngs(one, many, n)
        reference = [read_label_png(Path(tmp) / "pydensecrf_one" / f"{i:04d}.png") for i in range(n)]
        torch_pngs = [read_label_png(Path(tmp) / "torch_one" / f"{i:04d}.png") for i in range(n)]
        names = read_list(root / "ImageSets" / "Segmentation" / "train.txt")
        bao = _bao_labels(args.bao_weights, root, names, Path(tmp) / "bao") if args.bao_weights else None
        classes = ImageLabels.load(root / "cls_labels.json").num_fg + 1  # the trained models' classes
    png_same = np.mean([float((t == r).mean()) for t, r in zip(torch_pngs, reference)])

    rng = np.random.default_rng(1)
    images = [image for image, _, _ in triples]
    masks = [mask for _, _, mask in triples]
    labels = [_degraded_labels(mask, rng) for mask in masks]
    softmax = [_noisy_softmax(mask, rng) for mask in masks]
    print(f"{n} images, each CRF alone, {args.repeats} repeats (torch: {args.threads} thread(s)) ...", flush=True)
    timed_probs = [probs for _, probs in pairs]
    seconds = _time_uses(images, labels, timed_probs, args.repeats)
    cuda_rows = ["| probabilities | torch on CUDA | pending (no GPU at hand) | pending | - |"]
    if torch.cuda.is_available():
        gpu, cuda = torch.cuda.get_device_name(0), torch.device("cuda")
        cuda_rows = [f"| probabilities | torch on CUDA ({gpu}), {label} | {t:.2f} | {n / t:.2f} | - |"
                     for label, t in (("one image per call",
                                       _timed(densecrf.crf_refine_probs_batch, images, timed_probs, (), cuda, 1)[0]),
                                      (f"up to {densecrf.PIXELS_PER_CALL:,} pixels per lattice",
                                       _timed(densecrf.crf_refine_probs_batch, images, timed_probs, (), cuda,
                                              None)[0]))]

    print(f"agreement on {n} images ...", flush=True)
    uses = {
        "label maps (degraded masks), gt_prob 0.7, Gaussian 3/3, bilateral 50/5/10":
            ([crf_label_marginals(i, lab, NUM_CLASSES, backend="pydensecrf") for i, lab in zip(images, labels)],
             densecrf.crf_label_marginals_batch(images, labels, NUM_CLASSES)),
        "noisy softmax, DeepLab-V2 (Gaussian 1/3, bilateral 67/3/4)":
            ([crf_refine_probs(i, p, backend="pydensecrf") for i, p in zip(images, softmax)],
             densecrf.crf_refine_probs_batch(images, softmax)),
    }
    inputs = {"label maps (degraded masks)": labels, "noisy softmax": [p.argmax(0) for p in softmax]}
    if bao is not None:
        key = f"BAO pseudo-labels of `{args.bao_weights}` (infer_bao.py), gt_prob 0.7, published terms"
        uses[key] = ([crf_label_marginals(i, lab, classes, backend="pydensecrf") for i, lab in zip(images, bao)],
                     densecrf.crf_label_marginals_batch(images, bao, classes))
        inputs["BAO pseudo-labels"] = bao
    if args.seg_weights:
        trained = _seg_softmax(args.seg_weights, images, classes)
        key = f"softmax of `{args.seg_weights}` (infer_seg.py's scales and flips), DeepLab-V2"
        uses[key] = ([crf_refine_probs(i, p, backend="pydensecrf") for i, p in zip(images, trained)],
                     densecrf.crf_refine_probs_batch(images, trained))
        inputs["trained model's softmax"] = [p.argmax(0) for p in trained]
    rows = _agreement(uses, masks)
    input_miou = "; ".join(f"{name} {np.mean([_miou(lab, m) for lab, m in zip(maps, masks)]):.2f}"
                           for name, maps in inputs.items())

    def row(backend: str, procs: int) -> str:
        label = ("one process, one image after the other" if procs == 0
                 else f"{procs} worker processes (`--crf_workers`)")
        return f"| {backend} | {label} | {times[backend, procs]:.1f} | {n / times[backend, procs]:.2f} |"

    def alone(use: str) -> list[str]:
        out = []
        for backend in ("pydensecrf", "torch"):
            t = statistics.median(seconds[use, backend])
            cores = args.threads if backend == "torch" else 1
            name = "pydensecrf2, one process" if backend == "pydensecrf" else \
                f"torch on the CPU, {args.threads} thread(s), one image per lattice"
            out.append(f"| {'label maps' if use == 'labels' else 'probabilities'} | {name} | {t:.1f} | {n / t:.2f} | "
                       f"{n / t / cores:.2f} |")
        return out

    def ratio(use: str) -> str:
        each = [p / (t * args.threads) for p, t in zip(seconds[use, "pydensecrf"], seconds[use, "torch"])]
        return f"{statistics.median(each):.2f}x (range {min(each):.2f}-{max(each):.2f} over {len(each)} repeats)"

    body = (f"## Dense CRF of the segmentation stage (bench/bench_crf.py)\n\n{machine_line()}\n"
            f"Command: `python -m bench.bench_crf {shlex.join(sys.argv[1:])}`\n"
            f"{n} generated images of about {args.size} px (data/synthetic.py), 21 classes of smooth random "
            f"probabilities, infer_seg.py's CRF (10 iterations, Gaussian 3/1, "
            f"bilateral 4/67/3) and PNG writing; worker processes timed from their start; the torch CRF with "
            f"one thread per process.\n\n"
            "| backend | variant | seconds | images/s |\n|---|---|---|---|\n"
            + "\n".join(row(backend, procs) for backend in ("pydensecrf", "torch") for procs in variants) + "\n\n"
            + (f"Workers' PNGs byte-identical to one process's: pydensecrf {'yes' if same['pydensecrf'] else 'NO'}, "
               f"torch {'yes' if same['torch'] else 'NO'}. " if workers else "")
            + f"Torch's labels equal to pydensecrf2's: {100 * png_same:.3f}% of the pixels.\n\n"
            "### pydensecrf2 and the torch CRF alone (crf/densecrf.py)\n\n"
            "The CRF alone (no PNG writing) on the same images, both uses: infer_bao.py's label-map CRF (the "
            "degraded masks below, published terms) and infer_seg.py's (the smooth random probabilities above); "
            f"median seconds of {args.repeats} repeats, the backends alternating; per core: images/s divided by "
            "the cores used.\n\n"
            "| use | backend | seconds | images/s | images/s per core |\n|---|---|---|---|---|\n"
            + "\n".join(alone("labels") + alone("probs") + cuda_rows) + "\n\n"
            f"Torch CPU per core / pydensecrf2: label maps {ratio('labels')}; probabilities {ratio('probs')}.\n\n"
            "Agreement (goal: >= 99.5% of pixels with pydensecrf2's label, mIoU within 0.1 point). Label maps: "
            "the masks with every object dilated or eroded by 3-9 px and 4-8 discs of wrong classes; noisy "
            "softmax: 4 on the mask's class plus smooth noise, blurred"
            + (", and the outputs of trained models where named" if bao is not None or args.seg_weights else
               " (stand-ins; `--bao_weights` / `--seg_weights` add the outputs of trained models)")
            + f". mIoU of the CRF's inputs against the masks: {input_miou}.\n\n"
            "| inputs | pixels equal (mean %) | worst image (%) | mIoU pydensecrf2 | mIoU torch | difference | "
            "marginals max abs diff |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "Where they differ: float rounding only (the lattice is built with the C++'s float32 "
            "operations, so the same lattice points and weights; the normalisation is folded into the splat "
            "and slice weights, a blur pass adds its neighbours one at a time, and torch's exp and log are not "
            "the C library's); a label flips only where two labels' marginals tie to about 1e-4.\n")
    print("\n" + body)
    if args.results:
        write_section(args.results, "bench_crf", body)
    if not all(same.values()):
        raise SystemExit(1)
    return body


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
