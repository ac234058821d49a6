"""From a DETR's outputs to kdctl's: the loss terms the engine optimises and logs, and detections per image."""

from __future__ import annotations

from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models.detr.variants import DetrVariant


def loss_terms(variant: DetrVariant, model: nn.Module, loss_dict: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The model's loss terms with its auxiliary layers folded in; their sum is the model's own ``outputs.loss``.

    Variants whose ``loss_dict`` transformers already weights (``loss_weighted``, RT-DETR: auxiliary, denoising and
    encoder terms ``loss_vfl_aux_0``, ``loss_bbox_dn_1``, ``loss_giou_enc_0`` ...) are summed per base term
    (``loss_vfl``, ``loss_bbox``, ``loss_giou``) as they are; no entry is dropped. The others are weighted with the
    variant's :meth:`~DetrVariant.loss_weights`.
    """
    if variant.loss_weighted:
        return _summed_terms(loss_dict, where)
    weights = variant.loss_weights(model)
    aux = variant.aux_suffixes(model)
    losses: dict[str, Tensor] = {}
    for key, value in loss_dict.items():
        base, _, suffix = key.rpartition("_")
        if key in weights or key in variant.logged_terms:
            base = key
        elif not (suffix in aux and (base in weights or base in variant.logged_terms)):
            raise KdctlError(f"{where}: unknown loss term {key!r} from transformers (known: "
                             f"{', '.join([*weights, *variant.logged_terms])}); its variant must weight it")
        if base in variant.logged_terms:
            continue  # cardinality_error and the like: logged by transformers, not optimised
        term = value * weights[base]
        losses[base] = losses[base] + term if base in losses else term
    return losses


def _summed_terms(loss_dict: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    losses: dict[str, Tensor] = {}
    for key, value in loss_dict.items():
        parts = key.split("_")
        if len(parts) < 2 or parts[0] != "loss":
            raise KdctlError(f"{where}: unexpected loss entry {key!r} from transformers (expected loss_<term>...)")
        base = "_".join(parts[:2])
        losses[base] = losses[base] + value if base in losses else value
    return losses


def softmax_detections(logits: Tensor, xyxy: Tensor, threshold: float, k: int) -> dict[str, Tensor]:
    """DETR: one detection per query, best class of softmax without the no-object class (last)."""
    scores, labels = logits.softmax(-1)[:, :-1].max(-1)
    keep = scores > threshold
    scores, labels, xyxy = scores[keep], labels[keep], xyxy[keep]
    order = scores.argsort(descending=True)[:k]
    return {"boxes": xyxy[order], "scores": scores[order], "labels": labels[order]}


def sigmoid_detections(logits: Tensor, xyxy: Tensor, threshold: float, k: int) -> dict[str, Tensor]:
    """Sigmoid DETRs: top-k over queries x classes (a query may give several classes)."""
    num_classes = logits.shape[-1]
    prob = logits.sigmoid().flatten()
    scores, index = prob.topk(min(k, prob.numel()))
    keep = scores > threshold
    scores, index = scores[keep], index[keep]
    return {"boxes": xyxy[index // num_classes], "scores": scores, "labels": index % num_classes}
