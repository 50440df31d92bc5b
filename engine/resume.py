"""What a training run needs around its loop, and the one home of a run's file I/O.

- the data order: :func:`make_loader` and its :class:`ResumableSampler`, which resumes mid-epoch
  on exactly the batches an uninterrupted run would have seen next;
- random state: :func:`seed_everything`, :func:`rng_state` / :func:`set_rng_state` (saved per rank
  in the checkpoint);
- files: the resumable checkpoint (:func:`save_checkpoint`, :func:`load_checkpoint`, the format
  constants they write and check) and the plain weight files (:func:`save_weights`, :func:`cpu_state`);
- the ranks of a ``torchrun``: :func:`broadcast_buffers`, :func:`gather_objects`, :func:`state_digest`.

The loop that uses them is :mod:`engine.loop`.
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
from torch.utils.data import DataLoader, DistributedSampler

from core.errors import UserError, quiet_loader_worker
from core.fileio import atomic_path
from data.datasets import CollateOrError, ErrorsAsItems
from network.checkpoint import safe_load
from core.device import Runtime

CHECKPOINT_FORMAT = "bao-train-checkpoint"
CHECKPOINT_VERSION = 1


def make_loader(dataset, collate, rt: Runtime, per_rank_batch: int, num_workers: int,
                seed: int) -> tuple[DataLoader, ResumableSampler]:
    """The training DataLoader of one rank and its :class:`ResumableSampler`.

    A sample that fails to load (a corrupt image) reaches the loop as an error item, i.e. one
    clear message rather than a worker's traceback (:class:`data.datasets.ErrorsAsItems`);
    workers ignore Ctrl-C so that the main process can finish its step and save; the loader
    has its own generator, so creating iterators does not consume the global torch RNG.

    Workers persist across epochs, rather than being forked and joined again every epoch
    (:func:`release_workers` ends them): a dataset whose samples change with the epoch
    declares ``epoch_keys`` and is indexed with ``(epoch, index)`` keys, so the epoch reaches
    the workers with every index rather than as dataset state set in the main process, which
    persistent workers would never see.
    """
    sampler = ResumableSampler(dataset, rt.world_size, rt.rank, seed,
                               epoch_keys=getattr(dataset, "epoch_keys", False))
    loader = DataLoader(ErrorsAsItems(dataset), collate_fn=CollateOrError(collate), batch_size=per_rank_batch,
                        sampler=sampler, num_workers=num_workers, pin_memory=rt.device.type == "cuda",
                        drop_last=True, worker_init_fn=quiet_loader_worker, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def release_workers(loader: DataLoader) -> None:
    """Stop the persistent workers of a :func:`make_loader` loader now (no-op without workers).

    Between epochs they wait for work, ignoring SIGTERM (:func:`core.errors.quiet_loader_worker`).
    Left alive until the interpreter exits (a loader still referenced by a traceback), they would
    hang it: multiprocessing ends daemon processes with SIGTERM, then waits for them.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
        loader._iterator = None


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` (shuffled with ``seed`` and the epoch, sharded over
    ranks) that can skip the first samples of an epoch, to resume mid-epoch on exactly
    the batches an uninterrupted run would have seen next. Also used with one process.

    With ``epoch_keys`` it yields ``(epoch, index)`` pairs instead of indices, for a
    dataset whose samples depend on the epoch (:class:`data.datasets._AugmentedDataset`).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, epoch_keys: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0
        self.epoch_keys = bool(epoch_keys)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside 0..{self.num_samples}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in indices] if self.epoch_keys else indices)

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
            f"{path} is not a resumable checkpoint of a training run (plain weights such as *_modelt.pth "
            "cannot be resumed; start a new run from them)", about="plain_weights")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {state.get('version')}; this code reads version "
                        f"{CHECKPOINT_VERSION}")
    return state


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a plain state_dict (the published ``.pth`` layout) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def cpu_state(module: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module.state_dict()`` without keys starting with ``exclude``, in the standard
    (contiguous) layout even when the module is channels-last on a GPU."""
    return {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
            for k, v in module.state_dict().items() if not k.startswith(exclude)}


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
