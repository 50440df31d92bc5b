"""Train BAO (method spec, section 3), or the TransCAM classification stage it starts from.

BAO, from TransCAM weights (the published command)::

    python train_bao.py --weights transcam.pth --voc12_root VOCdevkit/VOC2012

TransCAM, from ImageNet Conformer weights (classification heads dropped) or from scratch::

    python train_bao.py --method transcam --weights Conformer_small_patch16.pth
    python train_bao.py --method transcam --from_scratch

Several GPUs, one or more machines (DistributedDataParallel, one process per GPU;
``--batch_size`` stays the global batch and is split over the processes)::

    torchrun --nnodes=NODES --node_rank=THIS_NODE --nproc_per_node=GPUS_PER_NODE \\
        --master_addr=FIRST_NODE_ADDRESS --master_port=29500 train_bao.py --weights transcam.pth

A run directory ``<save_dir>/<session_name>/`` receives ``args.json``, ``log.txt``,
``log.jsonl``, TensorBoard scalars (``tb/`` unless ``--tblog_dir``), after every epoch the
plain weights ``{session}_{epoch}epochs_modelt.pth`` (teacher) and ``..._models.pth``
(student) (TransCAM: ``{session}_{epoch}epochs.pth``, without the BAO heads, i.e. in the
published TransCAM layout), and one resumable ``checkpoint.pth``. ``epoch`` counts from 0,
as in the published loop: ten epochs end with ``..._9epochs_modelt.pth``. Ctrl-C stops after the current step, saves
``checkpoint.pth`` and exits; ``--resume auto`` continues exactly where it stopped.

``--val_every N`` scores the pseudo-labels on ``--val_list`` against its ground-truth masks
every N epochs (``tool.validation``): BAO's teacher threshold-free, TransCAM's CAMs at their
best background score; the mIoU goes to ``log.jsonl`` (event ``val``) and TensorBoard
(``val/miou``). The published loop declared ``--val_list`` and never validated: the default
is 0, no validation.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from apps.cli import (RESUME_HINT, add_dataset_args, add_model_args, add_refine_arg, add_training_args, args_dict,
                      changed_on_resume, check_arch, check_resumable, dataset_from_args, non_negative_int, parse_scales,
                      prepare_training_run, run_cli, run_training, write_args_json)
from core.errors import UserError
from data.classes import ClassSet
from data.datasets import ClassificationDataset
from data.labels import ImageLabels, read_list
from data.layout import REPO_ROOT, DatasetSpec
from data.transforms import TrainAugment
from network.checkpoint import BAO_HEADS, load_weights
from network.factory import build_network
from tool.device import Runtime, amp_dtype
from tool.engine import (Engine, Hints, Task, broadcast_buffers, cpu_state, load_checkpoint, make_loader, save_weights,
                         seed_everything)
from tool.teacher import make_teacher, update_teacher
from tool.train_log import RunLog
from tool.training import STAGES, bao_losses, transcam_losses
from tool.validation import PseudoLabelValidation

DEFAULT_EPOCHS = {"bao": 10, "transcam": 20}
DEFAULT_TRAIN_LISTS = {"voc": REPO_ROOT / "voc12" / "train_aug.txt", "coco": REPO_ROOT / "coco14" / "train.txt"}
DEFAULT_VAL_LISTS = {"voc": REPO_ROOT / "voc12" / "val.txt", "coco": REPO_ROOT / "coco14" / "val.txt"}
# The weights each stage starts from (network.checkpoint purposes): BAO from TransCAM weights
# (its heads missing), TransCAM from ImageNet Conformer weights (classification heads dropped).
START_WEIGHTS = {"bao": "transcam", "transcam": "backbone"}
# Flags that define the optimisation: a resumed run must use the values it was started with.
RUN_DEFINING = ("method", "network", "arch", "refine", "batch_size", "wt_dec", "adam_eps", "eps", "momentum",
                "l_pcl", "teacher_mode", "seed", "dataset")
# Flags a resumed run may change (the usual remedies for a diverging or out-of-memory run);
# changes are logged. Everything in RUN_DEFINING must stay as the run was started.
ADJUSTABLE_ON_RESUME = ("lr", "crop_size", "resize_long")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train BAO (teacher-student, learned background map) from TransCAM weights, or the "
                    "TransCAM classification stage (--method transcam).")
    parser.add_argument("--method", choices=STAGES, default="bao",
                        help="bao: the BAO stage (L_cls + l_pcl * L_pcl, teacher-student); transcam: the "
                             "TransCAM classification stage (L_cls only); default: %(default)s")
    add_model_args(parser, weights_required=False,
                   weights_help="starting weights: TransCAM weights for bao (label_enc/classifier_x keep their "
                                "initialisation), ImageNet Conformer weights for transcam (classification heads "
                                "dropped); ignored when --resume finds a checkpoint")
    add_refine_arg(parser)
    parser.add_argument("--from_scratch", action="store_true",
                        help="start from random initialisation instead of --weights")
    add_training_args(parser, default_batch=8,
                      epochs_help="number of epochs (default: 10 for bao, 20 for transcam, as published)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant (default: %(default)s)")
    parser.add_argument("--wt_dec", type=float, default=5e-4, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--adam_eps", type=float, default=1e-8,
                        help="AdamW epsilon (the published --eps is the label smoothing below; default: %(default)s)")
    parser.add_argument("--crop_size", type=int, default=512,
                        help="side of the square training crops (a multiple of 16; default: %(default)s)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=[320, 640], metavar=("LO", "HI"),
                        help="before cropping, resize each image so its long side is a random integer in "
                             "[LO, HI] (published: 320 640 for 512 crops; scale it with the image size of "
                             "small datasets) (default: 320 640)")
    parser.add_argument("--train_list", default=None,
                        help="list of training images; those whose image-level label has no foreground "
                             "class (COCO images without annotations) are skipped (default: "
                             "voc12/train_aug.txt for voc, coco14/train.txt for coco)")
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
    add_dataset_args(parser)
    parser.add_argument("--eps", type=float, default=0.4,
                        help="label smoothing of the pseudo-label target: 1-eps on the labelled class, "
                             "eps/(C-1) on each other class (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9995,
                        help="base EMA momentum of the teacher from the second epoch on (rises to 1 along a "
                             "cosine over each epoch; default: %(default)s)")
    parser.add_argument("--l_pcl", type=float, default=1.0, help="weight of the pseudo-label loss L_pcl (default: %(default)s)")
    parser.add_argument("--w_pcl", type=float, default=1.0,
                        help="published flag, kept so that published commands run; it has no effect: the "
                             "published loss multiplies the foreground mask by it in both the numerator and "
                             "the denominator of the foreground mean, where it cancels (default: %(default)s)")
    parser.add_argument("--teacher_mode", choices=("train", "eval"), default="train",
                        help="mode of the teacher forward: train (published: drop-path and batch statistics "
                             "act; the default) or eval")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible or contradictory flags and fill the method-dependent defaults.

    Runs before anything is built or written, so a bad command costs nothing.
    """
    if args.crop_size < 16 or args.crop_size % 16:
        raise UserError(f"--crop_size must be a multiple of 16 (the network's stride), got {args.crop_size}; "
                        f"try {max(16, round(args.crop_size / 16) * 16)}")
    lo, hi = args.resize_long
    if not 0 < lo <= hi:
        raise UserError(f"--resize_long needs 0 < LO <= HI, got {lo} {hi}")
    for flag, value in (("--lr", args.lr), ("--adam_eps", args.adam_eps)):
        if not value > 0 or not math.isfinite(value):
            raise UserError(f"{flag} must be a positive number, got {value}")
    for flag, value in (("--wt_dec", args.wt_dec), ("--l_pcl", args.l_pcl)):
        if not value >= 0 or not math.isfinite(value):
            raise UserError(f"{flag} must be zero or positive, got {value}")
    if not 0.0 <= args.eps < 1.0:
        raise UserError(f"--eps (label smoothing) must lie in [0, 1), got {args.eps}")
    if not 0.0 <= args.momentum <= 1.0:
        raise UserError(f"--momentum (EMA) must lie in [0, 1], got {args.momentum}")
    args.max_epoches = args.max_epoches or DEFAULT_EPOCHS[args.method]
    args.session_name = args.session_name or args.method
    args.train_list = str(args.train_list or DEFAULT_TRAIN_LISTS[args.dataset])
    if not Path(args.train_list).is_file():
        hint = " (coco14/prepare_coco.py writes coco14/train.txt)" if args.dataset == "coco" else ""
        raise UserError(f"train list not found: {args.train_list}; pass --train_list{hint}")
    check_arch(args)
    if args.val_every:
        args.val_list = str(args.val_list or DEFAULT_VAL_LISTS[args.dataset])
        if not Path(args.val_list).is_file():
            raise UserError(f"validation list not found: {args.val_list}; pass --val_list, or drop --val_every")
        args.val_scales = args.val_scales or (args.crop_size,)
    new_run = prepare_training_run(args, int(os.environ.get("WORLD_SIZE", "1")))
    if new_run and not args.weights and not args.from_scratch:
        what = "TransCAM weights" if args.method == "bao" else "ImageNet Conformer weights"
        raise UserError(f"give --weights ({what}) or, to train from random initialisation, --from_scratch")


class BAOTraining:
    """The BAO or TransCAM stage on one rank: data, model, teacher, and the step the engine runs."""

    def __init__(self, args: argparse.Namespace, rt: Runtime):
        self.args, self.rt = args, rt
        self.amp = amp_dtype(args.amp, rt.device)
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        spec = dataset_from_args(args)
        names, skipped = _labelled(read_list(args.train_list), spec.labels, args.train_list)
        self.data_id = {"num_images": len(names), "num_classes": spec.num_classes,
                        "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}
        if checkpoint is not None:
            # Checkpoints written before --refine existed were all trained with attention refinement.
            checkpoint["args"].setdefault("refine", "attention")
            check_resumable(checkpoint, args, RUN_DEFINING, self.data_id)
        # The dataset checks that every image and label exists.
        self.dataset = ClassificationDataset(spec.layout, names, spec.labels,
                                             TrainAugment(args.crop_size, tuple(args.resize_long)), seed=args.seed)
        per_rank_batch = args.batch_size // rt.world_size
        loader, sampler = make_loader(self.dataset, default_collate, rt, per_rank_batch, args.num_workers, args.seed)
        if len(loader) == 0:
            raise UserError(f"{args.train_list} has {len(names)} images, fewer than one batch per process "
                            f"({per_rank_batch}); lower --batch_size")
        self.validation = self._validation(spec, per_rank_batch) if args.val_every else None

        seed_everything(args.seed)
        self.model = build_network(args.network, args.arch, spec.num_classes, refine=args.refine)
        report = None
        if checkpoint is None and args.weights:
            report = load_weights(self.model, args.weights, purpose=START_WEIGHTS[args.method])
        # Created only now: a run refused for its data or weights leaves no run directory behind.
        self.log = RunLog(args.run_dir, args.tblog_dir, enabled=rt.is_main)
        if skipped:
            self.log.message(f"skipped {skipped} image(s) of {args.train_list} without any foreground class in "
                             "their image-level label (e.g. COCO images without annotations): they cannot "
                             "teach the classification loss")
        if report is not None:
            self.log.message(f"weights {args.weights}: {report.summary()}")
        self._announce_validation()
        if args.method == "transcam":
            # The BAO heads take no part in the TransCAM loss: frozen, so that DDP needs no
            # unused-parameter search and AdamW's weight decay leaves them at initialisation.
            for name, p in self.model.named_parameters():
                if name.startswith(BAO_HEADS):
                    p.requires_grad_(False)
        self.model.to(rt.device).train()
        self.teacher = make_teacher(self.model) if args.method == "bao" else None
        if self.teacher is not None:
            self.teacher.train(args.teacher_mode == "train")
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=args.wt_dec, eps=args.adam_eps)
        modules = {"student": self.model, "teacher": self.teacher} if self.teacher else {"model": self.model}
        task = Task(model=self.model, optimizer=optimizer, step=self._step, modules=modules,
                    after_step=self._update_teacher if self.teacher else None, save_epoch=self._save_epoch,
                    start_epoch=self.dataset.set_epoch, validate=self._validate if self.validation else None,
                    checkpoint_meta={"args": args_dict(args), "data": self.data_id})
        self.engine = Engine(task, rt, args.run_dir, self.log, loader, sampler, args.batch_size, args.max_epoches,
                             args.max_steps, args.log_every, self.amp, self._hints(per_rank_batch), args.debug_fault)
        if checkpoint is not None:
            self.engine.restore(checkpoint, args.resume, args.seed)
            for group in optimizer.param_groups:  # --lr may be changed on resume
                group["lr"] = args.lr
            adjusted = changed_on_resume(checkpoint, args, ADJUSTABLE_ON_RESUME)
            if adjusted:
                self.log.message(f"changed on resume: {adjusted}")
            self.log.record("resume", {"checkpoint": args.resume, "epoch": self.engine.pos.epoch + 1,
                                       "iter": self.engine.pos.step, "args": args_dict(args)},
                            step=self.engine.pos.global_step)
        else:
            seed_everything(args.seed + rt.rank)  # ranks draw different drop-path masks

    def _hints(self, per_rank_batch: int) -> Hints:
        args = self.args
        oom = (f" at --batch_size {args.batch_size} (per process {per_rank_batch}) and --crop_size "
               f"{args.crop_size}: lower --crop_size (a resumed run may change it) or start a new run with a "
               "lower --batch_size" + (", or use --amp bf16" if self.rt.device.type == "cuda" and self.amp is None
                                      else ""))
        nan = "lower --lr" + (" or use --amp bf16 / off" if self.amp == torch.float16 else "")
        return Hints(resume=RESUME_HINT, out_of_memory=oom, non_finite=nan)

    def _step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["img"].to(self.rt.device, non_blocking=True)
        labels = batch["label"].to(self.rt.device, non_blocking=True)
        if self.teacher is not None:
            return bao_losses(engine.wrapped, self.teacher, images, labels, self.args.eps, self.args.l_pcl, self.amp)
        return transcam_losses(engine.wrapped, images, labels, self.amp)

    def _update_teacher(self, pos) -> dict[str, float]:
        momentum = update_teacher(self.teacher, self.model, pos.epoch, pos.step, self.engine.iters_per_epoch,
                                  self.args.momentum)
        # After the first epoch the teacher's statistics come from its own forward on this
        # rank's batch; rank 0's are kept, as for the student.
        broadcast_buffers(self.teacher)
        return {"ema_momentum": momentum}

    def _validation(self, spec: DatasetSpec, per_rank_batch: int) -> PseudoLabelValidation:
        """The scoring of --val_list (its images and labels are checked now, before the run starts)."""
        args = self.args
        return PseudoLabelValidation(spec.layout, spec.labels, read_list(args.val_list), ClassSet(spec.class_names),
                                     args.method, tuple(args.val_scales), self.rt.device, self.amp, per_rank_batch,
                                     args.num_workers, self.rt.rank, self.rt.world_size, source=args.val_list)

    def _announce_validation(self) -> None:
        """Say what --val_list / --val_every will do; drop the validation when no image has a mask."""
        args, validation = self.args, self.validation
        if validation is None:
            if args.val_list:
                self.log.message(f"note: --val_list {args.val_list} is not scored without --val_every N (the "
                                 "published loop never validated)")
            return
        folders = " or ".join(str(f) for f in self.dataset.layout.mask_dirs)
        if not validation.names:
            self.log.message(f"no validation: no image of --val_list {args.val_list} has a ground-truth mask "
                             f"(looked in {folders}); the run trains without it")
            self.validation = None
            return
        left_out = (f"; {validation.missing} without a mask (looked in {folders}) left out" if validation.missing
                    else "")
        what = "the teacher's" if args.method == "bao" else "the model's"
        self.log.message(f"validation every {args.val_every} epoch(s): {what} pseudo-labels ({validation.rule}) "
                         f"on {len(validation.names)} images of {args.val_list}{left_out}, scales "
                         f"{','.join(map(str, args.val_scales))} with flips")

    def _validate(self, epoch: int) -> dict[str, Any] | None:
        """Engine hook: score the pseudo-labels after every --val_every-th epoch (0-based ``epoch``)."""
        if self.validation is None or (epoch + 1) % self.args.val_every:
            return None
        model = self.teacher if self.teacher is not None else self.model
        try:
            return self.validation(model)
        except UserError as err:
            raise UserError(f"validation on --val_list {self.args.val_list} after epoch {epoch + 1}: {err}; the "
                            f"epoch is saved: fix the list or drop --val_every, then {RESUME_HINT}") from None

    def _save_epoch(self, epoch: int) -> list[str]:
        """Plain state_dicts of the finished ``epoch`` (0-based), named as published (rank 0 writes)."""
        prefix = f"{self.args.session_name}_{epoch}epochs"
        if self.teacher is not None:
            files = {f"{prefix}_modelt.pth": (self.teacher, ()), f"{prefix}_models.pth": (self.model, ())}
        else:  # the published TransCAM layout, without the (untrained) BAO heads
            files = {f"{prefix}.pth": (self.model, BAO_HEADS)}
        if self.rt.is_main:
            for name, (module, exclude) in files.items():
                save_weights(Path(self.args.run_dir) / name, cpu_state(module, exclude))
        return list(files)

    def run(self) -> None:
        args = self.args
        if self.rt.is_main and not args.resume:
            write_args_json(args)
        self.log.message(
            f"{args.method} training on {self.rt.device} x{self.rt.world_size} (amp {self.amp or 'off'}): "
            f"{len(self.dataset)} images, {self.engine.iters_per_epoch} steps per epoch, {args.max_epoches} "
            f"epochs, run directory {args.run_dir}")
        if args.refine == "none":
            self.log.message("--refine none: the TransCAM CAMs and the BAO activation map are not refined by the "
                             "attention (an ablation; the TransCAM loss reads only the logits, which do not "
                             "depend on it)")
        if args.w_pcl != 1.0:
            self.log.message(f"note: --w_pcl {args.w_pcl} has no effect (it cancels in the published loss)")
        self.engine.run()


def _labelled(names: list[str], labels: ImageLabels, source: str) -> tuple[list[str], int]:
    """Drop the names whose image-level label is empty; return the kept names and how many were dropped.

    An image without any foreground class gives the multi-label classification loss nothing
    to learn and BAO's pseudo-label loss no class to condition on (the usual COCO training
    lists leave these images out). Names without a label at all are kept, for the dataset's
    check to report them.
    """
    kept = [n for n in names if n not in labels or labels.ids[n]]
    if not kept:
        raise UserError(f"no image of {source} has a foreground class in its image-level label; "
                        "check the list and --label_file")
    return kept, len(names) - len(kept)


def main(args: argparse.Namespace) -> None:
    validate_args(args)
    run_training(BAOTraining, args)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
