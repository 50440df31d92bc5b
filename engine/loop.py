"""The training engine: one resumable loop that every training script drives with its own step.

A script builds its model, data and optimizer, then hands the engine a *step function*
(one batch -> a dict of scalar losses, ``"loss"`` being backpropagated) and optional hooks.
The engine owns what every training run needs and what is easy to get wrong:

- the loop over epochs and steps, with a sampler that resumes mid-epoch on exactly the
  batches an uninterrupted run would have seen next (:class:`engine.resume.ResumableSampler`);
- DistributedDataParallel when launched by ``torchrun`` (losses averaged over ranks,
  buffers broadcast from rank 0, a final check that every rank holds the same weights);
- mixed precision (a gradient scaler for fp16);
- SIGINT / SIGTERM: stop after the current step, save, exit (:class:`StopRequest`);
- the optimisation step, :func:`engine.step.train_step` (the one the benchmarks time): backward, a guard
  that refuses a non-finite loss before it reaches the weights, the optimizer step; the
  messages of a non-finite loss and of an out-of-memory error say how to continue (:class:`Hints`);
- one resumable checkpoint (modules, optimizer, scaler, position, random state of every
  rank), written atomically at every epoch end and at every stop;
- logging: text, JSON lines, TensorBoard and a tqdm bar (:class:`engine.log.RunLog`).

The sampler, the random state, the checkpoint and weight files and the collectives it uses
live in :mod:`engine.resume`; the optimisation step in :mod:`engine.step`; what a training
script does around the loop (the run directory, resume checks, messages) in :mod:`engine.trainrun`.

The engine speaks of no flag and no dataset: what a message should advise comes from the
script, in :class:`Hints`.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core.errors import UserError, record_stop_signal
from data.datasets import raise_batch_error
from core.device import Runtime, barrier
from engine.resume import (broadcast_buffers, cpu_state, gather_objects, release_workers, rng_state, save_checkpoint,
                           seed_everything, set_rng_state, state_digest)
from engine.log import RunLog
from engine.step import NonFiniteLoss, is_out_of_memory, train_step

@dataclass
class Position:
    """Where training stands: ``epoch`` (0-based) to run, ``step`` done within it, ``global_step`` done in total."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Hints:
    """What the engine's messages advise; the script words them in its own flags.

    Attributes:
        resume: how to continue from the checkpoint (e.g. "continue with the same command and
            --resume auto").
        out_of_memory: follows "out of memory on DEVICE": the settings and what to lower.
        non_finite: what to change after a non-finite loss.
    """

    resume: str = "continue from the checkpoint"
    out_of_memory: str = ": lower the batch or crop size"
    non_finite: str = "lower the learning rate"


@dataclass
class Task:
    """What a training script gives the engine.

    Attributes:
        model: the trained module (not DDP-wrapped; the engine wraps it under torchrun).
        optimizer: its optimizer.
        step: ``(engine, batch) -> losses``, the forward of one batch through ``engine.wrapped``
            (the model, DDP-wrapped under torchrun); scalar tensors, ``"loss"`` backpropagated,
            the others (named ``loss_*``) logged.
        modules: name -> module saved in (and restored from) the checkpoint.
        before_step: called before every step with the position of the step about to run
            (e.g. to set a scheduled learning rate, which the step's log record then shows).
        after_step: called after every optimizer step with the position of the step just
            done (``step`` still counting it as not done); returns values to log (None skipped).
        save_epoch: called on rank 0 and the others after each finished epoch with its 0-based
            index; writes the per-epoch files (on rank 0) and returns their names.
        validate: called on every rank after each finished epoch, once its files and the
            checkpoint are saved, with its 0-based index (not when a stop was requested);
            returns values to log as a ``"val"`` record, floats also as TensorBoard scalars
            ``val/<name>`` (counts and words only in the record), or None when it did not
            validate this epoch. It must leave the random state as it found it, so that
            validating does not change the training.
        checkpoint_meta: extra entries of the checkpoint (settings, data identity).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[["Engine", dict[str, Any]], dict[str, torch.Tensor]]
    modules: dict[str, nn.Module]
    before_step: Callable[[Position], None] | None = None
    after_step: Callable[[Position], dict[str, float | None]] | None = None
    save_epoch: Callable[[int], list[str]] | None = None
    validate: Callable[[int], dict[str, Any] | None] | None = None
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)


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
        record_stop_signal(signum)  # SIGTERM ends the script with status 143 (core.errors.run_guarded)
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class Engine:
    """One training run (every rank builds one; only rank 0 logs and writes).

    Args:
        task: the model, optimizer, step and hooks (:class:`Task`).
        rt: this process's device and rank.
        run_dir: the run directory (``checkpoint.pth`` lives there).
        log: the run's log (disabled on ranks other than 0).
        loader: the training batches, drawn by ``sampler``.
        sampler: the :class:`engine.resume.ResumableSampler` of ``loader``.
        global_batch: images per step over all ranks (for throughput).
        max_epochs: epochs of the run.
        max_steps: stop after this many steps in total (a resumable stop), or None.
        total_steps: the schedule's length for iteration-based schedules: the run is complete
            after this many steps, even inside an epoch (which then counts as finished), or None.
        log_every: log every this many steps (and at every epoch end).
        amp: autocast dtype or None; fp16 turns the gradient scaler on.
        hints: the advice of the engine's messages.
        fault: ``(kind, step)`` to simulate a fault ("nan" or "oom") at a 1-based step, for tests.
    """

    def __init__(self, task: Task, rt: Runtime, run_dir: str | os.PathLike, log: RunLog, loader, sampler,
                 global_batch: int, max_epochs: int, max_steps: int | None = None, log_every: int = 20,
                 amp: torch.dtype | None = None, hints: Hints | None = None,
                 fault: tuple[str, int] | None = None, total_steps: int | None = None):
        self.task, self.rt, self.log = task, rt, log
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / "checkpoint.pth"
        self.loader, self.sampler = loader, sampler
        self.iters_per_epoch = len(loader)
        self.global_batch, self.max_epochs, self.max_steps = global_batch, max_epochs, max_steps
        self.total_steps = total_steps
        self.log_every, self.amp, self.fault = log_every, amp, fault
        self.hints = hints or Hints()
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=amp == torch.float16)
        self.pos = Position()
        self.last_checkpoint: Position | None = None
        self.stop: StopRequest | None = None
        self.stopping = False  # the ranks' agreed decision to stop, from the per-step vote
        self.wrapped: nn.Module = task.model
        if rt.distributed:
            self.wrapped = DistributedDataParallel(
                task.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                forward_sync_buffers=False)  # buffers are synchronised after each step instead

    # ----------------------------------------------------------------------------- resume
    def restore(self, checkpoint: dict[str, Any], source: str, seed: int) -> None:
        """Continue from a checkpoint of :meth:`save_checkpoint` (read with :func:`engine.resume.load_checkpoint`);
        ``seed`` reseeds the ranks when the checkpoint was written by another number of processes."""
        for name, module in self.task.modules.items():
            module.load_state_dict(checkpoint[name])
        self.task.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.pos = Position(**checkpoint["position"])
        self.last_checkpoint = Position(**checkpoint["position"])
        rngs = checkpoint["rng"]
        if len(rngs) == self.rt.world_size:
            set_rng_state(rngs[self.rt.rank], self.rt.device)
        else:
            self.log.message(f"note: the checkpoint was written by {len(rngs)} processes, this run has "
                             f"{self.rt.world_size}; training continues but not bit-identically")
            seed_everything(seed + self.rt.rank + self.pos.global_step)
        self.log.message(f"resumed {source} at {self.where(self.pos)} ({self.pos.global_step} steps done)")

    def save_checkpoint(self) -> None:
        """Resumable checkpoint of the current position (a collective: every rank calls it)."""
        rngs = gather_objects(rng_state(self.rt.device), self.rt.world_size)
        if self.rt.is_main:
            save_checkpoint(self.checkpoint_path, {
                **{name: cpu_state(module) for name, module in self.task.modules.items()},
                "optimizer": self.task.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "position": vars(self.pos).copy(),
                "rng": rngs,
                "world_size": self.rt.world_size,
                **self.task.checkpoint_meta,
            })
        self.last_checkpoint = Position(**vars(self.pos))

    # ---------------------------------------------------------------------------- training
    def run(self) -> None:
        """Train to ``max_epochs`` (or ``max_steps``); a stop request raises KeyboardInterrupt after saving."""
        try:
            self._train()
        finally:  # whatever ends the loop, the loader's persistent workers end with it
            release_workers(self.loader)
        if self._max_steps_reached() and not self.complete():
            self.log.message(f"step limit {self.max_steps} reached: resumable checkpoint {self.checkpoint_path}")
        self._check_ranks_agree()
        barrier()
        self.log.message(f"done: {self.pos.global_step} steps; outputs in {self.run_dir}")

    def _train(self) -> None:
        """The epochs of :meth:`run`: each saved at its end, a stop saved where it happened."""
        with StopRequest() as self.stop:
            while not self.complete() and not self._max_steps_reached():
                if self._run_epoch():
                    files = self.task.save_epoch(self.pos.epoch) if self.task.save_epoch else []
                    self.pos = Position(self.pos.epoch + 1, 0, self.pos.global_step)
                    self.save_checkpoint()
                    self.log.record("saved", {"epoch": self.pos.epoch, "files": files + [self.checkpoint_path.name]},
                                    step=self.pos.global_step)
                    if self.task.validate is not None and not self.stopping:
                        self._validate(self.pos.epoch - 1)
                else:  # stopped mid-epoch by a signal or max_steps
                    self.save_checkpoint()
                if self.stopping and not self.complete():
                    self.log.message(f"stopped at {self.where(self.pos)}: resumable checkpoint "
                                     f"{self.checkpoint_path}; {self.hints.resume}")
                    barrier()
                    raise KeyboardInterrupt

    def complete(self) -> bool:
        """True once the run has done all its epochs (or its ``total_steps``)."""
        return self.pos.epoch >= self.max_epochs or self._schedule_done()

    def _schedule_done(self) -> bool:
        return self.total_steps is not None and self.pos.global_step >= self.total_steps

    def _validate(self, epoch: int) -> None:
        """Run the task's validation of the finished ``epoch`` (0-based) and log what it returns."""
        values = self.task.validate(epoch)
        if values:
            scalars = {f"val/{k}": v for k, v in values.items() if isinstance(v, float)}
            self.log.record("val", {"epoch": epoch + 1, **values}, step=self.pos.global_step, scalars=scalars)
            if self.rt.is_main:  # the record goes to the files only; the result is worth a line on screen
                tqdm.write(f"validation after epoch {epoch + 1}: "
                           + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in values.items()))

    def _max_steps_reached(self) -> bool:
        return self.max_steps is not None and self.pos.global_step >= self.max_steps

    def _run_epoch(self) -> bool:
        """Train from the current position to the end of the epoch, or until a stop or the step
        limit; returns True when the epoch was completed."""
        epoch = self.pos.epoch
        if self.pos.step > self.iters_per_epoch:
            raise UserError(f"the checkpoint's position ({self.where(self.pos)}) lies beyond the end of an epoch "
                            f"of this run's data ({self.iters_per_epoch} steps): it was written with another list "
                            "or batch size; resume with those, or start a new run")
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(self.pos.step * self.loader.batch_size)
        sums: dict[str, float] = {}
        steps = 0
        tic = last_log = time.perf_counter()
        logged_at = self.pos.global_step
        announced = False
        exhausted = False
        # A context manager, so that the bar is closed (its line ended) before an error message.
        with tqdm(total=self.iters_per_epoch, initial=self.pos.step, desc=f"epoch {epoch + 1}/{self.max_epochs}",
                  unit="step", dynamic_ncols=True, disable=not self.rt.is_main) as bar:
            for batch in self.loader:
                raise_batch_error(batch, self.checkpoint_hint())
                values = self._step(batch)
                steps += 1
                for k, v in values.items():
                    if k.startswith("loss"):
                        sums[k] = sums.get(k, 0.0) + v
                now = time.perf_counter()
                rate = self.global_batch / max(now - tic, 1e-9)
                tic = now
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.1f}")
                bar.update(1)
                done_epoch = self.pos.step == self.iters_per_epoch or self._schedule_done()
                # The first step is always logged, so that even a one-step run leaves a record.
                if self.pos.global_step % self.log_every == 0 or done_epoch or steps == 1:
                    throughput = self.global_batch * (self.pos.global_step - logged_at) / max(now - last_log, 1e-9)
                    self._log_step(values, throughput)
                    last_log, logged_at = now, self.pos.global_step
                if self.stop.requested and not announced:
                    self.log.message(f"{self.stop.signal_name} received: stopping after this step and saving a "
                                     "resumable checkpoint (send it again to abort at once)")
                    announced = True
                # The vote is summed over ranks: any rank's request stops all of them after the same step.
                self.stopping = values["stop"] > 0
                if self.stopping or self._max_steps_reached() or self._schedule_done():
                    break
            else:
                exhausted = True
        # The epoch ends when its sampler runs out, even short of the position's count: a sampler that
        # yields fewer batches than len(loader) would otherwise restart the same epoch forever.
        finished = exhausted or self.pos.step == self.iters_per_epoch or self._schedule_done()
        if finished:
            means = {k: v / steps for k, v in sums.items()}
            self.log.record("epoch", {"epoch": epoch + 1, "steps": steps, **means}, step=self.pos.global_step)
        return finished

    def _step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimisation step (:func:`engine.step.train_step`) at the current position; returns the
        rank-averaged losses, the stop vote and the hook's values."""
        fault = self.fault[0] if self.fault and self.fault[1] == self.pos.global_step + 1 else None

        def forward() -> dict[str, torch.Tensor]:
            losses = self.task.step(self, batch)
            if fault == "nan":
                losses = {k: v * float("nan") for k, v in losses.items()}
            return losses

        try:
            if fault == "oom":
                raise torch.OutOfMemoryError("simulated out-of-memory error (fault injection)")
            if self.task.before_step is not None:
                self.task.before_step(self.pos)
            values = train_step(forward, self.task.optimizer, self.scaler, self.stop.requested, self.rt.world_size)
        except NonFiniteLoss as err:
            raise UserError(self._non_finite_message(err.values)) from None
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            hint = self.hints.out_of_memory + self.checkpoint_hint()
            raise UserError(f"out of memory on {self.rt.device}{hint}") from None
        broadcast_buffers(self.task.model)
        if self.task.after_step is not None:
            values.update(self.task.after_step(self.pos))
        self.pos.step += 1
        self.pos.global_step += 1
        return values

    def _log_step(self, values: dict[str, Any], throughput: float) -> None:
        lrs = [group["lr"] for group in self.task.optimizer.param_groups]
        losses = {k: v for k, v in values.items() if k.startswith("loss")}
        extra = {k: v for k, v in values.items() if k != "stop" and not k.startswith("loss") and v is not None}
        record = {"epoch": self.pos.epoch + 1, "iter": self.pos.step, **losses, "lr": lrs[0],
                  "images_per_s": round(throughput, 3), **extra}
        scalars = {f"loss/{k.removeprefix('loss_') if k != 'loss' else 'total'}": v for k, v in losses.items()}
        scalars.update({"train/lr": lrs[0], "train/images_per_s": throughput})
        scalars.update({f"train/{k}": v for k, v in extra.items()})
        self.log.record("step", record, step=self.pos.global_step, scalars=scalars)

    def _non_finite_message(self, losses: dict[str, float]) -> str:
        terms = ", ".join(f"{k}={v}" for k, v in losses.items())
        advice = self.hints.non_finite
        return (f"non-finite loss at epoch {self.pos.epoch + 1}, step {self.pos.step + 1} ({terms}); training "
                f"stopped before this step changed the weights. {advice[:1].upper()}{advice[1:]}"
                + self.checkpoint_hint())

    def checkpoint_hint(self) -> str:
        """Where the last good checkpoint is, for the end of an error message."""
        if self.last_checkpoint is None:
            return "; no checkpoint had been saved yet"
        return (f"; the last good checkpoint is {self.checkpoint_path} ({self.where(self.last_checkpoint)}), "
                f"{self.hints.resume}")

    def where(self, pos: Position) -> str:
        """A position in words: 'start of training', 'end of epoch 2', 'epoch 3, step 5 of 18'."""
        if pos.step == 0:
            return f"end of epoch {pos.epoch}" if pos.epoch else "start of training"
        return f"epoch {pos.epoch + 1}, step {pos.step} of {self.iters_per_epoch}"

    def _check_ranks_agree(self) -> None:
        """Distributed runs: verify (by digest) that every rank ends with the same modules."""
        if not self.rt.distributed:
            return
        mine = [state_digest(module) for module in self.task.modules.values()]
        digests = gather_objects(mine, self.rt.world_size)
        identical = all(d == digests[0] for d in digests)
        self.log.record("ranks", {"world_size": self.rt.world_size, "identical": identical, "digests": digests},
                        step=self.pos.global_step)
        if not identical:
            self.log.message("warning: the processes ended with different weights; only rank 0's are saved")
