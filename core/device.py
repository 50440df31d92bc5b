"""Device, mixed precision and distributed helpers shared by the entry scripts.

Distributed mode is switched on by the environment: under ``torchrun`` (``WORLD_SIZE`` > 1)
:func:`setup_distributed` initialises the process group (NCCL on CUDA, gloo on CPU) and
pins each rank to its local GPU. Without it everything runs in one process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import UserError, die_with_parent

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("off", *AMP_DTYPES)
# torch.compile modes; "reduce-overhead" adds CUDA graphs, worth it where shapes repeat.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class Runtime:
    """Where this process runs: its device, its rank and the world size."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and saves."""
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """Turn ``--device`` into a torch.device, refusing CUDA when there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def setup_distributed(device_name: str = "auto") -> Runtime:
    """Initialise the process group when launched by torchrun; return this process's runtime."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return Runtime(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # Started by torch's launcher: a launcher killed outright (kill -9, or with the runner that
        # started it) cannot stop its ranks, which would wait for ever at their next collective.
        die_with_parent(os.getppid())
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Runtime(device, rank, local_rank, world_size)


def cleanup_distributed() -> None:
    """Tear the process group down if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``; None means float32 (the published precision).

    bf16 autocasts on CPU and CUDA; fp16 is refused on CPU, where it is slow and
    gradient scaling is a CUDA feature.
    """
    if amp == "off":
        return None
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device (this run is on {device}); use --amp bf16 or off")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# What runs a model: training (both stages), multi-scale CAM prediction (infer_bao.py,
# visual_bao.py, validation) and segmentation inference (infer_seg.py); see memory_layout.
LAYOUT_WORK = ("training", "cam_prediction", "seg_inference")


def memory_layout(device: torch.device, work: str) -> torch.memory_format:
    """The memory layout of the model and its 4-D inputs for ``work`` (of :data:`LAYOUT_WORK`) on ``device``.

    The one place that decides where channels_last is used. channels_last gives the faster
    convolution kernels of cuDNN (with its autotuner, :func:`configure_math`) and of oneDNN,
    and changes float rounding: a kernel sums in another order. Hence:

    - on CUDA, channels_last for all work: GPU results are equal to the CPU's up to summation
      order anyway;
    - on the CPU, channels_last only for CAM prediction, whose recorded outputs
      (tests/identity.py) were made in it. Training and segmentation inference keep the
      layout they are given (NCHW), in which their recorded and published CPU numbers were
      made: channels_last would change oneDNN's rounding, and those numbers with it.

    Returns ``torch.channels_last``, or ``torch.preserve_format`` (leave the layout as it is),
    for ``module.to(memory_format=...)`` and ``tensor.to(..., memory_format=...)``.
    """
    if work not in LAYOUT_WORK:
        raise ValueError(f"work must be one of {LAYOUT_WORK}, got {work!r}")
    if device.type == "cuda" or work == "cam_prediction":
        return torch.channels_last
    return torch.preserve_format


def barrier() -> None:
    """Synchronise ranks (no-op outside distributed mode)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def configure_math(device: torch.device, tf32: bool = False) -> str:
    """Set this process's float32 math on ``device``; return one line saying what it is.

    The published numbers were made with PyTorch's defaults, which stay the defaults here:
    TF32 in cuDNN convolutions (on since PyTorch 1.7) and full float32 matmuls (attention,
    linear layers). ``tf32`` turns on TF32 matmuls too: faster on Ampere and later GPUs, and it
    changes the numbers (bench/gpu_check.py measures by how much). On the CPU there is no TF32
    and nothing is changed. cuDNN's autotuner is switched on for CUDA: the shapes repeat (fixed
    crops, fixed inference scales), and it only picks among algorithms of the same precision.
    """
    if device.type != "cuda":
        return "float32 math: the CPU's (no TF32)" + (", so --tf32 changes nothing here" if tf32 else "")
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = True
    convs = "TF32" if torch.backends.cudnn.allow_tf32 else "full float32"
    matmuls = "TF32 (--tf32)" if tf32 else "full float32 (as published; --tf32 for TF32)"
    return f"float32 math on {device}: convolutions {convs} (PyTorch's default), matmuls {matmuls}"


def compile_model(model: torch.nn.Module, mode: str = "off") -> torch.nn.Module:
    """``model`` compiled in place with ``torch.compile`` (``mode`` of :data:`COMPILE_MODES`), or as it is for "off".

    In place (``nn.Module.compile``), so the state_dict keys, the checkpoints and a later
    DistributedDataParallel wrapper see the same module. The first forward of each new input
    shape compiles (tens of seconds); later ones run the compiled code.
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode != "off":
        model.compile(mode=None if mode == "default" else mode)
    return model
