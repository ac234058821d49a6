"""The soft-target losses of prediction distillation (:mod:`kdctl.distill.pred_kd`), one function per student kind.

Every function takes the teacher's kept detections as pseudo-targets in the student's own terms, per image
``{"boxes": float [D, 4] xyxy in the batch frame, "scores": [D], "labels": int64 [D] student label indices}``,
assigns them with the STUDENT's own matcher / assigner, and returns UNWEIGHTED terms (scalars, float32). Only the
student's predictions assigned to a teacher detection ("positives") enter a term: the teacher says nothing about
the rest (its detections below the threshold are gone, and background stays with the student's detection loss).

Soft-target forms (``y`` = the teacher's score ``s`` on its class, 0 elsewhere; both are zero exactly when the
student's probabilities equal the targets, and positive otherwise):

* sigmoid heads: :func:`quality_focal` ``sum_c |sigmoid(x_c) - y_c|^beta * BCE(x_c, y_c)`` (Li et al. 2020);
* softmax heads: :func:`soft_label_kl` ``KL(y || softmax(x))`` with ``y = s`` on the class and ``1 - s`` on
  background / no-object: the soft cross-entropy minus the target's own entropy (same gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from kdctl.boxes import giou_loss

EPS = 1e-6
SMOOTH_L1_BETA = 1.0 / 9  # Faster R-CNN's own box loss (torchvision fastrcnn_loss)


# =========================================================================== the soft-target forms
def quality_focal(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss of sigmoid logits [M, K] against soft targets [M, K] in [0, 1] -> [M] (summed over K)."""
    logits, target = logits.float(), target.float()
    scale = (logits.sigmoid() - target).abs().pow(beta)
    return (scale * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).sum(-1)


def soft_label_kl(logits: Tensor, target: Tensor) -> Tensor:
    """KL(target || softmax(logits)) for logits [M, K] and target distributions [M, K] -> [M]."""
    return F.kl_div(logits.float().log_softmax(-1), target.float(), reduction="none").sum(-1)


def one_hot_scores(labels: Tensor, scores: Tensor, channels: int, background: int | None = None) -> Tensor:
    """Soft targets [M, channels]: ``scores`` at ``labels``, the rest 0, or ``1 - score`` at ``background``."""
    y = torch.zeros((labels.shape[0], channels), dtype=torch.float32, device=labels.device)
    rows = torch.arange(labels.shape[0], device=labels.device)
    if background is not None:
        y[:, background] = 1 - scores.float()
    y[rows, labels] = scores.float()
    return y


def _zero(like: Tensor) -> Tensor:
    return like.new_zeros((), dtype=torch.float32)


# =========================================================================== DETR students (Hungarian matcher)
def detr_matcher(model: nn.Module, logit_kind: str) -> nn.Module:
    """The student's own Hungarian matcher from transformers, with its config's costs: RT-DETR's (its
    ``matcher_*`` settings), Deformable DETR's focal cost for the other sigmoid models, DETR's for softmax."""
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher
    from transformers.loss.loss_for_object_detection import HungarianMatcher

    cfg = model.config
    if hasattr(cfg, "matcher_class_cost"):
        from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

        return RTDetrHungarianMatcher(cfg)
    costs = {k: float(getattr(cfg, k, 1.0)) for k in ("class_cost", "bbox_cost", "giou_cost")}
    return HungarianMatcher(**costs) if logit_kind == "softmax" else DeformableDetrHungarianMatcher(**costs)


def detr_targets(dets: list[dict[str, Tensor]], frames: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Teacher detections -> transformers labels ``{"class_labels" [D], "boxes" [D, 4] cxcywh / frame}``."""
    out = []
    for d, (h, w) in zip(dets, frames, strict=True):
        scale = d["boxes"].new_tensor([w, h, w, h])
        x0, y0, x1, y1 = (d["boxes"].float() / scale).clamp(0, 1).unbind(-1)
        out.append({"class_labels": d["labels"], "boxes": torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0,
                                                                       y1 - y0], -1)})
    return out


def detr_terms(logits: Tensor, boxes: Tensor, dets: list[dict[str, Tensor]], frames: list[tuple[int, int]],
               matcher: nn.Module, logit_kind: str, beta: float) -> dict[str, Tensor]:
    """DETR student, final decoder layer: logits [N, Q, C'], boxes [N, Q, 4] normalised cxcywh.

    Returns ``{"cls", "l1", "giou"}``: the class term per matched query summed over classes and averaged over the
    matched queries; L1 and 1 - GIoU of the matched boxes, weighted by the teacher's scores (score-weighted means).
    """
    targets = detr_targets(dets, frames)
    if sum(int(t["class_labels"].numel()) for t in targets) == 0:
        return {"cls": _zero(logits), "l1": _zero(logits), "giou": _zero(logits)}
    pairs = matcher({"logits": logits.detach().float(), "pred_boxes": boxes.detach().float()}, targets)
    q = torch.cat([torch.full_like(torch.as_tensor(i), n) for n, (i, _) in enumerate(pairs)]).to(logits.device)
    src = torch.cat([torch.as_tensor(i) for i, _ in pairs]).to(logits.device)
    tgt = [torch.as_tensor(j).to(logits.device) for _, j in pairs]
    labels = torch.cat([d["labels"][j] for d, j in zip(dets, tgt, strict=True)])
    scores = torch.cat([d["scores"][j] for d, j in zip(dets, tgt, strict=True)]).float()
    t_boxes = torch.cat([t["boxes"][j] for t, j in zip(targets, tgt, strict=True)])
    s_logits, s_boxes = logits[q, src], boxes[q, src].float()
    if logit_kind == "softmax":  # C real classes + no-object (last)
        cls = soft_label_kl(s_logits, one_hot_scores(labels, scores, s_logits.shape[-1], s_logits.shape[-1] - 1))
    else:
        cls = quality_focal(s_logits, one_hot_scores(labels, scores, s_logits.shape[-1]), beta)
    w = scores.sum().clamp_min(EPS)
    return {"cls": cls.sum() / max(1, labels.numel()),
            "l1": ((s_boxes - t_boxes).abs().sum(-1) * scores).sum() / w,
            "giou": (giou_loss(s_boxes, t_boxes) * scores).sum() / w}


# =========================================================================== dense CNN students (RetinaNet, FCOS)
def torchvision_targets(dets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Teacher detections -> torchvision targets (label ids = student label index + 1; 0 is background)."""
    return [{"boxes": d["boxes"].float(), "labels": d["labels"] + 1} for d in dets]


@torch.no_grad()
def dense_assignment(model: nn.Module, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: list[Tensor], levels: list[int]) -> list[Tensor]:
    """The student's own assigner (RetinaNet's IoU matcher, FCOS' centre sampling and scale ranges) on
    ``targets``: per image [A] the target index of each anchor, negative when unassigned. Runs the model's own
    ``compute_loss`` with its head's loss swapped for a capture of the assignment it computes."""
    from torchvision.models.detection import FCOS

    captured: list[list[Tensor]] = []

    def capture(targets: Any, head_outputs: Any, anchors: Any, matched_idxs: list[Tensor]) -> dict[str, Tensor]:
        captured.append(matched_idxs)
        return {}

    model.head.compute_loss = capture
    try:
        extra = (levels,) if isinstance(model, FCOS) else ()
        model.compute_loss(targets, head_outputs, anchors, *extra)
    finally:
        del model.head.compute_loss
    return captured[0]


def dense_terms(model: nn.Module, taps: dict[str, Any], dets: list[dict[str, Tensor]], beta: float
                ) -> dict[str, Tensor]:
    """RetinaNet / FCOS student: ``{"cls", "box"}``. cls: quality focal on the class logits of the anchors the
    student's assigner gives a teacher detection (targets ``s`` on its class, 0 on the other channels), summed
    over channels and averaged over those anchors; box: 1 - GIoU of the boxes the student decodes there and the
    teacher's box, score-weighted mean."""
    head, anchors = taps["head_outputs"], taps["anchors"]
    logits, deltas = head["cls_logits"], head["bbox_regression"]
    targets = torchvision_targets(dets)
    if sum(int(t["labels"].numel()) for t in targets) == 0:
        return {"cls": _zero(logits), "box": _zero(logits)}
    levels = [f.shape[-2] * f.shape[-1] for f in taps["fpn"].values()]
    coder = model.box_coder  # RetinaNet's BoxCoder decodes one box set with decode_single, FCOS' linear coder with decode
    decode = coder.decode_single if hasattr(coder, "decode_single") else coder.decode
    matched = dense_assignment(model, targets, head, anchors, levels)
    cls, box, n_pos, w = [], [], 0, []
    for i, (idx, t) in enumerate(zip(matched, targets, strict=True)):
        pos = idx >= 0
        if t["labels"].numel() == 0 or not bool(pos.any()):
            continue
        j = idx[pos]
        scores = dets[i]["scores"][j].float()
        cls.append(quality_focal(logits[i][pos], one_hot_scores(t["labels"][j], scores, logits.shape[-1]), beta))
        pred = decode(deltas[i][pos].float(), anchors[i][pos].float())
        box.append(generalized_box_iou_loss(pred, t["boxes"][j], reduction="none") * scores)
        n_pos, w = n_pos + int(pos.sum()), [*w, scores.sum()]
    if not cls:
        return {"cls": _zero(logits), "box": _zero(logits)}
    return {"cls": torch.cat(cls).sum() / n_pos, "box": torch.cat(box).sum() / torch.stack(w).sum().clamp_min(EPS)}


# =========================================================================== two-stage CNN students (Faster R-CNN)
def roi_terms(model: nn.Module, taps: dict[str, Any], dets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Faster R-CNN student, second stage: ``{"cls", "box"}``. The teacher's boxes join the RPN's proposals and
    are assigned by the student's RoI matcher; up to its sampler's positive quota per image is kept (positives
    only) and run through its box head. cls: KL of the class softmax to ``s`` on the class, ``1 - s`` on
    background, averaged over the RoIs; box: smooth L1 of the class's box deltas to the teacher box (the
    student's own box loss), score-weighted mean. The RPN is left to the detection loss."""
    roi = model.roi_heads
    targets = torchvision_targets(dets)
    proposals = [p.detach() for p in taps["proposals"]]
    ref = taps["fpn"][next(iter(taps["fpn"]))]
    if sum(int(t["labels"].numel()) for t in targets) == 0:
        return {"cls": _zero(ref), "box": _zero(ref)}
    gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
    with torch.no_grad():
        proposals = roi.add_gt_proposals(proposals, gt_boxes)
        matched, labels = roi.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        labels = [torch.where(lab > 0, lab, torch.full_like(lab, -1)) for lab in labels]  # positives only
        keep, _ = roi.fg_bg_sampler(labels)
    rois, idx, img = [], [], []
    for i, k in enumerate(keep):
        sel = torch.where(k.bool() & (labels[i] > 0))[0]
        rois.append(proposals[i][sel])
        idx.append(matched[i][sel])
        img.extend([i] * int(sel.numel()))
    if not img:
        return {"cls": _zero(ref), "box": _zero(ref)}
    features = roi.box_head(roi.box_roi_pool(taps["fpn"], rois, taps["image_sizes"]))
    class_logits, box_regression = roi.box_predictor(features)
    scores = torch.cat([dets[i]["scores"][j] for i, j in enumerate(idx)]).float()
    cls_ids = torch.cat([t["labels"][j] for t, j in zip(targets, idx, strict=True)])
    t_boxes = torch.cat([t["boxes"][j] for t, j in zip(targets, idx, strict=True)])
    cls = soft_label_kl(class_logits, one_hot_scores(cls_ids, scores, class_logits.shape[-1], background=0))
    rows = torch.arange(len(img), device=cls_ids.device)
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[rows, cls_ids].float()
    goal = roi.box_coder.encode_single(t_boxes, torch.cat(rois).float())
    box = F.smooth_l1_loss(deltas, goal, beta=SMOOTH_L1_BETA, reduction="none").sum(-1)
    return {"cls": cls.mean(), "box": (box * scores).sum() / scores.sum().clamp_min(EPS)}
