"""Build a model from the ``--network`` module path and ``--arch`` name of the entry scripts."""
from __future__ import annotations

import importlib

import torch.nn as nn

from core.errors import UserError

DEFAULT_NETWORK = "network.conformer_CAM"


def arch_choices(network: str = DEFAULT_NETWORK) -> list[str]:
    """Size names the network module offers (its ``ARCHS`` table)."""
    return sorted(_archs(network))


def build_network(network: str, arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Import ``network`` (a module with an ``ARCHS`` dict of builders) and build ``arch``."""
    archs = _archs(network)
    if arch not in archs:
        raise UserError(f"unknown --arch {arch!r} for {network}; choose one of {', '.join(sorted(archs))}")
    return archs[arch](num_classes=num_classes, **kwargs)


def _archs(network: str) -> dict:
    try:
        module = importlib.import_module(network)
    except ImportError as err:
        raise UserError(f"cannot import --network {network!r}: {err}") from None
    archs = getattr(module, "ARCHS", None)
    if not isinstance(archs, dict):
        raise UserError(f"--network {network!r} has no ARCHS table of model builders")
    return archs
