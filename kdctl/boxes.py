"""Box conversions and the elementwise GIoU loss, used by the DETR adapter and KD-DETR.

Boxes are ``[..., 4]`` tensors; ``cxcywh`` is (centre x, centre y, width, height), ``xyxy`` (x0, y0, x1, y1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def giou_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Elementwise 1 - GIoU of normalised cxcywh boxes: [L, N, G, 4], [N, G, 4] -> [L, N, G].

    Same value as ``torchvision.ops.generalized_box_iou_loss`` on the xyxy boxes, without its boolean indexing, and
    exactly 0 for identical boxes (the epsilon guards the divisions as a lower bound, not as an offset).
    """
    a = cxcywh_to_xyxy(student.float())
    b = cxcywh_to_xyxy(teacher.float()).expand_as(a)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    iou = inter / union.clamp_min(1e-7)
    enclosing = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return 1 - (iou - (enclosing - union) / enclosing.clamp_min(1e-7))
