"""Scoring a model's pseudo-labels on a list of images with ground-truth masks, between epochs.

- BAO (``method="bao"``): the threshold-free pseudo-labels, the argmax over [learned
  background, present classes' maps] (:func:`tool.cam.pseudo_labels`), i.e. the labels BAO's
  inference writes, at the given scales (each with its flip).
- TransCAM (``method="transcam"``): its CAMs have no background map, so no threshold-free
  rule exists for them. They are scored at the best background score of the default sweep
  (:data:`scoring.metrics.DEFAULT_SWEEP`), which chooses t with the masks, as the evaluation of
  TransCAM CAMs does; the mIoU and that t are reported.

The model runs in eval mode (no drop-path, running batch-norm statistics: the maps inference
would make from the saved weights) and is put back in its former mode afterwards; the random
state is left as it was found, so validating does not change the training. Under torchrun
every rank scores its share of the list and the counts are summed over the ranks, so all of
them take part and get the same result; an error on one rank is raised on all of them.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Subset

from core.errors import UserError
from data.classes import ClassSet
from data.datasets import InferenceDataset, read_mask
from data.labels import ImageLabels
from data.layout import DatasetLayout
from tool.cam import pseudo_labels
from scoring.metrics import DEFAULT_SWEEP, confusion, confusions_from_bins, scores, sweep_bins, threshold_range
from scoring.sweep import best_threshold
from tool.predict import DEFAULT_FORWARD_PIXELS, MultiScalePredictor, iterate_batches

RULES = {"bao": "threshold-free", "transcam": "best background score"}


class PseudoLabelValidation:
    """The mIoU of a model's pseudo-labels on ``names`` against their ground-truth masks.

    Args:
        layout: where the images and masks are.
        labels: image-level labels (they select the present classes' maps).
        names: the images to score; those without a mask are left out (:attr:`missing`).
        classes: the C classes of the labels and masks.
        method: "bao" or "transcam" (the rule, see the module docstring).
        scales: square input sides, each also run flipped.
        device: where the model runs; amp: autocast dtype or None.
        batch_size: images per batch; num_workers: data-loading processes.
        rank, world_size: this process's share of ``names`` is ``names[rank::world_size]``.
        source: the list's name, for messages.

    Raises:
        UserError: a listed image or image-level label is missing (checked on every rank).
    """

    def __init__(self, layout: DatasetLayout, labels: ImageLabels, names: list[str], classes: ClassSet, method: str,
                 scales: tuple[int, ...], device: torch.device, amp: torch.dtype | None, batch_size: int,
                 num_workers: int, rank: int = 0, world_size: int = 1, source: str = "the validation list",
                 forward_pixels: int = DEFAULT_FORWARD_PIXELS):
        if method not in RULES:
            raise ValueError(f"method must be one of {tuple(RULES)}, got {method!r}")
        self.layout, self.classes, self.method = layout, classes, method
        self.names = [n for n in names if layout.mask_path(n) is not None]
        self.missing = len(names) - len(self.names)
        self.device, self.amp = device, amp
        self.batch_size, self.num_workers, self.forward_pixels = batch_size, num_workers, forward_pixels
        self.distributed = world_size > 1
        self.thresholds = threshold_range(*DEFAULT_SWEEP)
        if self.names:
            labels.check_names(self.names, source)
            layout.check(self.names, source)
        # Built for the whole list (so every rank checks every name alike), read for this rank's share.
        dataset = InferenceDataset(layout, self.names, labels, scales=scales, flip=True, source=source)
        self.dataset = Subset(dataset, range(rank, len(self.names), world_size))

    @property
    def rule(self) -> str:
        """How the pseudo-labels are made: "threshold-free" or "best background score"."""
        return RULES[self.method]

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """Score ``model`` (eval mode meanwhile); returns ``miou_pct`` (mIoU in percent, the unit every
        printed mIoU of this repository uses; the key says so, as the JSON files of the evaluation hold
        fractions), ``images``, ``rule`` and, for TransCAM, ``best_t``. Every rank must call it."""
        counts = self.counts(model)
        result: dict[str, Any] = {"images": len(self.names), "rule": self.rule}
        if self.method == "bao":
            result["miou_pct"] = 100 * float(scores(counts, self.classes)["miou"])
            return result
        mious = np.array([scores(c, self.classes)["miou"] for c in confusions_from_bins(counts)])
        best, best_t = best_threshold(self.thresholds, mious)
        result.update(miou_pct=100 * float(mious[best]), best_t=best_t)
        return result

    def counts(self, model: nn.Module) -> np.ndarray:
        """The confusion matrix (C, C) (BAO) or sweep bins (T+1, C, C) (TransCAM) of ``model``'s
        pseudo-labels over the whole list (eval mode meanwhile), int64. Every rank must call it."""
        was_training = model.training
        model.eval()
        error = None
        try:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                counts = self._counts(model)
        except UserError as err:
            error, counts = str(err), self._zero_counts()
        finally:
            model.train(was_training)
        counts, failed = self._sum_over_ranks(counts, error is not None)
        if failed:
            raise UserError(error or "validation failed in another process (its message is above)")
        return counts

    def _zero_counts(self) -> np.ndarray:
        c = self.classes.num_classes
        return np.zeros((c, c) if self.method == "bao" else (self.thresholds.size + 1, c, c), np.int64)

    def _counts(self, model: nn.Module) -> np.ndarray:
        """This rank's confusion matrix (C, C) (BAO) or sweep bins (T+1, C, C) (TransCAM), int64."""
        counts = self._zero_counts()
        predictor = MultiScalePredictor(model, self.method, self.device, self.amp, self.forward_pixels)
        c = self.classes.num_classes
        for batch in iterate_batches(self.dataset, self.batch_size, self.num_workers, self.device):
            for name, (keys, maps) in zip(batch["names"], predictor(batch)):
                gt = read_mask(self.layout, name, tuple(maps.shape[1:]))
                if gt is None:
                    raise UserError(f"the ground-truth mask of {name} disappeared from {self.layout.root}")
                if self.method == "bao":
                    label = pseudo_labels(maps, keys, None, c).cpu().numpy().astype(np.uint8)
                    counts += confusion(gt, label, self.classes, pred_name=f"the pseudo-label of {name}")
                else:
                    counts += sweep_bins(gt, keys.numpy(), maps.cpu().numpy(), self.thresholds, self.classes,
                                         cam_name=f"the CAMs of {name}")
        return counts

    def _sum_over_ranks(self, counts: np.ndarray, failed: bool) -> tuple[np.ndarray, bool]:
        """The counts summed over all ranks, and whether any rank failed (one all-reduce)."""
        if not self.distributed:
            return counts, failed
        flat = torch.from_numpy(np.append(counts.reshape(-1), int(failed))).to(self.device)
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        return flat[:-1].reshape(counts.shape), bool(flat[-1])
