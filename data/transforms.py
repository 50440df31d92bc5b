"""Image transforms for training (random augmentation) and multi-scale inference.

All functions take (H, W, 3) uint8 RGB arrays as :func:`data.images.read_image` returns
them and produce float32 tensors normalised with the ImageNet mean and std.

Training (method spec section 3, :class:`TrainAugment`): resize so the long side is a
random integer in [320, 640] (bicubic), random horizontal flip, colour jitter, normalise,
random crop to a square, placing the image in a zero canvas when it is smaller.

Inference (section 4, :func:`multiscale_inputs`): resize to S x S for each scale S
(bicubic), normalise, and stack the horizontally flipped copy behind the plain one. The
inference loader stops after the resize (:func:`resized_scales`, uint8, a quarter of the
bytes to move to the GPU) and the model's device normalises and flips
(:func:`normalized_views`): normalisation follows the resize of the uint8 image, and
:func:`normalized_views` does the float32 arithmetic of :func:`normalize`, so the inputs
are the same numbers either way.

Segmentation stage (:class:`SegAugment`, :func:`scaled_input`): the DeepLab recipe, i.e.
random rescaling of image and label, flip, padded random crop; inference rescales by factors
of the original size, keeping the aspect.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0)


def normalize(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ``(x / 255 - mean) / std`` per channel."""
    out = (np.asarray(img, np.float32) - _MEAN) * _INV_STD
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=None)
def _channel_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`_MEAN` and :data:`_INV_STD` as (1, 3, 1, 1) float32 tensors on ``device``, copied there once."""
    return (torch.from_numpy(_MEAN).view(1, 3, 1, 1).to(device),
            torch.from_numpy(_INV_STD).view(1, 3, 1, 1).to(device))


def normalized_views(images: torch.Tensor, views: int) -> torch.Tensor:
    """Normalise uint8 images where they are (any device) and add their flipped copies.

    The same float32 operations as :func:`normalize`, ``(x - mean * 255) * (1 / (std * 255))``
    with the same constants, element by element: the values equal :func:`normalize`'s bit for bit.

    Args:
        images: (n, 3, S, S) uint8 RGB.
        views: 1 (plain) or 2 (plain, then flipped horizontally).
    Returns:
        (n * views, 3, S, S) float32, image-major: rows ``i * views + v`` are image i's views.
    """
    if views not in (1, 2):
        raise ValueError(f"views must be 1 or 2, got {views}")
    mean, inv_std = _channel_constants(images.device)
    x = (images.float() - mean) * inv_std
    if views == 1:
        return x
    return torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class TrainAugment:
    """The training augmentation; every random choice comes from the generator passed in.

    Calling ``aug(img, rng)`` with a generator built from the same seed gives the same
    tensor, so a dataset that seeds one generator per (seed, epoch, index), e.g.
    ``np.random.default_rng([seed, epoch, index])``, gives a resumed run the same
    augmentation whatever the worker count. Nothing here touches the global ``random``,
    ``numpy.random`` or ``torch`` generators.

    Args:
        crop_size: side of the square output crop.
        resize_long: inclusive range of the random long side after resizing.
        jitter: maximum brightness, contrast, saturation and hue change, as in
            torchvision's ColorJitter (factors drawn in [1 - x, 1 + x], hue in [-h, h]),
            applied in a random order.
    """

    def __init__(self, crop_size: int = 512, resize_long: tuple[int, int] = (320, 640),
                 jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)):
        if resize_long[0] < 1 or resize_long[0] > resize_long[1]:
            raise ValueError(f"resize_long must be an increasing pair of positive sizes, got {resize_long}")
        if not 0.0 <= jitter[3] <= 0.5:
            raise ValueError(f"hue jitter must lie in [0, 0.5], got {jitter[3]}")
        self.crop_size = int(crop_size)
        self.resize_long = (int(resize_long[0]), int(resize_long[1]))
        self.jitter = tuple(float(j) for j in jitter)

    def __call__(self, img: np.ndarray, rng: np.random.Generator | int) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, crop_size, crop_size) float32 normalised tensor."""
        rng = _as_rng(rng)
        pil = Image.fromarray(img)
        pil = self._resize_long(pil, rng)
        if rng.random() < 0.5:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pil = self._color_jitter(pil, rng)
        return self._crop(normalize(np.asarray(pil)), rng)

    def _resize_long(self, pil: Image.Image, rng: np.random.Generator) -> Image.Image:
        target = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
        w, h = pil.size
        scale = target / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return pil.resize(size, Image.Resampling.BICUBIC)

    def _color_jitter(self, pil: Image.Image, rng: np.random.Generator) -> Image.Image:
        brightness, contrast, saturation, hue = self.jitter
        factors = [
            rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness),
            rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast),
            rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation),
            rng.uniform(-hue, hue),
        ]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
        for i in rng.permutation(4):
            if enabled[i]:
                pil = ops[i](pil, float(factors[i]))
        return pil

    def _crop(self, img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Random crop_size x crop_size window; a smaller side is placed at a random offset
        in a zero canvas (zero = the mean colour after normalisation)."""
        crop = self.crop_size
        _, h, w = img.shape
        src_y, dst_y, ch = _crop_offsets(h, crop, rng)
        src_x, dst_x, cw = _crop_offsets(w, crop, rng)
        out = torch.zeros((3, crop, crop), dtype=img.dtype)
        out[:, dst_y:dst_y + ch, dst_x:dst_x + cw] = img[:, src_y:src_y + ch, src_x:src_x + cw]
        return out


def _crop_offsets(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, canvas start, copied length) along one axis."""
    if length >= crop:
        return int(rng.integers(0, length - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - length + 1)), length


def resized_scales(img: np.ndarray, scales: tuple[int, ...] = (256, 512, 768)) -> list[tuple[int, torch.Tensor]]:
    """The image resized to S x S for each scale S (bicubic), ignoring its aspect.

    Args:
        img: (H, W, 3) uint8 RGB.
        scales: output sides S.
    Returns:
        One ``(S, x)`` per scale, x of shape (3, S, S) uint8; :func:`normalized_views` makes
        the network inputs of a batch of them.
    """
    pil = Image.fromarray(img)
    return [(int(s), torch.from_numpy(np.asarray(pil.resize((int(s), int(s)), Image.Resampling.BICUBIC))
                                      .transpose(2, 0, 1).copy()))
            for s in scales]


def multiscale_inputs(img: np.ndarray, scales: tuple[int, ...] = (256, 512, 768),
                      flip: bool = True) -> list[tuple[int, torch.Tensor]]:
    """Inference inputs of one image, normalised on the CPU.

    Args:
        img: (H, W, 3) uint8 RGB.
        scales: output sides S; the image is resized to S x S (bicubic), ignoring its aspect.
        flip: also return the horizontally flipped image.

    Returns:
        One ``(S, x)`` per scale, x of shape (V, 3, S, S) float32 normalised, V = 2 with
        ``flip`` (x[0] plain, x[1] flipped; flip predictions of x[1] back along the last
        axis before combining) else V = 1.
    """
    return [(s, normalized_views(x[None], 2 if flip else 1)) for s, x in resized_scales(img, scales)]


def stack_scales(per_image: list[list[tuple[int, torch.Tensor]]]) -> list[tuple[int, torch.Tensor]]:
    """Batch :func:`resized_scales` of several images, scale by scale.

    Returns:
        One ``(S, x)`` per scale, x of shape (B, 3, S, S) uint8, row b holding image b.
    """
    if not per_image:
        raise ValueError("stack_scales needs at least one image")
    scales = [s for s, _ in per_image[0]]
    for inputs in per_image[1:]:
        if [s for s, _ in inputs] != scales:
            raise ValueError("all images of a batch must use the same scales")
    return [(s, torch.stack([inputs[k][1] for inputs in per_image])) for k, s in enumerate(scales)]


class SegAugment:
    """The segmentation-stage training augmentation (the DeepLab recipe); every random
    choice comes from the generator passed in, as for :class:`TrainAugment`.

    Rescale image and label by a random factor in ``scale_range`` (bilinear / nearest),
    flip horizontally with probability 0.5, normalise, pad to at least ``crop_size`` (image
    with the mean colour, i.e. 0 after normalisation; label with ``ignore_index``), and take
    a random ``crop_size`` square.

    Args:
        crop_size: side of the square crop.
        scale_range: inclusive range of the random rescaling factor.
        flip: random horizontal flips.
        ignore_index: label value of padded pixels.
    """

    def __init__(self, crop_size: int = 321, scale_range: tuple[float, float] = (0.5, 1.5), flip: bool = True,
                 ignore_index: int = 255):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be an increasing pair of positive factors, got {scale_range}")
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)

    def __call__(self, img: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 RGB and (H, W) uint8 ids -> (3, S, S) float32 and (S, S) int64, S = crop_size."""
        rng = _as_rng(rng)
        scale = float(rng.uniform(*self.scale_range))
        h, w = label.shape
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pil_img = Image.fromarray(img).resize(size, Image.Resampling.BILINEAR)
        pil_label = Image.fromarray(label).resize(size, Image.Resampling.NEAREST)
        if self.flip and rng.random() < 0.5:
            pil_img = pil_img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pil_label = pil_label.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = normalize(np.asarray(pil_img))
        y = torch.from_numpy(np.asarray(pil_label, dtype=np.int64))
        crop = self.crop_size
        src_y, dst_y, ch = _crop_offsets(y.shape[0], crop, rng)
        src_x, dst_x, cw = _crop_offsets(y.shape[1], crop, rng)
        out_x = torch.zeros((3, crop, crop), dtype=x.dtype)
        out_y = torch.full((crop, crop), self.ignore_index, dtype=torch.int64)
        out_x[:, dst_y:dst_y + ch, dst_x:dst_x + cw] = x[:, src_y:src_y + ch, src_x:src_x + cw]
        out_y[dst_y:dst_y + ch, dst_x:dst_x + cw] = y[src_y:src_y + ch, src_x:src_x + cw]
        return out_x, out_y


def scaled_input(img: np.ndarray, scale: float) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, round(H * scale), round(W * scale)) float32 normalised
    (bilinear), the segmentation stage's inference input at one scale."""
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(img)
    if size != (w, h):
        pil = pil.resize(size, Image.Resampling.BILINEAR)
    return normalize(np.asarray(pil))
