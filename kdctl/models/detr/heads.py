"""Class heads of transformers DETRs: replace them for other classes, keeping the rows of classes they knew.

Every class head a model has is resized in place (its ``nn.Linear`` modules keep their identity, so weights
transformers ties stay tied: a module shared, or a parameter shared, is replaced by one new parameter), and the
config follows (``id2label``, ``label2id``, hence ``num_labels``): the model's loss, ``save_pretrained`` and
``from_pretrained`` then agree on the new size.

=====================================  ================================================================
DETR, Table Transformer                ``class_labels_classifier`` [num_labels + 1]: softmax, no-object row LAST
Conditional DETR                       ``class_labels_classifier`` [num_labels]: sigmoid (focal)
DAB-DETR                               ``class_embed`` [num_labels]: sigmoid (focal)
Deformable DETR                        ``class_embed[i]`` per decoder layer (+ the two-stage encoder head, the last
                                       one, also ``model.decoder.class_embed``) [num_labels]: sigmoid (focal)
RT-DETR, D-FINE, DEIMv2                ``class_embed[i]``, ``model.decoder.class_embed[i]``, the encoder's
                                       ``model.enc_score_head`` [num_labels] and the denoising label embedding
                                       ``model.denoising_class_embed`` [num_labels + 1] (padding row last)
=====================================  ================================================================

New rows start as the architecture's own init: weights N(0, ``init_std``) (transformers' ``_init_weights``), bias 0
for softmax heads; sigmoid heads get the prior-probability bias ``-log((1 - p) / p)``: DAB-DETR's
``initializer_bias_prior_prob`` or 1 / (num_labels + 1) (as transformers does), 0.01 for Conditional and Deformable
DETR (their official code).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdctl.errors import KdctlError

FOCAL_PRIOR = 0.01  # Conditional / Deformable DETR's official class-head bias prior


def class_heads(model: nn.Module) -> list[nn.Linear]:
    """Every class head ``nn.Linear`` of a transformers DETR (shared modules listed once)."""
    found: list[nn.Module] = []
    inner = getattr(model, "model", None)
    for owner, attr in ((model, "class_labels_classifier"), (model, "class_embed"),
                        (getattr(inner, "decoder", None), "class_embed"), (inner, "enc_score_head"),
                        (inner, "enc_out_class_embed")):  # LW-DETR / RF-DETR groups
        head = getattr(owner, attr, None) if owner is not None else None
        found.extend(head if isinstance(head, nn.ModuleList) else [head] if head is not None else [])
    out: list[nn.Linear] = []
    for m in found:
        if not isinstance(m, nn.Linear):
            raise KdctlError(f"{type(model).__name__}: class head {type(m).__name__} is not a linear layer")
        if all(m is not o for o in out):
            out.append(m)
    if not out:
        raise KdctlError(f"{type(model).__name__}: no class head found")
    return out


def prior_bias(config: Any, num_labels: int, logit_kind: str, model_type: str) -> float:
    """The bias new rows start at (see the module docstring)."""
    if logit_kind == "softmax":
        return 0.0
    p = getattr(config, "initializer_bias_prior_prob", None)
    if not p:
        p = 1 / (num_labels + 1) if model_type == "dab-detr" else FOCAL_PRIOR
    return -math.log((1 - p) / p)


@torch.no_grad()
def replace_class_heads(model: nn.Module, names: list[str], keep: dict[int, int], logit_kind: str,
                        keep_no_object: bool = True) -> None:
    """Resize every class head of ``model`` to ``names`` (row ``j`` copied from old row ``keep[j]``; a softmax
    head's no-object row, last, copied from the old last row when ``keep_no_object``) and set its config."""
    config = model.config
    old_labels = int(config.num_labels)
    rows = dict(keep)
    extra = 1 if logit_kind == "softmax" else 0
    if extra and keep_no_object:
        rows[len(names)] = old_labels
    std = float(getattr(config, "init_std", None) or getattr(config, "initializer_range", None) or 0.02)
    bias = prior_bias(config, len(names), logit_kind, str(getattr(config, "model_type", "")))
    new_params: dict[int, nn.Parameter] = {}  # id(old parameter) -> its replacement (tied weights stay tied)

    def resized(old: nn.Parameter, init: str) -> nn.Parameter:
        if id(old) not in new_params:
            t = old.new_empty((len(names) + extra, *old.shape[1:]))
            if init == "weight":
                t.normal_(0.0, std)
            else:
                t.fill_(bias)
            for j, i in rows.items():
                t[j] = old[i]
            new_params[id(old)] = nn.Parameter(t, requires_grad=old.requires_grad)
        return new_params[id(old)]

    for lin in class_heads(model):
        if lin.out_features != old_labels + extra:
            raise KdctlError(f"{type(model).__name__}: a class head has {lin.out_features} outputs, expected "
                             f"{old_labels + extra} for {old_labels} labels")
        lin.weight = resized(lin.weight, "weight")
        if lin.bias is not None:
            lin.bias = resized(lin.bias, "bias")
        lin.out_features = len(names) + extra
    _resize_denoising_embed(model, names, rows, old_labels)
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}


def _resize_denoising_embed(model: nn.Module, names: list[str], rows: dict[int, int], old_labels: int) -> None:
    """RT-DETR-family denoising label embedding [num_labels + 1, d] (last row: the padding label): kept rows copied,
    new rows xavier-uniform as transformers initialises it, the padding row moved to the new end."""
    emb = getattr(getattr(model, "model", None), "denoising_class_embed", None)
    if not isinstance(emb, nn.Embedding) or emb.num_embeddings != old_labels + 1:
        return
    old = emb.weight
    t = old.new_empty((len(names) + 1, old.shape[1]))
    nn.init.xavier_uniform_(t)
    for j, i in rows.items():
        if j < len(names):
            t[j] = old[i]
    t[len(names)] = old[old_labels]
    emb.weight = nn.Parameter(t, requires_grad=old.requires_grad)
    emb.num_embeddings, emb.padding_idx = len(names) + 1, len(names)


__all__ = ["FOCAL_PRIOR", "class_heads", "prior_bias", "replace_class_heads"]
