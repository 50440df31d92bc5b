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
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from data.datasets import ClassificationDataset, CollateOrError, ErrorsAsItems, raise_batch_error
from data.labels import ImageLabels, read_list
from data.layout import REPO_ROOT, add_dataset_args, dataset_from_args
from data.transforms import TrainAugment
from network.checkpoint import BAO_HEADS, load_weights, require_file
from network.factory import DEFAULT_NETWORK, arch_choices, build_network
from tool.device import Runtime, add_device_args, amp_dtype, barrier, cleanup_distributed, setup_distributed
from tool.errors import UserError, ignore_sigint, run_cli
from tool.fileio import atomic_write
from tool.teacher import make_teacher, update_teacher
from tool.train_log import RunLog
from tool.training import (METHODS, ResumableSampler, bao_losses, broadcast_buffers, cpu_state, gather_objects,
                           load_checkpoint, rng_state, save_checkpoint, save_weights, seed_everything,
                           set_rng_state, state_digest, transcam_losses)

DEFAULT_EPOCHS = {"bao": 10, "transcam": 20}
DEFAULT_TRAIN_LISTS = {"voc": REPO_ROOT / "voc12" / "train_aug.txt", "coco": REPO_ROOT / "coco14" / "train.txt"}
CHECKPOINT_NAME = "checkpoint.pth"
# Flags that define the optimisation: a resumed run must use the values it was started with.
RUN_DEFINING = ("method", "network", "arch", "batch_size", "wt_dec", "adam_eps", "eps", "momentum", "l_pcl",
                "teacher_mode", "seed", "dataset")
# Flags a resumed run may change (the usual remedies for a diverging or out-of-memory run);
# changes are logged. Everything in RUN_DEFINING must stay as the run was started.
ADJUSTABLE_ON_RESUME = ("lr", "crop_size", "resize_long")
FAULTS = ("nan", "oom")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train BAO (teacher-student, learned background map) from TransCAM weights, or the "
                    "TransCAM classification stage (--method transcam).")
    parser.add_argument("--method", choices=METHODS, default="bao",
                        help="bao: the BAO stage (L_cls + l_pcl * L_pcl, teacher-student); transcam: the "
                             "TransCAM classification stage (L_cls only); default: %(default)s")
    parser.add_argument("--weights", default=None,
                        help="starting weights: TransCAM weights for bao (label_enc/classifier_x keep their "
                             "initialisation), ImageNet Conformer weights for transcam (classification heads "
                             "dropped); ignored when --resume finds a checkpoint")
    parser.add_argument("--from_scratch", action="store_true",
                        help="start from random initialisation instead of --weights")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="images per optimisation step, over all processes together (split over the "
                             "torchrun processes; must be divisible by their number; default: %(default)s)")
    parser.add_argument("--max_epoches", type=int, default=None,
                        help="number of epochs (default: 10 for bao, 20 for transcam, as published)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop after this many optimisation steps in total (counted from the start of "
                             "the run, resumed steps included), saving a resumable checkpoint; for smoke tests")
    parser.add_argument("--network", default=DEFAULT_NETWORK, help="module holding the ARCHS model builders (default: %(default)s)")
    parser.add_argument("--arch", default="sm", help="model size of --network (default: %(default)s, the size of the published weights)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant (default: %(default)s)")
    parser.add_argument("--wt_dec", type=float, default=5e-4, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--adam_eps", type=float, default=1e-8,
                        help="AdamW epsilon (the published --eps is the label smoothing below; default: %(default)s)")
    parser.add_argument("--crop_size", type=int, default=512, help="side of the square training crops (a multiple of 16; default: %(default)s)")
    parser.add_argument("--resize_long", type=int, nargs=2, default=[320, 640], metavar=("LO", "HI"),
                        help="before cropping, resize each image so its long side is a random integer in "
                             "[LO, HI] (published: 320 640 for 512 crops; scale it with the image size of "
                             "small datasets) (default: 320 640)")
    parser.add_argument("--train_list", default=None,
                        help="list of training images; those whose image-level label has no foreground "
                             "class (COCO images without annotations) are skipped (default: "
                             "voc12/train_aug.txt for voc, coco14/train.txt for coco)")
    add_dataset_args(parser)
    parser.add_argument("--session_name", default=None,
                        help="run name: prefix of the weight files and folder under --save_dir "
                             "(default: the method name)")
    parser.add_argument("--save_dir", default="runs", help="folder holding the run directories (default: %(default)s)")
    parser.add_argument("--tblog_dir", default=None, help="TensorBoard folder (default: <run directory>/tb)")
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
    parser.add_argument("--num_workers", type=int, default=8, help="data loading processes per training process (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation, the data order and the augmentation (default: %(default)s)")
    add_device_args(parser)
    parser.add_argument("--resume", default=None,
                        help="continue from a checkpoint.pth, or 'auto': the run directory's checkpoint when "
                             "there is one, else start a new run")
    parser.add_argument("--log_every", type=int, default=20,
                        help="log losses, lr, EMA momentum and throughput every this many steps (default: %(default)s)")
    parser.add_argument("--debug_fault", default=None, metavar="KIND:STEP",
                        help="for testing the error handling only: simulate a fault at optimisation step STEP "
                             "(1-based): 'nan:STEP' makes the loss non-finite, 'oom:STEP' raises a device "
                             "out-of-memory error")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible or contradictory flags and fill the method-dependent defaults.

    Runs before anything is built or written, so a bad command costs nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    positive = {"--batch_size": args.batch_size, "--crop_size": args.crop_size, "--log_every": args.log_every}
    if args.max_epoches is not None:
        positive["--max_epoches"] = args.max_epoches
    if args.max_steps is not None:
        positive["--max_steps"] = args.max_steps
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if args.crop_size % 16:
        raise UserError(f"--crop_size must be a multiple of 16 (the network's stride), got {args.crop_size}; "
                        f"try {max(16, round(args.crop_size / 16) * 16)}")
    lo, hi = args.resize_long
    if not 0 < lo <= hi:
        raise UserError(f"--resize_long needs 0 < LO <= HI, got {lo} {hi}")
    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} is the global batch and must be divisible by the "
                        f"{world_size} processes")
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
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be zero or positive, got {args.num_workers}")
    if args.arch not in arch_choices(args.network):
        raise UserError(f"unknown --arch {args.arch!r} for {args.network}; choose one of "
                        f"{', '.join(arch_choices(args.network))}")
    if args.weights and args.from_scratch:
        raise UserError("--weights and --from_scratch contradict each other; give one of them")
    if args.weights:
        require_file(args.weights, "weights file")
    args.debug_fault = _parse_fault(args.debug_fault)

    args.max_epoches = args.max_epoches or DEFAULT_EPOCHS[args.method]
    args.session_name = args.session_name or args.method
    args.train_list = str(args.train_list or DEFAULT_TRAIN_LISTS[args.dataset])
    if not Path(args.train_list).is_file():
        hint = " (coco14/prepare_coco.py writes coco14/train.txt)" if args.dataset == "coco" else ""
        raise UserError(f"train list not found: {args.train_list}; pass --train_list{hint}")
    run_dir = Path(args.save_dir) / args.session_name
    args.run_dir = str(run_dir)
    args.tblog_dir = str(args.tblog_dir or run_dir / "tb")
    own_checkpoint = run_dir / CHECKPOINT_NAME
    if args.resume == "auto":
        args.resume = str(own_checkpoint) if own_checkpoint.is_file() else None
    elif args.resume is not None:
        require_file(args.resume, "checkpoint to resume")
    if args.resume is None:
        if own_checkpoint.is_file():
            raise UserError(f"{run_dir} already holds a run ({own_checkpoint}); continue it with --resume auto, "
                            "or choose another --session_name or --save_dir")
        if not args.weights and not args.from_scratch:
            what = "TransCAM weights" if args.method == "bao" else "ImageNet Conformer weights"
            raise UserError(f"give --weights ({what}) or, to train from random initialisation, --from_scratch")


def _parse_fault(text: str | None) -> tuple[str, int] | None:
    if text is None:
        return None
    kind, _, step = text.partition(":")
    if kind not in FAULTS or not step.isdigit() or int(step) < 1:
        raise UserError(f"--debug_fault must be KIND:STEP with KIND in {', '.join(FAULTS)} and STEP >= 1, got {text!r}")
    return kind, int(step)


class StopRequest:
    """Turns SIGINT / SIGTERM into a request to stop after the current step.

    A second signal interrupts at once (KeyboardInterrupt); outputs are atomic, so even
    then no partial file is left.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        # Only set a flag: printing here could re-enter a write the main thread is doing.
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name


@dataclass
class Position:
    """Where training stands: ``epoch`` (0-based) to run, ``step`` done within it, ``global_step`` done in total."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


class Trainer:
    """One training run (all ranks construct one; only rank 0 logs and writes)."""

    def __init__(self, args: argparse.Namespace, rt: Runtime):
        self.args, self.rt = args, rt
        self.run_dir = Path(args.run_dir)
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        self.amp = amp_dtype(args.amp, rt.device)
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        spec = dataset_from_args(args)
        names, skipped = _labelled(read_list(args.train_list), spec.labels, args.train_list)
        self.data_id = {"num_images": len(names), "num_classes": spec.num_classes,
                        "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}
        if checkpoint is not None:
            self._check_resumable(checkpoint)
        self.dataset = ClassificationDataset(spec.layout, names, spec.labels, TrainAugment(args.crop_size, tuple(args.resize_long)),
                                             seed=args.seed)  # checks that every image and label exists
        self.per_rank_batch = args.batch_size // rt.world_size
        self.sampler = ResumableSampler(self.dataset, rt.world_size, rt.rank, args.seed)
        self.iters_per_epoch = self.sampler.num_samples // self.per_rank_batch
        if self.iters_per_epoch == 0:
            raise UserError(f"{args.train_list} has {len(names)} images, fewer than one batch per process "
                            f"({self.per_rank_batch}); lower --batch_size")
        self.loader = DataLoader(
            # A corrupt image reaches the loop as an error item: one clear message, not a worker's traceback.
            ErrorsAsItems(self.dataset), collate_fn=CollateOrError(default_collate),
            batch_size=self.per_rank_batch, sampler=self.sampler, num_workers=args.num_workers,
            # Workers ignore Ctrl-C so that the main process can finish its step and save a checkpoint.
            pin_memory=rt.device.type == "cuda", drop_last=True, worker_init_fn=ignore_sigint,
            # Its own generator: creating loader iterators must not consume the global torch RNG.
            generator=torch.Generator().manual_seed(args.seed))

        seed_everything(args.seed)
        self.model = build_network(args.network, args.arch, spec.num_classes)
        report = None
        if checkpoint is None and args.weights:
            purpose = "transcam" if args.method == "bao" else "backbone"
            report = load_weights(self.model, args.weights, purpose=purpose)
        # Created only now: a run refused for its data or weights leaves no run directory behind.
        self.log = RunLog(self.run_dir, args.tblog_dir, enabled=rt.is_main)
        if skipped:
            self.log.message(f"skipped {skipped} image(s) of {args.train_list} without any foreground class in "
                             "their image-level label (e.g. COCO images without annotations): they cannot "
                             "teach the classification loss")
        if report is not None:
            self.log.message(f"weights {args.weights}: {report.summary()}")
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
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr,
                                           weight_decay=args.wt_dec, eps=args.adam_eps)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=self.amp == torch.float16)
        self.pos = Position()
        self.last_checkpoint: Position | None = None
        self.stop: StopRequest | None = None
        self.stopping = False  # the ranks' agreed decision to stop, from the per-step vote
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            seed_everything(args.seed + rt.rank)  # ranks draw different drop-path masks
        self.student = self.model
        if rt.distributed:
            self.student = DistributedDataParallel(
                self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                forward_sync_buffers=False)  # buffers are synchronised after each step instead

    # ----------------------------------------------------------------------------- resume
    def _check_resumable(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["args"]
        changed = [f"--{k} {saved.get(k)} (now {getattr(self.args, k)})" for k in RUN_DEFINING
                   if saved.get(k) != getattr(self.args, k)]
        if changed:
            raise UserError(f"{self.args.resume} was trained with other settings: {'; '.join(changed)}. A resumed "
                            "run must keep them; pass the original values or start a new --session_name")
        if checkpoint["data"] != self.data_id:
            raise UserError(f"{self.args.resume} was trained on another image list or label file "
                            f"({checkpoint['data']['num_images']} images, {checkpoint['data']['num_classes']} "
                            f"classes); resume with the original --train_list and --label_file")

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        if self.args.method == "bao":
            self.model.load_state_dict(checkpoint["student"])
            self.teacher.load_state_dict(checkpoint["teacher"])
        else:
            self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group in self.optimizer.param_groups:  # --lr may be changed on resume
            group["lr"] = self.args.lr
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.pos = Position(**checkpoint["position"])
        self.last_checkpoint = Position(**checkpoint["position"])
        rngs = checkpoint["rng"]
        if len(rngs) == self.rt.world_size:
            set_rng_state(rngs[self.rt.rank], self.rt.device)
        else:
            self.log.message(f"note: the checkpoint was written by {len(rngs)} processes, this run has "
                             f"{self.rt.world_size}; training continues but not bit-identically")
            seed_everything(self.args.seed + self.rt.rank + self.pos.global_step)
        saved = checkpoint["args"]
        adjusted = [f"--{k} {saved.get(k)} -> {getattr(self.args, k)}" for k in ADJUSTABLE_ON_RESUME
                    if saved.get(k) != getattr(self.args, k)]
        if adjusted:
            self.log.message(f"changed on resume: {'; '.join(adjusted)}")
        self.log.message(f"resumed {self.args.resume} at {self._where(self.pos)} "
                         f"({self.pos.global_step} steps done)")
        self.log.record("resume", {"checkpoint": self.args.resume, "epoch": self.pos.epoch + 1, "iter": self.pos.step,
                                   "args": _args_dict(self.args)}, step=self.pos.global_step)

    # ------------------------------------------------------------------------------ saving
    def _save_checkpoint(self) -> None:
        """Resumable checkpoint of the current position (a collective: every rank calls it)."""
        rngs = gather_objects(rng_state(self.rt.device), self.rt.world_size)
        if self.rt.is_main:
            models = ({"student": cpu_state(self.model), "teacher": cpu_state(self.teacher)}
                      if self.teacher is not None else {"model": cpu_state(self.model)})
            save_checkpoint(self.checkpoint_path, {
                **models,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "position": vars(self.pos).copy(),
                "rng": rngs,
                "world_size": self.rt.world_size,
                "args": _args_dict(self.args),
                "data": self.data_id,
            })
        self.last_checkpoint = Position(**vars(self.pos))

    def _save_epoch_weights(self, epoch: int) -> list[str]:
        """Plain state_dicts of the finished ``epoch`` (0-based), named as published; returns the
        file names (rank 0 writes)."""
        prefix = f"{self.args.session_name}_{epoch}epochs"
        if self.teacher is not None:
            files = {f"{prefix}_modelt.pth": (self.teacher, ()), f"{prefix}_models.pth": (self.model, ())}
        else:  # the published TransCAM layout, without the (untrained) BAO heads
            files = {f"{prefix}.pth": (self.model, BAO_HEADS)}
        if self.rt.is_main:
            for name, (module, exclude) in files.items():
                save_weights(self.run_dir / name, cpu_state(module, exclude))
        return list(files)

    # ---------------------------------------------------------------------------- training
    def run(self) -> None:
        args = self.args
        if self.rt.is_main and not args.resume:
            atomic_write(self.run_dir / "args.json", lambda tmp: Path(tmp).write_text(_args_json(args)))
        self.log.message(
            f"{args.method} training on {self.rt.device} x{self.rt.world_size} "
            f"(amp {self.amp or 'off'}): {len(self.dataset)} images, {self.iters_per_epoch} steps per epoch, "
            f"{args.max_epoches} epochs, run directory {self.run_dir}")
        if args.w_pcl != 1.0:
            self.log.message(f"note: --w_pcl {args.w_pcl} has no effect (it cancels in the published loss)")
        with StopRequest() as self.stop:
            while self.pos.epoch < args.max_epoches and not self._max_steps_reached():
                if self._run_epoch():
                    files = self._save_epoch_weights(self.pos.epoch)
                    self.pos = Position(self.pos.epoch + 1, 0, self.pos.global_step)
                    self._save_checkpoint()
                    self.log.record("saved", {"epoch": self.pos.epoch, "files": files + [CHECKPOINT_NAME]},
                                    step=self.pos.global_step)
                else:  # stopped mid-epoch by a signal or --max_steps
                    self._save_checkpoint()
                if self.stopping and self.pos.epoch < args.max_epoches:
                    self.log.message(
                        f"stopped at {self._where(self.pos)}: resumable checkpoint {self.checkpoint_path}; "
                        "continue with the same command and --resume auto")
                    barrier()
                    raise KeyboardInterrupt
        if self._max_steps_reached() and self.pos.epoch < args.max_epoches:
            self.log.message(f"--max_steps {args.max_steps} reached: resumable checkpoint {self.checkpoint_path}")
        self._check_ranks_agree()
        barrier()
        self.log.message(f"done: {self.pos.global_step} steps; outputs in {self.run_dir}")

    def _max_steps_reached(self) -> bool:
        return self.args.max_steps is not None and self.pos.global_step >= self.args.max_steps

    def _run_epoch(self) -> bool:
        """Train from the current position to the end of the epoch, or until a stop or
        --max_steps; returns True when the epoch was completed."""
        args, epoch = self.args, self.pos.epoch
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(self.pos.step * self.per_rank_batch)
        sums: dict[str, float] = {}
        steps = 0
        tic = last_log = time.perf_counter()
        logged_at = self.pos.global_step
        announced = False
        # A context manager, so that the bar is closed (its line ended) before an error message.
        with tqdm(total=self.iters_per_epoch, initial=self.pos.step, desc=f"epoch {epoch + 1}/{args.max_epoches}",
                  unit="step", dynamic_ncols=True, disable=not self.rt.is_main) as bar:
            for batch in self.loader:
                raise_batch_error(batch, self._checkpoint_hint())
                values = self._step(batch)
                steps += 1
                for k, v in values.items():
                    if k.startswith("loss"):
                        sums[k] = sums.get(k, 0.0) + v
                now = time.perf_counter()
                rate = args.batch_size / max(now - tic, 1e-9)
                tic = now
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.1f}")
                bar.update(1)
                done_epoch = self.pos.step == self.iters_per_epoch
                if self.pos.global_step % args.log_every == 0 or done_epoch:
                    throughput = args.batch_size * (self.pos.global_step - logged_at) / max(now - last_log, 1e-9)
                    self._log_step(values, throughput)
                    last_log, logged_at = now, self.pos.global_step
                if self.stop.requested and not announced:
                    self.log.message(f"{self.stop.signal_name} received: stopping after this step and saving a "
                                     "resumable checkpoint (send it again to abort at once)")
                    announced = True
                # The vote is summed over ranks: any rank's request stops all of them after the same step.
                self.stopping = values["stop"] > 0
                if self.stopping or self._max_steps_reached():
                    break
        finished = self.pos.step == self.iters_per_epoch
        if finished:
            means = {k: v / steps for k, v in sums.items()}
            self.log.record("epoch", {"epoch": epoch + 1, "steps": steps, **means}, step=self.pos.global_step)
        return finished

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimisation step; returns the rank-averaged loss terms and the stop vote."""
        args, rt = self.args, self.rt
        step_number = self.pos.global_step + 1
        fault = args.debug_fault[0] if args.debug_fault and args.debug_fault[1] == step_number else None
        try:
            images = batch["img"].to(rt.device, non_blocking=True)
            labels = batch["label"].to(rt.device, non_blocking=True)
            if fault == "oom":
                raise torch.OutOfMemoryError("simulated out-of-memory error (--debug_fault)")
            if self.teacher is not None:
                losses = bao_losses(self.student, self.teacher, images, labels, args.eps, args.l_pcl, self.amp)
            else:
                losses = transcam_losses(self.student, images, labels, self.amp)
            if fault == "nan":
                losses = {k: v * float("nan") for k, v in losses.items()}
            names = sorted(losses)
            stats = torch.stack([losses[k].detach().float() for k in names]
                                + [torch.tensor(float(self.stop.requested), device=rt.device)])
            if rt.distributed:
                dist.all_reduce(stats)
                stats[:-1] /= rt.world_size
            values = dict(zip(names + ["stop"], stats.tolist()))
            if not all(math.isfinite(values[k]) for k in names):
                raise UserError(self._non_finite_message(values, names))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err):
                raise
            raise UserError(
                f"out of memory on {rt.device} at --batch_size {args.batch_size} (per process "
                f"{self.per_rank_batch}) and --crop_size {args.crop_size}: lower --crop_size (a resumed run may "
                f"change it) or start a new run with a lower --batch_size"
                + (", or use --amp bf16" if rt.device.type == "cuda" and self.amp is None else "")
                + self._checkpoint_hint()) from None
        broadcast_buffers(self.model)
        momentum = None
        if self.teacher is not None:
            momentum = update_teacher(self.teacher, self.model, self.pos.epoch, self.pos.step,
                                      self.iters_per_epoch, args.momentum)
            # After the first epoch the teacher's statistics come from its own forward on this
            # rank's batch; rank 0's are kept, as for the student.
            broadcast_buffers(self.teacher)
        self.pos.step += 1
        self.pos.global_step += 1
        values["ema_momentum"] = momentum
        return values

    def _log_step(self, values: dict[str, float], throughput: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        losses = {k: v for k, v in values.items() if k.startswith("loss")}
        record = {"epoch": self.pos.epoch + 1, "iter": self.pos.step, **losses, "lr": lr,
                  "images_per_s": round(throughput, 3)}
        scalars = {f"loss/{k.removeprefix('loss_') if k != 'loss' else 'total'}": v for k, v in losses.items()}
        scalars.update({"train/lr": lr, "train/images_per_s": throughput})
        if values["ema_momentum"] is not None:
            record["ema_momentum"] = values["ema_momentum"]
            scalars["train/ema_momentum"] = values["ema_momentum"]
        self.log.record("step", record, step=self.pos.global_step, scalars=scalars)

    def _non_finite_message(self, values: dict[str, float], names: list[str]) -> str:
        terms = ", ".join(f"{k}={values[k]}" for k in names)
        return (f"non-finite loss at epoch {self.pos.epoch + 1}, step {self.pos.step + 1} ({terms}); training "
                f"stopped before this step changed the weights. Lower --lr"
                + (" or use --amp bf16 / off" if self.amp == torch.float16 else "")
                + self._checkpoint_hint())

    def _checkpoint_hint(self) -> str:
        if self.last_checkpoint is None:
            return "; no checkpoint had been saved yet"
        return (f"; the last good checkpoint is {self.checkpoint_path} ({self._where(self.last_checkpoint)}), "
                "continue from it with --resume auto")

    def _where(self, pos: Position) -> str:
        if pos.step == 0:
            return f"end of epoch {pos.epoch}" if pos.epoch else "start of training"
        return f"epoch {pos.epoch + 1}, step {pos.step} of {self.iters_per_epoch}"

    def _check_ranks_agree(self) -> None:
        """Distributed runs: verify (by digest) that every rank ends with the same models."""
        if not self.rt.distributed:
            return
        mine = [state_digest(self.model)] + ([state_digest(self.teacher)] if self.teacher is not None else [])
        digests = gather_objects(mine, self.rt.world_size)
        identical = all(d == digests[0] for d in digests)
        self.log.record("ranks", {"world_size": self.rt.world_size, "identical": identical, "digests": digests},
                        step=self.pos.global_step)
        if not identical:
            self.log.message("warning: the processes ended with different weights; only rank 0's are saved")


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


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return "DefaultCPUAllocator: can't allocate memory" in text or "out of memory" in text.lower()


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def _args_json(args: argparse.Namespace) -> str:
    return json.dumps(_args_dict(args), indent=2, sort_keys=True) + "\n"


def main(args: argparse.Namespace) -> None:
    validate_args(args)
    rt = setup_distributed(args.device)
    try:
        trainer = Trainer(args, rt)
        try:
            trainer.run()
        except UserError as err:
            trainer.log.record("error", {"message": str(err)}, step=trainer.pos.global_step)
            raise
        finally:
            trainer.log.close()
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
