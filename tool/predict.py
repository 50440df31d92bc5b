"""Multi-scale prediction of normalised BAO / TransCAM maps, shared by infer_bao.py and
visual_bao.py (method spec section 4, steps 1-3).

Images arrive in batches from :class:`data.datasets.InferenceDataset` (every image resized
to the same S x S squares, plain and flipped). Each scale runs as one batched forward, split
into chunks of at most ``forward_pixels`` input pixels so that memory stays bounded at large
scales (attention memory grows with S^4). Only the small feature-resolution outputs of a
scale are kept; they are folded into one (K', H, W) accumulator per image holding just the
present classes (and the background map for BAO), so nothing of size (views x classes x
H x W) is ever alive.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from core.errors import quiet_loader_worker
from data.datasets import CollateOrError, ErrorsAsItems, collate_inference, raise_batch_error
from network.checkpoint import LoadReport, load_weights
from network.factory import build_network
from tool.cam import fold_views, normalize_maps, present_keys
from tool.device import autocast

# The maps inference can make: BAO (learned background + TransCAM foreground), TransCAM CAMs,
# and the CNN CAMs before attention refinement (an ablation).
MAP_KINDS = ("bao", "transcam", "cnn")
# What each kind of map needs from a checkpoint (network.checkpoint purposes).
WEIGHT_PURPOSE = {"bao": "bao", "transcam": "transcam", "cnn": "transcam"}
DEFAULT_SCALES = (256, 512, 768)
# One image and its flip at 768 per forward; 4 inputs at 512, 18 at 256.
DEFAULT_FORWARD_PIXELS = 2 * 768 * 768


def load_model(network: str, arch: str, weights: str, num_classes: int, method: str,
               device: torch.device, refine: str = "attention") -> tuple[nn.Module, LoadReport]:
    """Build ``arch`` for ``num_classes`` classes, load ``weights`` for ``method``, eval mode on ``device``.

    ``method`` "bao" needs the BAO heads in the checkpoint; "transcam" and "cnn" accept TransCAM
    weights (which lack them). ``refine`` is the model option of
    :class:`network.conformer.Conformer` ("none": maps without attention refinement). Wrong
    files raise :class:`core.errors.UserError`.
    """
    model = build_network(network, arch, num_classes, refine=refine)
    report = load_weights(model, weights, purpose=WEIGHT_PURPOSE[method])
    # channels_last: faster convolutions with oneDNN (CPU) and cuDNN (GPU); equal up to float rounding.
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    return model, report


def iterate_batches(dataset: Dataset, batch_size: int, num_workers: int,
                    device: torch.device) -> Iterator[dict[str, Any]]:
    """In-order :func:`collate_inference` batches of an :class:`data.datasets.InferenceDataset`.

    A :class:`UserError` raised while loading an image (a corrupt file) is re-raised here
    with its own message; through a DataLoader worker it would otherwise arrive wrapped in
    the worker's traceback text. Workers leave Ctrl-C to the main process, which stops
    cleanly (:func:`core.errors.quiet_loader_worker`).
    """
    loader = DataLoader(ErrorsAsItems(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=CollateOrError(collate_inference), pin_memory=device.type == "cuda",
                        worker_init_fn=quiet_loader_worker)
    for batch in loader:
        raise_batch_error(batch)
        yield batch


class MultiScalePredictor:
    """Run a model over the scales and views of a batch and return normalised maps per image.

    Args:
        model: a :class:`network.conformer.Conformer` in eval mode on ``device``.
        method: "bao" (``bao`` output, background map kept), "transcam" (``cams``,
            foreground only) or "cnn" (the CNN CAMs before attention refinement, foreground only).
        device: where the model runs.
        amp_dtype: autocast dtype on CUDA, None for fp32.
        forward_pixels: most input pixels per forward pass (at least one input always runs).
    """

    def __init__(self, model: nn.Module, method: str, device: torch.device, amp_dtype: torch.dtype | None = None,
                 forward_pixels: int = DEFAULT_FORWARD_PIXELS):
        if method not in MAP_KINDS:
            raise ValueError(f"method must be one of {MAP_KINDS}, got {method!r}")
        self.model = model
        self.method = method
        self.device = device
        self.amp_dtype = amp_dtype
        self.forward_pixels = int(forward_pixels)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised maps of each image of a :func:`collate_inference` batch.

        Returns:
            One ``(keys, maps)`` per image: keys (K',) int64 class ids on the CPU ([0, present
            foreground ids] for BAO, [present foreground ids] for TransCAM) and maps (K', H, W)
            float32 on ``self.device``, normalised to [0, 1) at the image's original size.
        """
        labels = batch["labels"]
        views = batch["views"]
        flipped = [v == 1 for v in range(views)]  # collate_inference puts the flipped view second
        bao = self.method == "bao"
        keys = [present_keys(label, background=bao) for label in labels]
        index = [k.to(self.device) for k in keys]
        sums: list[torch.Tensor | None] = [None] * len(keys)
        view_labels = labels.repeat_interleave(views, dim=0)
        for _, inputs in batch["inputs"]:
            out = self._forward(inputs, view_labels)  # (B * V, K, h, w)
            for b, size in enumerate(batch["sizes"]):
                folded = fold_views(out[b * views:(b + 1) * views, index[b]], size, flipped)
                sums[b] = folded if sums[b] is None else sums[b] + folded
        return [(k, normalize_maps(s)) for k, s in zip(keys, sums)]

    def _forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """inputs (n, 3, S, S), labels (n, C-1) -> float32 (n, K, S/16, S/16) maps, in chunks."""
        side = inputs.shape[-1] * inputs.shape[-2]
        chunk = max(1, self.forward_pixels // side)
        outs = []
        for start in range(0, inputs.shape[0], chunk):
            x = inputs[start:start + chunk].to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[start:start + chunk].to(self.device) if self.method == "bao" else None
            with autocast(self.device, self.amp_dtype):
                if self.method == "cnn":
                    maps = self.model.forward_cnn_cams(x)
                else:
                    result = self.model(x, y)
                    maps = result.bao if self.method == "bao" else result.cams
            outs.append(maps.float())
        return torch.cat(outs)
