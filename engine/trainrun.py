"""The life of a training run around the engine's loop, shared by train_bao.py and train_seg.py.

A training script defines its flags (in :mod:`apps.cli`), its model, its step and its hooks;
everything else a run does is here, once:

- the start: :func:`prepare_training_run` settles and checks the run directory, the resume
  target and the starting weights, before anything is built or written;
- the default training and validation lists of each dataset (:func:`resolve_train_list`,
  :func:`resolve_val_list`);
- the run's record: ``args.json`` beside the weight files (:func:`write_args_json`, read back
  by the inference scripts through :func:`read_run_args`);
- :class:`TrainingRun`, the part of a script's per-rank object that is the same in every
  script: the order in which a run is built (:meth:`TrainingRun.build`, from the script's
  hooks), the checkpoint to resume and the refusal of other settings or other data, the data
  loader, the log, the engine with its messages' advice, the resume record, the start message,
  the validation between epochs;
- :func:`run_training`, under ``torchrun`` or alone.

No flag is defined here (flags live in :mod:`apps.cli`); messages name the shared training
flags that every training script has.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, default_collate

from core.errors import UserError
from core.fileio import atomic_write
from core.runlock import RunLock, in_use_hint, refuse_if_locked
from data.layout import REPO_ROOT
from network.checkpoint import require_file
from core.device import (Runtime, amp_dtype, barrier, cleanup_distributed, compile_model, configure_math,
                         memory_layout, setup_distributed)
from engine.loop import Engine, Hints, Position, Task
from engine.step import parse_fault
from engine.resume import ResumableSampler, cpu_state, load_checkpoint, make_loader, save_weights, seed_everything
from engine.log import RunLog

RESUME_HINT = "continue with the same command and --resume auto"
DEFAULT_TRAIN_LISTS = {"voc": REPO_ROOT / "voc12" / "train_aug.txt", "coco": REPO_ROOT / "coco14" / "train.txt"}
DEFAULT_VAL_LISTS = {"voc": REPO_ROOT / "voc12" / "val.txt", "coco": REPO_ROOT / "coco14" / "val.txt"}
ARGS_FILE = "args.json"


def require_positive(args: argparse.Namespace, *flags: str) -> None:
    """Refuse a flag (attribute name) whose value is not a finite positive number."""
    for flag in flags:
        value = getattr(args, flag)
        if not value > 0 or not math.isfinite(value):
            raise UserError(f"--{flag} must be a positive number, got {value}")


def require_non_negative(args: argparse.Namespace, *flags: str) -> None:
    """Refuse a flag (attribute name) whose value is not a finite number >= 0."""
    for flag in flags:
        value = getattr(args, flag)
        if not value >= 0 or not math.isfinite(value):
            raise UserError(f"--{flag} must be zero or positive, got {value}")


def resolve_train_list(args: argparse.Namespace) -> None:
    """``--train_list``, or the dataset's default list; it must exist."""
    args.train_list = str(args.train_list or DEFAULT_TRAIN_LISTS[args.dataset])
    if not Path(args.train_list).is_file():
        hint = " (coco14/prepare_coco.py writes coco14/train.txt)" if args.dataset == "coco" else ""
        raise UserError(f"train list not found: {args.train_list}; pass --train_list{hint}")


def resolve_val_list(args: argparse.Namespace) -> None:
    """With ``--val_every``: ``--val_list`` or the dataset's default list (it must exist), and the
    validation scales (default: one, ``--crop_size``)."""
    if not args.val_every:
        return
    args.val_list = str(args.val_list or DEFAULT_VAL_LISTS[args.dataset])
    if not Path(args.val_list).is_file():
        raise UserError(f"validation list not found: {args.val_list}; pass --val_list, or drop --val_every")
    args.val_scales = args.val_scales or (args.crop_size,)


# What a training run refused for a run directory in use is told (core.runlock.RunLock).
RUN_DIR_IN_USE = in_use_hint("--session_name", "--save_dir")


def leads_launch() -> bool:
    """Whether this process locks the run directory: a lone process, or rank 0 of a torchrun
    launch (its other ranks follow rank 0 and take no lock)."""
    return os.environ.get("RANK", "0") == "0"


def prepare_training_run(args: argparse.Namespace, weights_flag: str, weights_what: str,
                         world_size: int | None = None) -> bool:
    """The start of a training run: check the shared training flags and settle the run directory.

    This is the one place where the run directory is decided and checked. Sets ``args.run_dir``,
    ``args.tblog_dir``, ``args.resume`` (a checkpoint path or None) and parses ``args.debug_fault``.
    Refuses to start a new run over an existing one, starting weights (the flag ``weights_flag``)
    given together with ``--from_scratch``, and a new run with neither (``weights_what`` says
    what the weights are). ``world_size`` defaults to ``torchrun``'s ``WORLD_SIZE``. Returns True
    for a new run.
    """
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
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
    new_run = args.resume is None
    if new_run and not weights and not args.from_scratch:
        raise UserError(f"give --{weights_flag} ({weights_what}) or, to train from random initialisation, "
                        "--from_scratch")
    return new_run


def args_dict(args: argparse.Namespace) -> dict:
    """The parsed flags as a JSON-able dict (tuples as lists): ``args.json`` and the checkpoint's settings."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def write_args_json(args: argparse.Namespace) -> None:
    """Write ``<run_dir>/args.json`` (sorted keys) atomically."""
    text = json.dumps(args_dict(args), indent=2, sort_keys=True) + "\n"
    atomic_write(Path(args.run_dir) / ARGS_FILE, lambda tmp: Path(tmp).write_text(text))


def read_run_args(weights: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The settings of the training run that wrote ``weights``: ``(path, settings)`` of the
    ``args.json`` beside it, or None when there is none (weights from elsewhere)."""
    path = Path(weights).parent / ARGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} (the settings of the run that wrote {weights}) cannot be read: {err}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} (the settings of the run that wrote {weights}) is not a JSON object")
    return path, settings


def changed_settings(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The ``keys`` whose value differs between a checkpoint's settings and this run's."""
    return [k for k in keys if saved.get(k) != current.get(k)]


def check_resumable(checkpoint: dict, args: argparse.Namespace, run_defining: tuple[str, ...],
                    data_id: dict) -> None:
    """Refuse to resume ``checkpoint`` (``--resume``) with other run-defining flags or other data.

    ``data_id`` identifies this run's list and label file (``num_images``, ``num_classes``, ...).
    """
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


class TrainingRun:
    """One rank of a training run: the part of a script's run object that every script shares.

    :meth:`build` assembles the run from the script's hooks in the one order that fixes which
    random numbers each part draws (hence the weights) and refuses the cheap mistakes first;
    a script subclasses it and fills in the hooks (:meth:`training_names`, :meth:`make_dataset`,
    :meth:`make_validation`, :meth:`make_model`, :meth:`make_task`, :meth:`schedule`). It sets
    :attr:`run_defining` (flags a resumed run must keep), :attr:`adjustable` (flags it may
    change) and words its start with :meth:`summary` and :meth:`notes`.
    """

    run_defining: tuple[str, ...] = ()
    adjustable: tuple[str, ...] = ()
    # Whose pseudo-labels the validation scores, in its start message.
    validated_maps = "the model's"
    # What an out-of-memory message advises after the batch and crop sizes.
    out_of_memory_advice = "start a new run with a lower --batch_size or --crop_size"

    def __init__(self, args: argparse.Namespace, rt: Runtime):
        self.args, self.rt = args, rt
        self.amp = amp_dtype(args.amp, rt.device)
        self.math = configure_math(rt.device, args.tf32)
        self.checkpoint = load_checkpoint(args.resume) if args.resume else None
        self.build()

    def build(self) -> None:
        """Assemble the run from the script's hooks: the list (checked against the checkpoint to
        resume), the data and this rank's loader, the validation, the model (seeded with --seed),
        the log, the task and the engine. The order is fixed here, not by the scripts: it decides
        which random numbers each part draws (hence the weights), and it refuses the cheap
        mistakes before the costly work."""
        names, num_classes = self.training_names()
        self.identify_data(names, num_classes)
        self.dataset = self.make_dataset(names)
        loader, sampler = self.make_loader(self.dataset, len(names))
        # Its images and labels are checked now, before the run starts.
        self.validation = self.make_validation()
        seed_everything(self.args.seed)
        self.model, loaded = self.make_model()
        self.open_log()
        for line in loaded:
            self.log.message(line)
        self.announce_validation()
        epochs, total_steps = self.schedule(len(loader))
        self.start_engine(self.make_task(), loader, sampler, epochs, total_steps)

    def training_names(self) -> tuple[list[str], int]:
        """Hook: the names of the training list and the number of classes."""
        raise NotImplementedError

    def make_dataset(self, names: list[str]):
        """Hook: the training dataset of ``names`` (it checks that every image and label exists)."""
        raise NotImplementedError

    def make_validation(self):
        """Hook: a :class:`scoring.validation.PseudoLabelValidation` scored every --val_every epochs, or None."""
        return None

    def make_model(self) -> tuple[nn.Module, list[str]]:
        """Hook: the model with its starting weights (on the CPU), and the lines to log about them."""
        raise NotImplementedError

    def make_task(self) -> Task:
        """Hook: the engine's task (the model placed by :meth:`placed`, its optimizer, step and hooks)."""
        raise NotImplementedError

    def schedule(self, steps_per_epoch: int) -> tuple[int, int | None]:
        """Hook: the run's epochs, and the steps after which it is complete (None: at the last epoch's
        end); by default the --max_epoches of an epoch-based schedule."""
        return self.args.max_epoches, None

    def non_finite_advice(self) -> str:
        """What the message of a non-finite loss advises."""
        return "lower --lr" + (" or use --amp bf16 / off" if self.amp == torch.float16 else "")

    def placed(self, model: nn.Module) -> nn.Module:
        """``model`` on this rank's device in the training layout (:func:`core.device.memory_layout`),
        in train mode."""
        return model.to(self.rt.device, memory_format=memory_layout(self.rt.device, "training")).train()

    def identify_data(self, names: list[str], num_classes: int) -> None:
        """Fingerprint the training list (``self.data_id``, kept in the checkpoint); refuse to
        resume a checkpoint of other settings or other data."""
        self.data_id = {"num_images": len(names), "num_classes": num_classes,
                        "names_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}
        if self.checkpoint is not None:
            check_resumable(self.checkpoint, self.args, self.run_defining, self.data_id)

    def make_loader(self, dataset, num_names: int) -> tuple[DataLoader, ResumableSampler]:
        """This rank's loader of ``dataset`` (from ``num_names`` list entries); refuses a list
        shorter than one batch per process."""
        args = self.args
        self.per_rank_batch = args.batch_size // self.rt.world_size
        loader, sampler = make_loader(dataset, default_collate, self.rt, self.per_rank_batch, args.num_workers,
                                      args.seed)
        if len(loader) == 0:
            raise UserError(f"{args.train_list} has {num_names} images, fewer than one batch per process "
                            f"({self.per_rank_batch}); lower --batch_size")
        return loader, sampler

    def open_log(self) -> RunLog:
        """The run's log. Called only once the data and weights are checked: a run refused for
        them leaves no run directory behind."""
        self.log = RunLog(self.args.run_dir, self.args.tblog_dir, enabled=self.rt.is_main)
        return self.log

    def start_engine(self, task: Task, loader: DataLoader, sampler: ResumableSampler, epochs: int,
                     total_steps: int | None = None) -> Engine:
        """The engine of ``task``, restored from the checkpoint or, for a new run, with each rank seeded."""
        args = self.args
        task.checkpoint_meta = {"args": args_dict(args), "data": self.data_id, **task.checkpoint_meta}
        amp_hint = ", or use --amp bf16" if self.rt.device.type == "cuda" and self.amp is None else ""
        hints = Hints(resume=RESUME_HINT, non_finite=self.non_finite_advice(),
                      out_of_memory=f" at --batch_size {args.batch_size} (per process {self.per_rank_batch}) and "
                                    f"--crop_size {args.crop_size}: {self.out_of_memory_advice}{amp_hint}")
        self.engine = Engine(task, self.rt, args.run_dir, self.log, loader, sampler, args.batch_size, epochs,
                             args.max_steps, args.log_every, self.amp, hints, args.debug_fault,
                             total_steps=total_steps)
        if self.checkpoint is None:
            seed_everything(args.seed + self.rt.rank)  # ranks draw different drop-path masks and crops
            return self.engine
        self.engine.restore(self.checkpoint, args.resume, args.seed)
        self.restored()
        adjusted = changed_on_resume(self.checkpoint, args, self.adjustable)
        if adjusted:
            self.log.message(f"changed on resume: {adjusted}")
        self.log.record("resume", {"checkpoint": args.resume, **self.resume_position(self.engine.pos),
                                   "args": args_dict(args)}, step=self.engine.pos.global_step)
        return self.engine

    def announce_validation(self) -> None:
        """Say what --val_list / --val_every will do; drop the validation when no image has a mask
        in the training data's mask folders."""
        args, validation = self.args, self.validation
        if validation is None:
            if getattr(args, "val_list", None):  # a script without validation flags has nothing to say
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
        self.log.message(f"validation every {args.val_every} epoch(s): {self.validated_maps} pseudo-labels "
                         f"({validation.rule}) "
                         f"on {len(validation.names)} images of {args.val_list}{left_out}, scales "
                         f"{','.join(map(str, args.val_scales))} with flips")

    def validate(self, epoch: int, model: nn.Module) -> dict[str, Any] | None:
        """Score ``model``'s pseudo-labels after every --val_every-th epoch (0-based ``epoch``)."""
        if self.validation is None or (epoch + 1) % self.args.val_every:
            return None
        try:
            return self.validation(model)
        except UserError as err:
            raise UserError(f"validation on --val_list {self.args.val_list} after epoch {epoch + 1}: {err}; the "
                            f"epoch is saved: fix the list or drop --val_every, then {RESUME_HINT}") from None

    def restored(self) -> None:
        """Hook: after the checkpoint is restored, before the resume is logged (e.g. apply a changed --lr)."""

    def resume_position(self, pos: Position) -> dict[str, int]:
        """Where the run resumed, as the resume record of ``log.jsonl`` states it."""
        return {"iter": pos.global_step}

    def summary(self) -> tuple[str, str]:
        """``(what, details)`` of the start message "WHAT on DEVICE xN (amp ..): DETAILS, run directory ..."."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines logged after the start message (settings worth a word)."""
        return []

    def run(self) -> None:
        """Write ``args.json`` (a new run, or a resume into a folder without one), say what runs, and train."""
        args = self.args
        # Every weight file sits beside the settings that made it: a run resumed from another
        # folder's checkpoint (--resume PATH) writes its own (the run-defining flags are those of PATH).
        if self.rt.is_main and (not args.resume or not (Path(args.run_dir) / ARGS_FILE).is_file()):
            write_args_json(args)
        what, details = self.summary()
        self.log.message(f"{what} on {self.rt.device} x{self.rt.world_size} (amp {self.amp or 'off'}): {details}, "
                         f"run directory {args.run_dir}")
        for note in [self.math, *self.notes()]:
            self.log.message(note)
        self.engine.run()

    def save_weight_files(self, files: dict[str, tuple[nn.Module, tuple[str, ...]]]) -> list[str]:
        """Write plain state_dicts, ``name -> (module, key prefixes left out)``, into the run directory
        (rank 0 writes); return their names."""
        if self.rt.is_main:
            for name, (module, exclude) in files.items():
                save_weights(Path(self.args.run_dir) / name, cpu_state(module, exclude))
        return list(files)

    def compiled(self, *modules: nn.Module) -> None:
        """Compile each of ``modules`` in place as ``--compile`` asks (after the teacher is copied:
        a copy of a compiled module is not what the teacher should be)."""
        for module in modules:
            if module is not None:
                compile_model(module, self.args.compile)


def run_training(build, args: argparse.Namespace) -> None:
    """Run a training script's ``build(args, runtime).run()`` under ``torchrun`` or alone.

    ``build`` returns an object with ``run()``, ``log`` (:class:`engine.log.RunLog`) and
    ``engine`` (a :class:`TrainingRun`); a user error during training is recorded in the run's
    log before it ends the script, and the log is closed and the process group left whatever
    happens. The run directory is locked (:class:`core.runlock.RunLock`) for the whole run.
    """
    with RunLock(args.run_dir, RUN_DIR_IN_USE) if leads_launch() else contextlib.nullcontext():
        _run_training(build, args)


def _run_training(build, args: argparse.Namespace) -> None:
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
