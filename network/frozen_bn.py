"""Frozen batch norm that keeps autocast's activations in their precision.

torchvision's ``FrozenBatchNorm2d`` holds its statistics and affine parameters as float32
buffers and computes ``x * scale + bias`` with them: under autocast the bf16 (or fp16) output
of a convolution is promoted back to float32 there, so every frozen batch norm of the
backbone turns the activations into float32 again and the next convolution casts them down
once more. On an H200 that made bf16 segmentation slower than float32.

:class:`FrozenBatchNorm2d` computes the same scale and bias in the buffers' dtype and
casts them to the input's dtype before applying them; with float32 inputs (no autocast) no
cast happens and the operations are torchvision's, in its order, so the outputs are
bit-identical. It is torchvision's class with only :meth:`FrozenBatchNorm2d.forward`
replaced: the same buffers and ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
``running_var``; a ``num_batches_tracked`` of trained batch norm is dropped on loading).
"""
from __future__ import annotations

import torch
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """Batch norm with constant statistics and affine parameters, computing in the input's dtype.

    Args:
        num_features: channels ``C``.
        eps: added to the variance before the square root.

    (B, C, H, W) -> (B, C, H, W) of the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's operations in its order: float32 results stay bit-identical to its.
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        if x.dtype != scale.dtype:
            # Under autocast x is bf16/fp16; float32 buffers would promote the output to float32.
            scale, bias = scale.to(x.dtype), bias.to(x.dtype)
        return x * scale + bias
