"""The fully connected CRF of pydensecrf2's ``DenseCRF2D`` in torch, on the CPU or a GPU.

Mean-field inference (Krähenbühl and Koltun 2011) with a Gaussian kernel on the pixel
positions and a bilateral kernel on positions and colours, Potts compatibility, each kernel
applied by the permutohedral lattice (Adams, Baek and Davis 2010: splat, blur, slice). The
conventions are pydensecrf2's, so that both give the same labels:

- features ``(x / sxy, y / sxy)`` and ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)``,
  x the column;
- the lattice built as its (SSE) C++ builds it, in float32: the elevation, the rounding to
  the nearest remainder-0 point (half to even), the rank with its tie rule, the barycentric
  weights, keys of the ``d`` first coordinates; a blur pass per axis ``v + (n1 + n2) / 2``
  with absent neighbours read as zero; slicing scaled by ``1 / (1 + 2^-d)``;
- ``NORMALIZE_SYMMETRIC`` (pydensecrf's default in ``addPairwise*``): the kernel applied as
  ``n * K(n * Q)`` with ``n = 1 / sqrt(K 1 + 1e-20)``;
- Potts: the message of a kernel with weight ``w`` adds ``+w * n K(n Q)`` to ``-unary``; all
  messages of an iteration come from the previous Q, then a softmax over the labels.

They differ by float summation order only (the lattice's splatting sums a vertex's pixels in
another order, torch's exp and log are not the C library's), which moves the marginals by
1e-6 to 1e-4 after 10 iterations and flips a label only where two labels tie to that precision.

Several images are refined in one lattice (their keys carry the image's index), so a batch
of images costs a few large tensor operations instead of many small ones.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from tool.crf import (BILATERAL_COMPAT, BILATERAL_SRGB, BILATERAL_SXY, GAUSSIAN_COMPAT, GAUSSIAN_SXY, GT_PROB,
                      ITERATIONS, CRFParams, check_label_inputs, check_prob_inputs)

# pydensecrf's SSE lattice builder runs over pixels four at a time and also inserts the lattice
# points of the zero feature vectors that pad the last group of four (they are never splatted
# to, but they relay values in the blur): kept, for the same neighbourhoods.
_SSE_BLOCK = 4
# Keys are packed into int64: the coordinates' ranges times the image count must stay below this.
_KEY_LIMIT = 2 ** 62


class Lattice:
    """The permutohedral lattice of the feature vectors of one or more images.

    Args:
        features: (P, d) float32 feature vectors of all pixels of all images, image after image.
        image_index: (P,) int64 index of each pixel's image (non-decreasing).
        pad_images: indices of the images whose lattice also holds the zero feature vector's
            points (pydensecrf's padding, see ``_SSE_BLOCK``).
    """

    def __init__(self, features: torch.Tensor, image_index: torch.Tensor, pad_images: Sequence[int] = ()):
        device = features.device
        p, d = features.shape
        self.d = d
        features = features.to(torch.float32)
        inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
        scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]
        down = torch.tensor(1.0 / (d + 1), dtype=torch.float32, device=device)
        up = float(d + 1)

        # Elevate onto the hyperplane sum = 0 of R^(d+1), in the C++ order of the float sums.
        elevated = torch.empty(p, d + 1, dtype=torch.float32, device=device)
        sm = torch.zeros(p, dtype=torch.float32, device=device)
        for j in range(d, 0, -1):
            cf = features[:, j - 1] * scale[j - 1]
            elevated[:, j] = sm - float(j) * cf
            sm = sm + cf
        elevated[:, 0] = sm

        # Nearest remainder-0 point, the simplex's permutation (rank) and the barycentric weights.
        v = torch.round(elevated * down)  # half to even, as SSE's default rounding
        rem0 = v * up
        total = v[:, 0].clone()
        for i in range(1, d + 1):
            total = total + v[:, i]
        diff = elevated - rem0
        less = diff.unsqueeze(2) < diff.unsqueeze(1)  # less[p, i, j]: diff_i < diff_j
        upper = torch.ones(d + 1, d + 1, dtype=torch.bool, device=device).triu(1)
        # i before j: i ranks up when diff_i < diff_j, else j does (ties rank the later one up).
        rank = (less & upper).sum(2) + (~less & upper).sum(1)
        rank = rank.to(torch.float32) + total.unsqueeze(1)
        shift = (rank < 0).to(torch.float32) * up - (rank >= up).to(torch.float32) * up
        rank = (rank + shift).to(torch.int64)
        rem0 = rem0 + shift
        vb = (elevated - rem0) * down
        bary = torch.zeros(p, d + 2, dtype=torch.float32, device=device)
        bary.scatter_add_(1, d - rank, vb)
        bary.scatter_add_(1, d + 1 - rank, -vb)
        bary[:, 0] = bary[:, 0] + (1.0 + bary[:, d + 1])
        weights = bary[:, :d + 1]

        # The d + 1 vertices of each pixel's simplex: key_r = rem0 + r - (d + 1) [rank > d - r].
        r = torch.arange(d + 1, device=device)
        rem0_i = rem0[:, :d].to(torch.int64)
        keys = rem0_i.unsqueeze(1) + r.view(1, -1, 1) - (d + 1) * (rank[:, :d].unsqueeze(1) > (d - r).view(1, -1, 1))
        owners = image_index.unsqueeze(1).expand(p, d + 1).reshape(-1)
        keys = keys.reshape(-1, d)
        if len(pad_images):
            # The zero vector: rem0 = 0, rank = (0, 1, ..., d).
            origin = r.view(-1, 1) - (d + 1) * (torch.arange(d, device=device).view(1, -1) > (d - r).view(-1, 1))
            pads = torch.as_tensor(list(pad_images), dtype=torch.int64, device=device)
            keys = torch.cat([keys, origin.repeat(len(pads), 1)])
            owners = torch.cat([owners, pads.repeat_interleave(d + 1)])

        # Hash the keys: pack (image, key) into one int64, with a margin of d + 1 on every
        # coordinate so that a neighbour's code is the point's code plus a constant.
        low = keys.min(0).values - (d + 1)
        extent = keys.max(0).values + (d + 1) - low + 1
        strides = [1] * d
        size = 1
        for k in range(d - 1, -1, -1):
            strides[k] = size
            size *= int(extent[k])
        n_images = int(image_index[-1]) + 1 if p else 1
        if size * n_images >= _KEY_LIMIT:
            raise ValueError(f"the lattice keys of these features span {size * n_images:.3g} codes, more than int64 "
                             f"holds; refine fewer images per call or use coarser features")
        stride = torch.tensor(strides, dtype=torch.int64, device=device)
        codes = ((keys - low) * stride).sum(1) + owners * size
        unique, inverse = torch.unique(codes, sorted=True, return_inverse=True)
        self.points = unique.numel()
        self.offsets = inverse[:p * (d + 1)].view(p, d + 1)
        self.weights = weights

        # Blur neighbours along each of the d + 1 axes: all coordinates -1 but +d on axis j
        # (axis d has no stored coordinate), and the opposite; absent ones read the zero row.
        self.neighbours = []
        for j in range(d + 1):
            delta = -int(stride.sum())
            if j < d:
                delta += (d + 1) * strides[j]
            pair = []
            for step in (delta, -delta):
                wanted = unique + step
                at = torch.searchsorted(unique, wanted).clamp_(max=self.points - 1)
                found = unique[at] == wanted
                index = torch.where(found, at, torch.full_like(at, self.points))
                pair.append(torch.cat([index, index.new_full((1,), self.points)]))
            self.neighbours.append(pair)

        # Splat and slice as sparse products: S (points, P) and alpha * S^T (P, points), CSR
        # (rows of S: its vertex's pixels, found by a stable sort of the pixels' vertices).
        alpha = float(np.float32(1.0 / (1.0 + 2.0 ** -d)))
        rows = self.offsets.reshape(-1)
        flat = weights.reshape(-1)
        order = torch.argsort(rows, stable=True)
        crow = torch.zeros(self.points + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.points), 0)
        # int32 indices where they fit: the sparse libraries' (MKL, cuSPARSE) native width.
        index = torch.int32 if p * (d + 1) < 2 ** 31 else torch.int64
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.splat = torch.sparse_csr_tensor(crow.to(index), torch.div(order, d + 1, rounding_mode="floor").to(index),
                                                 flat[order], (self.points, p), check_invariants=False)
            self.slice = torch.sparse_csr_tensor(torch.arange(0, p * (d + 1) + 1, d + 1, device=device, dtype=index),
                                                 rows.to(index), flat * alpha, (p, self.points), check_invariants=False)
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}

    def compute(self, values: torch.Tensor) -> torch.Tensor:
        """Splat ``values`` (P, C) onto the lattice, blur along every axis, slice back: (P, C).

        Works in buffers kept from call to call (fresh large tensors cost more than the arithmetic
        on the CPU); the returned tensor is one of them, overwritten by the next call.
        """
        c = values.shape[1]
        if c not in self._buffers:
            self._buffers[c] = (values.new_zeros(self.points + 1, c), values.new_empty(self.points + 1, c),
                                values.new_empty(self.points + 1, c), values.new_empty(values.shape[0], c))
        lattice, first, second, out = self._buffers[c]
        torch.mm(self.splat, values, out=lattice[:-1])
        for n1, n2 in self.neighbours:
            torch.index_select(lattice, 0, n1, out=first)
            torch.index_select(lattice, 0, n2, out=second)
            first.add_(second)
            lattice.add_(first, alpha=0.5)
        torch.mm(self.slice, lattice[:-1], out=out)
        return out


class _Kernel:
    """A symmetrically normalised lattice filter: ``Q -> n * K(n * Q)``."""

    def __init__(self, features: torch.Tensor, image_index: torch.Tensor, pad_images: Sequence[int]):
        self.lattice = Lattice(features, image_index, pad_images)
        ones = features.new_ones(features.shape[0], 1)
        self.norm = (1.0 / torch.sqrt(self.lattice.compute(ones).double() + 1e-20)).float()
        self.lattice._buffers.clear()

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """(P, C) message of ``q`` (P, C), in the lattice's buffer."""
        return self.lattice.compute(q * self.norm).mul_(self.norm)


def _features(images: Sequence[np.ndarray], sxy: float, srgb: float | None, device: torch.device) -> torch.Tensor:
    """(P, 2) positions / sxy, or (P, 5) with colours / srgb, of every pixel, image after image."""
    parts = []
    for image in images:
        h, w = image.shape[:2]
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        position = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).to(torch.float32) / np.float32(sxy)
        if srgb is None:
            parts.append(position)
        else:
            colour = torch.from_numpy(np.ascontiguousarray(image).reshape(-1, 3)).to(device, torch.float32)
            parts.append(torch.cat([position, colour / np.float32(srgb)], 1))
    return torch.cat(parts)


def mean_field(images: Sequence[np.ndarray], unaries: torch.Tensor, gaussian: tuple[float, float],
               bilateral: tuple[float, float, float], iterations: int) -> torch.Tensor:
    """Mean-field inference of the dense CRF of several images at once.

    Args:
        images: B (H_b, W_b, 3) uint8 RGB images.
        unaries: (P, C) float32 unary energies of all pixels (row-major within an image,
            image after image), on the device to compute on.
        gaussian: (sxy, weight) of the Gaussian kernel.
        bilateral: (sxy, srgb, weight) of the bilateral kernel.
        iterations: mean-field iterations.
    Returns:
        (P, C) float32 marginals.
    """
    device = unaries.device
    sizes = [image.shape[0] * image.shape[1] for image in images]
    image_index = torch.repeat_interleave(torch.arange(len(images), device=device),
                                          torch.tensor(sizes, device=device))
    pads = [b for b, n in enumerate(sizes) if n % _SSE_BLOCK]
    g_sxy, g_weight = gaussian
    b_sxy, b_srgb, b_weight = bilateral
    kernels = [(_Kernel(_features(images, g_sxy, None, device), image_index, pads), float(g_weight)),
               (_Kernel(_features(images, b_sxy, b_srgb, device), image_index, pads), float(b_weight))]
    q = torch.softmax(-unaries, 1)
    energy = torch.empty_like(unaries)
    for _ in range(iterations):
        torch.neg(unaries, out=energy)
        for kernel, weight in kernels:
            energy.add_(kernel(q), alpha=weight)
        torch.softmax(energy, 1, out=q)
    return q


def _chunks(sizes: Sequence[int], pixels: int) -> list[list[int]]:
    """Consecutive groups of indices whose sizes sum to at most ``pixels`` (at least one each)."""
    groups, current, total = [], [], 0
    for i, n in enumerate(sizes):
        if current and total + n > pixels:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        groups.append(current)
    return groups


# About 8 VOC images per lattice: bounded memory (about 1 GB on the CPU at 21 labels).
PIXELS_PER_CALL = 8 * 500 * 375


def label_unary(labels: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    """(H*W, n_labels) float32 energies of pydensecrf's ``unary_from_labels(zero_unsure=False)``:
    ``-log(gt_prob)`` for the pixel's label, ``-log((1 - gt_prob) / (n_labels - 1))`` for the others."""
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must lie in (0, 1), got {gt_prob}")
    unary = np.full((labels.size, n_labels), -np.log((1.0 - gt_prob) / (n_labels - 1)), np.float32)
    unary[np.arange(labels.size), labels.reshape(-1).astype(np.int64)] = -np.log(gt_prob)
    return unary


def softmax_unary(probs: np.ndarray) -> np.ndarray:
    """(H*W, C) float32 energies of pydensecrf's ``unary_from_softmax``: ``-log`` of the (C, H, W)
    probabilities clipped to [1e-5, 1]."""
    c = probs.shape[0]
    return -np.log(np.clip(probs.astype(np.float32), 1e-5, 1.0)).reshape(c, -1).T


def crf_label_marginals_batch(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], n_labels: int,
                              gt_prob: float = GT_PROB, iterations: int = ITERATIONS,
                              device: str | torch.device = "cpu",
                              pixels_per_call: int = PIXELS_PER_CALL) -> list[np.ndarray]:
    """Marginals of the label-map CRF (tool.crf's) of several images, up to ``pixels_per_call``
    pixels per lattice.

    Args:
        images: B (H_b, W_b, 3) uint8 RGB images.
        labels: B (H_b, W_b) integer class ids in 0..n_labels-1.
    Returns:
        B (n_labels, H_b, W_b) float32 marginals.
    """
    for image, label in zip(images, labels, strict=True):
        check_label_inputs(image, label, n_labels)
    out = []
    for group in _chunks([label.size for label in labels], pixels_per_call):
        unary = torch.from_numpy(np.concatenate([label_unary(labels[i], n_labels, gt_prob) for i in group]))
        q = mean_field([images[i] for i in group], unary.to(device), (GAUSSIAN_SXY, GAUSSIAN_COMPAT),
                       (BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT), iterations).cpu().numpy()
        start = 0
        for i in group:
            h, w = labels[i].shape
            out.append(np.ascontiguousarray(q[start:start + h * w].T).reshape(n_labels, h, w))
            start += h * w
    return out


def crf_refine_labels_batch(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], n_labels: int,
                            gt_prob: float = GT_PROB, iterations: int = ITERATIONS, device: str | torch.device = "cpu",
                            pixels_per_call: int = PIXELS_PER_CALL) -> list[np.ndarray]:
    """:func:`crf_refine_labels` of several images (arguments as :func:`crf_label_marginals_batch`).

    Returns:
        B (H_b, W_b) uint8 refined class ids.
    """
    return [q.argmax(0).astype(np.uint8) for q in crf_label_marginals_batch(images, labels, n_labels, gt_prob,
                                                                            iterations, device, pixels_per_call)]


def crf_refine_probs_batch(images: Sequence[np.ndarray], probs: Sequence[np.ndarray], params: CRFParams = CRFParams(),
                           device: str | torch.device = "cpu",
                           pixels_per_call: int = PIXELS_PER_CALL) -> list[np.ndarray]:
    """:func:`crf_refine_probs` of several images, up to ``pixels_per_call`` pixels per lattice.

    Args:
        images: B (H_b, W_b, 3) uint8 RGB images.
        probs: B (C, H_b, W_b) class probabilities, the same C for all.
    Returns:
        B (C, H_b, W_b) float32 refined probabilities.
    """
    for image, prob in zip(images, probs, strict=True):
        check_prob_inputs(image, prob)
    if len({prob.shape[0] for prob in probs}) > 1:
        raise ValueError("all probabilities of a batch must have the same class count")
    out = []
    for group in _chunks([prob[0].size for prob in probs], pixels_per_call):
        unary = torch.from_numpy(np.concatenate([softmax_unary(probs[i]) for i in group]))
        q = mean_field([images[i] for i in group], unary.to(device),
                       (params.gaussian_sxy, params.gaussian_compat),
                       (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat), params.iterations)
        q = q.cpu().numpy()
        start = 0
        for i in group:
            c, h, w = probs[i].shape
            out.append(np.ascontiguousarray(q[start:start + h * w].T).reshape(c, h, w))
            start += h * w
    return out


def crf_refine_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = GT_PROB,
                      iterations: int = ITERATIONS, device: str | torch.device = "cpu") -> np.ndarray:
    """Refine a label map with the dense CRF (tool.crf's label-map CRF, in torch).

    Args:
        image: (H, W, 3) uint8 RGB original image.
        labels: (H, W) integer class ids in 0..n_labels-1.
        n_labels: number of classes the map may hold (background included).
        gt_prob: confidence given to the input label of each pixel.
        iterations: mean-field iterations.
        device: where to compute.
    Returns:
        (H, W) uint8 refined class ids.
    """
    return crf_refine_labels_batch([image], [labels], n_labels, gt_prob, iterations, device)[0]


def crf_refine_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(),
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Refine class probabilities with the dense CRF (tool.crf's probability CRF, in torch).

    Args:
        image: (H, W, 3) uint8 RGB original image.
        probs: (C, H, W) class probabilities (summing to 1 over C).
        params: the CRF's pairwise terms and iterations.
        device: where to compute.
    Returns:
        (C, H, W) float32 refined probabilities.
    """
    return crf_refine_probs_batch([image], [probs], params, device)[0]
