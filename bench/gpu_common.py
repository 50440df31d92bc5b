"""What bench/gpu_check.py's measurements share: the variants it times, and the device helpers
that keep each measurement's time and peak memory its own."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from core.device import AMP_DTYPES, configure_math, memory_layout
from data.classes import VOC_CLASSES

NUM_CLASSES = len(VOC_CLASSES)  # PASCAL VOC, background included: the published checkpoints' heads


@dataclass(frozen=True)
class Variant:
    """One way of running the same work: precision, opt-in flags, or the published loop."""

    dtype: torch.dtype | None = None  # autocast dtype; None = float32
    tf32: bool = False  # --tf32
    compile: str = "off"  # --compile mode
    published: bool = False  # the published loops: NCHW, no cuDNN autotuner, batch 1, a host sync per step


# "fp32" is this version's defaults and the reference every other variant is compared with.
VARIANTS: dict[str, Variant] = {
    "published": Variant(published=True),
    "fp32": Variant(),
    "tf32": Variant(tf32=True),
    "bf16": Variant(dtype=AMP_DTYPES["bf16"]),
    "compile": Variant(compile="default"),
}


# A measurement not taken yet, in a report written while the run goes on (a cut-off run leaves it).
NOT_REACHED = "not reached"


def say(text: str) -> None:
    """Print a progress line at once."""
    print(text, flush=True)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the previous measurement left, so that the next peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak CUDA memory since the last :func:`release`, GiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def set_math(device: torch.device, variant: Variant) -> None:
    """The math backends of ``variant``: the published loops ran with PyTorch's defaults (no
    cuDNN autotuner, full float32 matmuls), this version's with :func:`core.device.configure_math`."""
    if variant.published:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = False
        return
    configure_math(device, variant.tf32)


def layout(device: torch.device, variant: Variant, work: str) -> torch.memory_format:
    """This version's layout of ``work`` on ``device`` (:func:`core.device.memory_layout`, as its
    scripts use it); NCHW for the published loops."""
    return torch.contiguous_format if variant.published else memory_layout(device, work)
