"""How the runner starts a stage's command lines: one process each, or the model stages on several
processes and machines through torch's launcher (:class:`Launch`, from ``--nproc_per_node``,
``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``); the command lines as programs to start
(:func:`program`) and as shell text (:func:`shell_line`).

A stage's record names the scripts that run on every process (:attr:`protocol.plan.Stage.ranked`:
training, which splits its global batch over the ranks, and inference, which shards its list by
rank); the other lines (scoring, overlays) run once, on the first node, with their own worker pool.

On one machine the ranks meet through torchrun's ``--standalone`` rendezvous (a free port each
time). On several, every node runs the same commands in the same order, and the ``i``-th
several-process line of a run meets at ``HOST:PORT+i`` (``--rdzv_endpoint HOST:PORT``) with
torchrun's static rendezvous, in which node 0 holds the store: a line never meets the previous
line's agents that are still ending on another node, and node ``r`` of ``--node_rank`` always
holds ranks ``r * N`` to ``r * N + N - 1``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

from core.errors import UserError

# How long a node waits at a rendezvous for node 0, which meanwhile runs the stages' lines of one
# process (scoring a COCO list takes tens of minutes): torchrun's default, ten minutes, is too short.
RENDEZVOUS_TIMEOUT_S = 6 * 3600

# The ports after --rdzv_endpoint's that a run may use (one per several-process line of a run).
PORTS_USED = 64


@dataclass(frozen=True)
class Launch:
    """Where a run's model stages run: ``nproc_per_node`` processes on each of ``nnodes`` machines;
    this machine is ``node_rank``; ``rdzv_endpoint`` (``HOST:PORT``) is node 0's address when
    ``nnodes`` > 1."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def world_size(self) -> int:
        """The processes of a several-process line, all nodes together."""
        return self.nproc_per_node * self.nnodes

    @property
    def leads(self) -> bool:
        """Whether this node runs the one-process lines and writes the run's state (node 0)."""
        return self.node_rank == 0

    def describe(self) -> str:
        nodes = f" x {self.nnodes} nodes" if self.nnodes > 1 else ""
        return f"--nproc_per_node {self.nproc_per_node}{nodes}"

    def prefix(self, index: int) -> list[str]:
        """The launcher's part of the ``index``-th several-process line of a run ([] with one process):
        the arguments after ``python``."""
        if self.world_size == 1:
            return []
        launcher = ["-m", "protocol.torchrun", "--nproc_per_node", str(self.nproc_per_node)]
        if self.nnodes == 1:
            return [*launcher, "--standalone"]
        host, port = _endpoint(self.rdzv_endpoint or "")
        return [*launcher, "--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank), "--rdzv_backend", "static",
                "--rdzv_endpoint", f"{host}:{port + index}", "--rdzv_conf", f"timeout={RENDEZVOUS_TIMEOUT_S}"]


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535 - PORTS_USED:
        raise UserError(f"--rdzv_endpoint {text!r}: give node 0's address as HOST:PORT (a port up to "
                        f"{65535 - PORTS_USED}; the run uses PORT to PORT+{PORTS_USED - 1})")
    return host, int(port)


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_from_args(args: argparse.Namespace) -> Launch:
    """The runner's launch flags, checked: one UserError for a count below 1, more processes than the
    GPUs of ``--device cuda``, several nodes without a rendezvous address, a node rank out of range."""
    launch = Launch(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint)
    if launch.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node {launch.nproc_per_node}: give at least 1 process per node")
    if launch.nnodes < 1:
        raise UserError(f"--nnodes {launch.nnodes}: give at least 1 node")
    if not 0 <= launch.node_rank < launch.nnodes:
        raise UserError(f"--node_rank {launch.node_rank} is out of range for --nnodes {launch.nnodes} "
                        f"(0 to {launch.nnodes - 1})")
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise UserError(f"--nnodes {launch.nnodes}: give --rdzv_endpoint HOST:PORT, node 0's address, the same "
                        "on every node")
    if launch.rdzv_endpoint:
        _endpoint(launch.rdzv_endpoint)
    device = args.device
    if launch.nproc_per_node > 1 and device.startswith("cuda:"):
        raise UserError(f"--device {device} with --nproc_per_node {launch.nproc_per_node}: each process takes "
                        "its own GPU; give --device cuda (CUDA_VISIBLE_DEVICES picks the GPUs)")
    gpus = visible_gpus() if device.startswith("cuda") or launch.nproc_per_node > 1 else 0
    uses_cuda = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if uses_cuda and launch.nproc_per_node > gpus:
        raise UserError(f"--nproc_per_node {launch.nproc_per_node} with --device {device}: this machine shows "
                        f"{gpus} GPU{'s' if gpus != 1 else ''}; give at most {gpus} (one process per GPU)")
    return launch


def program(prefix: list[str], cmd: list[str]) -> list[str]:
    """A command line as a program to start: this Python, the launcher's ``prefix``, the script's line."""
    return [sys.executable, *prefix, *cmd]


def shell_line(argv: list[str]) -> str:
    """A program's arguments as one shell-quoted line."""
    return shlex.join(argv)
