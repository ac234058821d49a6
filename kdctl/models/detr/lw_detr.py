"""LW-DETR and RF-DETR (transformers ``LwDetrForObjectDetection``, ``RfDetrForObjectDetection``).

What sets them apart from the other DETRs (transformers 5.24, ``modeling_lw_detr.py``, ``modeling_rf_detr.py``,
``loss/loss_lw_detr.py``):

* Queries ("box" query kind): per slot a learned content (``model.model.query_feat``) and a box, the encoder's
  top-k proposal refined by a learned per-slot delta; the decoder's ``reference_points`` [N, Q, 4] are plain
  normalised cx, cy, w, h (no sigmoid). The decoder never moves its reference: every layer's box is
  ``refine_bboxes(reference, bbox_embed(h_l))`` (transformers' own function), its logits ``class_embed(h_l)``.
* KD point rule (#12's rule for the content, with the content these models have): a distillation point is a box,
  and each model takes its content from its OWN source, here its learned slot contents: point j of a group -> slot
  ``j mod Q`` (:meth:`LwDetr.query_content`). The teacher's specific points are its Q slots in order, so decoding
  them reproduces its own outputs; the random general points cycle through the slots, the same for both models.
* Group DETR: in training mode the model decodes ``group_detr`` groups of Q queries (13 by default), each with its
  own proposals and slots, and the decoder's self-attention splits its sequence into ``group_detr`` chunks. The
  taps keep group 0 (the one inference uses, :meth:`LwDetr.tap_slice`). Custom queries are decoded with the
  self-attention modules switched to eval mode (:meth:`LwDetr.decode_context`): otherwise a count not divisible
  by ``group_detr`` raises and a divisible one is silently split into groups that do not see each other. Dropout
  elsewhere stays as trained.
* Losses: ``loss_dict`` is unweighted (``loss_ce`` IA-BCE, ``loss_bbox``, ``loss_giou``; suffixes ``_0`` ...
  for the auxiliary layers and ``_enc`` for the encoder's top-k); kdctl weights each once with the config's
  ``class/bbox/giou_loss_coefficient``, so the sum is transformers' ``outputs.loss``.
* Input (the processors: ImageNet mean / std, pixel mask): the decoder honours the pixel mask (boxes relative to
  the valid region, as Deformable DETR); the ViT needs patch grids divisible by its windows, so the batch is padded
  to multiples of :meth:`LwDetr.input_multiple`. RF-DETR's windowed DINOv2 cuts windows correctly on square grids
  only (its ``window_partition`` views an H x W grid as W x H): its input is padded to a square.
* ONNX: "fixed-size" (top-k, proposals and the position-embedding interpolation are traced at one size), N dynamic.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models.detr.variants import DetrVariant


class LwDetr(DetrVariant):
    model_cls = "LwDetrForObjectDetection"
    config_cls = "LwDetrConfig"
    processor_cls = "DeformableDetrImageProcessor"  # transformers' AutoImageProcessor for lw_detr
    model_type = "lw_detr"
    onnx_kind = "fixed-size"
    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "valid_ratios")
    recipe: ClassVar[str] = "lwdetr"
    modeling: ClassVar[str] = "transformers.models.lw_detr.modeling_lw_detr"
    attention_cls: ClassVar[str] = "LwDetrAttention"  # the Group-DETR self-attention of the decoder layers

    # ------------------------------------------------------------------ losses
    def loss_weights(self, model: nn.Module) -> dict[str, float]:
        cfg = model.config
        return {"loss_ce": float(cfg.class_loss_coefficient), "loss_bbox": float(cfg.bbox_loss_coefficient),
                "loss_giou": float(cfg.giou_loss_coefficient)}

    def aux_suffixes(self, model: nn.Module) -> set[str]:
        return super().aux_suffixes(model) | {"enc"}  # the encoder's top-k proposals, weighted as the final layer

    # ------------------------------------------------------------------ queries
    def query_kind(self, model: nn.Module) -> str:
        return "box"

    def query_dim(self, model: nn.Module) -> int:
        return 4

    def queries_image_dependent(self, model: nn.Module) -> bool:
        return True

    def learned_queries(self, model: nn.Module) -> Tensor:
        raise KdctlError(f"{self.model_cls}'s queries are per-image boxes (the encoder's top-k refined by learned "
                         "deltas); use taps['queries']")

    def tap_slice(self, model: nn.Module, kw: dict[str, Any]) -> slice:
        return slice(0, self.num_queries(model))  # group 0: the inference group (training decodes group_detr)

    def used_queries(self, model: nn.Module, kw: dict[str, Any]) -> Tensor:
        """The boxes group 0 decoded, [N, Q, 4] normalised cx, cy, w, h."""
        return kw["reference_points"][:, self.tap_slice(model, kw)].detach()

    def query_content(self, model: nn.Module, taps: dict[str, Any], q: Tensor, index: Tensor | None) -> Tensor:
        """Content [N, G, D] of the boxes ``q`` [N, G, 4]: this model's learned content of slot ``j mod Q`` for
        point j (with gradient: it is a parameter); ``index`` is not used (no memory positions)."""
        slots = torch.arange(q.shape[1], device=q.device) % self.num_queries(model)
        content = model.model.query_feat.weight[slots].to(q.dtype)
        return content.unsqueeze(0).expand(q.shape[0], -1, -1)

    # ------------------------------------------------------------------ decoder
    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:
        return {"reference_points": q}  # inputs_embeds: query_content, set by the adapter

    @contextmanager
    def decode_context(self, model: nn.Module) -> Iterator[None]:
        """The decoder's self-attention modules in eval mode (no Group-DETR split); the rest as it is."""
        mods = [m for m in model.modules() if type(m).__name__ == self.attention_cls]
        modes = [m.training for m in mods]
        for m in mods:
            m.training = False
        try:
            yield
        finally:
            for m, mode in zip(mods, modes, strict=True):
                m.training = mode

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        refine = importlib.import_module(self.modeling).refine_bboxes
        hs = out.intermediate_hidden_states  # [L, N, G, D]
        return model.class_embed(hs), refine(kw["reference_points"], model.bbox_embed(hs))

    # ------------------------------------------------------------------ backbone, input
    def conv_encoder(self, model: nn.Module) -> Any:
        """The ViT as ``.model`` (what :func:`kdctl.models.detr.backbone.backbone_module` reads)."""
        from types import SimpleNamespace

        return SimpleNamespace(model=model.model.backbone.backbone)

    def input_multiple(self, model: nn.Module) -> int:
        """patch x windows per side (x 2 with a 0.5 projector scale, a stride-2 convolution)."""
        bb = model.config.backbone_config
        half = 2 if 0.5 in self.scales(model) else 1
        return int(bb.patch_size) * int(bb.num_windows_side) * half

    def scales(self, model: nn.Module) -> tuple[float, ...]:
        """Feature-map scales relative to the patch grid, one per encoder memory level."""
        return tuple(float(s) for s in model.config.projector_scale_factors)

    def min_input_side(self, model: nn.Module) -> int:
        """The smallest square input whose encoder positions cover the ``num_queries`` of the top-k."""
        patch, q = int(model.config.backbone_config.patch_size), self.num_queries(model)
        side = patch * math.ceil(math.sqrt(q / sum(s * s for s in self.scales(model))))
        m = self.input_multiple(model)
        return -(-side // m) * m

    def check_input_size(self, model: nn.Module, height: int, width: int) -> None:
        """The encoder's top-k takes ``num_queries`` positions: refuse inputs with fewer (one line, not torch's)."""
        patch, q = int(model.config.backbone_config.patch_size), self.num_queries(model)
        cells = sum(int(height // patch * s) * int(width // patch * s) for s in self.scales(model))
        if cells < q:
            raise KdctlError(f"{self.model_cls}: a {height}x{width} input gives {cells} encoder positions, fewer than "
                             f"its {q} queries; use --imgsz {self.min_input_side(model)} or more")

    def processor_kwargs(self, imgsz: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
        """Longer side ``imgsz`` (a multiple of :meth:`input_multiple`), padded to ``imgsz`` x ``imgsz`` with the
        pixel mask: what kdctl feeds one image."""
        return {**super().processor_kwargs(imgsz, mean, std), "do_pad": True,
                "pad_size": {"height": imgsz, "width": imgsz}}


class RfDetr(LwDetr):
    model_cls = "RfDetrForObjectDetection"
    config_cls = "RfDetrConfig"
    processor_cls = "RfDetrImageProcessor"
    model_type = "rf_detr"
    square_pad = True
    modeling = "transformers.models.rf_detr.modeling_rf_detr"
    attention_cls = "RfDetrAttention"

    def input_multiple(self, model: nn.Module) -> int:
        bb = model.config.backbone_config
        return int(bb.patch_size) * int(bb.num_windows)

    def scales(self, model: nn.Module) -> tuple[float, ...]:
        return (1.0,)  # one level at the patch grid (transformers 5.24: num_feature_levels = 1)

    @contextmanager
    def onnx_context(self, model: nn.Module, size: int) -> Iterator[None]:
        """The position embeddings for ``size`` x ``size`` computed once, outside the trace: the legacy exporter has
        no antialiased bicubic resize (``aten::_upsample_bicubic2d_aa``), and the graph is fixed-size anyway."""
        emb = model.model.backbone.backbone.embeddings
        cells = (size // int(model.config.backbone_config.patch_size)) ** 2
        with torch.no_grad():
            like = emb.position_embeddings.new_zeros(1, cells + 1, emb.position_embeddings.shape[-1])
            pos = emb.interpolate_pos_encoding(like, size, size).detach()
        emb.interpolate_pos_encoding = lambda embeddings, height, width: pos
        try:
            yield
        finally:
            del emb.interpolate_pos_encoding
