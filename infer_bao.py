"""Threshold-free pseudo-labels from a trained BAO model (method spec section 4), or the
TransCAM baseline's CAMs for threshold sweeps.

    python infer_bao.py --weights bao.pth --voc12_root VOCdevkit/VOC2012 \\
        --out_pred out/pseudo_labels --out_crf out/pseudo_labels_crf --out_cam out/cams
    python infer_bao.py --method transcam --weights transcam.pth --out_cam out/transcam_cams
    python infer_bao.py --method cnn --weights transcam.pth --out_cam out/cnn_cams   # ablation: no refinement
    python infer_bao.py --refine none --weights bao_none.pth ...   # a BAO model trained with --refine none
    torchrun --nproc_per_node 4 infer_bao.py --weights bao.pth ...   # list sharded over ranks

Per image: the multi-scale, flipped maps (``tool.predict``), then

- ``--out_pred DIR``: ``<name>.png``, palette PNG of class ids = argmax over [learned
  background, present classes' maps] (BAO; no threshold), or over [t, CAMs] with ``--t``
  (TransCAM);
- ``--out_crf DIR``: ``<name>.png``, that label map refined by a dense CRF;
- ``--out_cam DIR``: ``<name>.npz`` (``data.camio``): the normalised maps of the present
  classes (key 0 = the background map for BAO), float16, for threshold studies.

Without any output flag, BAO writes ``--out_pred out/pseudo_labels``, TransCAM
``--out_cam out/cams`` and the CNN ablation ``--out_cam out/cnn_cams``. An image whose requested outputs all exist is skipped (resume)
unless ``--overwrite``; every file is written atomically, so an interrupted run leaves no
truncated output. A batch's files are written by a few threads while the next batch runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from apps.cli import (add_crf_backend_arg, add_crf_workers_arg, add_overwrite_arg, add_prediction_args,
                      check_threshold, crf_backend_from_args, dataset_from_args, run_cli)
from apps.crf_placement import crf_setup
from apps.run_settings import prediction_settings_from_run
from core.errors import UserError
from core.fileio import unfinished
from core.palette import save_label_png
from core.workers import TaskPool
from data.camio import CAM_SUFFIX, save_cams
from data.datasets import InferenceDataset
from data.labels import read_list
from data.layout import DEFAULT_INFER_LISTS
from crf.refine import write_crf_png
from core.device import (Runtime, amp_dtype, barrier, cleanup_distributed, compile_model, configure_math,
                         setup_distributed)
from tool.predict import HostOutputs, MultiScalePredictor, iterate_batches, load_model, to_host

DEFAULT_OUT = {"bao": ("out_pred", "out/pseudo_labels"), "transcam": ("out_cam", "out/cams"),
               "cnn": ("out_cam", "out/cnn_cams")}
SUFFIX = {"out_pred": ".png", "out_crf": ".png", "out_cam": CAM_SUFFIX}
# Threads writing the label PNGs and CAM files of one batch while the next one runs (PNG encoding
# and file writes release the GIL).
WRITER_THREADS = 3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infer_list", default=None,
                        help="images to process: a list file of names or published '/JPEGImages/x.jpg ...' "
                             "lines (default: voc12/train.txt for voc, coco14/train.txt for coco, in this "
                             "repository)")
    parser.add_argument("--out_pred", default=None,
                        help="folder for the pseudo-label PNGs (class ids, VOC palette)")
    parser.add_argument("--out_crf", default=None,
                        help="folder for the dense-CRF refined pseudo-label PNGs")
    parser.add_argument("--out_cam", default=None,
                        help="folder for the normalised maps of the present classes (<name>.npz, "
                             "data.camio format; BAO includes the background map as key 0)")
    add_overwrite_arg(parser)
    add_crf_workers_arg(parser)
    add_crf_backend_arg(parser)
    add_prediction_args(parser)
    return parser


def output_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """Requested output kinds ('out_pred', 'out_crf', 'out_cam') -> folder; checks flag combinations."""
    outputs = {k: Path(getattr(args, k)) for k in SUFFIX if getattr(args, k)}
    check_threshold(args)
    if args.method != "bao" and args.t is None and ("out_pred" in outputs or "out_crf" in outputs):
        raise UserError(
            f"--method {args.method} has no background map: label PNGs (--out_pred/--out_crf) need a background "
            "threshold --t; or write the CAMs with --out_cam and sweep t with evaluation_bao.py"
        )
    if not outputs:
        kind, folder = DEFAULT_OUT[args.method]
        outputs[kind] = Path(folder)
    return outputs


def main(args: argparse.Namespace) -> None:
    taken = prediction_settings_from_run(args)
    outputs = output_dirs(args)
    args.crf_backend = crf_backend_from_args(args, "out_crf" in outputs)
    runtime = setup_distributed(args.device)
    try:
        _run(args, outputs, runtime, taken)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, outputs: dict[str, Path], runtime: Runtime, taken: str | None) -> None:
    """Infer on this rank's share of the list; ``taken`` says which model flags came from the run's args.json."""
    spec = dataset_from_args(args)
    args.infer_list = str(args.infer_list or DEFAULT_INFER_LISTS[args.dataset])
    names = read_list(args.infer_list)
    spec.check(names, source=str(args.infer_list))
    mine = names[runtime.rank::runtime.world_size]
    amp = amp_dtype(args.amp, runtime.device)
    model, report = load_model(args.network, args.arch, args.weights, spec.num_classes, args.method,
                               runtime.device, args.refine)
    math = configure_math(runtime.device, args.tf32)
    compile_model(model, args.compile)
    todo = unfinished({folder: SUFFIX[kind] for kind, folder in outputs.items()}, mine, args.overwrite, barrier)
    if runtime.is_main:
        if taken:
            print(taken)
        print(f"weights {args.weights}: {report.summary()}")
        print(math)
        where = ", ".join(f"--{k} {folder}" for k, folder in outputs.items())
        shard = f"; rank 0 of {runtime.world_size} takes {len(mine)}" if runtime.distributed else ""
        print(f"{len(names)} images in {args.infer_list}{shard}: {len(mine) - len(todo)} already done (skipped), "
              f"{len(todo)} to do -> {where}")

    if todo:
        dataset = InferenceDataset(spec.layout, todo, spec.labels, scales=args.scales, flip=True,
                                   return_image="out_crf" in outputs)
        predictor = MultiScalePredictor(model, args.method, runtime.device, amp,
                                        args.forward_pixels)
        # The CRF (seconds per image on one core) runs in worker processes while the model goes on;
        # the torch CRF on a GPU runs in this process, beside the model.
        crf = crf_setup(args, runtime.device, "out_crf" in outputs)
        with_crf = "out_crf" in outputs
        # Two batches' files in flight at most: the one being written, the one just predicted.
        with tqdm(total=len(todo), unit="img", desc="infer", disable=not runtime.is_main) as bar, \
                TaskPool(crf.workers) as pool, \
                TaskPool(WRITER_THREADS, threads=True, in_flight=2 * args.batch_size) as writer:
            for batch in iterate_batches(dataset, args.batch_size, args.num_workers, runtime.device):
                images = batch.get("images", [None] * len(batch["names"]))
                results = to_host(predictor.predict(batch), labels="out_pred" in outputs or with_crf,
                                  maps="out_cam" in outputs, background_score=args.t, num_classes=spec.num_classes)
                for name, image, result in zip(batch["names"], images, results):
                    # An image is done once all its files exist: with the CRF, that is when its CRF ends.
                    written = writer.submit(_write_files, name, result, outputs)
                    if with_crf:
                        written = pool.submit(write_crf_png, outputs["out_crf"] / f"{name}.png", image, result.label,
                                              spec.num_classes, crf.backend, crf.device, crf.threads)
                    bar.update(written)
            written = writer.drain()
            bar.update(pool.drain() if with_crf else written)
    barrier()
    if runtime.is_main:
        print(f"done: {len(todo)} images written by rank 0")


def _write_files(name: str, result: HostOutputs, outputs: dict[str, Path]) -> None:
    """Write the label PNG and CAM file of one image that ``outputs`` asks for, each atomically (a
    writer thread's task; the CRF's PNG is written by the CRF's pool).

    result: the image's keys (K',), label (H, W) uint8 and maps (K', H, W) normalised.
    """
    if "out_pred" in outputs:
        save_label_png(outputs["out_pred"] / f"{name}.png", result.label)
    if "out_cam" in outputs:
        save_cams(outputs["out_cam"] / f"{name}{CAM_SUFFIX}", result.keys, result.maps, half=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
