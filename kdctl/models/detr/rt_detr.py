"""RT-DETR and RT-DETRv2 (transformers ``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``).

What sets them apart from the other DETRs (transformers 5.24, ``modeling_rt_detr.py``):

* Queries are image-dependent ("proposal" query kind): the top-k positions of the encoder memory give each query
  its box (``reference_points`` before the sigmoid, [N, Q, 4]) and its content, ``enc_output(memory)`` gathered at
  that position and detached. A distillation point is therefore a box plus the rule that each model builds the
  content from its OWN encoder memory: gathered at a memory index (:meth:`RTDetr.query_content` with ``index``,
  used when two models' memory layouts match) or sampled bilinearly at the box centre on the level whose anchor size
  (0.05 * 2^level, transformers' ``generate_anchors``) is nearest the box's longer side.
* Training adds contrastive denoising queries in FRONT of the Q detection queries (``dn_num_split``); their
  self-attention mask travels as the decoder's ``encoder_attention_mask``. The taps keep the last Q queries only
  (:meth:`RTDetr.denoising_prefix`), and custom queries are decoded without that mask.
* The class and box heads run inside the decoder (``intermediate_logits``, ``intermediate_reference_points``).
* ``loss_dict`` entries are already weighted (varifocal class term): kdctl folds them per term, never re-weights.
* The image processor does not normalise (``do_normalize = False``); the models ignore the pixel mask, so kdctl
  feeds a square input (the batch padded to ``max(H, W)``) and reads boxes relative to that square.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.models.detr.variants import DetrVariant

ANCHOR_GRID = 0.05  # transformers' generate_anchors(grid_size): anchor size 0.05 * 2^level


class RTDetr(DetrVariant):
    model_cls = "RTDetrForObjectDetection"
    config_cls = "RTDetrConfig"
    processor_cls = "RTDetrImageProcessor"
    model_type = "rt_detr"
    onnx_kind = "fixed-size"  # anchors and top-k are traced for one input size
    image_mean = (0.0, 0.0, 0.0)  # do_normalize = False
    image_std = (1.0, 1.0, 1.0)
    batch_keys = ("encoder_hidden_states",)
    square_input = True
    loss_weighted = True
    record_modules: ClassVar[dict[str, str]] = {"enc_memory": "model.enc_output", "enc_scores": "model.enc_score_head"}
    recipe: ClassVar[str] = "rtdetr"  # the official RT-DETRv2 training: EMA, augmentations (presets/recipes/rtdetr.toml)

    # ------------------------------------------------------------------ queries
    def query_kind(self, model: nn.Module) -> str:
        return "proposal"

    def query_dim(self, model: nn.Module) -> int:
        return 4

    def queries_image_dependent(self, model: nn.Module) -> bool:
        return True

    def learned_queries(self, model: nn.Module) -> Tensor:
        raise KdctlError(f"{self.model_cls} has no learned queries (they are the encoder's top-k proposals per "
                         "image); use taps['queries']")

    def denoising_prefix(self, model: nn.Module, kw: dict[str, Any]) -> int:
        return int(kw["inputs_embeds"].shape[1]) - self.num_queries(model)

    def used_queries(self, model: nn.Module, kw: dict[str, Any]) -> Tensor:
        """The proposals the pass decoded (pre-sigmoid boxes [N, Q, 4], denoising queries left out)."""
        return kw["reference_points"][:, self.denoising_prefix(model, kw):].detach()

    def used_index(self, model: nn.Module, recorded: dict[str, Tensor]) -> Tensor:
        """[N, Q] memory positions of the model's own queries (its top-k, as its forward selected them)."""
        scores = recorded["enc_scores"].detach()
        return torch.topk(scores.max(-1).values, self.num_queries(model), dim=1).indices

    def memory_layout(self, kw: dict[str, Any]) -> tuple[tuple[int, int], ...]:
        return tuple((int(h), int(w)) for h, w in kw["spatial_shapes_list"])

    def memory_mask(self, model: nn.Module, kw: dict[str, Any]) -> Tensor:
        mem = kw["encoder_hidden_states"]
        return torch.ones(mem.shape[:2], dtype=torch.long, device=mem.device)  # the model uses no padding mask

    def query_content(self, model: nn.Module, taps: dict[str, Any], q: Tensor, index: Tensor | None) -> Tensor:
        """Content [N, G, D] of the proposals ``q`` [N, G, 4] from this model's own encoder memory (detached, as the
        model detaches its own): gathered at ``index`` [N, G], else sampled bilinearly at the box centres."""
        mem = taps["recorded"]["enc_memory"]  # enc_output(valid_mask * memory), [N, S, D]
        if index is not None:
            return mem.gather(1, index.unsqueeze(-1).expand(-1, -1, mem.shape[-1])).detach()
        return sample_memory(mem, self.memory_layout(taps["decoder_kwargs"]), q).detach()

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:
        # inputs_embeds (the content) is set by the adapter from query_content; no denoising mask for custom groups
        return {"reference_points": q, "encoder_attention_mask": None}

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return out.intermediate_logits.transpose(0, 1), out.intermediate_reference_points.transpose(0, 1)

    # ------------------------------------------------------------------ io
    def processor_kwargs(self, imgsz: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
        identity = all(m == 0 for m in mean) and all(s == 1 for s in std)
        return {"size": {"height": imgsz, "width": imgsz}, "do_normalize": not identity,
                "image_mean": list(mean), "image_std": list(std)}

    def min_input_side(self, model: nn.Module) -> int:
        """The smallest square side (a multiple of 32) whose encoder positions cover the ``num_queries`` top-k."""
        need = int(model.config.num_queries)
        return next((s for s in range(32, 4097, 32) if memory_positions(model.config, s, s) >= need), 1)

    def check_input_size(self, model: nn.Module, height: int, width: int) -> None:
        """The encoder's top-k needs at least ``num_queries`` memory positions (transformers fails otherwise)."""
        cfg = model.config
        need = int(cfg.num_queries)
        if memory_positions(cfg, height, width) < need:
            side = self.min_input_side(model)
            raise KdctlError(f"{type(model).__name__}: a {height}x{width} input gives "
                             f"{memory_positions(cfg, height, width)} encoder positions, fewer than its {need} queries; "
                             f"use --imgsz {side} or more (a model with fewer num_queries runs smaller)")

    def prepare(self, model: nn.Module) -> None:
        """Anchors from the actual feature sizes in eval mode too (a fixed ``anchor_image_size`` would tie the model
        to one input size)."""
        model.config.anchor_image_size = None


class RTDetrV2(RTDetr):
    model_cls = "RTDetrV2ForObjectDetection"
    config_cls = "RTDetrV2Config"
    model_type = "rt_detr_v2"


def sample_memory(mem: Tensor, layout: tuple[tuple[int, int], ...], q: Tensor) -> Tensor:
    """Bilinear sample of the flattened multi-level memory ``mem`` [N, S, D] at the centres of the pre-sigmoid boxes
    ``q`` [N, G, 4], on the level whose anchor size ``0.05 * 2^level`` is nearest (in log scale) the box's longer
    side. Returns [N, G, D]."""
    n, _, d = mem.shape
    box = q.float().sigmoid()
    grid = (box[..., :2] * 2 - 1).unsqueeze(2).to(mem.dtype)  # [N, G, 1, 2] in [-1, 1]
    size = box[..., 2:].amax(-1).clamp_min(1e-6)
    level = torch.round(torch.log2(size / ANCHOR_GRID)).clamp(0, len(layout) - 1).long()  # [N, G]
    samples, start = [], 0
    for h, w in layout:
        fmap = mem[:, start : start + h * w].transpose(1, 2).reshape(n, d, h, w)
        samples.append(F.grid_sample(fmap, grid, align_corners=False, padding_mode="border")[..., 0].transpose(1, 2))
        start += h * w
    stacked = torch.stack(samples, dim=2)  # [N, G, levels, D]
    return stacked.gather(2, level[..., None, None].expand(-1, -1, 1, d)).squeeze(2)


def memory_positions(cfg: Any, height: int, width: int) -> int:
    """Flattened encoder-memory length of an RT-DETR-family model at a ``height`` x ``width`` input: one map per
    feature level, at ``feat_strides`` (extra levels: each a stride-2 conv of the last)."""
    strides = list(cfg.feat_strides)
    while len(strides) < int(cfg.num_feature_levels):
        strides.append(strides[-1] * 2)
    return sum(-(-height // s) * -(-width // s) for s in strides[: int(cfg.num_feature_levels)])
