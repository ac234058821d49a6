"""Images a tracker shows after each evaluation: ``results.png`` and sample predictions on validation images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = 4
"""Validation images drawn at each evaluation (the same ones every time, so their predictions can be compared)."""
MIN_SCORE = 0.3
"""Predictions drawn: score at least this, at most :data:`MAX_BOXES` per image."""
MAX_BOXES = 30
MIN_SIDE = 320
"""Small images are enlarged (nearest neighbour, by an integer factor) to about this side, so labels stay legible."""


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, one per class (matplotlib's tab20, cycled)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(n)]


def sample_predictions(dataset: Any, results: list[dict[str, Any]], names: list[str], cat_ids: list[int],
                       k: int = SAMPLES) -> dict[str, np.ndarray]:
    """``{"predictions/<file stem>": HWC uint8}`` for the first ``k`` images of ``dataset`` (a
    :class:`kdctl.data.dataset.CocoDetection`): ground truth in thin white boxes, predictions (COCO results dicts,
    xywh in original pixels) in a colour per class with ``name score`` labels."""
    from torchvision.utils import draw_bounding_boxes

    colours = palette(len(names))
    by_cat = {c: i for i, c in enumerate(cat_ids)}
    out: dict[str, np.ndarray] = {}
    for index in range(min(k, len(dataset))):
        info = dataset.data.images[index]
        img = dataset.load_image(index)
        H, W = img.shape[-2:]
        scale = max(1, MIN_SIDE // max(H, W))
        if scale > 1:
            img = img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        gt = [a["bbox"] for a in dataset.data.anns_by_image.get(info["id"], []) if not a.get("iscrowd", 0)]
        if gt:
            img = draw_bounding_boxes(img, xyxy(gt, scale), colors="white", width=1)
        dets = sorted((r for r in results if r["image_id"] == info["id"] and r["score"] >= MIN_SCORE
                       and r["category_id"] in by_cat), key=lambda r: -r["score"])[:MAX_BOXES]
        if dets:
            cls = [by_cat[r["category_id"]] for r in dets]
            img = draw_bounding_boxes(img, xyxy([r["bbox"] for r in dets], scale),
                                      labels=[f"{names[c]} {r['score']:.2f}" for c, r in zip(cls, dets, strict=True)],
                                      colors=[colours[c] for c in cls], width=2)
        out[f"predictions/{Path(info['file_name']).stem}"] = img.permute(1, 2, 0).contiguous().numpy()
    return out


def xyxy(boxes: list[list[float]], scale: int):
    """COCO xywh boxes -> a float tensor [K, 4] of xyxy, multiplied by ``scale``."""
    import torch

    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    return b * scale


def read_png(path: Path) -> np.ndarray | None:
    """A PNG (``results.png``) as HWC uint8 RGB; None when it does not exist."""
    from PIL import Image

    if not Path(path).is_file():
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def eval_images(results_png: Path, dataset: Any, results: list[dict[str, Any]], names: list[str],
                cat_ids: list[int]) -> dict[str, np.ndarray]:
    """What the trackers show after an evaluation: ``results`` (the plot) and :func:`sample_predictions`."""
    out: dict[str, np.ndarray] = {}
    plot = read_png(results_png)
    if plot is not None:
        out["results"] = plot
    out.update(sample_predictions(dataset, results, names, cat_ids))
    return out
