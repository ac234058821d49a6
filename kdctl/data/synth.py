"""A deterministic synthetic COCO detection dataset of coloured shapes on textured backgrounds.

``synthesize(out, n_images, seed)`` writes::

    out/images/000001.png ...          one file per image (``image_format`` "png" or "jpg")
    out/train.json, val.json, test.json   COCO detection format, one file per split

Design choices:

- Determinism: image ``i`` is drawn from its own ``Generator(PCG64([seed, i]))``, so the same arguments give
  byte-identical files, and image ``i`` does not depend on ``n_images``. No global RNG state is touched.
- Learnability: the class is given by the shape (``CLASSES``); by default 70 % of objects also carry a
  class-specific hue (``class_tint``), the others a random hue. Objects are saturated and always contrast with
  what lies under them; backgrounds are low-saturation gradients + smooth noise + faint stripes + faint clutter
  (thin lines and dots, never closed shapes).
- Occlusion: shapes are drawn in order, later over earlier. A new shape is placed only where every earlier
  object keeps at least ``min_visible`` of its pixels (up to 20 tries, else the new shape is skipped), so no
  object becomes mostly hidden and no annotation is dropped. Each box is tight around the object's VISIBLE
  pixels (a partly hidden object gets a shrunk box, as in COCO) and ``area`` is its visible pixel count.
- Boxes follow the COCO pixel-edge convention: an object covering pixel columns ``c0..c1`` has
  ``x = c0, w = c1 - c0 + 1``, so ``x + w <= width``.
"""

from __future__ import annotations

import colorsys
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kdctl.errors import KdctlError

CLASSES: list[str] = ["circle", "square", "triangle", "cross", "ring"]
"""Class names, in category-id order (category id = index + 1)."""

SYNTH_VERSION = 1
_CLASS_HUES = (0.0, 0.6, 0.33, 0.13, 0.8)  # red, blue, green, orange-yellow, purple
_CLASS_MIN_SIZE = (8, 8, 9, 11, 12)  # px; crosses and rings need a little room to be recognisable
_MIN_CONTRAST = 90.0  # RGB distance between an object's colour and the mean of what it covers
_PLACEMENT_TRIES = 20
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class SynthObject:
    """One annotated object of a rendered image.

    Attributes:
        label: class index into ``CLASSES`` (0..C-1).
        bbox: (x, y, w, h) tight box of the visible pixels, pixel-edge convention.
        area: number of visible pixels.
        full_area: number of pixels of the whole shape before later objects covered part of it.
    """

    label: int
    bbox: tuple[float, float, float, float]
    area: float
    full_area: float


# ----------------------------------------------------------------------------------------------- background


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """float64 [3] RGB in 0..255 from HSV in 0..1 (hue wraps)."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """float32 [H, W, 3]: unit-variance Gaussian noise on a coarse grid (one value per ``cell`` px), bilinear."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.standard_normal((gh, gw, 3)).astype(np.float32)
    ys, xs = np.linspace(0, gh - 1.001, h), np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None].astype(np.float32), (xs - x0)[None, :, None].astype(np.float32)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [H, W, 3]: a linear gradient between two low-saturation colours, random direction."""
    c1 = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.85))
    c2 = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.85))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return (c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]).astype(np.float32)


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [H, W, 3]: faint sinusoidal stripes (amplitude 3-12, period 6-40 px)."""
    angle, period, phase = rng.uniform(0, math.pi), rng.uniform(6, 40), rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(3, 12) * rng.uniform(0.5, 1.0, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + phase)
    return (wave[..., None] * amp[None, None]).astype(np.float32)


def _clutter(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [H, W, 3]: faint thin lines and dots, each shifting the colour by at most 22 per channel."""
    n = int(rng.integers(5, 40))
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for k in range(1, n + 1):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.6:
            length, angle = rng.uniform(10, 0.5 * max(h, w)), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=k, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(0.5, 2.0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=k)
    shifts = np.zeros((n + 1, 3), dtype=np.float32)
    shifts[1:] = rng.uniform(-22, 22, size=(n, 3))
    return shifts[np.asarray(canvas)]


def render_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [H, W, 3] in 0..255 (not clipped): gradient + smooth noise, optionally stripes and clutter."""
    img = _gradient(rng, h, w)
    img += _smooth_noise(rng, h, w, cell=rng.uniform(16, 64)) * rng.uniform(3, 12)
    if rng.random() < 0.5:
        img += _stripes(rng, h, w)
    if rng.random() < 0.7:
        img += _clutter(rng, h, w)
    return img


# ------------------------------------------------------------------------------------------------- shapes


def _ellipse(n: int = 48) -> np.ndarray:
    """float64 [n, 2] unit circle vertices."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_polygons(label: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons [n, 2] of class ``label`` around (0, 0); the first is filled, the others are holes."""
    name = CLASSES[label]
    if name == "circle":
        return [_ellipse()]
    if name == "square":
        return [np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])]
    if name == "triangle":
        t = np.deg2rad([-90.0, 30.0, 150.0])
        return [np.stack([np.cos(t), np.sin(t)], axis=1)]
    if name == "cross":
        a = rng.uniform(0.28, 0.4)
        return [np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                          [-1, -a], [-a, -a]], dtype=np.float64)]
    if name == "ring":
        return [_ellipse(), _ellipse() * rng.uniform(0.45, 0.65)]
    raise ValueError(f"unknown class index {label}")


def _shape_polygons(label: int, extent: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons [n, 2] of a randomly stretched and rotated shape whose bounding box's longer side is ``extent``,
    centred on (0, 0)."""
    polys = _unit_polygons(label, rng)
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polys = [(p * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])) @ rot.T for p in polys]
    span = polys[0].max(axis=0) - polys[0].min(axis=0)
    centre = (polys[0].max(axis=0) + polys[0].min(axis=0)) / 2
    return [(p - centre) * (extent / float(span.max())) for p in polys]


def _rasterize(polys: list[np.ndarray], cx: float, cy: float, h: int, w: int) -> tuple[int, int, np.ndarray]:
    """Rasterize polygons centred at (cx, cy): returns (x0, y0, bool mask [h', w']) of a patch inside the image."""
    outer = polys[0] + (cx, cy)
    x0, y0 = max(int(math.floor(outer[:, 0].min())) - 1, 0), max(int(math.floor(outer[:, 1].min())) - 1, 0)
    x1, y1 = min(int(math.ceil(outer[:, 0].max())) + 2, w), min(int(math.ceil(outer[:, 1].max())) + 2, h)
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    for i, p in enumerate(polys):
        draw.polygon([(float(x) - x0 + cx, float(y) - y0 + cy) for x, y in p], fill=0 if i else 1)
    return x0, y0, np.asarray(canvas).astype(bool)


# ------------------------------------------------------------------------------------------------- objects


@dataclass
class _Placed:
    """An object drawn on the image: its class, full (unoccluded) pixel count and base colour [3]."""

    label: int
    full_area: int
    colour: np.ndarray


def _sample_extent(rng: np.random.Generator, label: int, h: int, w: int, min_object: int) -> float:
    """Longer box side of a new object: log-uniform between the class minimum and half the shorter image side."""
    lo = float(max(min_object, _CLASS_MIN_SIZE[label]))
    hi = max(lo, 0.5 * min(h, w))
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _occlusion_ok(owner: np.ndarray, visible: list[int], placed: list[_Placed], x0: int, y0: int,
                  mask: np.ndarray, min_visible: float) -> bool:
    """True if drawing ``mask`` at (x0, y0) leaves every earlier object ``min_visible`` of its full area."""
    covered = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask]
    hidden = np.bincount(covered[covered >= 0], minlength=len(placed))
    return all(visible[k] - hidden[k] >= min_visible * placed[k].full_area for k in range(len(placed)))


def _object_colour(rng: np.random.Generator, label: int, refs: list[np.ndarray], class_tint: float) -> np.ndarray:
    """float64 [3] RGB: a saturated colour at least ``_MIN_CONTRAST`` from every reference colour in ``refs``
    (the mean background it covers and the colours of the objects it covers or touches), or the best of 20 tries."""
    tinted = rng.random() < class_tint
    best, best_dist = None, -1.0
    for _ in range(20):
        hue = _CLASS_HUES[label] + rng.uniform(-0.05, 0.05) if tinted else rng.random()
        colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.35, 1.0))
        dist = min(float(np.linalg.norm(colour - ref)) for ref in refs)
        if dist >= _MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def _dilate(mask: np.ndarray) -> np.ndarray:
    """bool [h, w]: ``mask`` grown by one pixel (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def _reference_colours(img: np.ndarray, owner: np.ndarray, placed: list[_Placed], x0: int, y0: int,
                       mask: np.ndarray) -> list[np.ndarray]:
    """Colours a new object at (x0, y0) must contrast with: the mean background under ``mask`` and the base colour
    of every earlier object it covers or touches."""
    region = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
    background = mask & (region < 0)
    refs = [img[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][background].mean(axis=0)] if background.any() else []
    refs += [placed[k].colour for k in np.unique(region[_dilate(mask)]) if k >= 0]
    return refs


def _paint(img: np.ndarray, rng: np.random.Generator, x0: int, y0: int, mask: np.ndarray, colour: np.ndarray) -> None:
    """Fill ``mask`` at (x0, y0) of img float [H, W, 3] with ``colour`` and a mild linear shading (in place)."""
    ph, pw = mask.shape
    angle, shade = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.15)
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    t = (xx - pw / 2) * math.cos(angle) + (yy - ph / 2) * math.sin(angle)
    t = t / max(float(np.abs(t).max()), 1.0)
    fill = colour[None, None].astype(np.float32) * (1 + shade * t[..., None])
    patch = img[y0:y0 + ph, x0:x0 + pw]
    patch[mask] = fill[mask]


def _try_place(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray, visible: list[int],
               placed: list[_Placed], min_object: int, min_visible: float, class_tint: float) -> bool:
    """Sample one object and draw it where occlusion allows (updates img, owner, visible, placed)."""
    h, w = owner.shape
    label = int(rng.integers(len(CLASSES)))
    polys = _shape_polygons(label, _sample_extent(rng, label, h, w, min_object), rng)
    half = np.abs(polys[0]).max(axis=0)
    for _ in range(_PLACEMENT_TRIES):
        cx = rng.uniform(half[0] + 1, max(w - half[0] - 1, half[0] + 1))
        cy = rng.uniform(half[1] + 1, max(h - half[1] - 1, half[1] + 1))
        x0, y0, mask = _rasterize(polys, cx, cy, h, w)
        if mask.sum() < 12 or not _occlusion_ok(owner, visible, placed, x0, y0, mask, min_visible):
            continue
        region = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        for k, n in enumerate(np.bincount(region[mask][region[mask] >= 0], minlength=len(placed))):
            visible[k] -= int(n)
        colour = _object_colour(rng, label, _reference_colours(img, owner, placed, x0, y0, mask), class_tint)
        _paint(img, rng, x0, y0, mask, colour)
        region[mask] = len(placed)
        placed.append(_Placed(label=label, full_area=int(mask.sum()), colour=colour))
        visible.append(int(mask.sum()))
        return True
    return False


def _annotations(owner: np.ndarray, placed: list[_Placed]) -> list[SynthObject]:
    """Tight boxes and areas of the visible pixels of each placed object, in drawing order."""
    objects = []
    for k, obj in enumerate(placed):
        ys, xs = np.nonzero(owner == k)
        x0, y0 = float(xs.min()), float(ys.min())
        bbox = (x0, y0, float(xs.max()) + 1.0 - x0, float(ys.max()) + 1.0 - y0)
        objects.append(SynthObject(label=obj.label, bbox=bbox, area=float(len(xs)), full_area=float(obj.full_area)))
    return objects


def render_image(rng: np.random.Generator, height: int, width: int, *, max_objects: int = 8, min_object: int = 8,
                 min_visible: float = 0.6, class_tint: float = 0.7) -> tuple[np.ndarray, list[SynthObject]]:
    """Render one image with 1..``max_objects`` shapes.

    Returns:
        image: uint8 [H, W, 3] RGB.
        objects: the annotated objects (at least one), each with a tight box of its visible pixels.
    """
    img = render_background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int32)
    visible: list[int] = []
    placed: list[_Placed] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        _try_place(rng, img, owner, visible, placed, min_object, min_visible, class_tint)
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1.0, 4.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), _annotations(owner, placed)


# ------------------------------------------------------------------------------------------------- dataset


def split_counts(n_images: int, splits: dict[str, float]) -> dict[str, int]:
    """Images per split: proportional (largest remainder), but at least one per split when ``n_images`` allows.

    >>> split_counts(3, {"train": 0.7, "val": 0.2, "test": 0.1})
    {'train': 1, 'val': 1, 'test': 1}
    """
    total = sum(splits.values())
    raw = {k: n_images * v / total for k, v in splits.items()}
    counts = {k: int(math.floor(r)) for k, r in raw.items()}
    by_remainder = sorted(splits, key=lambda k: (-(raw[k] - counts[k]), list(splits).index(k)))
    for k in by_remainder[: n_images - sum(counts.values())]:
        counts[k] += 1
    for k in sorted(splits, key=lambda k: -splits[k]):  # give empty splits one image from the largest
        if counts[k] == 0 and splits[k] > 0:
            donor = max(counts, key=lambda d: counts[d])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[k] += 1
    return counts


def _check_args(out: Path, n_images: int, seed: int, size: tuple[int, int], splits: dict[str, float],
                max_objects: int, min_object: int, fractions: dict[str, float], image_format: str) -> None:
    """Raise KdctlError (one line) on invalid arguments or an OUT that already holds a dataset."""
    if not isinstance(n_images, int) or n_images < 1:
        raise KdctlError(f"the number of images must be a positive integer, got {n_images!r}")
    if not isinstance(seed, int) or seed < 0:
        raise KdctlError(f"the seed must be a non-negative integer, got {seed!r}")
    if len(size) != 2 or not all(isinstance(v, int) for v in size) or not 32 <= size[0] <= size[1] <= 4096:
        raise KdctlError(f"size must be (min_side, max_side) with 32 <= min_side <= max_side <= 4096, got {size!r}")
    if not splits or any(v < 0 for v in splits.values()) or sum(splits.values()) <= 0:
        raise KdctlError(f"splits must map names to non-negative fractions with a positive sum, got {splits!r}")
    bad = [k for k in splits if not _SPLIT_NAME.match(k) or k == "images"]
    if bad:
        raise KdctlError(f"invalid split name {bad[0]!r}: use letters, digits, '_' or '-' (and not 'images')")
    if max_objects < 1:
        raise KdctlError(f"max_objects must be >= 1, got {max_objects}")
    if not 4 <= min_object <= size[0] // 2:
        raise KdctlError(f"min_object must be between 4 and half the smallest image side ({size[0] // 2}), "
                         f"got {min_object}")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise KdctlError(f"{name} must be between 0 and 1, got {value}")
    if image_format not in ("png", "jpg"):
        raise KdctlError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if out.exists() and not out.is_dir():
        raise KdctlError(f"output path {out} exists and is not a directory")
    taken = [p for p in (out / f"{k}.json" for k in splits) if p.exists()]
    if (out / "images").is_dir() and any((out / "images").iterdir()):
        taken.insert(0, out / "images")
    if taken:
        raise KdctlError(f"{out} already holds a dataset ({taken[0].name} exists); choose an empty directory or "
                         "delete it first")


def _categories() -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def _coco_skeleton(split: str, n_images: int, seed: int) -> dict:
    """A COCO dict with info, licenses, categories and empty images/annotations."""
    info = {
        "description": f"kdctl synthetic shapes, split {split} (seed={seed}, n_images={n_images})",
        "version": str(SYNTH_VERSION),
        "year": 2025,
        "contributor": "kdctl",
        "url": "",
        "date_created": "",
    }
    licenses = [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]
    return {"info": info, "licenses": licenses, "images": [], "annotations": [], "categories": _categories()}


def _save_image(image: np.ndarray, path: Path, image_format: str) -> None:
    """Write uint8 [H, W, 3] RGB as PNG or JPEG (deterministic encoders, no metadata)."""
    if image_format == "png":
        Image.fromarray(image).save(path, format="PNG", compress_level=3)
    else:
        Image.fromarray(image).save(path, format="JPEG", quality=92)


def synthesize(
    out: str | Path,
    n_images: int,
    seed: int = 0,
    *,
    size: tuple[int, int] = (160, 320),
    splits: dict[str, float] | None = None,
    max_objects: int = 8,
    min_object: int = 8,
    min_visible: float = 0.6,
    class_tint: float = 0.7,
    image_format: str = "png",
) -> dict[str, int]:
    """Write OUT/images/NNNNNN.png and OUT/{split}.json (COCO detection format); return image counts per split.

    Args:
        out: output directory (created; must not already hold images/ or the split JSON files).
        n_images: total number of images (>= 1); with >= len(splits) images every split gets at least one.
        seed: non-negative seed; image i is drawn from ``Generator(PCG64([seed, i]))``.
        size: (min_side, max_side): each image's width and height are drawn independently in this range.
        splits: split name -> fraction (default train 0.7, val 0.2, test 0.1); consecutive images per split.
        max_objects: objects per image are drawn uniformly in 1..max_objects (fewer if they do not fit).
        min_object: smallest object extent in px (the largest is half the shorter image side).
        min_visible: fraction of its pixels every object keeps visible under later objects.
        class_tint: probability that an object's hue is its class hue (else a random hue).
        image_format: "png" or "jpg".
    """
    splits = dict(splits) if splits is not None else {"train": 0.7, "val": 0.2, "test": 0.1}
    out = Path(out)
    fractions = {"min_visible": min_visible, "class_tint": class_tint}
    _check_args(out, n_images, seed, tuple(size), splits, max_objects, min_object, fractions, image_format)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = split_counts(n_images, splits)
    image_id, ann_id = 0, 0
    for split, count in counts.items():
        coco = _coco_skeleton(split, n_images, seed)
        for _ in range(count):
            image_id += 1
            rng = np.random.Generator(np.random.PCG64([seed, image_id]))
            w, h = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
            image, objects = render_image(rng, h, w, max_objects=max_objects, min_object=min_object,
                                          min_visible=min_visible, class_tint=class_tint)
            file_name = f"{image_id:06d}.{image_format}"
            _save_image(image, out / "images" / file_name, image_format)
            coco["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h, "license": 1})
            for obj in objects:
                ann_id += 1
                coco["annotations"].append({"id": ann_id, "image_id": image_id, "category_id": obj.label + 1,
                                            "bbox": list(obj.bbox), "area": obj.area, "iscrowd": 0})
        (out / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    return counts


__all__ = ["CLASSES", "SynthObject", "render_background", "render_image", "split_counts", "synthesize"]
