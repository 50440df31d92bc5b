"""One optimisation step, as every training script runs it (through :class:`engine.loop.Engine`)
and the benchmarks time it (bench/bench_train.py, bench/bench_seg.py, bench/gpu_check.py), and
the failures a step can meet: a non-finite loss, an out-of-memory error, and the faults that
tests inject to simulate them.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

FAULTS = ("nan", "oom")


class NonFiniteLoss(ArithmeticError):
    """A step's loss was not finite; the weights were left as they were.

    Attributes:
        values: loss name -> its (rank-averaged) value, in name order.
    """

    def __init__(self, values: dict[str, float]):
        super().__init__("non-finite loss (" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")")
        self.values = values


def train_step(forward: Callable[[], dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, stop_requested: bool = False, world_size: int = 1) -> dict[str, float]:
    """One optimisation step: the step every training script runs (through :class:`Engine`) and the
    benchmarks time.

    ``forward()`` runs the task's step on one batch and returns its scalar losses (``"loss"`` is
    backpropagated). Under ``torchrun`` (``world_size`` > 1) the losses and the stop votes are
    summed over the ranks, the losses then averaged. Backward is launched before the losses are
    read, so that reading them (the step's one wait for the device) overlaps it; a non-finite
    loss is still refused before the optimizer step, hence before it changes the weights.

    Args:
        forward: ``() -> losses``, scalar tensors on the training device.
        optimizer: the model's optimizer; its gradients are zeroed here.
        scaler: the gradient scaler (enabled for fp16 only).
        stop_requested: this rank's vote to stop after this step.
        world_size: processes in the process group (1: no collective).
    Returns:
        loss name -> value (rank-averaged), and ``"stop"``: the number of ranks that voted to stop.
    Raises:
        NonFiniteLoss: a loss was NaN or infinite (the weights are unchanged).
    """
    losses = forward()
    names = sorted(losses)
    device = losses["loss"].device
    stats = torch.stack([losses[k].detach().float() for k in names]
                        + [torch.tensor(float(stop_requested), device=device)])
    if world_size > 1:
        dist.all_reduce(stats)
        stats[:-1] /= world_size
    ready = None
    if stats.is_cuda:  # copied as soon as the forward is done, read once backward is queued
        stats = stats.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    if ready is not None:
        ready.synchronize()
    values: dict[str, float] = dict(zip(names + ["stop"], stats.tolist()))
    if not all(math.isfinite(values[k]) for k in names):
        raise NonFiniteLoss({k: values[k] for k in names})
    scaler.step(optimizer)
    scaler.update()
    return values


def is_out_of_memory(err: BaseException) -> bool:
    """True for a device or host allocation failure."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return "DefaultCPUAllocator: can't allocate memory" in text or "out of memory" in text.lower()


def parse_fault(text: str | None) -> tuple[str, int] | None:
    """``"KIND:STEP"`` (KIND in :data:`FAULTS`, STEP >= 1) -> ``(kind, step)``; ValueError otherwise."""
    if text is None:
        return None
    kind, _, step = text.partition(":")
    if kind not in FAULTS or not step.isdigit() or int(step) < 1:
        raise ValueError(f"expected KIND:STEP with KIND in {', '.join(FAULTS)} and STEP >= 1, got {text!r}")
    return kind, int(step)
