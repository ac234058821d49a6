"""D-FINE and DEIMv2 (transformers ``DFineForObjectDetection``, ``Deimv2ForObjectDetection``).

Both form their queries as RT-DETR does (:mod:`kdctl.models.detr.rt_detr`): the encoder's top-k proposals (a
pre-sigmoid box plus content read from the encoder memory, ``model.enc_output``), contrastive denoising queries in
front of them in training, the pixel mask ignored (square input), ``RTDetrImageProcessor`` with ``do_normalize =
False``. What differs (transformers 5.24, ``modeling_d_fine.py`` / ``modeling_deimv2.py``):

* Boxes are Fine-grained Distribution Refinement: every decoder layer predicts, per box edge, logits over
  ``max_num_bins + 1`` bins (``intermediate_predicted_corners`` [N, L, Q, 4 (B + 1)]) whose expectation under the
  non-uniform weighting function W(n) (``weighting_function(max_num_bins, up, reg_scale)``) is the edge's distance
  from the FIRST-layer box (``pre_bbox_head``; ``initial_reference_points`` [N, L, Q, 4], the same box for every
  layer): ``edge = centre -/+ (reg_scale / 2 + d) * size / reg_scale`` (``distance2bbox``).
* Scores pass a localisation-quality estimator (``lqe_layers``) that reads the corner distributions.
* In training mode the decoder returns L + 1 logits / boxes (the first one is layer 0 before refinement, from
  ``pre_bbox_head``) and L corner sets; in eval mode ONLY the ``eval_idx`` layer's (one of each). The taps follow:
  [L + 1, N, Q, ...] in training, [1, N, Q, ...] in eval; the last entry is always the model's output.
  transformers 5.24 builds ``decoder_layers + (decoder_layers - eval_idx - 1)`` decoder layers but only
  ``decoder_layers`` heads, so any ``eval_idx`` other than the last layer fails in its forward: kdctl refuses it.
* Losses (already weighted by transformers, passed through as they are): varifocal (D-FINE ``loss_vfl``) or MAL
  (DEIMv2 ``loss_mal``, with the dense one-to-one matching), L1, GIoU, FGL (``loss_fgl``, the edge distributions
  against the ground truth) and DDF (``loss_ddf``, GO-LSD self-distillation from the model's own last layer).
* DEIMv2 keeps its backbone in ``model.model.conv_encoder`` (HGNetv2: ``.model``; DINOv3: ``.backbone`` with a
  spatial tuning adapter); ``encoder_type = "lite"`` (Atto, Femto, Pico) replaces the hybrid encoder.

Extra taps (:meth:`DFine.head_extras`): ``"corners"`` [L, N, G, 4, B + 1] edge logits and ``"initial_boxes"`` [L, N,
G, 4] the first-layer boxes (cx, cy, w, h), which KD-DETR's ``box = "distribution"`` compares (:mod:`kdctl.distill.
fdr`), with :meth:`DFine.fdr_params` (W(n) and ``reg_scale``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models.detr.rt_detr import RTDetr


class DFine(RTDetr):
    model_cls = "DFineForObjectDetection"
    config_cls = "DFineConfig"
    processor_cls = "RTDetrImageProcessor"
    model_type = "d_fine"
    recipe: ClassVar[str] = "rtdetr"  # AdamW, EMA and the RT-DETR augmentations, as D-FINE's official configs

    def head_extras(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> dict[str, Tensor]:
        """``corners`` [L, N, G, 4, B + 1] and ``initial_boxes`` [L, N, G, 4] of the layers that have logits."""
        corners = out.intermediate_predicted_corners.transpose(0, 1)
        bins = int(model.config.max_num_bins) + 1
        return {"corners": corners.unflatten(-1, (4, bins)),
                "initial_boxes": out.initial_reference_points.transpose(0, 1)}

    @torch.no_grad()
    def fdr_params(self, model: nn.Module) -> tuple[Tensor, float]:
        """(W(n) [B + 1], reg_scale): the bin values and scale of the model's edge distributions."""
        from transformers.models.d_fine.modeling_d_fine import weighting_function

        dec = self.decoder(model)
        return weighting_function(dec.max_num_bins, dec.up, dec.reg_scale).detach(), abs(float(dec.reg_scale))

    def check_preset(self, kwargs: dict[str, Any], where: str) -> None:
        layers = int(kwargs.get("decoder_layers", 6))
        eval_idx = int(kwargs.get("eval_idx", -1))
        _check_eval_idx(eval_idx, layers, where)

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        cfg = model.config
        _check_eval_idx(int(cfg.eval_idx), int(cfg.decoder_layers), type(model).__name__)

    def conv_encoder(self, model: nn.Module) -> nn.Module:
        return model.model.backbone


class Deimv2(DFine):
    model_cls = "Deimv2ForObjectDetection"
    config_cls = "Deimv2Config"
    model_type = "deimv2"

    def conv_encoder(self, model: nn.Module) -> nn.Module:
        enc = model.model.conv_encoder
        if not hasattr(enc, "model"):  # DINOv3: the ViT is .backbone (the adapter and projections are DEIMv2's)
            return SimpleNamespace(model=enc.backbone)
        return enc


def _check_eval_idx(eval_idx: int, layers: int, where: str) -> None:
    if eval_idx not in (-1, layers - 1):
        raise KdctlError(f"{where}: eval_idx {eval_idx} with {layers} decoder layers is not supported (transformers "
                         "5.24 builds extra layers without heads for it and fails); use eval_idx = -1")
