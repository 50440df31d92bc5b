"""The flags that several entry scripts share, each defined once here (a script's own flags are
defined in its ``get_args_parser``; tests/test_cli_flags.py checks the split), their types, and
the hints naming the flag that fixes a library error (:data:`FLAG_HINTS`, :func:`run_cli`).

Library modules define no flags. The groups that need torch-based modules import them inside
the function: evaluation and the dataset commands use this module too, and must start without torch.
"""
from __future__ import annotations

import argparse
import os

from core.errors import UserError
from core.errors import run_guarded
from data.layout import DEFAULT_LABEL_FILES, DEFAULT_VOC_ROOT, DatasetLayout, DatasetSpec, load_dataset

DEFAULT_ARCH = "sm"
DEFAULT_SEG_MODEL = "deeplabv2"
DEFAULT_BACKBONE = "resnet101"

# What the library's errors are about -> the flags that fix them (core.errors.UserError.about).
FLAG_HINTS = {
    "transcam_for_bao": "; use --method transcam for the TransCAM baseline, or train BAO from these weights "
                        "with train_bao.py --weights",
    "imagenet": "; start the TransCAM stage from them: train_bao.py --method transcam --weights ...",
    "classes": ": --label_file (and --dataset)",
    "arch": "; check --arch",
    "plain_weights": "; pass them as --weights",
    "backbone_weights": " (--backbone_weights; see --backbone)",
    "seg_arch": "; check --model and --backbone",
    "label_dir": "; write the pseudo-labels there with infer_bao.py --out_pred, or check --label_dir",
    "label_files": "; make pseudo-labels for every name of the list (infer_bao.py --infer_list) or check "
                   "--label_dir and the list",
    "label_ids": " (--label_dir, --label_file / --dataset)",
    # evaluation_bao.py (scoring.evaluate, scoring.metrics)
    "prediction_folder": "; set --predict_dir",
    "ground_truth_folder": "; set --gt_dir or --voc12_root",
    "predictions": " (--predict_dir, --list)",
    "ground_truth": " (--gt_dir or --voc12_root, --list)",
    "cams_not_labels": "; evaluate them with --type npy",
    "labels_not_cams": "; evaluate them with --type png",
    "coco_contiguous_ids": ("; evaluate contiguous ids against contiguous-id masks (python -m coco14.prepare_coco "
                            "--convention contiguous) or, for masks without convention.json, with --dataset coco "
                            "and --convention contiguous"),
    "coco_raw_ids": ("; evaluate raw category ids against raw-id masks (python -m coco14.prepare_coco --convention "
                     "raw) or, for masks without convention.json, with --dataset coco --convention raw; or "
                     "convert the predictions to contiguous ids"),
    "background_map": "; drop --bg_from_file",
    "images": "; set --img_dir (the folder of <name>.jpg; default <voc12_root>/JPEGImages)",
    "logfile": "; set --logfile",
}


def run_cli(main, args: argparse.Namespace) -> None:
    """Run an entry script's ``main(args)``: a user error ends in one line naming the flag to fix
    (:data:`FLAG_HINTS`; a dataset-root error found after the dataset was opened, e.g. by a dataset's
    image check, names the script's root flag), Ctrl-C in a clean exit (:func:`core.errors.run_guarded`)."""
    def main_naming_root_flag(a: argparse.Namespace):
        try:
            return main(a)
        except UserError as err:
            flag = "--coco_root" if getattr(a, "dataset", "voc") == "coco" else "--voc12_root"
            raise (_with_root_flag(err, flag) if hasattr(a, flag[2:]) else err) from None

    run_guarded(main_naming_root_flag, args, FLAG_HINTS)


def int_at_least(minimum: int):
    """argparse type for integers >= ``minimum`` (counts, batch sizes, worker processes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def parse_bool(text: str) -> bool:
    """argparse type for a boolean value: true/false, 1/0, yes/no, on/off (any case).

    Published flags declared ``type=bool`` turned every non-empty text, "False" included,
    into True; this reads the words as meant and refuses anything else.
    """
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false (also 1/0, yes/no)")


def worker_count(text: str) -> int:
    """argparse type for a number of worker processes: >= 1, or negative as joblib's ``n_jobs``
    (the published scripts' flag), counted back from the CPU count: -1 = every CPU, -2 = all but one."""
    value = int_at_least(-(1 << 30))(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be >= 1, got 0 (or negative, counted back from the CPU count as "
                                         "joblib's n_jobs: -1 = every CPU)")
    return value if value > 0 else max(1, (os.cpu_count() or 1) + 1 + value)


def parse_scales(text: str) -> tuple[int, ...]:
    """argparse type for ``--scales``: comma-separated positive multiples of 16, e.g. ``256,512,768``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs at least one scale, e.g. 256,512,768")
    try:
        scales = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    bad = [s for s in scales if s <= 0 or s % 16]
    if bad:
        raise argparse.ArgumentTypeError(f"scales must be positive multiples of 16 (the network stride), got {bad}")
    if len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"scales must be distinct, got {text!r}")
    return scales


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--amp``."""
    from core.device import AMP_CHOICES

    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--amp", default="off", choices=AMP_CHOICES,
                        help="mixed precision: off = float32 throughout, as published (the default); bf16 "
                             "or fp16 = autocast, faster on GPUs but it changes the teacher's pseudo-labels "
                             "and the maps slightly (bench/gpu_check.py measures by how much); bf16 also "
                             "works on CPU, fp16 needs CUDA")


def add_speed_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--tf32`` and ``--compile``: opt-in speed that changes the numbers (docs/numerics.md)."""
    from core.device import COMPILE_MODES

    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls on CUDA (faster on Ampere and later; changes the numbers slightly; "
                             "convolutions use TF32 either way, PyTorch's default); off by default, as published")
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES,
                        help="torch.compile the model: 'default', 'reduce-overhead' (adds CUDA graphs) or "
                             "'max-autotune'; the first batches compile (tens of seconds); results equal "
                             "eager up to float rounding (default: off)")


def add_stages_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device`` of a command that runs the entry scripts as stages (passed to each of them)."""
    parser.add_argument("--device", default="auto",
                        help="--device of every stage: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or "
                             "'cuda:N'")


def add_voc_root_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--voc12_root`` (also used alone by the commands that only read VOC files)."""
    parser.add_argument("--voc12_root", default=DEFAULT_VOC_ROOT,
                        help="VOC root, the folder holding JPEGImages/, SegmentationClass(Aug)/ and "
                             f"Annotations/ (default: {DEFAULT_VOC_ROOT})")


def add_label_file_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, extra_help: str = "",
                       from_run: bool = False) -> None:
    """``--label_file``; ``from_run`` as in :func:`add_model_args` (the help then says that the run's
    ``args.json`` supplies the default)."""
    parser.add_argument("--label_file", default=None,
                        help="image-level label JSON; its class list sets the number of classes (default: "
                             f"{_run_or(from_run)}{DEFAULT_LABEL_FILES['voc'].relative_to(DEFAULT_LABEL_FILES['voc'].parents[1])} "
                             f"for voc, {DEFAULT_LABEL_FILES['coco'].relative_to(DEFAULT_LABEL_FILES['coco'].parents[1])} "
                             f"for coco, both in this repository){extra_help}")


def add_generated_dataset_args(parser: argparse.ArgumentParser, num_train: int = 300, num_val: int = 100,
                               size: int = 128) -> None:
    """``--num_train``, ``--num_val``, ``--size``: the generated VOC-format dataset (protocol/make_dataset.py)."""
    parser.add_argument("--num_train", type=positive_int, default=num_train,
                        help="generated images in ImageSets/Segmentation/train.txt (default: %(default)s)")
    parser.add_argument("--num_val", type=non_negative_int, default=num_val,
                        help="generated images in ImageSets/Segmentation/val.txt (default: %(default)s)")
    parser.add_argument("--size", type=positive_int, default=size,
                        help="nominal side of the generated images; each width and height is drawn in "
                             "[0.75, 1.25] * size (default: %(default)s)")


def add_dataset_args(parser: argparse.ArgumentParser, from_run: bool = False) -> None:
    """``--dataset``, ``--voc12_root``, ``--coco_root``, ``--coco_mask_dir`` and ``--label_file``
    (``from_run`` as in :func:`add_label_file_arg`)."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", choices=("voc", "coco"), default="voc",
                       help="dataset layout: PASCAL VOC 2012 or MS COCO 2014 (default: voc)")
    add_voc_root_arg(group)
    group.add_argument("--coco_root", default=None,
                       help="COCO 2014 root, the folder holding train2014/ and val2014/ "
                            "(required with --dataset coco)")
    group.add_argument("--coco_mask_dir", default=None,
                       help="folder of COCO ground-truth mask PNGs written by the coco14 command "
                            "(default: <coco_root>/SegmentationClass)")
    add_label_file_arg(group, from_run=from_run)


def dataset_from_args(args: argparse.Namespace) -> DatasetSpec:
    """The :class:`data.layout.DatasetSpec` chosen by the flags of :func:`add_dataset_args`."""
    if args.dataset == "coco" and not args.coco_root:
        raise UserError("--dataset coco needs --coco_root, the folder holding train2014/ and val2014/")
    try:
        return load_dataset(args.dataset, args.voc12_root if args.dataset == "voc" else args.coco_root,
                            label_file=args.label_file, coco_mask_dir=args.coco_mask_dir)
    except UserError as err:
        raise _with_root_flag(err, "--voc12_root" if args.dataset == "voc" else "--coco_root") from None


def _with_root_flag(err: UserError, flag: str, hint: str = "") -> UserError:
    """A dataset-root error of the library with the flag that sets the root (and ``hint``)."""
    return UserError(f"{err}; check {flag}{hint}") if err.about == "root" else err


def add_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, weights_help: str,
                   weights_required: bool, from_run: bool = False) -> None:
    """``--weights``, ``--network`` and ``--arch``.

    ``from_run``: the model flags default to None, for :func:`apps.run_settings.settings_from_run` to fill them
    from the run that wrote ``--weights`` (else with the defaults the help states).
    """
    from network.factory import DEFAULT_NETWORK

    parser.add_argument("--weights", required=weights_required, default=None, help=weights_help)
    parser.add_argument("--network", default=None if from_run else DEFAULT_NETWORK,
                        help="module with the ARCHS table of model builders (default: "
                             f"{_run_or(from_run)}{DEFAULT_NETWORK})")
    parser.add_argument("--arch", default=None if from_run else DEFAULT_ARCH,
                        help="model size: sm (all published weights), ti, bs, or tiny (tests and the demo) "
                             f"(default: {_run_or(from_run)}{DEFAULT_ARCH})")


def _run_or(from_run: bool) -> str:
    """The start of a default's help when :func:`apps.run_settings.settings_from_run` may take it from the training run."""
    return "that of the training run, from the args.json beside --weights, else " if from_run else ""


def check_arch(args: argparse.Namespace) -> None:
    """Refuse an ``--arch`` that ``--network`` does not build."""
    from network.factory import arch_choices

    choices = arch_choices(args.network)
    if args.arch not in choices:
        raise UserError(f"unknown --arch {args.arch!r} for {args.network}; choose one of {', '.join(choices)}")


def add_refine_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, from_run: bool = False) -> None:
    """``--refine``: how the TransCAM CAMs and the BAO activation map are refined (a model option);
    ``from_run`` as in :func:`add_model_args`."""
    from network.conformer import REFINE_MODES

    parser.add_argument("--refine", choices=REFINE_MODES, default=None if from_run else REFINE_MODES[0],
                        help="attention: the TransCAM CAMs and the BAO activation map are refined by the "
                             "transformer's attention, refine(M)[i] = sum_j A[i,j] M[:,j] (published); none: "
                             "refine(M) = M, both maps straight from their heads, an ablation for attention "
                             "that does not localise (e.g. a model trained from scratch on few images). The "
                             "weights are the same either way; a training run records it and keeps it on "
                             "resume (default: " + _run_or(from_run) + REFINE_MODES[0] + ")")


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    """``--val_list``, ``--val_every``, ``--val_scales``: scoring the pseudo-labels between epochs."""
    parser.add_argument("--val_list", default=None,
                        help="images whose pseudo-labels are scored against their ground-truth masks every "
                             "--val_every epochs (published flag, declared there but never used; default: "
                             "voc12/val.txt for voc, coco14/val.txt for coco)")
    parser.add_argument("--val_every", type=non_negative_int, default=0,
                        help="every this many epochs, score on --val_list the teacher's threshold-free "
                             "pseudo-labels (bao) or the CAMs at their best background score (transcam, which "
                             "has no background map) and log the mIoU to log.jsonl and TensorBoard; images "
                             "without a mask are left out, and without any mask nothing is validated. 0: never, "
                             "as the published loop (default: %(default)s)")
    parser.add_argument("--val_scales", type=parse_scales, default=None,
                        help="input sides of the validation, comma-separated multiples of 16, each also run "
                             "flipped (default: one scale, --crop_size; 256,512,768 = the inference scales)")


def add_crf_backend_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, device_flag: bool = True) -> None:
    """``--crf_backend``: which implementation runs the dense CRF (crf/refine.py); ``device_flag``:
    whether the script has ``--device`` (without it the torch CRF runs on the CPU)."""
    from crf.params import BACKENDS

    where = "on --device" if device_flag else "on the CPU"
    parser.add_argument("--crf_backend", choices=BACKENDS, default="auto",
                        help="dense CRF implementation: auto = pydensecrf2 when it is installed (the published "
                             "numbers), else the torch CRF; pydensecrf = pydensecrf2 (an error when it is not "
                             f"installed); torch = the torch CRF (crf/densecrf.py, same labels on >= 99.5%% of "
                             f"pixels), {where} (default: auto)")


def crf_backend_from_args(args: argparse.Namespace, needed: bool) -> str:
    """``--crf_backend`` resolved once, before any work, when the run writes CRF labels (``needed``):
    "pydensecrf" or "torch" (pydensecrf2 asked for but missing is a UserError); else the flag as given."""
    from crf.params import resolve_backend

    return resolve_backend(args.crf_backend) if needed else args.crf_backend


def add_crf_workers_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--crf_workers``: processes running the dense CRF beside the model (core.workers.TaskPool)."""
    parser.add_argument("--crf_workers", type=non_negative_int, default=None,
                        help="processes running the dense CRF and writing its PNGs while the model goes on to the "
                             "next images (the CRF takes seconds per image on one core; a torch CRF worker uses "
                             "one thread); 0: in the main process, one image after the other; ignored with "
                             "--crf_backend torch on a CUDA device, where the CRF runs in the main process beside "
                             "the model (default: the usable CPUs, shared among the ranks of a torchrun on this "
                             "machine, minus one)")


def add_overwrite_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--overwrite`` of the inference scripts, which otherwise resume by skipping finished images."""
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute images whose outputs already exist (default: skip them)")


def add_threshold_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--t``, the TransCAM background threshold of the inference scripts."""
    parser.add_argument("--t", type=float, default=None,
                        help="transcam only: background score t for thresholded pseudo-labels, argmax over "
                             "[t, normalised CAMs]; BAO needs no threshold (default: none)")


def check_threshold(args: argparse.Namespace) -> None:
    """``--t`` belongs to the maps without a background map."""
    if args.method == "bao" and args.t is not None:
        raise UserError("--t is a TransCAM background threshold; BAO labels need no threshold, drop --t")


def add_prediction_args(parser: argparse.ArgumentParser) -> None:
    """Model, method, scale, batching, device and dataset flags of the inference scripts."""
    from tool.predict import DEFAULT_FORWARD_PIXELS, DEFAULT_SCALES, MAP_KINDS

    group = parser.add_argument_group("model and multi-scale inference")
    add_model_args(group, weights_required=True, from_run=True,
                   weights_help="checkpoint: BAO weights from train_bao.py (--method bao) or TransCAM weights "
                                "(--method transcam, cnn); plain state_dicts and {'model': ...} wrappers are read; "
                                "the model flags left out are those of the run that wrote them (its args.json)")
    group.add_argument("--method", default="bao", choices=MAP_KINDS,
                       help="bao: learned background map + TransCAM foreground maps (threshold-free); "
                            "transcam: foreground CAMs only, for threshold sweeps; cnn: the CNN branch's "
                            "CAMs before attention refinement (ablation), foreground only (default: bao)")
    add_refine_arg(group, from_run=True)
    group.add_argument("--scales", type=parse_scales, default=DEFAULT_SCALES,
                       help="square input sides, comma-separated multiples of 16; each is also run "
                            f"flipped (default: {','.join(map(str, DEFAULT_SCALES))})")
    group.add_argument("--batch_size", type=positive_int, default=4,
                       help="images per batch; each scale of a batch runs as one forward of 2 x batch "
                            "inputs, chunked by --forward_pixels (default: 4)")
    group.add_argument("--forward_pixels", type=positive_int, default=DEFAULT_FORWARD_PIXELS,
                       help="most input pixels (inputs x S x S) in one forward pass; bounds memory at large "
                            f"scales, raise it on a large GPU (default: {DEFAULT_FORWARD_PIXELS} = one image "
                            "and its flip at 768)")
    group.add_argument("--num_workers", type=non_negative_int, default=2,
                       help="data-loading processes reading and resizing images (0: in the main process) "
                            "(default: 2)")
    add_threshold_arg(group)
    add_device_args(parser)
    add_speed_args(parser)
    add_dataset_args(parser, from_run=True)


def add_training_args(parser: argparse.ArgumentParser, default_batch: int, epochs_help: str | None) -> None:
    """The flags every training script shares: batch, length, run directory, resume, logging, seed.

    ``epochs_help`` None leaves ``--max_epoches`` out (iteration-based schedules).
    """
    parser.add_argument("--batch_size", type=positive_int, default=default_batch,
                        help="images per optimisation step, over all processes together (split over the "
                             "torchrun processes; must be divisible by their number; default: %(default)s)")
    if epochs_help is not None:
        parser.add_argument("--max_epoches", type=positive_int, default=None, help=epochs_help)
    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="stop after this many optimisation steps in total (counted from the start of "
                             "the run, resumed steps included), saving a resumable checkpoint; for smoke tests")
    parser.add_argument("--session_name", default=None,
                        help="run name: prefix of the weight files and folder under --save_dir "
                             "(default: the method or model name)")
    parser.add_argument("--save_dir", default="runs", help="folder holding the run directories (default: %(default)s)")
    parser.add_argument("--tblog_dir", default=None, help="TensorBoard folder (default: <run directory>/tb)")
    parser.add_argument("--num_workers", type=non_negative_int, default=8,
                        help="data loading processes per training process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation, the data order and the augmentation (default: %(default)s)")
    parser.add_argument("--resume", default=None,
                        help="continue from a checkpoint.pth, or 'auto': the run directory's checkpoint when "
                             "there is one, else start a new run")
    parser.add_argument("--log_every", type=positive_int, default=20,
                        help="log losses, learning rate and throughput every this many steps (default: %(default)s)")
    parser.add_argument("--debug_fault", default=None, metavar="KIND:STEP",
                        help="for testing the error handling only: simulate a fault at optimisation step STEP "
                             "(1-based): 'nan:STEP' makes the loss non-finite, 'oom:STEP' raises a device "
                             "out-of-memory error")
    add_device_args(parser)
    add_speed_args(parser)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to a flag's help unless the help states its default already
    (as the shared help texts here do) or there is none to show (None, False, '')."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, ""):
            return text
        return super()._get_help_string(action)


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`DefaultsHelpFormatter` that keeps the description's line breaks (a module docstring)."""


def voc_layout_from_args(args: argparse.Namespace, hint: str = "") -> DatasetLayout:
    """The :class:`data.layout.DatasetLayout` of ``--voc12_root``; a missing root names the flag
    (and ``hint``, e.g. another flag that would do instead)."""
    try:
        return DatasetLayout.voc(args.voc12_root)
    except UserError as err:
        raise _with_root_flag(err, "--voc12_root", hint) from None


def add_segmentation_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                                batch_norm: bool = True, from_run: bool = False) -> None:
    """``--model``, ``--backbone`` and (for training, ``batch_norm``) ``--bn`` of the segmentation stage;
    ``from_run`` as in :func:`add_model_args`."""
    from network.deeplab import BACKBONES, BN_MODES, DEFAULT_BN, MODELS

    parser.add_argument("--model", choices=sorted(MODELS), default=None if from_run else DEFAULT_SEG_MODEL,
                        help="deeplabv2: ResNet-101 at output stride 8 with DeepLab-V2's ASPP (dilations "
                             "6/12/18/24, summed), what most WSSS papers report; deeplabv3: torchvision's "
                             f"DeepLab-V3 (default: {_run_or(from_run)}{DEFAULT_SEG_MODEL})")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default=None if from_run else DEFAULT_BACKBONE,
                        help="resnet101 (ImageNet weights in torchvision's layout load into it) or tiny (a "
                             f"small network for tests and the CPU demo) (default: {_run_or(from_run)}"
                             f"{DEFAULT_BACKBONE})")
    if not batch_norm:
        return
    recipe = ", ".join(f"{m} {bn}" for m, bn in DEFAULT_BN.items())
    parser.add_argument("--bn", choices=BN_MODES, default=None,
                        help="backbone batch norm: frozen (statistics and affine constant, the DeepLab-V2 "
                             "fine-tuning recipe) or train (default: the model's recipe: " + recipe + "; train with "
                             "--from_scratch)")
