"""Train a segmentation model on pseudo-labels: the last stage of the WSSS protocol.

The pseudo-labels of the segmentation training list come first (BAO, threshold-free)::

    python infer_bao.py --weights bao.pth --infer_list voc12/train_aug.txt --out_pred out/pseudo_train_aug

then DeepLab-V2 (ResNet-101, ImageNet initialisation) on them, the usual WSSS recipe::

    python train_seg.py --label_dir out/pseudo_train_aug --backbone_weights resnet101-63fe2227.pth \\
        --voc12_root VOCdevkit/VOC2012

Several GPUs: ``torchrun --nproc_per_node GPUS train_seg.py ...`` (``--batch_size`` stays the
global batch). The run directory ``<save_dir>/<session_name>/`` receives ``args.json``,
``log.txt``, ``log.jsonl``, TensorBoard scalars, a resumable ``checkpoint.pth`` after every
epoch and at every stop (Ctrl-C stops after the current step; ``--resume auto`` continues
exactly there), and, once all ``--max_iters`` iterations are done, the plain weights
``{session}_final.pth`` that infer_seg.py reads.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from apps.cli import (DefaultsHelpFormatter, add_dataset_args, add_segmentation_model_args, add_training_args,
                      dataset_from_args, run_cli)
from core.errors import UserError
from data.datasets import PseudoLabelDataset
from data.labels import read_list
from data.transforms import SegAugment
from network.deeplab import DEFAULT_BN, build_segmentation_model, head_and_backbone_parameters, load_backbone_weights
from engine.loop import Engine, Position, Task
from tool.segmentation import set_poly_lr
from tool.training import seg_batch_losses
from engine.trainrun import (TrainingRun, prepare_training_run, require_non_negative, require_positive,
                             resolve_train_list, run_training)

# Flags that define the optimisation: a resumed run must keep them.
RUN_DEFINING = ("model", "backbone", "bn", "batch_size", "max_iters", "wt_dec", "momentum", "head_lr_mult",
                "poly_power", "crop_size", "scale_range", "flip", "seed", "dataset")
ADJUSTABLE_ON_RESUME = ("lr",)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a segmentation model (DeepLab-V2 or V3) on pseudo-label PNGs, with the common WSSS "
                    "recipe as defaults.", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--label_dir", required=True,
                        help="folder of <name>.png label maps for every name of --train_list: class ids "
                             "(palette or grayscale PNGs, 255 ignored), e.g. infer_bao.py --out_pred; "
                             "ground-truth masks give the fully supervised upper bound")
    parser.add_argument("--train_list", default=None,
                        help="training images (default: voc12/train_aug.txt for voc, coco14/train.txt for coco)")
    add_segmentation_model_args(parser)
    parser.add_argument("--backbone_weights", default=None,
                        help="ImageNet weights of the backbone, a state_dict in torchvision's layout (for "
                             "resnet101: torchvision's resnet101 ImageNet file); its classifier fc.* is dropped")
    parser.add_argument("--from_scratch", action="store_true",
                        help="start the backbone from random initialisation instead of --backbone_weights (batch "
                             "norm is then trained: --bn train)")
    add_training_args(parser, default_batch=10, epochs_help=None)
    parser.add_argument("--max_iters", type=int, default=20000,
                        help="length of the schedule in optimisation steps; the poly decay reaches 0 there")
    parser.add_argument("--lr", type=float, default=2.5e-4, help="base SGD learning rate of the backbone")
    parser.add_argument("--head_lr_mult", type=float, default=10.0, help="learning-rate factor of the head")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--wt_dec", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--poly_power", type=float, default=0.9,
                        help="power of the poly decay: lr * (1 - iter / max_iters) ** power")
    parser.add_argument("--crop_size", type=int, default=321, help="side of the square training crops")
    parser.add_argument("--scale_range", type=float, nargs=2, default=[0.5, 1.5], metavar=("LO", "HI"),
                        help="random rescaling factor of image and label before cropping")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="random horizontal flips")
    add_dataset_args(parser)
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible flags and settle the run directory, before anything is built or written."""
    if args.max_iters < 1:
        raise UserError(f"--max_iters must be at least 1, got {args.max_iters}")
    if args.crop_size < 8:
        raise UserError(f"--crop_size must be at least 8 (the output stride), got {args.crop_size}")
    lo, hi = args.scale_range
    if not 0 < lo <= hi:
        raise UserError(f"--scale_range needs 0 < LO <= HI, got {lo} {hi}")
    require_positive(args, "lr", "head_lr_mult")
    require_non_negative(args, "wt_dec", "poly_power")
    if not 0.0 <= args.momentum < 1.0:
        raise UserError(f"--momentum must lie in [0, 1), got {args.momentum}")
    if args.from_scratch and args.bn == "frozen":
        # Frozen batch norm keeps the identity statistics of a fresh network: the backbone then has no
        # normalisation at all and its activations grow through the layers until the loss is NaN.
        raise UserError("--from_scratch needs --bn train: frozen batch norm only suits a backbone whose statistics "
                        "were learnt (--backbone_weights)")
    args.bn = args.bn or ("train" if args.from_scratch else DEFAULT_BN[args.model])
    args.session_name = args.session_name or args.model
    resolve_train_list(args)
    prepare_training_run(args, "backbone_weights", "ImageNet weights of the backbone")


class SegTraining(TrainingRun):
    """One rank of a segmentation training run: data, model, SGD with the poly schedule, and the
    step the engine runs."""

    run_defining = RUN_DEFINING
    adjustable = ADJUSTABLE_ON_RESUME

    def training_names(self) -> tuple[list[str], int]:
        self.spec = dataset_from_args(self.args)
        return read_list(self.args.train_list), self.spec.num_classes

    def make_dataset(self, names: list[str]) -> PseudoLabelDataset:
        # Checks every image and label map (presence, mode, size) before anything is built.
        args = self.args
        return PseudoLabelDataset(self.spec.layout, names, args.label_dir, self.spec.num_classes,
                                  SegAugment(args.crop_size, tuple(args.scale_range), args.flip), seed=args.seed,
                                  source=args.train_list)

    def make_model(self) -> tuple[torch.nn.Module, list[str]]:
        args = self.args
        model = build_segmentation_model(args.model, args.backbone, self.spec.num_classes, args.bn)
        if self.checkpoint is not None or not args.backbone_weights:
            return model, []
        report = load_backbone_weights(model, args.backbone_weights, args.backbone)
        return model, [f"backbone weights {args.backbone_weights}: {report.summary()}"]

    def make_task(self) -> Task:
        args = self.args
        self.compiled(self.placed(self.model))
        backbone, head = head_and_backbone_parameters(self.model)
        self.base_lrs = [args.lr, args.lr * args.head_lr_mult]
        optimizer = torch.optim.SGD([{"params": backbone, "lr": self.base_lrs[0]},
                                     {"params": head, "lr": self.base_lrs[1]}],
                                    lr=args.lr, momentum=args.momentum, weight_decay=args.wt_dec)
        return Task(model=self.model, optimizer=optimizer, step=self._step, modules={"model": self.model},
                    before_step=self._schedule, save_epoch=self._save_final)

    def schedule(self, steps_per_epoch: int) -> tuple[int, int]:
        return math.ceil(self.args.max_iters / steps_per_epoch), self.args.max_iters

    def _step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The engine's step function: the segmentation loss of ``batch`` through ``engine.wrapped``."""
        return seg_batch_losses(engine.wrapped, batch, self.rt.device, self.amp)

    def _schedule(self, pos: Position) -> None:
        """Before step ``pos.global_step`` (0-based): its poly rates (1x backbone, 10x head)."""
        set_poly_lr(self.engine.task.optimizer, self.base_lrs, pos.global_step, self.args.max_iters,
                    self.args.poly_power)

    def _save_final(self, epoch: int) -> list[str]:
        """After an epoch: the plain weights once the schedule is complete (rank 0 writes)."""
        if self.engine.pos.global_step < self.args.max_iters:
            return []
        return self.save_weight_files({f"{self.args.session_name}_final.pth": (self.model, ())})

    def summary(self) -> tuple[str, str]:
        args = self.args
        return (f"segmentation training ({args.model}, {args.backbone}, batch norm {args.bn})",
                f"{len(self.dataset)} images with labels from {args.label_dir}, {args.max_iters} iterations "
                f"({self.engine.iters_per_epoch} per epoch)")


def main(args: argparse.Namespace) -> None:
    validate_args(args)
    run_training(SegTraining, args)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
