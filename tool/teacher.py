"""The BAO teacher: a copy of the student that follows it (method spec, section 3, step 8).

- During the first epoch (epoch 0) the teacher takes the student's full state, parameters
  and buffers, after every optimisation step.
- From the second epoch on, its parameters are an exponential moving average of the
  student's, ``T = m T + (1 - m) S``, with ``m`` rising from the base momentum to 1 along a
  half cosine over the iterations of one epoch and restarting at every epoch
  (:func:`ema_momentum`); the number of iterations is the real one of the data loader.
- Only parameters are averaged, as published: the teacher's buffers (batch-norm running
  statistics and counters) are the ones its own forwards produce. In the default
  train-mode teacher (the published one, never put in eval mode) every teacher forward
  updates them from its batch; the saved ``*_modelt.pth`` files carry those statistics, and
  inference (eval mode) uses them.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` that never needs gradients (requires_grad off)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


def ema_momentum(it: int, iters_per_epoch: int, base: float) -> float:
    """EMA momentum of iteration ``it`` (0-based, counted within the epoch).

    ``m(it) = 1 - (1 - base) * (cos(pi * it / iters_per_epoch) + 1) / 2``: ``base`` at
    ``it = 0``, 1 at ``it = iters_per_epoch``.
    """
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be positive, got {iters_per_epoch}")
    if not 0 <= it <= iters_per_epoch:
        raise ValueError(f"iteration {it} lies outside the epoch of {iters_per_epoch} iterations")
    return 1.0 - (1.0 - base) * (math.cos(math.pi * it / iters_per_epoch) + 1.0) / 2.0


@torch.no_grad()
def copy_student(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher parameters and buffers := the student's (same architecture)."""
    dst, src = _tensors(teacher, student)
    torch._foreach_copy_(dst, src)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Teacher parameters := momentum * teacher + (1 - momentum) * student; buffers untouched."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    # lerp(t, s, w) = t + w (s - t) = (1 - w) t + w s with w = 1 - momentum.
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def update_teacher(teacher: nn.Module, student: nn.Module, epoch: int, it: int, iters_per_epoch: int,
                   base_momentum: float) -> float:
    """Apply the teacher update that follows step ``it`` (0-based) of ``epoch`` (0-based).

    Returns the momentum used: 0.0 for the first-epoch copy (a copy is an EMA with m = 0),
    else :func:`ema_momentum` of ``it``.
    """
    if epoch == 0:
        copy_student(teacher, student)
        return 0.0
    m = ema_momentum(it, iters_per_epoch, base_momentum)
    ema_update(teacher, student, m)
    return m


def _tensors(teacher: nn.Module, student: nn.Module) -> tuple[list, list]:
    """Matching (teacher, student) lists of every parameter and buffer."""
    t_items, s_items = _named_state(teacher), _named_state(student)
    if [k for k, _ in t_items] != [k for k, _ in s_items]:
        raise ValueError("teacher and student have different state layouts")
    return [t for _, t in t_items], [s.detach() for _, s in s_items]


def _named_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())
