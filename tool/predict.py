"""Multi-scale prediction of normalised BAO / TransCAM maps, shared by infer_bao.py and
visual_bao.py (method spec section 4, steps 1-3).

Images arrive in batches from :class:`data.datasets.InferenceDataset` (every image resized
to the same S x S squares, plain and flipped). Each scale runs as one batched forward, split
into chunks of at most ``forward_pixels`` input pixels so that memory stays bounded at large
scales (attention memory grows with S^4). Only the small feature-resolution outputs of a
scale are kept; they are folded into one (K', H, W) accumulator per image holding just the
present classes (and the background map for BAO), so nothing of size (views x classes x
H x W) is ever alive.

On a GPU the host waits for the device once per batch. The inputs travel as uint8 (a
quarter of float32's bytes) and are normalised and flipped there
(:func:`data.transforms.normalized_views`, the same numbers as on the host); the label
vectors and the index of the present classes go over in one non-blocking copy each, from
pinned memory; :func:`to_host` brings the batch's pseudo-labels (uint8, made on the device)
and maps back in one copy each, instead of a copy, and a wait, per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from core.errors import quiet_loader_worker
from data.datasets import CollateOrError, ErrorsAsItems, collate_inference, raise_batch_error
from data.transforms import normalized_views
from network.checkpoint import LoadReport, load_weights
from network.factory import build_network
from tool.cam import fold_views, normalize_maps, present_keys, pseudo_labels
from core.device import autocast, memory_layout

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
    model = model.eval().to(device=device, memory_format=memory_layout(device, "cam_prediction"))
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


@dataclass
class Prediction:
    """The normalised maps of one image, on the model's device.

    Attributes:
        keys: (K',) int64 class ids of the channels, on the CPU ([0, present foreground ids]
            for BAO, [present foreground ids] for TransCAM and the CNN CAMs).
        device_keys: the same ids on the model's device.
        maps: (K', H, W) float32 on the model's device, normalised (``tool.cam.normalize_maps``)
            at the image's original size.
    """

    keys: torch.Tensor
    device_keys: torch.Tensor
    maps: torch.Tensor


@dataclass
class HostOutputs:
    """What :func:`to_host` brings back of one image.

    Attributes:
        keys: (K',) int64 class ids of the maps' channels.
        label: (H, W) uint8 pseudo-label (``tool.cam.pseudo_labels``), None when not asked for.
        maps: (K', H, W) float32 normalised maps, None when not asked for.
    """

    keys: np.ndarray
    label: np.ndarray | None
    maps: np.ndarray | None


def to_host(predictions: list[Prediction], labels: bool, maps: bool, background_score: float | None = None,
            num_classes: int | None = None) -> list[HostOutputs]:
    """The pseudo-labels (with ``labels``) and maps (with ``maps``) of a batch, on the host.

    The pseudo-labels are made on the maps' device as uint8 (class ids < 256); each kind comes
    back in one device-to-host copy for the whole batch. ``background_score`` and
    ``num_classes``: as :func:`tool.cam.pseudo_labels` (None for BAO maps; a threshold t for
    TransCAM maps).
    """
    none = [None] * len(predictions)
    host_labels = none
    if labels:
        host_labels = _one_copy_to_host([
            pseudo_labels(p.maps, p.keys, background_score, num_classes, device_keys=p.device_keys).to(torch.uint8)
            for p in predictions])
    host_maps = _one_copy_to_host([p.maps for p in predictions]) if maps else none
    return [HostOutputs(p.keys.numpy(), label, m) for p, label, m in zip(predictions, host_labels, host_maps)]


def _one_copy_to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Tensors of one device and dtype -> numpy arrays of their shapes, through one ``.cpu()``."""
    flat = torch.cat([x.reshape(-1) for x in tensors]).cpu().numpy()
    ends = np.cumsum([x.numel() for x in tensors])
    return [flat[end - x.numel():end].reshape(x.shape) for x, end in zip(tensors, ends)]


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

    def __call__(self, batch: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(keys, maps)`` of each image of a batch, as :meth:`predict` gives them."""
        return [(p.keys, p.maps) for p in self.predict(batch)]

    @torch.inference_mode()
    def predict(self, batch: dict[str, Any]) -> list[Prediction]:
        """The normalised maps of each image of a :func:`collate_inference` batch, left on the device."""
        labels = batch["labels"]
        views = batch["views"]
        flipped = [v == 1 for v in range(views)]  # normalized_views puts the flipped view second
        bao = self.method == "bao"
        keys = [present_keys(label, background=bao) for label in labels]
        index = self._upload(torch.cat(keys)).split([len(k) for k in keys])
        view_labels = self._upload(labels).repeat_interleave(views, dim=0) if bao else None
        sums: list[torch.Tensor | None] = [None] * len(keys)
        for _, images in batch["inputs"]:
            out = self._forward(self._upload(images), views, view_labels)  # (B * V, K, h, w)
            for b, size in enumerate(batch["sizes"]):
                folded = fold_views(out[b * views:(b + 1) * views, index[b]], size, flipped)
                sums[b] = folded if sums[b] is None else sums[b] + folded
        return [Prediction(k, i, normalize_maps(s)) for k, i, s in zip(keys, index, sums)]

    def _upload(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the model's device; on a GPU from pinned memory, without waiting for the copy."""
        if self.device.type == "cuda":
            x = x.pin_memory()  # no copy for the loader's pinned batches
        return x.to(self.device, non_blocking=True)

    def _forward(self, images: torch.Tensor, views: int, labels: torch.Tensor | None) -> torch.Tensor:
        """images (B, 3, S, S) uint8 and labels (B * V, C-1) (BAO; None otherwise), on the device
        -> float32 (B * V, K, S/16, S/16) maps of the B * V views, in chunks of at most
        ``forward_pixels`` input pixels."""
        rows = images.shape[0] * views
        chunk = max(1, self.forward_pixels // (images.shape[-1] * images.shape[-2]))
        outs = []
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            first = start // views  # the images whose views rows start..stop-1 are
            x = normalized_views(images[first:(stop - 1) // views + 1], views)
            x = x[start - first * views:stop - first * views]
            x = x.contiguous(memory_format=memory_layout(self.device, "cam_prediction"))
            y = labels[start:stop] if labels is not None else None
            with autocast(self.device, self.amp_dtype):
                if self.method == "cnn":
                    maps = self.model.forward_cnn_cams(x)
                else:
                    result = self.model(x, y)
                    maps = result.bao if self.method == "bao" else result.cams
            outs.append(maps.float())
        return torch.cat(outs)
