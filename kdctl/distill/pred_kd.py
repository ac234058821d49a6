"""pred-kd: prediction distillation for any teacher/student pair, across families included (issue #15 item 4).

The teacher's detections on the SAME augmented batch become extra soft targets for the student. It needs only the
teacher's ``predict`` and the student's own matcher / assigner and head outputs, so it works for DETR -> CNN,
CNN -> DETR and every same-family pair; ``--method auto`` picks it for a cross-family pair (DRKD / KD-DETR stay the
choice within a family) and ``--method drkd+pred-kd`` adds it to another method (:mod:`kdctl.distill.combined`).

Teacher side (:meth:`PredKD.teacher_taps`, no gradient): ``teacher.predict`` on the batch (its own post-processing,
boxes in the batch frame), detections scoring below ``score_threshold`` dropped ("nothing when the teacher is
unsure"), class-wise NMS at ``nms_iou`` (``torchvision.ops.batched_nms``; DETR teachers have none of their own), at
most ``max_detections`` per image, and labels mapped to the student's label space BY NAME
(:func:`kdctl.models.labels.match_classes`, through the run's dataset classes and ``--label-map`` when set):
a teacher class the student lacks is dropped. Teacher and student may have different label spaces.

Student side: each detection ``(box, class c, score s)`` is a pseudo-target assigned with the student's OWN
matcher; only the student predictions assigned to one (positives) get a KD term (the rest is left to the
detection loss, which trains background). Class targets: ``y = s`` on ``c`` (quality focal for sigmoid heads,
soft-label KL for softmax heads, see :mod:`kdctl.distill.pred_kd_losses`); box terms are score-weighted means.

==================  ==========================================  ============================================
student             assignment                                  terms (``kd_pred_*``)
==================  ==========================================  ============================================
DETR family         transformers' Hungarian matcher with the    cls: quality focal (sigmoid: Deformable,
(transformers)      student's config costs (DETR's for          DAB, Conditional, RT-DETR) or KL to
                    softmax, Deformable's focal cost for        ``s``/no-object ``1 - s`` (softmax DETR);
                    sigmoid, RT-DETR's own ``matcher_*``)       l1 + giou on normalised cxcywh boxes,
                    on the FINAL decoder layer                  weighted by the student's own
                                                                ``bbox/giou_loss_coefficient``
RetinaNet, FCOS     the model's own ``compute_loss``            cls: quality focal over the class
(torchvision)       assignment (IoU matcher / centre            channels of assigned anchors;
                    sampling + scale ranges), recorded from     box: 1 - GIoU of the decoded box
                    the one training pass's head outputs
Faster R-CNN        teacher boxes join the RPN proposals,       cls: KL of the RoI softmax to ``s`` /
                    the RoI head's IoU matcher and its          background ``1 - s``; box: smooth L1
                    sampler's positive quota, one extra         (beta 1/9) on the class's deltas
                    box-head pass over those RoIs
==================  ==========================================  ============================================

Terms: ``kd_pred_cls = cls * L_cls`` and ``kd_pred_box = box * L_box`` (CNN students), ``kd_pred_l1 = box *
bbox_loss_coefficient * L_L1`` and ``kd_pred_giou = box * giou_loss_coefficient * L_GIoU`` (DETR students).
Each is zero exactly when the student's assigned predictions equal the soft targets (probability ``s`` on the
teacher's class, 0 on the others / ``1 - s`` on background, the teacher's box) and positive otherwise.

Simplifications versus the issue text: negatives get no KD term (the teacher's silence below the threshold is not
turned into a background target); a DETR student is distilled on its final decoder layer only (no auxiliary
layers, no denoising groups); FCOS' centre-ness branch and Faster R-CNN's RPN are left to the detection loss;
RetinaNet's box term is GIoU on decoded boxes rather than its L1 on deltas. The teacher runs ``predict`` (its
full forward) once per step; in a combination with a feature method it runs its backbone a second time.

Options (``[kd.pred-kd]``): ``cls`` (1.0), ``box`` (1.0), ``score_threshold`` (0.3), ``nms_iou`` (0.6),
``max_detections`` (100), ``beta`` (2.0, the quality focal exponent).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from kdctl.data.batch import Batch
from kdctl.distill.base import Distiller
from kdctl.distill.pred_kd_losses import dense_terms, detr_matcher, detr_terms, roi_terms
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput
from kdctl.models.labels import match_classes

DEFAULTS: dict[str, float] = {"cls": 1.0, "box": 1.0, "score_threshold": 0.3, "nms_iou": 0.6,
                              "max_detections": 100, "beta": 2.0}
"""Recipe keys of ``[kd.pred-kd]`` and their defaults."""


def student_labels(teacher: Detector, student: Detector) -> list[int]:
    """Per label the teacher's ``predict`` returns (a dataset class after ``set_classes``, else one of its
    ``label_names``), the student's label index with the same name, or -1 when the student lacks it."""
    names = teacher.dataset_names or teacher.label_names
    rows = match_classes(names, student.label_names)
    if student.dataset_names is not None:  # through the run's classes, so that --label-map applies
        via = match_classes(names, student.dataset_names)
        model = student.model_labels(torch.arange(len(student.dataset_names))).tolist()
        rows = [r if v is None else model[v] for r, v in zip(rows, via, strict=True)]
    return [-1 if r is None else int(r) for r in rows]


def select_detections(dets: list[dict[str, Tensor]], to_student: Tensor, score_threshold: float, nms_iou: float,
                      max_detections: int) -> list[dict[str, Tensor]]:
    """Per image: scores >= threshold, class-wise NMS, labels mapped (``to_student`` [C_t], -1 = dropped), the
    ``max_detections`` best. Returns ``{"boxes" [D, 4], "scores" [D], "labels" [D] student indices}``."""
    out = []
    for d in dets:
        labels = to_student.to(d["labels"].device)[d["labels"]]
        keep = (d["scores"] >= score_threshold) & (labels >= 0)
        boxes, scores, labels = d["boxes"][keep].float(), d["scores"][keep].float(), labels[keep]
        kept = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
        out.append({"boxes": boxes[kept], "scores": scores[kept], "labels": labels[kept]})
    return out


class PredKD(Distiller):
    """Prediction distillation (see the module docstring).

    Args:
        teacher, student: any kdctl detectors (DETR family or torchvision RetinaNet / FCOS / Faster R-CNN).
        cls, box: weights of the class and box terms.
        score_threshold: teacher detections below it give no target; nms_iou: class-wise NMS IoU;
        max_detections: per image; beta: quality focal exponent (sigmoid heads).
    """

    name: ClassVar[str] = "pred-kd"

    def __init__(self, teacher: Detector, student: Detector, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise KdctlError(f"[kd.pred-kd]: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        o = {**DEFAULTS, **options}
        try:
            values = {k: float(v) for k, v in o.items()}
        except (TypeError, ValueError) as e:
            raise KdctlError(f"[kd.pred-kd]: every option is a number ({e})") from e
        if not all(math.isfinite(v) and v >= 0 for v in values.values()) or values["max_detections"] < 1:
            raise KdctlError("[kd.pred-kd]: options must be finite and >= 0, max_detections >= 1")
        super().__init__(teacher, student, **values)
        object.__setattr__(self, "student", student)  # a reference: the engine owns and optimises the student
        self.w_cls, self.w_box, self.beta = values["cls"], values["box"], values["beta"]
        self.score_threshold, self.nms_iou = values["score_threshold"], values["nms_iou"]
        self.max_detections = int(values["max_detections"])
        self.kind = student_kind(student)
        self.matcher = detr_matcher(student.model, student.logit_kind) if self.kind == "detr" else None

    @torch.no_grad()
    def teacher_taps(self, batch: Batch) -> dict[str, Any]:
        """``{"detections": per image {"boxes" [D, 4] xyxy in the batch frame, "scores" [D], "labels" [D]
        student label indices}}``: the teacher's kept detections (module docstring)."""
        frame = dataclasses.replace(batch, orig_sizes=list(batch.sizes))  # predict in the batch's own pixels
        dets = self.teacher.predict(frame, score_threshold=self.score_threshold, max_detections=self.max_detections)
        to_student = torch.as_tensor(student_labels(self.teacher, self.student), dtype=torch.long)
        return {"detections": select_detections(dets, to_student, self.score_threshold, self.nms_iou,
                                                self.max_detections)}

    def forward(self, student_out: TrainOutput, teacher_taps: dict[str, Any], batch: Batch) -> dict[str, Tensor]:
        """Weighted ``kd_pred_*`` terms (module docstring)."""
        dets, taps = teacher_taps["detections"], student_out.taps
        if self.kind == "detr":
            s = self.student
            t = detr_terms(taps["logits"][-1], taps["boxes"][-1], dets, s.frame_sizes(batch), self.matcher,
                           s.logit_kind, self.beta)
            l1, giou = detr_box_weights(s.model.config)
            return {"kd_pred_cls": self.w_cls * t["cls"], "kd_pred_l1": self.w_box * l1 * t["l1"],
                    "kd_pred_giou": self.w_box * giou * t["giou"]}
        model = self.student.model
        t = dense_terms(model, taps, dets, self.beta) if self.kind == "dense" else roi_terms(model, taps, dets)
        return {"kd_pred_cls": self.w_cls * t["cls"], "kd_pred_box": self.w_box * t["box"]}


def student_kind(student: Detector) -> str:
    """"detr", "dense" (RetinaNet / FCOS: a dense head with anchors) or "roi" (Faster R-CNN); else KdctlError."""
    if student.family == "detr":
        return "detr"
    model = getattr(student, "model", None)
    if hasattr(model, "roi_heads") and hasattr(model, "rpn"):
        return "roi"
    if hasattr(model, "head") and hasattr(model, "anchor_generator") and hasattr(model, "compute_loss"):
        return "dense"
    raise KdctlError(f"pred-kd: no soft-target loss for a {getattr(student, 'architecture', '?')} student "
                     "(supported: the DETR family, RetinaNet, FCOS, Faster R-CNN)")


def detr_box_weights(config: Any) -> tuple[float, float]:
    """The DETR student's own L1 and GIoU loss weights (``bbox/giou_loss_coefficient``; RT-DETR ``weight_loss_*``)."""
    l1 = getattr(config, "bbox_loss_coefficient", None) or getattr(config, "weight_loss_bbox", None) or 5.0
    giou = getattr(config, "giou_loss_coefficient", None) or getattr(config, "weight_loss_giou", None) or 2.0
    return float(l1), float(giou)
