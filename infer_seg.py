"""Segment images with a model trained by train_seg.py: multi-scale, flipped, optionally CRF-refined.

VOC val, scored with evaluation_bao.py::

    python infer_seg.py --weights runs/deeplabv2/deeplabv2_final.pth --infer_list voc12/val.txt \\
        --out_pred out/seg_val --out_crf out/seg_val_crf
    python evaluation_bao.py --predict_dir out/seg_val_crf --list voc12/val.txt

VOC test, for the evaluation server (``--voc12_root`` the test set's VOC2012 folder)::

    python infer_seg.py --weights ... --infer_list voc12/test.txt --out_server out/voc_test --server_labels crf

writes ``out/voc_test/results/VOC2012/Segmentation/comp6_test_cls/<name>.png`` and, once every
image of the list is there, ``out/voc_test/results.tar.gz`` to upload.

COCO val: ``--dataset coco --coco_root COCO`` (default list ``coco14/val_labelled.txt``, the
40,137 val images with a labelled class; ``coco14/val.txt`` holds all 40,504), scored with
``evaluation_bao.py --predict_dir ... --gt_dir COCO/SegmentationClass --list coco14/val_labelled.txt``.

Per image: class probabilities averaged over ``--scales`` (factors of the original size) and
their flips; ``--out_pred``: argmax as a palette PNG at the original resolution; ``--out_crf``:
the argmax after a dense CRF on those probabilities (DeepLab-V2's parameters unless changed).
Images whose requested outputs exist are skipped (resume) unless ``--overwrite``; every file
is written atomically. Under ``torchrun`` the list is sharded over the processes.

Throughput: the data-loading processes also resize and normalise each image to every scale;
without a CRF only the argmax (uint8 labels) leaves the device; CRF worker processes receive
the probabilities through shared memory. On a CUDA device the model runs channels_last, and
``--batch_size`` images of one size share each forward pass; on the CPU images go one at a
time, as the published numbers were made (oneDNN rounds batched convolutions differently).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from apps.cli import (RawDescriptionDefaultsHelpFormatter, add_crf_backend_arg, add_crf_workers_arg, add_dataset_args,
                      add_device_args, add_overwrite_arg, add_segmentation_model_args, add_speed_args,
                      crf_backend_from_args, dataset_from_args, non_negative_int, positive_int, run_cli)
from apps.crf_placement import crf_setup
from apps.run_settings import segmentation_settings_from_run
from core.errors import UserError, quiet_loader_worker
from core.fileio import unfinished
from core.workers import Shared, TaskPool
from data.datasets import CollateOrError, ErrorsAsItems, ImageDataset, collate_images, raise_batch_error
from data.labels import read_list
from data.layout import REPO_ROOT
from network.deeplab import build_segmentation_model, load_segmentation_weights
from crf.params import CRFParams
from core.device import (Runtime, amp_dtype, barrier, cleanup_distributed, compile_model, configure_math,
                         memory_layout, setup_distributed)
from tool.segmentation import (DEFAULT_SEG_SCALES, VOC_SERVER_DIR, argmax_classes, batch_probs, save_labels,
                               write_label_pngs, write_label_pngs_batch, write_server_archive)

# Images segmented by default: the val lists the segmentation stage is scored on (not
# data.layout.DEFAULT_INFER_LISTS, the training images pseudo-labels are made for). COCO val:
# the images with at least one labelled class (40,137), what WSSS papers score on.
DEFAULT_SCORED_LISTS = {"voc": REPO_ROOT / "voc12" / "val.txt", "coco": REPO_ROOT / "coco14" / "val_labelled.txt"}
LABEL_KINDS = ("pred", "crf")
# With --batch_size B, at most HELD_BATCHES * B images wait for others of their size: a list of
# many sizes (COCO's) would otherwise hold images without bound.
HELD_BATCHES = 4


def parse_factors(text: str) -> tuple[float, ...]:
    """argparse type for ``--scales``: comma-separated positive factors, e.g. ``0.5,1.0,1.5``."""
    try:
        factors = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not factors or any(not f > 0 for f in factors):
        raise argparse.ArgumentTypeError(f"scales must be positive factors, got {text!r}")
    return factors


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="segmentation weights written by train_seg.py (<session>_final.pth, or a run's "
                             "checkpoint.pth); --model, --backbone and --label_file left out are those of the run "
                             "that wrote them (its args.json)")
    # No --bn: in eval mode frozen and trained batch norm compute the same, and either's weights load.
    add_segmentation_model_args(parser, batch_norm=False, from_run=True)
    parser.add_argument("--infer_list", default=None,
                        help="images to segment (default: voc12/val.txt for voc, coco14/val_labelled.txt for coco: "
                             "the val images with a labelled class, written by coco14.prepare_coco)")
    parser.add_argument("--out_pred", default=None, help="folder for the label PNGs (argmax of the probabilities)")
    parser.add_argument("--out_crf", default=None, help="folder for the label PNGs after the dense CRF")
    parser.add_argument("--out_server", default=None,
                        help="folder receiving the VOC evaluation server layout "
                             f"({VOC_SERVER_DIR}/<name>.png) and, when complete, results.tar.gz")
    parser.add_argument("--server_labels", choices=LABEL_KINDS, default="crf",
                        help="which labels --out_server holds: pred (no CRF) or crf")
    parser.add_argument("--scales", type=parse_factors, default=DEFAULT_SEG_SCALES,
                        help="rescaling factors of the original image, comma-separated "
                             f"(default: {','.join(map(str, DEFAULT_SEG_SCALES))})")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the horizontally flipped image at each scale")
    crf = CRFParams()
    parser.add_argument("--crf_iters", type=non_negative_int, default=crf.iterations,
                        help="mean-field iterations of the CRF (DeepLab-V2: 10)")
    parser.add_argument("--crf_gaussian", type=float, nargs=2, default=[crf.gaussian_compat, crf.gaussian_sxy],
                        metavar=("WEIGHT", "SXY"), help="Gaussian pairwise term (DeepLab-V2: 3 1)")
    parser.add_argument("--crf_bilateral", type=float, nargs=3,
                        default=[crf.bilateral_compat, crf.bilateral_sxy, crf.bilateral_srgb],
                        metavar=("WEIGHT", "SXY", "SRGB"), help="bilateral pairwise term (DeepLab-V2: 4 67 3)")
    add_crf_workers_arg(parser)
    add_crf_backend_arg(parser)
    parser.add_argument("--num_workers", type=non_negative_int, default=2,
                        help="data-loading processes reading images and making their inputs at every scale "
                             "(0: in the main process)")
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="on a CUDA device, images of one size segmented together, each scale one forward pass "
                             "of 2 x batch_size with the flips; 1 on the CPU, where batched convolutions round "
                             "differently from the published one-image runs")
    add_overwrite_arg(parser)
    add_device_args(parser)
    add_speed_args(parser)
    add_dataset_args(parser, from_run=True)
    return parser


def output_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """Requested outputs ('pred', 'crf', 'server') -> the folder their PNGs go to."""
    outputs = {}
    if args.out_pred:
        outputs["pred"] = Path(args.out_pred)
    if args.out_crf:
        outputs["crf"] = Path(args.out_crf)
    if args.out_server:
        outputs["server"] = Path(args.out_server) / VOC_SERVER_DIR
    if not outputs:
        raise UserError("nothing to write: give --out_pred, --out_crf and/or --out_server")
    return outputs


def needs_crf(args: argparse.Namespace, outputs: dict[str, Path]) -> bool:
    """Whether the requested outputs hold CRF labels (--out_crf, or --out_server with --server_labels crf)."""
    return "crf" in outputs or ("server" in outputs and args.server_labels == "crf")


def equal_size_groups(batches: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Regroup the loader's one-image batches (:func:`data.datasets.collate_images` with inputs)
    into lists of at most ``batch_size`` images of one size: a list goes once full or, when
    ``HELD_BATCHES * batch_size`` images wait, the fullest goes; the rest at the end. With
    ``batch_size`` 1 each image goes at once, in the loader's order. Each image is
    ``{"name", "image": (H, W, 3) uint8, "inputs": [S x (3, h_s, w_s)]}``.
    """
    waiting: dict[tuple[int, int], list[dict[str, Any]]] = {}
    held = 0
    for batch in batches:
        raise_batch_error(batch)
        image = batch["images"][0]
        group = waiting.setdefault(image.shape[:2], [])
        group.append({"name": batch["names"][0], "image": image, "inputs": batch["inputs"][0]})
        held += 1
        if len(group) == batch_size or held >= HELD_BATCHES * batch_size:
            fullest = max(waiting, key=lambda size: len(waiting[size]))
            held -= len(waiting[fullest])
            yield waiting.pop(fullest)
    yield from waiting.values()


def main(args: argparse.Namespace) -> None:
    taken = segmentation_settings_from_run(args)
    outputs = output_dirs(args)
    args.crf_backend = crf_backend_from_args(args, needs_crf(args, outputs))
    runtime = setup_distributed(args.device)
    try:
        _run(args, outputs, runtime, taken)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, outputs: dict[str, Path], runtime: Runtime, taken: str | None) -> None:
    """Segment this rank's share of the list; ``taken`` says which model flags came from the run's args.json."""
    spec = dataset_from_args(args)
    args.infer_list = str(args.infer_list or DEFAULT_SCORED_LISTS[args.dataset])
    names = read_list(args.infer_list)
    spec.layout.check(names, source=args.infer_list)
    mine = names[runtime.rank::runtime.world_size]
    amp = amp_dtype(args.amp, runtime.device)
    # Frozen batch norm: in eval mode it computes what trained batch norm does, and loads either.
    model = build_segmentation_model(args.model, args.backbone, spec.num_classes, "frozen")
    report = load_segmentation_weights(model, args.weights)
    model.eval().to(runtime.device)
    cuda = runtime.device.type == "cuda"
    model.to(memory_format=memory_layout(runtime.device, "seg_inference"))
    math = configure_math(runtime.device, args.tf32)
    compile_model(model, args.compile)
    batch_size = args.batch_size if cuda else 1
    crf = CRFParams(gaussian_compat=args.crf_gaussian[0], gaussian_sxy=args.crf_gaussian[1],
                    bilateral_compat=args.crf_bilateral[0], bilateral_sxy=args.crf_bilateral[1],
                    bilateral_srgb=args.crf_bilateral[2], iterations=args.crf_iters)
    todo = unfinished({folder: ".png" for folder in outputs.values()}, mine, args.overwrite, barrier)
    if runtime.is_main:
        if taken:
            print(taken)
        print(f"weights {args.weights}: {report.summary()}")
        print(math)
        shard = f"; rank 0 of {runtime.world_size} takes {len(mine)}" if runtime.distributed else ""
        print(f"{len(names)} images in {args.infer_list}{shard}: {len(mine) - len(todo)} already done (skipped), "
              f"{len(todo)} to do -> {', '.join(str(f) for f in outputs.values())}")
        if args.batch_size != batch_size:
            print(f"--batch_size {args.batch_size} ignored on {runtime.device}: batches are for CUDA devices; "
                  "elsewhere images go one at a time (batched convolutions round differently)")
    if todo:
        crf_needed = needs_crf(args, outputs)
        loader = DataLoader(ErrorsAsItems(ImageDataset(spec.layout, todo, args.infer_list, args.scales)),
                            batch_size=1, num_workers=args.num_workers, collate_fn=CollateOrError(collate_images),
                            worker_init_fn=quiet_loader_worker, pin_memory=cuda)
        # The CRF (seconds per image on one core) runs in worker processes while the model goes
        # on; without it, writing the PNGs inline costs next to nothing, and so does the torch CRF
        # on a GPU, which runs in this process beside the model, on a whole batch per call.
        setup = crf_setup(args, runtime.device, crf_needed)
        with tqdm(total=len(todo), unit="img", desc="segment", disable=not runtime.is_main) as bar, \
                TaskPool(setup.workers) as pool:
            for group in equal_size_groups(loader, batch_size):
                inputs = [torch.stack([item["inputs"][s] for item in group]) for s in range(len(args.scales))]
                probs = batch_probs(model, inputs, group[0]["image"].shape[:2], args.flip, runtime.device, amp)
                if crf_needed and setup.backend == "torch" and not setup.workers:  # the CRF here: a batch per call
                    write_label_pngs_batch([item["name"] for item in group], [item["image"] for item in group],
                                           probs.cpu().numpy(), outputs, args.server_labels, crf, setup.device)
                    bar.update(len(group))
                elif crf_needed:
                    for item, image_probs in zip(group, probs.cpu().numpy()):
                        bar.update(pool.submit(write_label_pngs, item["name"], item["image"], Shared(image_probs),
                                               outputs, args.server_labels, crf, setup.backend, setup.device,
                                               setup.threads))
                else:
                    for item, labels in zip(group, argmax_classes(probs).cpu().numpy()):
                        bar.update(pool.submit(save_labels, item["name"], {"pred": labels}, outputs,
                                               args.server_labels))
            bar.update(pool.drain())
    barrier()
    if runtime.is_main:
        print(f"done: {len(todo)} images written by rank 0")
        if "server" in outputs:
            missing = [n for n in names if not (outputs["server"] / f"{n}.png").is_file()]
            if missing:
                print(f"{len(missing)} images of the list are not in the server layout yet; no archive written")
            else:
                print(f"server archive: {write_server_archive(args.out_server, names)}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
