"""User-facing model builders, under the module path users already pass
(``--network network.conformer_CAM --arch sm``).

Each builder returns a :class:`network.conformer.Conformer` with the TransCAM and BAO heads;
``num_classes`` includes background (21 VOC, 81 COCO). Keyword arguments go to the model,
e.g. ``refine="none"`` (``--refine none``: the maps without attention refinement, an ablation).
"""
from __future__ import annotations

from typing import Callable

from network.conformer import Conformer, build_conformer


def Net_tiny(num_classes: int = 21, **kwargs) -> Conformer:
    """Tiny Conformer for tests and the CPU demo (not a published size)."""
    return build_conformer("tiny", num_classes, **kwargs)


def Net_ti(num_classes: int = 21, **kwargs) -> Conformer:
    """Conformer-Ti: channel ratio 1, E 384, 6 heads, depth 12."""
    return build_conformer("ti", num_classes, **kwargs)


def Net_sm(num_classes: int = 21, **kwargs) -> Conformer:
    """Conformer-S, the size of every published TransCAM/BAO checkpoint."""
    return build_conformer("sm", num_classes, **kwargs)


def Net_bs(num_classes: int = 21, **kwargs) -> Conformer:
    """Conformer-B: channel ratio 6, E 576, 9 heads, depth 12."""
    return build_conformer("bs", num_classes, **kwargs)


ARCHS: dict[str, Callable[..., Conformer]] = {"tiny": Net_tiny, "ti": Net_ti, "sm": Net_sm, "bs": Net_bs}
