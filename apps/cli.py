"""The command-line flags of every entry script, each defined once.

Entry scripts (train_bao.py, infer_bao.py, visual_bao.py, evaluation_bao.py, the dataset and
demo commands) build their parsers from these groups, so a flag has one name, one default
and one help text everywhere. Library modules define no flags; where a library error should
name the flag that fixes it, the helpers here add it (:func:`dataset_from_args`).

The groups that need torch-based modules import them inside the function: evaluation and
the dataset commands use this module too, and must start without loading torch.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from core.errors import UserError
from core.errors import run_cli as run_with_hints
from core.runlock import RunLock, refuse_if_locked
from core.workers import default_workers
from data.layout import DEFAULT_LABEL_FILES, DEFAULT_VOC_ROOT, DatasetLayout, DatasetSpec, load_dataset

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
}


def run_cli(main, args: argparse.Namespace) -> None:
    """Run an entry script's ``main(args)``: a user error ends in one line naming the flag to fix
    (:data:`FLAG_HINTS`), Ctrl-C in a clean exit (:func:`core.errors.run_cli`)."""
    run_with_hints(main, args, FLAG_HINTS)


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
    from tool.device import AMP_CHOICES

    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--amp", default="off", choices=AMP_CHOICES,
                        help="mixed precision: off = float32 throughout, as published (the default); bf16 "
                             "or fp16 = autocast, faster on GPUs but it changes the teacher's pseudo-labels "
                             "and the maps slightly (bench/gpu_check.py measures by how much); bf16 also "
                             "works on CPU, fp16 needs CUDA")


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


def add_label_file_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, extra_help: str = "") -> None:
    """``--label_file``."""
    parser.add_argument("--label_file", default=None,
                        help="image-level label JSON; its class list sets the number of classes (default: "
                             f"{DEFAULT_LABEL_FILES['voc'].relative_to(DEFAULT_LABEL_FILES['voc'].parents[1])} "
                             f"for voc, {DEFAULT_LABEL_FILES['coco'].relative_to(DEFAULT_LABEL_FILES['coco'].parents[1])} "
                             f"for coco, both in this repository){extra_help}")


def add_generated_dataset_args(parser: argparse.ArgumentParser, num_train: int = 300, num_val: int = 100,
                               size: int = 128) -> None:
    """``--num_train``, ``--num_val``, ``--size``: the generated VOC-format dataset (apps/make_dataset.py)."""
    parser.add_argument("--num_train", type=positive_int, default=num_train,
                        help="generated images in ImageSets/Segmentation/train.txt (default: %(default)s)")
    parser.add_argument("--num_val", type=non_negative_int, default=num_val,
                        help="generated images in ImageSets/Segmentation/val.txt (default: %(default)s)")
    parser.add_argument("--size", type=positive_int, default=size,
                        help="nominal side of the generated images; each width and height is drawn in "
                             "[0.75, 1.25] * size (default: %(default)s)")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--voc12_root``, ``--coco_root``, ``--coco_mask_dir`` and ``--label_file``."""
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
    add_label_file_arg(group)


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
                   weights_required: bool) -> None:
    """``--weights``, ``--network`` and ``--arch``."""
    from network.factory import DEFAULT_NETWORK

    parser.add_argument("--weights", required=weights_required, default=None, help=weights_help)
    parser.add_argument("--network", default=DEFAULT_NETWORK,
                        help=f"module with the ARCHS table of model builders (default: {DEFAULT_NETWORK})")
    parser.add_argument("--arch", default="sm",
                        help="model size: sm (all published weights), ti, bs, or tiny (tests and the demo) "
                             "(default: sm)")


def check_arch(args: argparse.Namespace) -> None:
    """Refuse an ``--arch`` that ``--network`` does not build."""
    from network.factory import arch_choices

    choices = arch_choices(args.network)
    if args.arch not in choices:
        raise UserError(f"unknown --arch {args.arch!r} for {args.network}; choose one of {', '.join(choices)}")


def add_refine_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--refine``: how the TransCAM CAMs and the BAO activation map are refined (a model option)."""
    from network.conformer import REFINE_MODES

    parser.add_argument("--refine", choices=REFINE_MODES, default=REFINE_MODES[0],
                        help="attention: the TransCAM CAMs and the BAO activation map are refined by the "
                             "transformer's attention, refine(M)[i] = sum_j A[i,j] M[:,j] (published); none: "
                             "refine(M) = M, both maps straight from their heads, an ablation for attention "
                             "that does not localise (e.g. a model trained from scratch on few images). The "
                             "weights are the same either way; a training run records it and keeps it on "
                             "resume (default: attention)")


def add_crf_workers_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--crf_workers``: processes running the dense CRF beside the model (core.workers.TaskPool)."""
    parser.add_argument("--crf_workers", type=non_negative_int, default=None,
                        help="processes running the dense CRF and writing its PNGs while the model goes on to the "
                             "next images (the CRF takes seconds per image on one core); 0: in the main process, "
                             "one image after the other (default: the usable CPUs, shared among the ranks of a "
                             "torchrun on this machine, minus one)")


def crf_worker_count(args: argparse.Namespace, needed: bool) -> int:
    """``--crf_workers`` resolved: 0 when the run writes no CRF labels (nothing worth a process),
    else the flag, or :func:`core.workers.default_workers` when it was not given."""
    if not needed:
        return 0
    return default_workers() if args.crf_workers is None else args.crf_workers


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
    add_model_args(group, weights_required=True,
                   weights_help="checkpoint: BAO weights from train_bao.py (--method bao) or TransCAM weights "
                                "(--method transcam, cnn); plain state_dicts and {'model': ...} wrappers are read")
    group.add_argument("--method", default="bao", choices=MAP_KINDS,
                       help="bao: learned background map + TransCAM foreground maps (threshold-free); "
                            "transcam: foreground CAMs only, for threshold sweeps; cnn: the CNN branch's "
                            "CAMs before attention refinement (ablation), foreground only (default: bao)")
    add_refine_arg(group)
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
    add_dataset_args(parser)


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


RESUME_HINT = "continue with the same command and --resume auto"
# What a training run refused for a run directory in use is told (core.runlock.RunLock).
RUN_DIR_IN_USE = "wait for it to end, stop it, or choose another --session_name or --save_dir"


def leads_launch() -> bool:
    """Whether this process locks the run directory: a lone process, or rank 0 of a torchrun
    launch (its other ranks follow rank 0 and take no lock)."""
    return os.environ.get("RANK", "0") == "0"


def prepare_training_run(args: argparse.Namespace, world_size: int, weights_flag: str = "weights") -> bool:
    """Check the shared training flags and settle the run directory; returns True for a new run.

    Sets ``args.run_dir``, ``args.tblog_dir``, ``args.resume`` (a checkpoint path or None) and
    parses ``args.debug_fault``. Refuses to start a new run over an existing one, and starting
    weights (the flag ``weights_flag``) given together with ``--from_scratch``.
    """
    from network.checkpoint import require_file
    from tool.engine import parse_fault

    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} is the global batch and must be divisible by the "
                        f"{world_size} processes")
    try:
        args.debug_fault = parse_fault(args.debug_fault)
    except ValueError as err:
        raise UserError(f"--debug_fault: {err}") from None
    weights = getattr(args, weights_flag)
    if weights and args.from_scratch:
        raise UserError(f"--{weights_flag} and --from_scratch contradict each other; give one of them")
    run_dir = Path(args.save_dir) / args.session_name
    args.run_dir = str(run_dir)
    args.tblog_dir = str(args.tblog_dir or run_dir / "tb")
    own_checkpoint = run_dir / "checkpoint.pth"
    if leads_launch():  # refused here, before --resume reads the other run's checkpoint
        refuse_if_locked(run_dir, RUN_DIR_IN_USE)
    if args.resume == "auto":
        args.resume = str(own_checkpoint) if own_checkpoint.is_file() else None
    elif args.resume is not None:
        require_file(args.resume, "checkpoint to resume")
    if args.resume is None and own_checkpoint.is_file():
        raise UserError(f"{run_dir} already holds a run ({own_checkpoint}); continue it with --resume auto, "
                        "or choose another --session_name or --save_dir")
    if weights:
        require_file(weights, "weights file")
    return args.resume is None


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
                                batch_norm: bool = True) -> None:
    """``--model``, ``--backbone`` and (for training, ``batch_norm``) ``--bn`` of the segmentation stage."""
    from network.deeplab import BACKBONES, BN_MODES, DEFAULT_BN, MODELS

    parser.add_argument("--model", choices=sorted(MODELS), default="deeplabv2",
                        help="deeplabv2: ResNet-101 at output stride 8 with DeepLab-V2's ASPP (dilations "
                             "6/12/18/24, summed), what most WSSS papers report; deeplabv3: torchvision's "
                             "DeepLab-V3 (default: deeplabv2)")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="resnet101",
                        help="resnet101 (ImageNet weights in torchvision's layout load into it) or tiny (a "
                             "small network for tests and the CPU demo) (default: resnet101)")
    if not batch_norm:
        return
    recipe = ", ".join(f"{m} {bn}" for m, bn in DEFAULT_BN.items())
    parser.add_argument("--bn", choices=BN_MODES, default=None,
                        help="backbone batch norm: frozen (statistics and affine constant, the DeepLab-V2 "
                             "fine-tuning recipe) or train (default: the model's recipe: " + recipe + "; train with "
                             "--from_scratch)")



def args_dict(args: argparse.Namespace) -> dict:
    """The parsed flags as a JSON-able dict (tuples as lists): ``args.json`` and the checkpoint's settings."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def write_args_json(args: argparse.Namespace) -> None:
    """Write ``<run_dir>/args.json`` (sorted keys) atomically."""
    import json

    from core.fileio import atomic_write

    text = json.dumps(args_dict(args), indent=2, sort_keys=True) + "\n"
    atomic_write(Path(args.run_dir) / "args.json", lambda tmp: Path(tmp).write_text(text))


def check_resumable(checkpoint: dict, args: argparse.Namespace, run_defining: tuple[str, ...],
                    data_id: dict) -> None:
    """Refuse to resume ``checkpoint`` (``--resume``) with other run-defining flags or other data.

    ``data_id`` identifies this run's list and label file (``num_images``, ``num_classes``, ...).
    """
    from tool.engine import changed_settings

    saved = checkpoint["args"]
    changed = changed_settings(saved, vars(args), run_defining)
    if changed:
        detail = "; ".join(f"--{k} {saved.get(k)} (now {getattr(args, k)})" for k in changed)
        raise UserError(f"{args.resume} was trained with other settings: {detail}. A resumed run must keep them; "
                        "pass the original values or start a new --session_name")
    if checkpoint["data"] != data_id:
        raise UserError(f"{args.resume} was trained on another image list or label file "
                        f"({checkpoint['data']['num_images']} images, {checkpoint['data']['num_classes']} classes); "
                        "resume with the original --train_list and --label_file")


def changed_on_resume(checkpoint: dict, args: argparse.Namespace, adjustable: tuple[str, ...]) -> str | None:
    """``"--lr 0.1 -> 0.05; ..."`` for the ``adjustable`` flags a resumed run changed, or None."""
    saved = checkpoint["args"]
    adjusted = [f"--{k} {saved.get(k)} -> {getattr(args, k)}" for k in adjustable if saved.get(k) != getattr(args, k)]
    return "; ".join(adjusted) or None


def run_training(build, args: argparse.Namespace) -> None:
    """Run a training script's ``build(args, runtime).run()`` under ``torchrun`` or alone.

    ``build`` returns an object with ``run()``, ``log`` (:class:`tool.train_log.RunLog`) and
    ``engine``; a user error during training is recorded in the run's log before it ends the
    script, and the log is closed and the process group left whatever happens. The run
    directory is locked (:class:`core.runlock.RunLock`) for the whole run.
    """
    with RunLock(args.run_dir, RUN_DIR_IN_USE) if leads_launch() else contextlib.nullcontext():
        _run_training(build, args)


def _run_training(build, args: argparse.Namespace) -> None:
    from tool.device import barrier, cleanup_distributed, setup_distributed

    rt = setup_distributed(args.device)
    try:
        training = build(args, rt)
        try:
            training.run()
        except UserError as err:
            training.log.record("error", {"message": str(err)}, step=training.engine.pos.global_step)
            raise
        finally:
            training.log.close()
        # Leave together: a rank tearing the process group down while another still writes its
        # files and logs made gloo abort the early rank at exit ("terminate called ...").
        barrier()
    finally:
        cleanup_distributed()
