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

They differ by float rounding only (the normalisation and the kernel's weight are folded into
the splat and slice weights, a blur pass sums ``v + n1 / 2 + n2 / 2``, the kernels may use fused
multiply-adds, torch's exp and log are not the C library's), which moves the marginals by 1e-6
to 1e-4 after 10 iterations and flips a label only where two labels tie to that precision.

Splat, blur and slice are each one weighted gather-sum (``embedding_bag``: a bag per lattice
point of its pixels, of itself and its two neighbours, a bag per pixel of its simplex's
vertices), so an iteration is a few passes over memory on the CPU and a few kernels on a GPU.
Several images can share one lattice (their keys carry the image's index): on a GPU a batch of
images then costs a few large operations instead of many small ones; on the CPU one image per
lattice is faster (:func:`default_pixels_per_call`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from crf.params import (BILATERAL_COMPAT, BILATERAL_SRGB, BILATERAL_SXY, GAUSSIAN_COMPAT, GAUSSIAN_SXY, GT_PROB,
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

    Attributes:
        points: M, the lattice points; the lattice's values are (M + 1, C), row M kept zero.
        offsets: (P, d + 1) the points of each pixel's simplex; weights: (P, d + 1) its
            barycentric weights.
        splat_pixels, splat_weights, splat_start: the splat's bags (a bag per point of its
            pixels, then one empty bag for row M).
        blur: per axis, (M + 1, 3) bags (point, neighbour, opposite neighbour; M where absent)
            and their (M + 1, 3) weights.
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
        # For each pair i < j, i ranks up when diff_i < diff_j, else j does (ties rank the later one up).
        columns = diff.t().contiguous()
        rank_t = torch.zeros(d + 1, p, dtype=torch.float32, device=device)
        for i in range(d + 1):
            for j in range(i + 1, d + 1):
                less = columns[i] < columns[j]
                rank_t[i] += less
                rank_t[j] += ~less
        rank = rank_t.t() + total.unsqueeze(1)
        shift = (rank < 0).to(torch.float32) * up - (rank >= up).to(torch.float32) * up
        rank = (rank + shift).to(torch.int64)
        rem0 = rem0 + shift
        vb = (elevated - rem0) * down
        bary = torch.zeros(p, d + 2, dtype=torch.float32, device=device)
        bary.scatter_add_(1, d - rank, vb)
        bary.scatter_add_(1, d + 1 - rank, -vb)
        bary[:, 0] = bary[:, 0] + (1.0 + bary[:, d + 1])
        weights = bary[:, :d + 1]

        # The d + 1 vertices of each pixel's simplex: key_r = rem0 + r - (d + 1) [rank > d - r],
        # of which the d first coordinates are kept, packed with the image's index into one int64
        # code with a margin of 2 (d + 1) on every coordinate, so that a neighbour's code is the
        # point's code plus a constant. The codes are built from rem0 and rank without
        # materialising the (P, d + 1, d) keys.
        rem0_i = rem0[:, :d].to(torch.int64)
        low, high = rem0_i.min(0).values, rem0_i.max(0).values
        if len(pad_images):  # the zero vector: rem0 = 0, rank = (0, 1, ..., d)
            low, high = low.clamp(max=0), high.clamp(min=0)
        low = low - 2 * (d + 1)
        extent = (high + 2 * (d + 1) - low + 1).tolist()
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
        r = torch.arange(d + 1, device=device)
        codes = ((rem0_i - low) * stride).sum(1) + image_index * size
        codes = codes.unsqueeze(1) + r * int(stride.sum())
        for k in range(d):
            codes -= (d + 1) * strides[k] * (rank[:, k:k + 1] > d - r)
        codes = codes.reshape(-1)
        if len(pad_images):
            origin = int(((-low) * stride).sum()) + r * int(stride.sum())
            for k in range(d):
                origin -= (d + 1) * strides[k] * (k > d - r)
            pads = torch.as_tensor(list(pad_images), dtype=torch.int64, device=device)
            codes = torch.cat([codes, (origin + pads.unsqueeze(1) * size).reshape(-1)])

        # Points: the distinct codes. One stable sort gives them, each vertex entry's point and
        # each point's pixels in pixel order (as C++'s loop over pixels accumulates them).
        sorted_codes, order = torch.sort(codes, stable=True)
        first = torch.ones_like(sorted_codes, dtype=torch.bool)
        first[1:] = sorted_codes[1:] != sorted_codes[:-1]
        point = torch.cumsum(first, 0) - 1
        unique = sorted_codes[first]
        m = unique.numel()
        self.points = m
        entries = p * (d + 1)
        inverse = torch.empty_like(point)
        inverse[order] = point
        # int32 indices where they fit: the embedding-bag kernels read half the bytes.
        index = torch.int32 if codes.numel() < 2 ** 31 else torch.int64
        self.offsets = inverse[:entries].view(p, d + 1).to(index)
        self.weights = weights

        # Splat: a bag per point of its entries in pixel order (the padding's entries weigh
        # zero), then one empty bag: the lattice's last row m is zero and stands for absent
        # neighbours in the blur.
        self.splat_pixels = torch.div(order, d + 1, rounding_mode="floor").clamp_(max=p - 1).to(index)
        self.splat_weights = torch.cat([weights.reshape(-1), weights.new_zeros(codes.numel() - entries)])[order]
        self.splat_start = torch.cat([torch.nonzero(first).squeeze(1),
                                      first.new_full((1,), codes.numel(), dtype=torch.int64)]).to(index)
        self.alpha = float(np.float32(1.0 / (1.0 + 2.0 ** -d)))

        # Blur along each of the d + 1 axes, as bags of three: the point itself (weight 1) and
        # its neighbours (1/2 each) with all coordinates -1 but +d on axis j (axis d has no
        # stored coordinate), and the opposite; absent ones read the zero row (as C++).
        self.blur = []
        weight = torch.tensor([1.0, 0.5, 0.5], device=device).repeat(m + 1, 1)
        for j in range(d + 1):
            delta = -int(stride.sum()) + ((d + 1) * strides[j] if j < d else 0)
            wanted = unique + delta
            at = torch.searchsorted(unique, wanted).clamp_(max=m - 1)
            found = unique[at] == wanted
            members = torch.full((m + 1, 3), m, dtype=torch.int64, device=device)
            members[:m, 0] = torch.arange(m, device=device)
            members[:m, 1] = torch.where(found, at, m)
            members[at[found], 2] = torch.nonzero(found).squeeze(1)  # the opposite neighbour's relation
            self.blur.append((members.to(index), weight))

    def compute(self, values: torch.Tensor, splat_weights: torch.Tensor | None = None,
                slice_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Splat ``values`` (P, C) onto the lattice, blur along every axis, slice back: (P, C).

        ``splat_weights`` (P * (d + 1),) and ``slice_weights`` (P, d + 1) replace the barycentric
        weights (see :meth:`scaled_weights`).
        """
        if splat_weights is None or slice_weights is None:
            splat_weights, slice_weights = self.scaled_weights()
        lattice = F.embedding_bag(self.splat_pixels, values, self.splat_start, mode="sum",
                                  per_sample_weights=splat_weights)
        for members, weight in self.blur:
            lattice = F.embedding_bag(members, lattice, mode="sum", per_sample_weights=weight)
        return F.embedding_bag(self.offsets, lattice, mode="sum", per_sample_weights=slice_weights)

    def scaled_weights(self, splat_scale: torch.Tensor | None = None,
                       slice_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Splat and slice weights with a factor per pixel folded in: (P * (d + 1),), (P, d + 1).

        Args:
            splat_scale: (P,) factor of each pixel's value as it is splatted.
            slice_scale: (P,) factor of each pixel's sliced result (after the slice's ``alpha``).
        """
        splat = self.splat_weights if splat_scale is None else self.splat_weights * splat_scale[self.splat_pixels]
        sliced = self.weights * self.alpha
        if slice_scale is not None:
            sliced = sliced * slice_scale.unsqueeze(1)
        return splat, sliced


class _Kernel:
    """A symmetrically normalised lattice filter with its weight: ``Q -> w * n * K(n * Q)``,
    the normalisation ``n = 1 / sqrt(K 1 + 1e-20)`` and ``w`` folded into the splat and slice weights."""

    def __init__(self, features: torch.Tensor, image_index: torch.Tensor, pad_images: Sequence[int], weight: float):
        self.lattice = Lattice(features, image_index, pad_images)
        ones = features.new_ones(features.shape[0], 1)
        norm = (1.0 / torch.sqrt(self.lattice.compute(ones).double() + 1e-20)).float().squeeze(1)
        self.splat, self.slice = self.lattice.scaled_weights(norm, norm * weight)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """(P, C) message of ``q`` (P, C)."""
        return self.lattice.compute(q, self.splat, self.slice)


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
    kernels = [_Kernel(_features(images, g_sxy, None, device), image_index, pads, float(g_weight)),
               _Kernel(_features(images, b_sxy, b_srgb, device), image_index, pads, float(b_weight))]
    q = torch.softmax(-unaries, 1)
    for _ in range(iterations):
        energy = kernels[0](q)
        energy.add_(kernels[1](q)).sub_(unaries)
        q = torch.softmax(energy, 1)
    return q


def _chunks(sizes: Sequence[int], pixels: int | None, device: str | torch.device) -> list[list[int]]:
    """Consecutive groups of indices whose sizes sum to at most ``pixels`` (at least one each;
    None: :func:`default_pixels_per_call`'s default for ``device``)."""
    if pixels is None:
        pixels = default_pixels_per_call(device)
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


# About 8 VOC images per lattice on a GPU: bounded memory (about 1 GB at 21 labels).
PIXELS_PER_CALL = 8 * 500 * 375


def default_pixels_per_call(device: str | torch.device) -> int:
    """Default pixels per lattice: :data:`PIXELS_PER_CALL` on a GPU, where several images fill it
    better than one; one image at a time on the CPU, where one image's lattice stays in the caches
    (measured on a 2-core AMD EPYC VM: 4 images of about 448 px in one lattice took more than twice as long
    per image as one after the other)."""
    return PIXELS_PER_CALL if torch.device(device).type == "cuda" else 1


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
                              pixels_per_call: int | None = None) -> list[np.ndarray]:
    """Marginals of the label-map CRF (crf.refine's) of several images, up to ``pixels_per_call``
    pixels per lattice (None: :func:`default_pixels_per_call`'s default for ``device``).

    Args:
        images: B (H_b, W_b, 3) uint8 RGB images.
        labels: B (H_b, W_b) integer class ids in 0..n_labels-1.
    Returns:
        B (n_labels, H_b, W_b) float32 marginals.
    """
    for image, label in zip(images, labels, strict=True):
        check_label_inputs(image, label, n_labels)
    out = []
    for group in _chunks([label.size for label in labels], pixels_per_call, device):
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
                            pixels_per_call: int | None = None) -> list[np.ndarray]:
    """:func:`crf_refine_labels` of several images (arguments as :func:`crf_label_marginals_batch`).

    Returns:
        B (H_b, W_b) uint8 refined class ids.
    """
    return [q.argmax(0).astype(np.uint8) for q in crf_label_marginals_batch(images, labels, n_labels, gt_prob,
                                                                            iterations, device, pixels_per_call)]


def crf_refine_probs_batch(images: Sequence[np.ndarray], probs: Sequence[np.ndarray], params: CRFParams = CRFParams(),
                           device: str | torch.device = "cpu",
                           pixels_per_call: int | None = None) -> list[np.ndarray]:
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
    for group in _chunks([prob[0].size for prob in probs], pixels_per_call, device):
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
    """Refine a label map with the dense CRF (crf.refine's label-map CRF, in torch).

    Args: as :func:`crf.refine.crf_label_marginals`; ``device``: where to compute.
    Returns:
        (H, W) uint8 refined class ids.
    """
    return crf_refine_labels_batch([image], [labels], n_labels, gt_prob, iterations, device)[0]


def crf_refine_probs(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(),
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Refine class probabilities with the dense CRF (crf.refine's probability CRF, in torch).

    Args:
        image: (H, W, 3) uint8 RGB original image.
        probs: (C, H, W) class probabilities (summing to 1 over C).
        params: the CRF's pairwise terms and iterations.
        device: where to compute.
    Returns:
        (C, H, W) float32 refined probabilities.
    """
    return crf_refine_probs_batch([image], [probs], params, device)[0]
