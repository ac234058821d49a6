"""Box-aware augmentation with torchvision.transforms.v2 and tv_tensors.

Every model in a run receives the output of ONE pipeline, so teacher and student always see identical pixels.
Resizing follows the Ultralytics convention: the longer side becomes ``imgsz`` and the aspect ratio is kept
(the batch is then zero-padded at the bottom/right by :func:`kdctl.data.batch.collate`).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def build_transforms(imgsz: int, train: bool, hflip: float = 0.5) -> v2.Compose:
    """The v2 pipeline for ``(tv_tensors.Image uint8, {"boxes": tv_tensors.BoundingBoxes, "labels": ...})``.

    Args:
        imgsz: target length of the longer image side.
        train: add random augmentation (horizontal flip).
        hflip: probability of a horizontal flip when training.
    Output: float32 image in [0, 1] and boxes in the resized frame; boxes that become degenerate are removed.
    """
    ops: list = []
    ops.append(v2.Resize(size=None, max_size=imgsz, antialias=True))
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(ops)
