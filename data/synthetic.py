"""A small synthetic segmentation dataset in the real PASCAL VOC on-disk format.

:func:`generate` writes it (the dataset command ``make_dataset`` calls it); the output
folder is used like a VOC root, i.e. pass it as ``--voc12_root``::

    JPEGImages/<name>.jpg              RGB images, width and height in [0.75, 1.25] * size
    Annotations/<name>.xml             VOC XML: size, one <object> (name, bndbox) per object
    SegmentationClass/<name>.png       palette PNG class ids, 255 on a 2-pixel boundary band
    SegmentationClassAug/<name>.png    the same ids without the band (like the Aug masks)
    SegmentationObject/<name>.png      instance k = k-th <object> of the XML, 255 band
    ImageSets/Segmentation/{train,val,trainval}.txt   bare names
    cls_labels.json                    image-level labels; its class list sets C

What makes it a useful WSSS test bed rather than a toy: every class has a class-specific
shape and body texture, but the body colours are drawn from the same muted palette as the
cluttered background (gradients, blotches, stripes, textured distractor shapes of no class),
and the body textures also appear on distractors. Only a small core of each object (about
a tenth of its area) has a saturated, class-specific colour and pattern. A classifier
therefore learns the cores first and its CAMs cover objects only partly, which is what
makes the background threshold (or BAO's learned background) matter.

Sample ``i`` is drawn from ``np.random.default_rng([seed, i])``, so the output is
byte-identical for a seed, and the train images do not change with ``num_val``.
"""
from __future__ import annotations

import colorsys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from core.errors import UserError
from core.fileio import atomic_path
from core.palette import IGNORE_INDEX, save_label_png
from data.labels import ImageLabels, write_list

CLASSES = ("disc", "box", "triangle", "ring", "cross", "star")

# Per class (in CLASSES order): body texture, core hue (degrees), core pattern.
_BODY_TEXTURE = ("rings", "checker", "stripes", "dots", "gradient", "speckle")
_CORE_HUE = (0.0, 55.0, 120.0, 185.0, 235.0, 300.0)
_CORE_PATTERN = ("solid", "checker", "solid", "solid", "dots", "stripes")
_TEXTURES = ("rings", "checker", "stripes", "dots", "gradient", "speckle")

_MAX_OBJECTS = 3
_PLACEMENT_TRIES = 40
_MIN_VISIBLE = 0.55  # fraction of an object's area that must stay visible (occlusion, border)
_MIN_CORE_VISIBLE = 0.5
_SIZE_JITTER = (0.75, 1.25)
_RADIUS = (0.14, 0.3)  # object radius as a fraction of the short image side


def _circle(radius: float, n: int = 48, start: float = 0.0, span: float | None = None) -> np.ndarray:
    """n points of a circle from angle ``start``, or of an arc of ``span`` radians (ends included)."""
    t = start + (2 * np.pi * np.arange(n) / n if span is None else np.linspace(0.0, span, n))
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(outer: float, inner: float, points: int = 5) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _canonical_shapes() -> list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]:
    """Per class: (body polygons, hole polygons, core polygons) in unit coordinates.

    Every core lies inside its body, so the discriminative part is part of the object.
    """
    tri = _circle(1.3, 3, -np.pi / 2)
    apex = tri[0]
    arm = 0.32
    cross = np.array([[-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm],
                      [arm, 1], [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm]])
    sector = np.concatenate([_circle(1.05, 12, -np.pi / 6, np.pi / 3),
                             _circle(0.6, 12, -np.pi / 6, np.pi / 3)[::-1]])
    return [
        ([_circle(1.0)], [], [_circle(0.35, 24)]),
        ([_box(-0.85, -0.85, 0.85, 0.85)], [], [_box(0.3, 0.3, 0.8, 0.8)]),
        ([tri], [], [apex + 0.35 * (tri - apex)]),
        ([_circle(1.05)], [_circle(0.6)], [sector]),
        ([cross], [], [_box(-0.22, -0.22, 0.22, 0.22)]),
        ([_star(1.15, 0.5)], [], [_circle(0.25, 24)]),
    ]


_SHAPES = _canonical_shapes()


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


@dataclass
class _Pose:
    """Similarity-plus-stretch placement: canonical p -> centre + R * rot(theta) @ stretch(p)."""

    cx: float
    cy: float
    radius: float
    theta: float
    aspect: float  # x is stretched by sqrt(aspect), y by 1/sqrt(aspect): the area is kept

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        s = np.sqrt(self.aspect)
        p = pts * np.array([s, 1.0 / s])
        c, n = np.cos(self.theta), np.sin(self.theta)
        rot = np.array([[c, -n], [n, c]])
        return p @ rot.T * self.radius + np.array([self.cx, self.cy])

    def local(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical (u, v) of every pixel centre, for textures that follow the object."""
        dx, dy = xs - self.cx, ys - self.cy
        c, n = np.cos(self.theta), np.sin(self.theta)
        s = np.sqrt(self.aspect)
        u = (c * dx + n * dy) / (self.radius * s)
        v = (-n * dx + c * dy) * s / self.radius
        return u.astype(np.float32), v.astype(np.float32)


@dataclass
class _Object:
    cls: int  # 0-based index into CLASSES
    pose: _Pose
    mask: np.ndarray  # (H, W) bool, the whole object inside the image
    core: np.ndarray  # (H, W) bool, its discriminative part
    area: float  # area in pixels of the whole object, also outside the image
    core_area: float
    truncated: bool


def _fill(shape: tuple[int, int], polys: list[np.ndarray], holes: list[np.ndarray] = ()) -> np.ndarray:
    """Rasterise polygons (image coordinates, sub-pixel precise) into an (H, W) bool mask."""
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(p * 16).astype(np.int32) for p in polys], 1, cv2.LINE_8, 4)
    if holes:
        cv2.fillPoly(canvas, [np.round(p * 16).astype(np.int32) for p in holes], 0, cv2.LINE_8, 4)
    return canvas.astype(bool)


def _make_object(cls: int, rng: np.random.Generator, h: int, w: int) -> _Object:
    """A randomly posed object of class index ``cls`` in an H x W image (masks not yet occluded)."""
    radius = min(h, w) * rng.uniform(*_RADIUS)
    margin = 0.35 * radius
    pose = _Pose(
        cx=rng.uniform(margin, w - margin), cy=rng.uniform(margin, h - margin), radius=radius,
        theta=rng.uniform(0, 2 * np.pi), aspect=float(np.exp(rng.uniform(np.log(0.7), np.log(1.4)))),
    )
    body, holes, core = _SHAPES[cls]
    body_img = [pose.to_image(p) for p in body]
    mask = _fill((h, w), body_img, [pose.to_image(p) for p in holes])
    area = (sum(_polygon_area(p) for p in body) - sum(_polygon_area(p) for p in holes)) * radius**2
    core_mask = _fill((h, w), [pose.to_image(p) for p in core]) & mask
    core_area = sum(_polygon_area(p) for p in core) * radius**2
    pts = np.concatenate(body_img)
    truncated = bool(pts.min() < 0 or pts[:, 0].max() > w - 1 or pts[:, 1].max() > h - 1)
    return _Object(cls, pose, mask, core_mask, area, core_area, truncated)


_KERNEL = np.ones((3, 3), np.uint8)


def _visible_enough(instances: np.ndarray, index: int, obj: _Object) -> bool:
    """Whether object ``index`` (1-based id in ``instances``) stays recognisable: enough of
    it and of its core is visible, and some pixel survives the 2-pixel ignore band."""
    vis = instances == index
    if vis.sum() < _MIN_VISIBLE * obj.area or (vis & obj.core).sum() < _MIN_CORE_VISIBLE * obj.core_area:
        return False
    return bool(cv2.erode(vis.astype(np.uint8), _KERNEL).any())


def _place_objects(classes: list[int], rng: np.random.Generator, h: int, w: int
                   ) -> tuple[list[_Object], np.ndarray]:
    """Place one object per entry of ``classes`` (later ones in front), skipping an object
    that finds no place where it and all earlier ones stay recognisable.

    Returns the placed objects and the (H, W) uint8 instance map (0 background, k + 1 the
    k-th placed object).
    """
    instances = np.zeros((h, w), np.uint8)
    placed: list[_Object] = []
    for cls in classes:
        for _ in range(_PLACEMENT_TRIES):
            obj = _make_object(cls, rng, h, w)
            trial = instances.copy()
            trial[obj.mask] = len(placed) + 1
            candidates = placed + [obj]
            if all(_visible_enough(trial, k + 1, o) for k, o in enumerate(candidates)):
                instances, placed = trial, candidates
                break
    return placed, instances


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    """(3,) float32 RGB in 0..255 of a hue in degrees and saturation/value in 0..1."""
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), np.float32) * 255.0


def _muted_palette(rng: np.random.Generator, n: int = 6) -> np.ndarray:
    """(n, 3) float32 low-saturation colours shared by background, distractors and bodies."""
    return np.stack([_hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.45), rng.uniform(0.3, 0.9))
                     for _ in range(n)])


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 mixing weight in [0, 1] of a pattern in canonical coordinates."""
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.sqrt(u * u + v * v) / 0.3)
    if kind == "checker":
        return ((np.floor(u / 0.4) + np.floor(v / 0.4)) % 2).astype(np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.5 * v) / 0.35)
    if kind == "dots":
        fu, fv = u / 0.35 - np.floor(u / 0.35) - 0.5, v / 0.35 - np.floor(v / 0.35) - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if kind == "gradient":
        return np.clip((u + 1.0) / 2.0, 0.0, 1.0)
    if kind == "speckle":
        noise = cv2.GaussianBlur(rng.random(u.shape, np.float32), (0, 0), 0.8)
        return np.clip((noise - 0.5) * 4.0 + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}")


def _mix(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
    return c1 + (c2 - c1) * t[:, :, None]


def _background(rng: np.random.Generator, palette: np.ndarray, xs: np.ndarray, ys: np.ndarray
                ) -> np.ndarray:
    """(H, W, 3) float32 cluttered background: gradient, blotches, stripes, distractors."""
    h, w = xs.shape
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs / w + np.sin(angle) * ys / h).astype(np.float32)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    i, j = rng.choice(len(palette), 2, replace=False)
    img = _mix(palette[i], palette[j], ramp)
    grid = rng.normal(0.0, 22.0, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3)).astype(np.float32)
    img += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.6:
        pose = _Pose(w / 2, h / 2, min(h, w) * rng.uniform(0.15, 0.4), rng.uniform(0, np.pi), 1.0)
        t = _texture("stripes", *pose.local(xs, ys), rng)
        alpha = rng.uniform(0.25, 0.6)
        img = _mix(img, np.broadcast_to(palette[rng.integers(len(palette))], img.shape), alpha * t)
    for _ in range(int(rng.integers(2, 7))):
        mask, pose = _distractor(rng, h, w)
        i, j = rng.choice(len(palette), 2, replace=False)
        tex = _mix(palette[i], palette[j], _texture(_TEXTURES[rng.integers(len(_TEXTURES))],
                                                    *pose.local(xs, ys), rng))
        img[mask] = tex[mask]
    return img


def _distractor(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, _Pose]:
    """A shape of no class (ellipse, lumpy blob, many-sided polygon or thick line)."""
    pose = _Pose(rng.uniform(0, w), rng.uniform(0, h), min(h, w) * rng.uniform(0.06, 0.25),
                 rng.uniform(0, 2 * np.pi), float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))))
    kind = rng.integers(4)
    if kind == 0:
        poly = _circle(1.0, 32)
    elif kind == 1:
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        r = 1.0 + 0.3 * np.sin(int(rng.integers(2, 5)) * t + rng.uniform(0, 2 * np.pi))
        poly = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif kind == 2:
        pts = rng.uniform(-1, 1, (int(rng.integers(6, 10)), 2)).astype(np.float32)
        poly = cv2.convexHull(pts)[:, 0, :].astype(np.float64)
    else:
        canvas = np.zeros((h, w), np.uint8)
        line = np.round(pose.to_image(rng.uniform(-1.5, 1.5, (int(rng.integers(2, 4)), 2))) * 16)
        thickness = max(1, int(round(min(h, w) * rng.uniform(0.015, 0.05))))
        cv2.polylines(canvas, [line.astype(np.int32)], False, 1, thickness, cv2.LINE_8, 4)
        return canvas.astype(bool), pose
    return _fill((h, w), [pose.to_image(poly)]), pose


def _paint_object(img: np.ndarray, obj: _Object, visible: np.ndarray, palette: np.ndarray,
                  rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> None:
    """Paint the visible pixels: muted class texture with shading, then the saturated core."""
    u, v = obj.pose.local(xs, ys)
    i, j = rng.choice(len(palette), 2, replace=False)
    body = _mix(palette[i], palette[j], _texture(_BODY_TEXTURE[obj.cls], u, v, rng))
    light = rng.uniform(0, 2 * np.pi)
    body *= (1.0 + 0.15 * (np.cos(light) * u + np.sin(light) * v))[:, :, None]
    img[visible] = body[visible]
    color = _hsv(_CORE_HUE[obj.cls] + rng.uniform(-8, 8), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
    pattern = _CORE_PATTERN[obj.cls]
    t = (np.zeros(u.shape, np.float32) if pattern == "solid"
         else _texture(pattern, u / 0.6, v / 0.6, rng))
    core = _mix(color, color * 0.45, t)
    core_vis = visible & obj.core
    img[core_vis] = core[core_vis]


def render_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[_Object]]:
    """Draw one image.

    Returns:
        image (H, W, 3) uint8 RGB, instance map (H, W) uint8 (0 background, k + 1 object k)
        and the placed objects, H and W in [0.75, 1.25] * size.
    """
    h = int(round(size * rng.uniform(*_SIZE_JITTER)))
    w = int(round(size * rng.uniform(*_SIZE_JITTER)))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    palette = _muted_palette(rng)
    num_classes = 1 if rng.random() < 0.6 else 2
    chosen = rng.choice(len(CLASSES), num_classes, replace=False)
    num_objects = int(rng.integers(num_classes, _MAX_OBJECTS + 1))
    classes = list(chosen) + list(rng.choice(chosen, num_objects - num_classes))
    objects, instances = _place_objects([int(c) for c in classes], rng, h, w)
    img = _background(rng, palette, xs, ys)
    for k, obj in enumerate(objects):
        _paint_object(img, obj, instances == k + 1, palette, rng, xs, ys)
    img += rng.normal(0.0, rng.uniform(2.0, 6.0), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), instances, objects


def _masks(instances: np.ndarray, objects: list[_Object]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(SegmentationClass, SegmentationClassAug, SegmentationObject) maps of an instance map.

    SegmentationClass and SegmentationObject have 255 on every pixel next to a pixel of
    another object or the background (a 2-pixel band across each boundary, like VOC's
    outlines, also between touching objects of one class); SegmentationClassAug has none.
    """
    lut = np.array([0] + [o.cls + 1 for o in objects], np.uint8)
    aug = lut[instances]
    band = cv2.dilate(instances, _KERNEL) != cv2.erode(instances, _KERNEL)
    seg = aug.copy()
    seg[band] = IGNORE_INDEX
    obj = instances.copy()
    obj[band] = IGNORE_INDEX
    return seg, aug, obj


def _annotation(name: str, img: np.ndarray, instances: np.ndarray, objects: list[_Object], seed: int
                ) -> ET.ElementTree:
    """VOC XML of one image; object k (0-based) is instance k + 1 of SegmentationObject."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = f"synthetic (data/synthetic.py, seed {seed})"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", img.shape[1]), ("height", img.shape[0]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for k, obj in enumerate(objects):
        ys, xs = np.nonzero(instances == k + 1)
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = CLASSES[obj.cls]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(obj.truncated))
        ET.SubElement(node, "difficult").text = "0"
        box = ET.SubElement(node, "bndbox")
        # VOC boxes are 1-based and inclusive.
        for tag, value in (("xmin", xs.min()), ("ymin", ys.min()), ("xmax", xs.max()), ("ymax", ys.max())):
            ET.SubElement(box, tag).text = str(int(value) + 1)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def generate(out_dir: str | Path, num_train: int, num_val: int, size: int = 128, seed: int = 0,
             quality: int = 90, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the dataset to ``out_dir`` (a VOC root) and return a summary.

    Returns:
        dict with ``root``, ``classes`` (foreground names), ``num_train``, ``num_val``,
        ``height`` and ``width`` (min, max), ``objects`` (total), ``two_class_images``,
        ``images_per_class`` ({class: count}) and ``seconds``.
    """
    if num_train < 1 or num_val < 0:
        raise UserError("--num_train must be at least 1 and --num_val at least 0")
    if size < 32:
        raise UserError(f"--size {size} is too small to draw recognisable objects; use 32 or more")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must lie in 1..100, got {quality}")
    out = Path(out_dir)
    jpeg_dir = out / "JPEGImages"
    if not overwrite and jpeg_dir.is_dir() and any(jpeg_dir.iterdir()):
        raise UserError(f"{out} already holds images; pass --overwrite or choose another --out")
    start = time.perf_counter()
    total = num_train + num_val
    names = [f"synth_{i:06d}" for i in range(total)]
    ids: dict[str, list[int]] = {}
    heights, widths, num_objects = [], [], 0
    for i, name in enumerate(tqdm(names, desc="images", disable=not progress)):
        img, instances, objects = render_sample(np.random.default_rng([seed, i]), size)
        with atomic_path(jpeg_dir / f"{name}.jpg") as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=quality)
        seg, aug, obj = _masks(instances, objects)
        save_label_png(out / "SegmentationClass" / f"{name}.png", seg)
        save_label_png(out / "SegmentationClassAug" / f"{name}.png", aug)
        save_label_png(out / "SegmentationObject" / f"{name}.png", obj)
        with atomic_path(out / "Annotations" / f"{name}.xml") as tmp:
            _annotation(name, img, instances, objects, seed).write(tmp, encoding="utf-8")
        ids[name] = sorted({o.cls + 1 for o in objects})
        heights.append(img.shape[0])
        widths.append(img.shape[1])
        num_objects += len(objects)
    lists = out / "ImageSets" / "Segmentation"
    write_list(lists / "train.txt", names[:num_train])
    write_list(lists / "val.txt", names[num_train:])
    write_list(lists / "trainval.txt", names)
    ImageLabels(list(CLASSES), ids).save(out / "cls_labels.json")
    return {
        "root": str(out),
        "classes": list(CLASSES),
        "num_train": num_train,
        "num_val": num_val,
        "height": (min(heights), max(heights)),
        "width": (min(widths), max(widths)),
        "objects": num_objects,
        "two_class_images": sum(len(v) == 2 for v in ids.values()),
        "images_per_class": {c: sum(k + 1 in v for v in ids.values()) for k, c in enumerate(CLASSES)},
        "seconds": time.perf_counter() - start,
    }


def generate_once(out_dir: str | Path, num_train: int, num_val: int, size: int = 128, seed: int = 0,
                  progress: bool = False) -> bool:
    """:func:`generate` unless ``out_dir`` already holds a finished dataset (its cls_labels.json,
    written last); an interrupted one is written again. Returns whether it generated."""
    if (Path(out_dir) / "cls_labels.json").is_file():
        return False
    generate(out_dir, num_train, num_val, size=size, seed=seed, overwrite=True, progress=progress)
    return True
