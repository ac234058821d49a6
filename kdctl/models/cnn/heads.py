"""Class heads of torchvision detectors: replace one for other classes, keeping the rows of classes it knew.

Model label ids count the background: id 0 is background, class ``i`` of ``label_names`` is id ``i + 1``;
``num_classes`` below always includes the background, as torchvision's builders count it.

* Faster R-CNN: ``roi_heads.box_predictor`` (``FastRCNNPredictor``): class scores [K, in] and per-class box deltas
  [4K, in] (class-major, rows ``4c .. 4c + 3``). A new predictor starts as torchvision builds one (``nn.Linear``'s
  default init).
* RetinaNet, FCOS: ``head.classification_head.cls_logits``, a 3x3 conv with ``A * K`` output channels (anchor-major:
  channel ``a * K + k``). New channels start as torchvision's: weights N(0, 0.01), bias ``-log((1 - p) / p)`` with
  the prior probability p = 0.01.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError

PRIOR_PROBABILITY = 0.01  # torchvision's RetinaNet / FCOS classification heads
PREDICTOR_KEYS = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred")
DENSE_KEY = "head.classification_head.cls_logits"
DENSE_BOX_KEY = "head.regression_head.bbox_reg.weight"  # [A * 4, C, 3, 3]: gives the anchors per location


def head_classes(state: dict[str, Tensor]) -> int | None:
    """The number of classes (background included) of the class head stored in a torchvision state dict."""
    w = state.get(f"{PREDICTOR_KEYS[0]}.weight")
    if w is not None:
        return int(w.shape[0])
    w, box = state.get(f"{DENSE_KEY}.weight"), state.get(DENSE_BOX_KEY)
    if w is not None and box is not None and box.shape[0] % 4 == 0 and box.shape[0]:
        return int(w.shape[0]) // (int(box.shape[0]) // 4)
    return None


def resize_head_state(state: dict[str, Tensor], old: int, new: int) -> dict[str, Tensor]:
    """``state`` with its class head tensors replaced by zeros sized for ``new`` classes instead of ``old``
    (what a builder that loads ``state`` itself expects before the head is replaced again)."""
    out = dict(state)
    for key in (*PREDICTOR_KEYS, DENSE_KEY):
        for part in ("weight", "bias"):
            t = state.get(f"{key}.{part}")
            if t is not None:
                out[f"{key}.{part}"] = t.new_zeros((t.shape[0] // old * new, *t.shape[1:]))
    return out


@torch.no_grad()
def replace_class_head(model: nn.Module, num_classes: int, rows: dict[int, int]) -> None:
    """Give ``model`` a class head for ``num_classes`` ids (background included); new id ``j`` copies old id
    ``rows[j]`` (box deltas and every anchor's channel too), the others start as torchvision's init does."""
    if hasattr(model, "roi_heads"):
        model.roi_heads.box_predictor = _new_predictor(model.roi_heads.box_predictor, num_classes, rows)
        return
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is None or not isinstance(getattr(head, "cls_logits", None), nn.Conv2d):
        raise KdctlError(f"{type(model).__name__}: kdctl cannot replace this detector's class head")
    old = head.cls_logits
    anchors = old.out_channels // head.num_classes
    new = nn.Conv2d(old.in_channels, anchors * num_classes, kernel_size=old.kernel_size, stride=old.stride,
                    padding=old.padding).to(old.weight.device, old.weight.dtype)
    nn.init.normal_(new.weight, std=0.01)
    nn.init.constant_(new.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    for a in range(anchors):
        for j, i in rows.items():
            new.weight[a * num_classes + j] = old.weight[a * head.num_classes + i]
            new.bias[a * num_classes + j] = old.bias[a * head.num_classes + i]
    head.cls_logits, head.num_classes = new, num_classes


def _new_predictor(old: nn.Module, num_classes: int, rows: dict[int, int]) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    if not isinstance(old, FastRCNNPredictor):
        raise KdctlError(f"{type(old).__name__}: kdctl can replace torchvision's FastRCNNPredictor only")
    w = old.cls_score.weight
    new = FastRCNNPredictor(old.cls_score.in_features, num_classes).to(w.device, w.dtype)
    for j, i in rows.items():
        new.cls_score.weight[j] = old.cls_score.weight[i]
        new.cls_score.bias[j] = old.cls_score.bias[i]
        new.bbox_pred.weight[4 * j:4 * j + 4] = old.bbox_pred.weight[4 * i:4 * i + 4]
        new.bbox_pred.bias[4 * j:4 * j + 4] = old.bbox_pred.bias[4 * i:4 * i + 4]
    return new


__all__ = ["PRIOR_PROBABILITY", "head_classes", "replace_class_head", "resize_head_state"]
