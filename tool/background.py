"""Other reads of BAO's background channel, an option of the method for diagnostics.

BAO's threshold-free labels (spec section 4) compare the background channel of the learned
activation map, ``am[:, 0]``, with the TransCAM foreground CAMs. The loss that trains the map
(spec section 3, L_pcl) is a cross-entropy of ``softmax(am)``, which is unchanged when the same
number is added to every channel at a pixel: it sets ``am[:, 0]`` only relative to the map's
other channels. :class:`WithBackground` swaps the channel BAO's labels read for one of
:data:`BACKGROUNDS`:

- published: ``am[:, 0]``, the method;
- softmax: ``softmax(am)[:, 0]``, the background probability the loss trains;
- centred: ``am[:, 0] - mean_k am[:, k]``, the channel without the offset all channels share.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from network.conformer import ConformerOutput

# Background channel (B, 1, h, w) of each read, from the forward output.
BACKGROUNDS: dict[str, Callable[[ConformerOutput], torch.Tensor]] = {
    "published": lambda out: out.am[:, :1],
    "softmax": lambda out: out.am.softmax(dim=1)[:, :1],
    "centred": lambda out: out.am[:, :1] - out.am.mean(dim=1, keepdim=True),
}


class WithBackground(nn.Module):
    """``model`` whose BAO map takes its background channel from :data:`BACKGROUNDS` ``[kind]``."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        if kind not in BACKGROUNDS:
            raise ValueError(f"kind must be one of {tuple(BACKGROUNDS)}, got {kind!r}")
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> ConformerOutput:
        """x (B, 3, S, S), labels (B, K-1) -> the model's output with bao (B, K, h, w) rebuilt."""
        out = self.model(x, labels)
        return out._replace(bao=torch.cat([BACKGROUNDS[self.kind](out), out.cams[:, 1:]], dim=1))
