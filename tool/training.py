"""Building blocks of the training loop of ``train_bao.py``: the loss of one batch for each
method, a data sampler that can resume in the middle of an epoch, the resumable checkpoint
and the random-number state, and the distributed helpers that keep every rank's model
identical.

The loss functions themselves are in :mod:`tool.losses`; the teacher update in
:mod:`tool.teacher`.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler

from network.checkpoint import safe_load
from tool.device import autocast
from tool.errors import UserError
from tool.fileio import atomic_path
from tool.losses import class_balanced_ce, classification_loss, smooth_targets, teacher_pseudo_label

METHODS = ("bao", "transcam")
CHECKPOINT_FORMAT = "bao-train-checkpoint"
CHECKPOINT_VERSION = 1


def bao_losses(student: nn.Module, teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               eps: float, l_pcl: float, amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Losses of one BAO training step (method spec, section 3, steps 2-7).

    The teacher runs under ``torch.no_grad()``: its CAMs only make the pseudo-label, so
    no autograd graph is recorded for it. Losses are computed in float32 under AMP.

    Args:
        student: the trained model (possibly DDP-wrapped), called as ``student(x, y)``.
        teacher: the teacher model, called as ``teacher(x)`` (only its CAMs are used).
        images: (B, 3, S, S) normalised crops.
        labels: (B, C-1) multi-hot foreground labels.
        eps: label smoothing of the pseudo-label target.
        l_pcl: weight of the pseudo-label loss.
        amp_dtype: autocast dtype, or None for float32.
    Returns:
        ``{"loss": L, "loss_cls": L_cls, "loss_pcl": L_pcl}``, scalar float32 tensors
        (``loss`` is the one to backpropagate).
    """
    with autocast(images.device, amp_dtype):
        with torch.no_grad():
            cams_t = teacher(images).cams
        out = student(images, labels)
    loss_cls = classification_loss(out.conv_logits.float(), out.trans_logits.float(), labels)
    pseudo = teacher_pseudo_label(cams_t.float(), labels)
    target = smooth_targets(pseudo, out.am.shape[1], eps)
    loss_pcl = class_balanced_ce(out.am, target, pseudo)
    return {"loss": loss_cls + l_pcl * loss_pcl, "loss_cls": loss_cls, "loss_pcl": loss_pcl}


def transcam_losses(student: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Loss of one TransCAM training step: ``L_cls`` of the forward without labels.

    Args:
        student: the trained model (possibly DDP-wrapped), called as ``student(x)``.
        images: (B, 3, S, S) normalised crops.
        labels: (B, C-1) multi-hot foreground labels.
        amp_dtype: autocast dtype, or None for float32.
    Returns:
        ``{"loss": L_cls, "loss_cls": L_cls}`` (the same scalar tensor).
    """
    with autocast(images.device, amp_dtype):
        out = student(images)
    loss_cls = classification_loss(out.conv_logits.float(), out.trans_logits.float(), labels)
    return {"loss": loss_cls, "loss_cls": loss_cls}


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` (shuffled with ``seed`` and the epoch, sharded over
    ranks) that can skip the first samples of an epoch, to resume mid-epoch on exactly
    the batches an uninterrupted run would have seen next. Also used with one process.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside 0..{self.num_samples}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random-number state (torch CPU and CUDA, numpy, python), in a form
    that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a resumable checkpoint atomically (the previous one stays until the new one
    is complete)."""
    full = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(full, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (safely: ``weights_only=True``)."""
    state = safe_load(path, "checkpoint to resume")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a resumable checkpoint of train_bao.py (plain weights such as "
            "*_modelt.pth cannot be resumed; start a new run from them with --weights)"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {state.get('version')}; this code reads version "
                        f"{CHECKPOINT_VERSION}")
    return state


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a plain state_dict (the published ``.pth`` layout) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def cpu_state(module: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module.state_dict()`` without keys starting with ``exclude``."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()
            if not k.startswith(exclude)}


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank the buffers of rank ``src`` (one broadcast per dtype).

    DDP keeps the gradients, hence the parameters, identical on all ranks, but batch-norm
    running statistics are updated from each rank's own batch; this makes them equal too.
    No-op outside distributed mode.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        dist.broadcast(flat, src)
        offset = 0
        with torch.no_grad():
            for b in bufs:
                n = b.numel()
                b.copy_(flat[offset:offset + n].view_as(b))
                offset += n


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` with one process)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
