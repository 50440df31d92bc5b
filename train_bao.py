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

A run directory ``<save_dir>/<session_name>/`` receives ``args.json`` (the run's settings, which
infer_bao.py and visual_bao.py read beside the weights), ``log.txt``, ``log.jsonl``, TensorBoard
scalars (``tb/`` unless ``--tblog_dir``), after every epoch the plain weights
``{session}_{epoch}epochs_modelt.pth`` (teacher) and ``..._models.pth`` (student) (TransCAM:
``{session}_{epoch}epochs.pth``, without the BAO heads: the published TransCAM layout), and one
resumable ``checkpoint.pth``. ``epoch`` counts from 0, as published: ten epochs end with
``..._9epochs_modelt.pth``. Ctrl-C stops after the current step, saves ``checkpoint.pth`` and
exits; ``--resume auto`` continues exactly where it stopped.

``--val_every N`` scores the pseudo-labels on ``--val_list`` every N epochs (``scoring.validation``;
the mIoU goes to ``log.jsonl`` and TensorBoard). The published loop never validated: default 0.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from apps.cli import (add_dataset_args, add_model_args, add_refine_arg, add_training_args, add_validation_args,
                      check_arch, dataset_from_args, run_cli)
from core.errors import UserError
from data.classes import ClassSet
from data.datasets import ClassificationDataset
from data.labels import read_list
from data.transforms import TrainAugment
from network.checkpoint import load_weights
from network.factory import build_network
from engine.loop import Engine, Position, Task
from engine.resume import broadcast_buffers
from tool.teacher import make_teacher, update_teacher
from tool.training import (STAGES, bao_batch_losses, epoch_weight_files, freeze_bao_heads, labelled_names,
                           transcam_batch_losses)
from engine.trainrun import (TrainingRun, prepare_training_run, require_non_negative, require_positive,
                             resolve_train_list, resolve_val_list, run_training)
from scoring.validation import PseudoLabelValidation

DEFAULT_EPOCHS = {"bao": 10, "transcam": 20}
# The weights each stage starts from (network.checkpoint purposes): BAO from TransCAM weights
# (its heads missing), TransCAM from ImageNet Conformer weights (classification heads dropped).
START_WEIGHTS = {"bao": "transcam", "transcam": "backbone"}


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
    add_validation_args(parser)
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
    require_positive(args, "lr", "adam_eps")
    require_non_negative(args, "wt_dec", "l_pcl")
    if not 0.0 <= args.eps < 1.0:
        raise UserError(f"--eps (label smoothing) must lie in [0, 1), got {args.eps}")
    if not 0.0 <= args.momentum <= 1.0:
        raise UserError(f"--momentum (EMA) must lie in [0, 1], got {args.momentum}")
    args.max_epoches = args.max_epoches or DEFAULT_EPOCHS[args.method]
    args.session_name = args.session_name or args.method
    resolve_train_list(args)
    check_arch(args)
    resolve_val_list(args)
    prepare_training_run(args, "weights", "TransCAM weights" if args.method == "bao" else "ImageNet Conformer weights")


class BAOTraining(TrainingRun):
    """The BAO or TransCAM stage on one rank: data, model, teacher, and the step the engine runs."""

    # Flags that define the optimisation: a resumed run must use the values it was started with.
    run_defining = ("method", "network", "arch", "refine", "batch_size", "wt_dec", "adam_eps", "eps", "momentum",
                    "l_pcl", "teacher_mode", "seed", "dataset")
    # Flags a resumed run may change (the usual remedies for a diverging or out-of-memory run);
    # changes are logged. Everything in run_defining must stay as the run was started.
    adjustable = ("lr", "crop_size", "resize_long")

    validated_maps = property(lambda self: "the teacher's" if self.args.method == "bao" else "the model's")
    out_of_memory_advice = ("lower --crop_size (a resumed run may change it) or start a new run with a lower "
                            "--batch_size")

    def training_names(self) -> tuple[list[str], int]:
        args = self.args
        self.spec = dataset_from_args(args)
        names, self.skipped = labelled_names(read_list(args.train_list), self.spec.labels, args.train_list)
        if self.checkpoint is not None:
            # Checkpoints written before --refine existed were all trained with attention refinement.
            self.checkpoint["args"].setdefault("refine", "attention")
        return names, self.spec.num_classes

    def make_dataset(self, names: list[str]) -> ClassificationDataset:
        args = self.args
        return ClassificationDataset(self.spec.layout, names, self.spec.labels,
                                     TrainAugment(args.crop_size, tuple(args.resize_long)), seed=args.seed,
                                     source=args.train_list)

    def make_validation(self) -> PseudoLabelValidation | None:
        args, spec, rt = self.args, self.spec, self.rt
        if not args.val_every:
            return None
        return PseudoLabelValidation(spec.layout, spec.labels, read_list(args.val_list), ClassSet(spec.class_names),
                                     args.method, tuple(args.val_scales), rt.device, self.amp, self.per_rank_batch,
                                     args.num_workers, rt.rank, rt.world_size, source=args.val_list)

    def make_model(self) -> tuple[torch.nn.Module, list[str]]:
        args = self.args
        model = build_network(args.network, args.arch, self.spec.num_classes, refine=args.refine)
        loaded = []
        if self.skipped:
            loaded.append(f"skipped {self.skipped} image(s) of {args.train_list} without any foreground class in "
                          "their image-level label (e.g. COCO images without annotations): they cannot teach the "
                          "classification loss")
        if self.checkpoint is None and args.weights:
            report = load_weights(model, args.weights, purpose=START_WEIGHTS[args.method])
            loaded.append(f"weights {args.weights}: {report.summary()}")
        return model, loaded

    def make_task(self) -> Task:
        args = self.args
        if args.method == "transcam":
            freeze_bao_heads(self.model)
        self.placed(self.model)
        self.teacher = make_teacher(self.model).train(args.teacher_mode == "train") if args.method == "bao" else None
        self.compiled(self.model, self.teacher)
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=args.wt_dec, eps=args.adam_eps)
        modules = {"student": self.model, "teacher": self.teacher} if self.teacher else {"model": self.model}
        return Task(model=self.model, optimizer=optimizer, step=self._step, modules=modules,
                    after_step=self._update_teacher if self.teacher else None, save_epoch=self._save_epoch,
                    validate=self._validate if self.validation else None)

    def restored(self) -> None:
        for group in self.engine.task.optimizer.param_groups:  # --lr may be changed on resume
            group["lr"] = self.args.lr

    def resume_position(self, pos: Position) -> dict[str, int]:
        return {"epoch": pos.epoch + 1, "iter": pos.step}

    def _step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The engine's step function: the stage's losses of ``batch`` through ``engine.wrapped``."""
        if self.teacher is not None:
            return bao_batch_losses(engine.wrapped, self.teacher, batch, self.rt.device, self.args.eps,
                                    self.args.l_pcl, self.amp)
        return transcam_batch_losses(engine.wrapped, batch, self.rt.device, self.amp)

    def _update_teacher(self, pos) -> dict[str, float]:
        momentum = update_teacher(self.teacher, self.model, pos.epoch, pos.step, self.engine.iters_per_epoch,
                                  self.args.momentum)
        # After the first epoch the teacher's statistics come from its own forward on this
        # rank's batch; rank 0's are kept, as for the student.
        broadcast_buffers(self.teacher)
        return {"ema_momentum": momentum}

    def _validate(self, epoch: int) -> dict[str, Any] | None:
        """Engine hook: score the pseudo-labels after every --val_every-th epoch (0-based ``epoch``)."""
        return self.validate(epoch, self.teacher if self.teacher is not None else self.model)

    def _save_epoch(self, epoch: int) -> list[str]:
        """Engine hook: the plain weights of the finished ``epoch`` (0-based), named as published."""
        return self.save_weight_files(epoch_weight_files(self.args.session_name, epoch, self.model, self.teacher))

    def summary(self) -> tuple[str, str]:
        return (f"{self.args.method} training", f"{len(self.dataset)} images, {self.engine.iters_per_epoch} steps "
                f"per epoch, {self.args.max_epoches} epochs")

    def notes(self) -> list[str]:
        notes = []
        if self.args.refine == "none":
            notes.append("--refine none: the TransCAM CAMs and the BAO activation map are not refined by the "
                         "attention (an ablation; the TransCAM loss reads only the logits, which do not depend on it)")
        if self.args.w_pcl != 1.0:
            notes.append(f"note: --w_pcl {self.args.w_pcl} has no effect (it cancels in the published loss)")
        return notes


def main(args: argparse.Namespace) -> None:
    validate_args(args)
    run_training(BAOTraining, args)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
