"""Localisation distillation between Fine-grained Distribution Refinement heads (D-FINE, DEIMv2): KD-DETR's
``box = "distribution"`` term.

An FDR head describes each box edge by a distribution over bins: bin n of edge e says "this edge lies at
``centre -/+ (reg_scale / 2 + W(n)) * size / reg_scale``" from the model's FIRST-layer box (``initial_boxes``),
W the non-uniform weighting function (:meth:`kdctl.models.detr.d_fine.DFine.fdr_params`). A teacher's and a
student's distributions are relative to different first-layer boxes (and possibly different W), so they are not
comparable bin by bin. :func:`reexpress` moves the teacher's final-layer distribution into the student's frame:
every teacher bin is the edge position it stands for; that position, expressed as a distance from the STUDENT's
first-layer box, falls between two student bins, which share the bin's probability linearly (D-FINE's own
``translate_gt`` rule for a ground-truth edge; outside W's range it goes to the end bin). The result has the
teacher's shape (its uncertainty), and its mean is the teacher's final box edge re-expressed relative to the
student's first-layer box (the split is linear and the re-expression affine, inside W's range).

:func:`edge_kl` is then ``mean over the 4 edges of KL(teacher re-expressed || softmax(student logits))``, zero when
the two models are the same (same first-layer box, same W: every teacher bin lands on its own bin) and positive
otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SIGN = (-1.0, -1.0, 1.0, 1.0)  # left, top edges lie before the centre; right, bottom after it


def fdr_params(det: Any) -> tuple[Tensor, float] | None:
    """(W [B + 1], reg_scale) of a detector whose boxes are edge distributions (D-FINE, DEIMv2), else None."""
    variant = getattr(det, "variant", None)
    fn = getattr(variant, "fdr_params", None)
    return None if fn is None else fn(det.model)


def edge_positions(init: Tensor, w: Tensor, reg_scale: float) -> Tensor:
    """Where each bin puts each edge: ``init`` [..., 4] cxcywh first-layer boxes, W [B + 1] -> [..., 4, B + 1]
    coordinates (x for left/right, y for top/bottom), normalised like the boxes."""
    sign = init.new_tensor(SIGN)
    centre = init[..., [0, 1, 0, 1]]
    size = init[..., [2, 3, 2, 3]]
    offset = (0.5 * reg_scale + w.to(init)) * (size / reg_scale).unsqueeze(-1)  # [..., 4, B + 1]
    return centre.unsqueeze(-1) + sign.unsqueeze(-1) * offset


def project(probs: Tensor, dist: Tensor, w: Tensor) -> Tensor:
    """Split each probability ``probs`` [..., K] at distance ``dist`` [..., K] onto the two bins of W [B + 1] around
    it (linearly; beyond the ends onto the end bin) -> [..., B + 1], the same total mass."""
    w = w.to(dist)
    bins = w.numel()
    idx = (torch.searchsorted(w, dist.contiguous(), right=True) - 1).clamp(0, bins - 2)
    left, right = w[idx], w[idx + 1]
    wr = ((dist - left) / (right - left)).clamp(0.0, 1.0)
    out = probs.new_zeros((*probs.shape[:-1], bins))
    out = out.scatter_add(-1, idx, probs * (1 - wr))
    return out.scatter_add(-1, idx + 1, probs * wr)


def reexpress(t_logits: Tensor, t_init: Tensor, t_params: tuple[Tensor, float], s_init: Tensor,
              s_params: tuple[Tensor, float]) -> Tensor:
    """The teacher's edge distributions in the student's frame.

    t_logits: [..., 4, Bt + 1] teacher edge logits (its final layer); t_init: [..., 4] its first-layer boxes;
    s_init: [L, ..., 4] (or [..., 4]) the student's first-layer boxes. Returns [L, ..., 4, Bs + 1] probabilities
    (detached: a target).
    """
    with torch.no_grad():
        (w_t, r_t), (w_s, r_s) = t_params, s_params
        probs = t_logits.float().softmax(-1)
        edges = edge_positions(t_init.float(), w_t, r_t)  # [..., 4, Bt + 1]
        s_init = s_init.float()
        sign = s_init.new_tensor(SIGN).unsqueeze(-1)
        centre = s_init[..., [0, 1, 0, 1]].unsqueeze(-1)
        size = s_init[..., [2, 3, 2, 3]].unsqueeze(-1).clamp_min(1e-6)
        dist = sign * (edges - centre) * (r_s / size) - 0.5 * r_s  # [L, ..., 4, Bt + 1]
        return project(probs.expand_as(dist), dist, w_s)


def edge_kl(s_logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the 4 edges of KL(target || softmax(s_logits)): [L, ..., 4, B + 1] twice -> [L, ...]."""
    log_q = s_logits.float().log_softmax(-1)
    kl = (torch.xlogy(target, target) - target * log_q).sum(-1)
    return kl.mean(-1)


def fdr_taps(taps: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    """The final layer's edge distributions and first-layer boxes of FDR models (D-FINE, DEIMv2), else nothing."""
    return {prefix + k: taps[k][-1] for k in ("corners", "initial_boxes") if k in taps}


def group_fdr(taps: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    """``{"corners", "initial_boxes"}`` of one distillation group from the teacher taps (keys with ``prefix``)."""
    return {k: taps[prefix + k] for k in ("corners", "initial_boxes") if prefix + k in taps}


__all__ = ["edge_kl", "edge_positions", "fdr_params", "fdr_taps", "group_fdr", "project", "reexpress"]
