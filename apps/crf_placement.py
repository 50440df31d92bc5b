"""Where an inference script's dense CRF runs: which device, how many worker processes, how many
torch threads each; a policy on the flags ``--crf_backend``, ``--crf_workers`` and ``--device``
(defined in :mod:`apps.cli`).

On a GPU the torch CRF runs in the main process beside the model; on the CPU (and pydensecrf2)
in ``--crf_workers`` processes of one torch thread each, while the model goes on to the next images.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from core.workers import default_workers


def crf_worker_count(args: argparse.Namespace, needed: bool, backend: str = "pydensecrf",
                     device_type: str = "cpu") -> int:
    """``--crf_workers`` resolved: 0 when the run writes no CRF labels (nothing worth a process) or
    the torch CRF runs on a GPU (``backend`` "torch", ``device_type`` "cuda": it runs in the main
    process beside the model), else the flag, or :func:`core.workers.default_workers` when it was
    not given."""
    if not needed or (backend == "torch" and device_type == "cuda"):
        return 0
    return default_workers() if args.crf_workers is None else args.crf_workers


@dataclass(frozen=True)
class CRFSetup:
    """Where an inference script's CRF runs: ``backend`` ("pydensecrf" or "torch"),
    the torch CRF's ``device``, the pool's ``workers`` (0: the main process) and each worker's
    torch ``threads`` (None: torch's setting)."""

    backend: str
    device: str
    workers: int
    threads: int | None


def crf_setup(args: argparse.Namespace, device: object, needed: bool) -> CRFSetup:
    """The CRF of ``args.crf_backend`` (resolved by :func:`apps.cli.crf_backend_from_args`) next to a model on
    ``device`` (a torch.device): the torch CRF on that device, in the main process on a GPU; on the
    CPU (and pydensecrf2) in ``--crf_workers`` processes of one torch thread each."""
    where = str(device) if args.crf_backend == "torch" else "cpu"
    workers = crf_worker_count(args, needed, args.crf_backend, where.split(":")[0])
    return CRFSetup(args.crf_backend, where, workers, 1 if workers else None)
