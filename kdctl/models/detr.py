"""transformers DETR-family adapter: DETR, Conditional DETR, DAB-DETR and Deformable DETR behind one Detector.

Supported classes (transformers 5.23): ``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection``,
``DabDetrForObjectDetection`` and ``DeformableDetrForObjectDetection`` (plain, ``with_box_refine`` and
``two_stage``). The adapter reuses transformers' own modules (decoder, class/box heads, losses); it copies none of
their code.

Input. ``pixel_values = (batch.images - mean) / std`` (ImageNet mean/std, or the checkpoint's image processor
values), zeroed on the padding like the HF processors do; ``pixel_mask = batch.pixel_mask()``. Training labels are
``{"class_labels": model label ids, "boxes": normalised cx, cy, w, h}`` relative to the UNPADDED image
``batch.sizes[i]``; predicted boxes are read relative to the unpadded image too (the sine position embeddings and
Deformable's valid ratios are computed from the pixel mask, so positions are relative to the valid region).

Taps (what :meth:`DetrDetector.forward_train` / :meth:`DetrDetector.forward_taps` return for KD), L = decoder
layers, N = images, Q = the model's queries, C' = classes as the model was trained (``logit_kind``):

* ``"logits"``: [L, N, Q, C'] class logits of every decoder layer, the last one being the model's final output
  (layers the model does not supervise, e.g. DETR without ``auxiliary_loss``, are read with the model's own
  decoder layer norm and heads);
* ``"boxes"``: [L, N, Q, 4] normalised cx, cy, w, h of every decoder layer (last = final);
* ``"queries"``: the queries the pass used, detached: the learned queries [Q, D] or, for two-stage Deformable
  DETR, the per-image encoder proposals [N, Q, 4] (the "specific distillation points");
* ``"reference_points"``: Deformable DETR ("embed2"): the [N, Q, 2] points its own ``reference_points`` head gave
  the queries, detached (pass them to :meth:`DetrDetector.decode_groups` to decode the queries at the same points
  with another model); None for the other models, whose queries are their points or have none;
* ``"memory"``: [N, S, d_model] encoder output (S = flattened feature positions, all levels for Deformable),
  ``"memory_mask"``: [N, S] True/1 on valid (not padded) positions;
* ``"decoder_kwargs"``: the keyword arguments the model passed to its decoder (encoder memory, masks, position
  embeddings, spatial shapes, valid ratios ...), recorded by a forward hook during the normal pass. :meth:`decode`
  calls the decoder again with the query arguments swapped, so backbone and encoder run once per step. Decode
  teacher taps under the same ``no_grad`` / ``inference_mode`` that produced them.

Queries (:attr:`DetrDetector.query_kind`, :attr:`DetrDetector.query_dim`):

* ``"embed"`` [Q, d_model]: DETR and Conditional DETR positional query embeddings (content starts at zero);
* ``"anchor4"`` [Q, 4]: DAB-DETR anchor boxes before sigmoid; two-stage Deformable DETR uses the same format
  for its image-dependent proposals (so DAB anchors and two-stage proposals are interchangeable);
* ``"embed2"`` [Q, 2 * d_model]: Deformable DETR (plain / box refine) ``[position | content]`` embeddings; the
  reference points come from the model's own ``reference_points`` head unless :meth:`DetrDetector.decode_groups`
  is given others (``reference_points``).

Parity (tests/test_detr_adapter.py): ``decode(taps, queries_used)`` reproduces the normal forward's final AND
auxiliary logits/boxes (max abs diff < 1e-5) for DETR (with and without ``auxiliary_loss``), Conditional DETR,
DAB-DETR and Deformable DETR plain, with box refine and two-stage. Measured: exactly 0 everywhere except
two-stage (~1e-7: its proposals are recovered as ``logit(sigmoid(x))`` from the recorded reference points). Not
supported for decoding: DAB-DETR with ``num_patterns > 0`` (loads and predicts, but :meth:`decode` raises).

Backbone weights: transformers 5.23 ignores ``use_pretrained_backbone`` (backbones are always built without
weights, so loading a checkpoint never downloads). For presets with ``pretrained_backbone=True`` the adapter
copies timm's ImageNet weights into the timm backbone itself (a Hugging Face Hub download unless cached).

Losses: ``_forward_train`` returns ``{"loss_ce", "loss_bbox", "loss_giou"}``, each the model's weighted term with
the auxiliary layers folded in, so that their sum equals the model's own ``outputs.loss`` ("loss_ce" is the
focal loss for the sigmoid models, as in transformers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.errors import BackboneWeightsUnavailable, KdctlError
from kdctl.models.base import Detector, TrainOutput

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.specs import Resolved

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")
# config keys that are not dataclass fields of the transformers configs but are accepted by their constructors
INIT_ONLY_KEYS = {"use_timm_backbone", "backbone", "backbone_kwargs", "use_pretrained_backbone"}


# =========================================================================== per-architecture glue
class _Ops:
    """Where one architecture keeps its queries, how new queries enter its decoder, how its heads read it."""

    model_cls: ClassVar[str]
    config_cls: ClassVar[str]
    processor_cls: ClassVar[str]
    model_type: ClassVar[str]
    logit_kind: ClassVar[str] = "sigmoid"
    # decoder kwargs with a leading batch dimension (repeated when query groups are folded into the batch)
    batch_keys: ClassVar[tuple[str, ...]] = ()

    def query_kind(self, model: nn.Module) -> str:
        return "embed"

    def query_dim(self, model: nn.Module) -> int:
        return int(self.learned_queries(model).shape[-1])

    def num_queries(self, model: nn.Module) -> int:
        return int(model.config.num_queries)

    def learned_queries(self, model: nn.Module) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def used_queries(self, model: nn.Module, kw: dict[str, Any]) -> Tensor:
        """The queries the recorded pass used: [Q, D] learned, or [N, Q, D] when image-dependent."""
        return self.learned_queries(model).detach()

    def used_reference_points(self, model: nn.Module, kw: dict[str, Any]) -> Tensor | None:
        """The reference points [N, Q, c] the recorded pass decoded its queries at, where a model's own head derives
        them from the query (Deformable "embed2"); None where the query itself is the point or there is none."""
        return None

    def query_parts(self, model: nn.Module) -> int:
        """How many independent embeddings one query concatenates (statistics for :meth:`sample_queries`)."""
        return 1

    def forward_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward needed to read every decoder layer."""
        return {}

    def check_decodable(self, model: nn.Module) -> None:
        return None

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:  # pragma: no cover
        """Decoder kwargs that replace the model's queries by ``q`` [N, G, D]."""
        raise NotImplementedError

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Decoder output -> (logits [L, N, G, C'], boxes [L, N, G, 4] normalised cxcywh)."""
        raise NotImplementedError


class _DetrOps(_Ops):
    model_cls = "DetrForObjectDetection"
    config_cls = "DetrConfig"
    processor_cls = "DetrImageProcessor"
    model_type = "detr"
    logit_kind = "softmax"
    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "spatial_position_embeddings")

    def learned_queries(self, model: nn.Module) -> Tensor:
        return model.model.query_position_embeddings.weight

    def forward_kwargs(self, model: nn.Module) -> dict[str, Any]:
        # without auxiliary_loss the decoder does not return its intermediate states: record the layer outputs
        return {} if model.config.auxiliary_loss else {"output_hidden_states": True}

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:
        return {"inputs_embeds": torch.zeros_like(q), "object_queries_position_embeddings": q, "attention_mask": None}

    def states(self, model: nn.Module, out: Any) -> Tensor:
        """[L, N, G, D] normalised decoder states, the last one being the decoder's final output."""
        if model.config.auxiliary_loss:
            inter = list(out.intermediate_hidden_states[:-1])
        else:  # hidden_states = (input, layer 1, ..., layer L-1, final)
            inter = [model.model.decoder.layernorm(h) for h in out.hidden_states[1:-1]]
        return torch.stack([*inter, out.last_hidden_state])

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        s = self.states(model, out)
        return model.class_labels_classifier(s), model.bbox_predictor(s).sigmoid()


class _ConditionalOps(_DetrOps):
    model_cls = "ConditionalDetrForObjectDetection"
    config_cls = "ConditionalDetrConfig"
    processor_cls = "ConditionalDetrImageProcessor"
    model_type = "conditional_detr"
    logit_kind = "sigmoid"

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid

        s = self.states(model, out)
        ref = inverse_sigmoid(out.reference_points).transpose(0, 1)  # [G, N, 2] -> [N, G, 2]
        delta = model.bbox_predictor(s)
        boxes = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1).sigmoid()
        return model.class_labels_classifier(s), boxes


class _DabOps(_Ops):
    model_cls = "DabDetrForObjectDetection"
    config_cls = "DabDetrConfig"
    processor_cls = "ConditionalDetrImageProcessor"  # sigmoid top-k post-processing, like DAB's own
    model_type = "dab-detr"
    batch_keys = ("encoder_hidden_states", "memory_key_padding_mask", "object_queries")

    def query_kind(self, model: nn.Module) -> str:
        return "anchor4"

    def learned_queries(self, model: nn.Module) -> Tensor:
        return model.model.query_refpoint_embeddings.weight

    def check_decodable(self, model: nn.Module) -> None:
        if model.config.num_patterns:
            raise KdctlError("DAB-DETR with num_patterns > 0 cannot decode custom queries (set num_patterns = 0)")

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:
        content = q.new_zeros((*q.shape[:2], model.config.hidden_size))
        return {"inputs_embeds": content, "query_position_embeddings": q, "return_dict": True}

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        from transformers.models.dab_detr.modeling_dab_detr import inverse_sigmoid

        s = out.intermediate_hidden_states  # [L, N, G, D]
        boxes = (model.bbox_predictor(s) + inverse_sigmoid(out.reference_points)).sigmoid()
        return model.class_embed(s), boxes


class _DeformableOps(_Ops):
    model_cls = "DeformableDetrForObjectDetection"
    config_cls = "DeformableDetrConfig"
    processor_cls = "DeformableDetrImageProcessor"
    model_type = "deformable_detr"
    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "valid_ratios")

    def query_kind(self, model: nn.Module) -> str:
        return "anchor4" if model.config.two_stage else "embed2"

    def query_dim(self, model: nn.Module) -> int:
        return 4 if model.config.two_stage else 2 * model.config.d_model

    def num_queries(self, model: nn.Module) -> int:
        cfg = model.config
        return int(cfg.two_stage_num_proposals if cfg.two_stage else cfg.num_queries)

    def query_parts(self, model: nn.Module) -> int:
        return 2

    def learned_queries(self, model: nn.Module) -> Tensor:
        if model.config.two_stage:
            raise KdctlError(
                "two-stage Deformable DETR has no learned queries (they are the encoder's top-k proposals per image); "
                "use taps['queries']"
            )
        return model.model.query_position_embeddings.weight

    def used_queries(self, model: nn.Module, kw: dict[str, Any]) -> Tensor:
        if model.config.two_stage:  # the proposals (pre-sigmoid boxes) the model selected, [N, Q, 4]
            return torch.logit(kw["reference_points"]).detach()
        return super().used_queries(model, kw)

    def used_reference_points(self, model: nn.Module, kw: dict[str, Any]) -> Tensor | None:
        return None if model.config.two_stage else kw["reference_points"].detach()  # [N, Q, 2] from its own head

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:
        inner, d = model.model, model.config.d_model
        if model.config.two_stage:
            pos = inner.pos_trans_norm(inner.pos_trans(inner.get_proposal_pos_embed(q)))
            position, content = pos.split(d, dim=-1)
            ref = q.sigmoid()
        else:
            position, content = q.split(d, dim=-1)
            ref = inner.reference_points(position).sigmoid()
        return {"inputs_embeds": content, "object_queries_position_embeddings": position, "reference_points": ref}

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

        hs, refs = out.intermediate_hidden_states, out.intermediate_reference_points  # [N, L, G, D], [N, L, G, c]
        logits, boxes = [], []
        for level in range(hs.shape[1]):
            ref = inverse_sigmoid(kw["reference_points"] if level == 0 else refs[:, level - 1])
            delta = model.bbox_embed[level](hs[:, level])
            if ref.shape[-1] == 4:
                coord = delta + ref
            else:
                coord = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
            logits.append(model.class_embed[level](hs[:, level]))
            boxes.append(coord.sigmoid())
        return torch.stack(logits), torch.stack(boxes)


_OPS: tuple[_Ops, ...] = (_DetrOps(), _ConditionalOps(), _DabOps(), _DeformableOps())
OPS_BY_CLASS: dict[str, _Ops] = {o.model_cls: o for o in _OPS}
OPS_BY_MODEL_TYPE: dict[str, _Ops] = {o.model_type: o for o in _OPS}


def _ops_for(model: nn.Module) -> _Ops:
    name = type(model).__name__
    if name not in OPS_BY_CLASS:
        raise KdctlError(f"{name} is not a supported DETR class; supported: {', '.join(OPS_BY_CLASS)}")
    return OPS_BY_CLASS[name]


# =========================================================================== the Detector
class DetrDetector(Detector):
    """A transformers DETR-family detector (see the module docstring for taps, queries and parity)."""

    family: ClassVar[str] = "detr"

    def __init__(
        self,
        model: nn.Module,
        label_names: list[str],
        architecture: str,
        imgsz: int = 640,
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__(model, label_names, architecture, imgsz)
        self.ops = _ops_for(model)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)

    # ------------------------------------------------------------------ query format
    @property
    def query_kind(self) -> str:
        """"embed" [Q, d_model] (DETR, Conditional), "anchor4" [Q, 4] pre-sigmoid boxes (DAB, two-stage
        Deformable), "embed2" [Q, 2 d_model] (Deformable)."""
        return self.ops.query_kind(self.model)

    @property
    def query_dim(self) -> int:
        return self.ops.query_dim(self.model)

    @property
    def queries_image_dependent(self) -> bool:
        """True when the model picks its queries per image (two-stage): use ``taps["queries"]``."""
        return bool(getattr(self.model.config, "two_stage", False))

    @property
    def logit_kind(self) -> str:
        """"softmax" (DETR: C' = num_labels + 1, no-object last) or "sigmoid" (C' = num_labels)."""
        return self.ops.logit_kind

    @property
    def num_queries(self) -> int:
        return self.ops.num_queries(self.model)

    @property
    def num_decoder_layers(self) -> int:
        return int(self.model.config.decoder_layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    def learned_queries(self) -> Tensor:
        """The model's own query parameters [Q, D] (feeding them to :meth:`decode` reproduces the forward)."""
        return self.ops.learned_queries(self.model)

    def sample_queries(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        distribution: str = "normal",
        device: torch.device | str | None = None,
    ) -> Tensor:
        """[n, D] random "general distillation points" in this model's query format.

        anchor4: "normal" draws pre-sigmoid anchors from N(0, 1) (the KD-DETR reference code); "uniform" draws
        boxes uniformly in [0, 1] after sigmoid (the paper) and returns their logits. embed / embed2: each part
        ([position] or [position | content]) is drawn with the mean and standard deviation of the model's own
        learned queries ("normal": Gaussian, "uniform": uniform with the same mean and variance).
        """
        if distribution not in ("normal", "uniform"):
            raise KdctlError(f"unknown query distribution {distribution!r}; use 'normal' or 'uniform'")
        draw_on = generator.device if generator is not None else torch.device(device or "cpu")
        shape = (int(n), self.query_dim)
        if distribution == "normal":
            z = torch.randn(shape, generator=generator, device=draw_on)
        else:
            z = torch.rand(shape, generator=generator, device=draw_on)
        if self.query_kind == "anchor4":
            out = z if distribution == "normal" else torch.logit(z.clamp(1e-4, 1 - 1e-4))
        else:
            if distribution == "uniform":
                z = (z - 0.5) * math.sqrt(12.0)  # zero mean, unit variance
            mean, std = self._query_stats()
            out = z * std.to(draw_on) + mean.to(draw_on)
        return out.to(device or draw_on)

    @torch.no_grad()
    def _query_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and std [D] of the learned queries: one value per concatenated part, repeated over its dims."""
        q = self.learned_queries().detach().float()
        parts = self.ops.query_parts(self.model)
        chunks = q.chunk(parts, dim=-1)
        mean = torch.cat([c.mean().expand(c.shape[-1]) for c in chunks])
        std = torch.cat([c.std().clamp_min(1e-6).expand(c.shape[-1]) for c in chunks])
        return mean, std  # on the model's device: no host sync

    # ------------------------------------------------------------------ batch -> model
    def pixel_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(pixel_values [N, 3, H, W] normalised and zero on padding, pixel_mask [N, H, W] int64)."""
        images = batch.images
        mean = torch.tensor(self.image_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        mask = batch.pixel_mask()
        return (images - mean) / std * mask[:, None].to(images.dtype), mask

    def hf_labels(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per image ``{"class_labels" [K], "boxes" [K, 4] cxcywh normalised by the unpadded size}``."""
        if len(batch.targets) != len(batch):
            raise KdctlError("a training batch needs one target dict per image")
        out = []
        for (h, w), t in zip(batch.sizes, batch.targets, strict=True):
            boxes = t["boxes"].to(batch.device, torch.float32).reshape(-1, 4)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=batch.device)
            x0, y0, x1, y1 = (boxes / scale).clamp(0, 1).unbind(-1)
            cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
            labels = self.model_labels(t["labels"].to(batch.device, torch.long).reshape(-1))
            out.append({"class_labels": labels, "boxes": cxcywh})
        return out

    # ------------------------------------------------------------------ forward passes
    @contextmanager
    def _record_decoder(self) -> Iterator[dict[str, Any]]:
        """Record the decoder's keyword arguments and output during one normal forward."""
        rec: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            rec["kwargs"], rec["output"] = dict(kwargs), output

        handle = self.model.model.decoder.register_forward_hook(hook, with_kwargs=True)
        try:
            yield rec
        finally:
            handle.remove()

    def _run(self, batch: Batch, labels: list[dict[str, Tensor]] | None) -> tuple[Any, dict[str, Any]]:
        """One model forward -> (model outputs, taps)."""
        pixel_values, pixel_mask = self.pixel_inputs(batch)
        with self._record_decoder() as rec:
            out = self.model(
                pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels, **self.ops.forward_kwargs(self.model)
            )
        if "kwargs" not in rec:  # pragma: no cover - would mean transformers changed its call structure
            raise KdctlError(f"{type(self.model).__name__}: the decoder was not called with keyword arguments")
        kw = rec["kwargs"]
        logits, boxes = self.ops.heads(self.model, rec["output"], kw)
        mask_key = "memory_key_padding_mask" if "memory_key_padding_mask" in kw else "encoder_attention_mask"
        taps = {
            "logits": logits,
            "boxes": boxes,
            "queries": self.ops.used_queries(self.model, kw),
            "reference_points": self.ops.used_reference_points(self.model, kw),
            "memory": kw["encoder_hidden_states"],
            "memory_mask": kw[mask_key],
            "decoder_kwargs": kw,
        }
        return out, taps

    def _forward_train(self, batch: Batch) -> TrainOutput:
        out, taps = self._run(batch, self.hf_labels(batch))
        return TrainOutput(losses=self._weighted_losses(out.loss_dict), taps=taps)

    def forward_taps(self, batch: Batch) -> dict[str, Any]:
        return self._run(batch, None)[1]

    def _weighted_losses(self, loss_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's weighted loss terms, auxiliary layers folded in (their sum is the model's ``loss``)."""
        cfg = self.model.config
        weights = {"loss_ce": 1.0, "loss_bbox": cfg.bbox_loss_coefficient, "loss_giou": cfg.giou_loss_coefficient}
        aux = {str(i) for i in range(cfg.decoder_layers - 1)} if cfg.auxiliary_loss else set()
        losses: dict[str, Tensor] = {}
        for key, value in loss_dict.items():
            base, _, suffix = key.rpartition("_")
            if key in weights:
                base = key
            elif not (base in weights and suffix in aux):
                continue  # cardinality_error and the like: logged by transformers, not optimised
            term = value * weights[base]
            losses[base] = losses[base] + term if base in losses else term
        return losses

    # ------------------------------------------------------------------ custom queries
    def decode(self, taps: dict[str, Any], queries: Tensor) -> dict[str, Tensor]:
        """Decode G queries over the recorded encoder memory, in their own decoder pass.

        queries: [G, D] shared by the batch or [N, G, D] per image, in :attr:`query_kind` format.
        Returns ``{"logits": [L, N, G, C'], "boxes": [L, N, G, 4]}`` (every decoder layer, last = final).
        Gradients flow through this model's decoder, heads and (for a training pass) its encoder.
        """
        return self.decode_groups(taps, [queries])[0]

    def decode_groups(
        self, taps: dict[str, Any], groups: list[Tensor], reference_points: list[Tensor | None] | None = None
    ) -> list[dict[str, Tensor]]:
        """:meth:`decode` several query groups at once; groups never attend to each other.

        Groups of equal size are folded into the batch dimension (one decoder call); others run one by one.
        reference_points (Deformable "embed2" only): per group None (the model's own ``reference_points`` head on
        the query's position part) or the [G, 2] / [N, G, 2] normalised points to decode the group at, e.g. another
        model's ``taps["reference_points"]`` for its own queries (KD-DETR's specific points).
        """
        self.ops.check_decodable(self.model)
        kw = taps["decoder_kwargs"]
        n = kw["encoder_hidden_states"].shape[0]
        qs = [self._batched_queries(q, n, kw["encoder_hidden_states"]) for q in groups]
        refs = self._batched_reference_points(reference_points, qs)
        if len(qs) > 1 and len({q.shape[1] for q in qs}) == 1:
            k = len(qs)
            folded = {key: self._repeat(key, v, k) for key, v in kw.items()}
            logits, boxes = self._decode_once(folded, torch.cat(qs, dim=0), refs)
            return [{"logits": logits[:, i * n : (i + 1) * n], "boxes": boxes[:, i * n : (i + 1) * n]} for i in range(k)]
        outs = [self._decode_once(kw, q, [r]) for q, r in zip(qs, refs, strict=True)]
        return [{"logits": lg, "boxes": bx} for lg, bx in outs]

    def _batched_reference_points(self, refs: list[Tensor | None] | None, qs: list[Tensor]) -> list[Tensor | None]:
        """Per group None or [G, c] / [N, G, c] points -> None or [N, G, c] in the queries' device and dtype."""
        if refs is None or all(r is None for r in refs):
            return [None] * len(qs)
        if len(refs) != len(qs) or self.query_kind != "embed2":
            raise KdctlError(f"reference points can be given for the embed2 queries of Deformable DETR only, one entry "
                             f"per group; got {len(refs)} for {len(qs)} groups of a {self.architecture} "
                             f"({self.query_kind} queries)")
        out: list[Tensor | None] = []
        for r, q in zip(refs, qs, strict=True):
            if r is not None:
                r = r.to(device=q.device, dtype=q.dtype)
                r = r.unsqueeze(0).expand(q.shape[0], -1, -1) if r.dim() == 2 else r
                if r.shape[:2] != q.shape[:2] or r.shape[-1] != 2:
                    raise KdctlError(f"reference points of shape {tuple(r.shape)} do not fit queries of shape "
                                     f"{tuple(q.shape)} (expected [{q.shape[0]}, {q.shape[1]}, 2])")
            out.append(r)
        return out

    def _batched_queries(self, q: Tensor, n: int, like: Tensor) -> Tensor:
        """[G, D] or [N, G, D] -> [N, G, D] on the memory's device and dtype."""
        if q.shape[-1] != self.query_dim or q.dim() not in (2, 3) or (q.dim() == 3 and q.shape[0] != n):
            raise KdctlError(
                f"queries of shape {tuple(q.shape)} do not fit this {self.architecture} ({self.query_kind} queries "
                f"of dim {self.query_dim}, batch {n}): teacher and student query formats differ"
            )
        q = q.to(device=like.device, dtype=like.dtype)
        return q.unsqueeze(0).expand(n, -1, -1) if q.dim() == 2 else q

    def _repeat(self, key: str, value: Any, k: int) -> Any:
        if key in self.ops.batch_keys and isinstance(value, Tensor):
            return value.repeat(k, *([1] * (value.dim() - 1)))
        return value

    def _decode_once(self, kw: dict[str, Any], q: Tensor, refs: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        """q: the groups [k * N, G, D] folded into the batch; refs: per group None (own points) or [N, G, 2]."""
        call = {**kw, **self.ops.query_kwargs(self.model, kw, q)}
        if any(r is not None for r in refs):
            own = call["reference_points"].chunk(len(refs))
            call["reference_points"] = torch.cat([o if r is None else r for o, r in zip(own, refs, strict=True)])
        out = self.model.model.decoder(**call)
        return self.ops.heads(self.model, out, call)

    # ------------------------------------------------------------------ inference
    def _predict_raw(self, batch: Batch, score_threshold: float, max_detections: int) -> list[dict[str, Tensor]]:
        pixel_values, pixel_mask = self.pixel_inputs(batch)
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        dets = []
        for logits, boxes, (h, w) in zip(out.logits, out.pred_boxes, batch.sizes, strict=True):
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            xyxy = cxcywh_to_xyxy(boxes) * scale
            if self.logit_kind == "softmax":
                det = _softmax_detections(logits, xyxy, score_threshold, max_detections)
            else:
                det = _sigmoid_detections(logits, xyxy, score_threshold, max_detections)
            dets.append(det)
        return dets

    # ------------------------------------------------------------------ save
    def save(self, directory: str | Path) -> Path:
        """save_pretrained (safetensors) plus the matching image processor config, loadable offline by
        ``pipeline("object-detection", model=directory)`` and by :func:`kdctl.specs.load_detector`."""
        import transformers

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.model.config
        cfg.use_pretrained_backbone = False
        cfg.id2label = dict(enumerate(self.label_names))
        cfg.label2id = {name: i for i, name in enumerate(self.label_names)}
        with _quiet_transformers():
            self.model.save_pretrained(directory, safe_serialization=True)
            processor = getattr(transformers, self.ops.processor_cls)(
                size={"max_height": self.imgsz, "max_width": self.imgsz},
                image_mean=list(self.image_mean),
                image_std=list(self.image_std),
            )
            processor.save_pretrained(directory)
        return directory

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(
            query_kind=self.query_kind, query_dim=self.query_dim, logit_kind=self.logit_kind,
            num_queries=self.num_queries, decoder_layers=self.num_decoder_layers, hidden_size=self.hidden_size,
        )
        return out


# =========================================================================== post-processing helpers
def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _softmax_detections(logits: Tensor, xyxy: Tensor, threshold: float, k: int) -> dict[str, Tensor]:
    """DETR: one detection per query, best class of softmax without the no-object class (last)."""
    scores, labels = logits.softmax(-1)[:, :-1].max(-1)
    keep = scores > threshold
    scores, labels, xyxy = scores[keep], labels[keep], xyxy[keep]
    order = scores.argsort(descending=True)[:k]
    return {"boxes": xyxy[order], "scores": scores[order], "labels": labels[order]}


def _sigmoid_detections(logits: Tensor, xyxy: Tensor, threshold: float, k: int) -> dict[str, Tensor]:
    """Sigmoid DETRs: top-k over queries x classes (a query may give several classes)."""
    num_classes = logits.shape[-1]
    prob = logits.sigmoid().flatten()
    scores, index = prob.topk(min(k, prob.numel()))
    keep = scores > threshold
    scores, index = scores[keep], index[keep]
    return {"boxes": xyxy[index // num_classes], "scores": scores, "labels": index % num_classes}


# =========================================================================== loading
@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings (kdctl prints its own one-line errors)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load(
    r: Resolved,
    *,
    label_names: list[str] | None = None,
    pretrained_backbone: bool = True,
    trust_remote_code: bool = False,
    overrides: dict[str, Any] | None = None,
) -> DetrDetector:
    """Build a :class:`DetrDetector` from a resolved spec ("hf_dir", "kdctl_dir" with a config.json, "preset")."""
    if r.kind in ("hf_dir", "kdctl_dir"):
        det = _load_checkpoint(r, trust_remote_code=trust_remote_code, overrides=overrides or {})
    elif r.kind == "preset":
        det = _build_preset(r, label_names=label_names, pretrained_backbone=pretrained_backbone,
                            overrides=overrides or {})
    else:
        raise KdctlError(f"{r.spec}: the DETR adapter cannot load a {r.kind!r} spec")
    det.eval()
    return det


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:limit]}" if text else e.__class__.__name__


def _check_config_keys(config_cls: type, keys: list[str], where: str) -> None:
    """Unknown keys would be silently stored by transformers configs: refuse them instead."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)} | INIT_ONLY_KEYS | set(config_cls.attribute_map)
    unknown = sorted(k for k in keys if k not in known)
    if unknown:
        raise KdctlError(f"{where}: unknown {config_cls.__name__} key(s) {', '.join(unknown)}")


def _load_checkpoint(r: Resolved, *, trust_remote_code: bool, overrides: dict[str, Any]) -> DetrDetector:
    import transformers

    path = Path(r.path or "")
    cfg = r.config if r.kind == "hf_dir" else _read_json(path / "config.json")
    ops = OPS_BY_MODEL_TYPE.get(str(cfg.get("model_type")))
    if ops is None:
        raise KdctlError(
            f"{path}: model_type {cfg.get('model_type')!r} is not a supported DETR; supported: "
            f"{', '.join(OPS_BY_MODEL_TYPE)}"
        )
    _require_weights(path)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    config_cls, model_cls = getattr(transformers, ops.config_cls), getattr(transformers, ops.model_cls)
    with _quiet_transformers():
        try:
            config = config_cls.from_pretrained(path, **extra)
        except Exception as e:
            raise KdctlError(f"{path / 'config.json'}: invalid {ops.config_cls} ({_first_line(e)})") from e
        _apply_overrides(config, overrides, f"{path}")
        config.use_pretrained_backbone = False  # the checkpoint carries the backbone weights
        try:
            model, info = model_cls.from_pretrained(path, config=config, output_loading_info=True, **extra)
        except Exception as e:
            raise KdctlError(f"{path}: corrupt or unreadable weights ({_first_line(e)})") from e
    _check_loading_info(info, path)
    if getattr(config, TRAINABLE_NORM_KEY, None) == "batchnorm":  # a from-scratch backbone keeps training its norms
        train_backbone_norms(model)
    restore_backbone_activations(model)
    proc = _read_processor(path)
    imgsz = r.imgsz or _imgsz_from_processor(proc) or 640
    det = DetrDetector(
        model, _labels_from_config(config, path), ops.model_cls, imgsz=imgsz,
        image_mean=tuple(proc.get("image_mean") or IMAGENET_MEAN), image_std=tuple(proc.get("image_std") or IMAGENET_STD),
    )
    return det


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise KdctlError(f"{path}: not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdctlError(f"{path}: corrupt JSON ({e})") from e
    if not isinstance(data, dict):
        raise KdctlError(f"{path}: expected a JSON object")
    return data


def _require_weights(path: Path) -> None:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / n).is_file() for n in names):
        raise KdctlError(f"{path}: no weights file (model.safetensors) next to config.json")


def _check_loading_info(info: dict[str, Any], path: Path) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("num_batches_tracked")]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise KdctlError(
            f"{path}: weights do not match the config (missing {len(missing)}: {sorted(missing)[:3]}, "
            f"mismatched {len(mismatched)}: {[m[0] if isinstance(m, tuple) else m for m in mismatched[:3]]})"
        )


def _apply_overrides(config: Any, overrides: dict[str, Any], where: str) -> None:
    if not overrides:
        return
    _check_config_keys(type(config), list(overrides), where)
    for key, value in overrides.items():
        setattr(config, key, value)


def _labels_from_config(config: Any, where: Path | str) -> list[str]:
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    try:
        return [id2label[i] for i in range(len(id2label))]
    except KeyError as e:
        raise KdctlError(f"{where}: id2label ids are not 0..{len(id2label) - 1} (missing {e})") from e


def _read_processor(path: Path) -> dict[str, Any]:
    p = path / "preprocessor_config.json"
    return _read_json(p) if p.is_file() else {}


def _imgsz_from_processor(proc: dict[str, Any]) -> int | None:
    """kdctl imgsz (longest side) from an image processor ``size``: max_height/width, else shortest_edge."""
    size = proc.get("size") or {}
    if not isinstance(size, dict):
        return None
    if size.get("max_height") and size.get("max_width"):
        return int(max(size["max_height"], size["max_width"]))
    return int(size["shortest_edge"]) if size.get("shortest_edge") else None


def _build_preset(
    r: Resolved, *, label_names: list[str] | None, pretrained_backbone: bool, overrides: dict[str, Any]
) -> DetrDetector:
    import transformers

    ops = OPS_BY_CLASS.get(r.architecture)
    if ops is None:
        raise KdctlError(f"preset {r.spec!r}: architecture must be one of {', '.join(OPS_BY_CLASS)}, got {r.architecture!r}")
    if not label_names:
        raise KdctlError(
            f"preset {r.spec!r} builds a new model and needs the class names of the dataset or the teacher "
            "(pass --data or --teacher)"
        )
    config_cls, model_cls = getattr(transformers, ops.config_cls), getattr(transformers, ops.model_cls)
    kwargs = {**r.config, **overrides}
    weights_file = kwargs.pop("backbone_weights", None)  # a local ImageNet state dict (timm or torchvision names)
    _check_config_keys(config_cls, list(kwargs), f"preset {r.spec!r}")
    if ops.model_type == "deformable_detr" and int(kwargs.get("decoder_layers", 6)) < 2:
        raise KdctlError(f"preset {r.spec!r}: Deformable DETR needs decoder_layers >= 2 (transformers ties its heads)")
    kwargs.pop("use_pretrained_backbone", None)  # ImageNet weights are loaded below, on request
    kwargs["id2label"] = dict(enumerate(label_names))
    kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    with _quiet_transformers():
        try:
            config = config_cls(**kwargs)
            model = model_cls(config)
        except Exception as e:
            raise KdctlError(f"preset {r.spec!r}: cannot build {ops.model_cls} ({_first_line(e)})") from e
    init_queries(model)
    if weights_file:
        load_backbone_file(model, Path(str(weights_file)).expanduser(), f"preset {r.spec!r}")
    elif pretrained_backbone:
        load_imagenet_backbone(model)
    elif train_backbone_norms(model):
        setattr(config, TRAINABLE_NORM_KEY, "batchnorm")
    restore_backbone_activations(model)
    config.use_pretrained_backbone = False
    return DetrDetector(model, list(label_names), ops.model_cls, imgsz=int(r.imgsz or 640))


def backbone_module(model: nn.Module) -> nn.Module:
    """The timm / HF backbone network inside a DETR-family model."""
    encoder = model.model.backbone
    encoder = getattr(encoder, "conv_encoder", encoder)  # DAB-DETR wraps it once more
    net = encoder.model
    return getattr(net, "_backbone", net)  # the timm network inside transformers' TimmBackbone (DAB keeps it)


TRAINABLE_NORM_KEY = "kdctl_backbone_norm"
"""Config attribute kdctl sets to "batchnorm" on a DETR whose backbone was built without ImageNet weights."""


def train_backbone_norms(model: nn.Module) -> int:
    """Swap the backbone's frozen BatchNorm layers for trainable ``nn.BatchNorm2d`` ones; returns how many.

    transformers freezes every backbone BatchNorm (statistics AND affine parameters), which is right for ImageNet
    weights but leaves a backbone trained from scratch with no normalisation at all (it then barely learns).
    ``nn.BatchNorm2d`` keeps the state-dict names (weight, bias, running_mean, running_var), and in eval mode it
    computes exactly what the frozen layer computes with the same values, so a checkpoint still loads in plain
    transformers (as frozen layers holding the learned statistics) and predicts the same.
    """
    count = 0
    for parent in list(model.model.backbone.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("FrozenBatchNorm2d"):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=1e-5).to(child.weight.device)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, key).copy_(getattr(child, key))
                setattr(parent, name, bn)
                count += 1
    return count


@torch.no_grad()
def init_queries(model: nn.Module) -> None:
    """Initialise a freshly built model's learned queries as the official implementations do.

    The official DETR, Conditional DETR, DAB-DETR and Deformable DETR code keep ``nn.Embedding``'s default
    N(0, 1) initialisation for their query embeddings (DAB-DETR: anchors ``sigmoid(N(0, 1))``; with
    ``random_refpoints_xy`` the centres uniform in [0, 1]). transformers' ``_init_weights`` redraws every embedding
    with std ``init_std`` = 0.02, which puts all DAB-DETR anchors at about (0.5, 0.5, 0.5, 0.5): identical queries
    make identical predictions, and a DAB-DETR trained from that start collapses (every query predicts the same
    box). Only models built from presets are re-initialised; checkpoints keep their weights.
    """
    inner = model.model
    for name in ("query_position_embeddings", "query_refpoint_embeddings"):
        emb = getattr(inner, name, None)
        if isinstance(emb, nn.Embedding):
            emb.weight.normal_()
    refs = getattr(inner, "query_refpoint_embeddings", None)
    if isinstance(refs, nn.Embedding) and getattr(model.config, "random_refpoints_xy", False):
        xy = refs.weight[:, :2].uniform_(0, 1).clamp(1e-5, 1 - 1e-5)
        refs.weight[:, :2] = torch.log(xy / (1 - xy))


class _ActivationHook:
    """Forward hook applying ``act`` to a module's output (the activation of a timm ``BatchNormAct2d``)."""

    def __init__(self, act: nn.Module) -> None:
        self.act = act

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return self.act(output)


def restore_backbone_activations(model: nn.Module) -> int:
    """Give back the activations transformers drops from timm backbones; returns how many were restored.

    transformers replaces every BatchNorm of a DETR's timm backbone with its frozen BatchNorm. timm's EfficientNet
    family (MobileNet-V2/V3, EfficientNet, ...) uses ``BatchNormAct2d``, a BatchNorm that also applies the block's
    activation, so after the swap those backbones have no non-linearity left (ResNets, with separate activation
    modules, are unaffected). kdctl re-attaches each lost activation as a forward hook on the replacement norm:
    the state dict is unchanged, and the backbone computes what timm's network computes. Plain transformers
    loading a kdctl checkpoint computes the network without them; ``kdctl export`` therefore writes such models
    with ``freeze_batch_norm_2d`` (:func:`stock_transformers_model`), whose ``FrozenBatchNormAct2d`` norms keep
    their activation and get no hook here.
    """
    bcfg = getattr(model.config, "backbone_config", None)
    if getattr(bcfg, "model_type", None) != "timm_backbone":
        return 0
    import timm
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    net = backbone_module(model)
    with torch.device("meta"):  # the reference layout only: no weights allocated, nothing downloaded
        ref = timm.create_model(bcfg.backbone, pretrained=False, features_only=bcfg.features_only,
                                in_chans=bcfg.num_channels, out_indices=bcfg.out_indices,
                                output_stride=bcfg.output_stride)
    count = 0
    for name, module in ref.named_modules():
        if not isinstance(module, BatchNormAct2d) or isinstance(module.act, nn.Identity):
            continue
        target = net.get_submodule(name)
        if isinstance(target, (BatchNormAct2d, FrozenBatchNormAct2d)) or getattr(target, "_kdctl_activation", 0):
            continue  # the norm applies the activation itself (FrozenBatchNormAct2d: an export, freeze_batch_norm_2d)
        if any(True for _ in module.act.parameters()):
            raise KdctlError(f"timm backbone {bcfg.backbone!r}: activation {type(module.act).__name__} with "
                             "parameters in a BatchNormAct2d is not supported")
        act = module.act
        if hasattr(act, "inplace"):
            act.inplace = False
        target.register_forward_hook(_ActivationHook(act))
        target._kdctl_activation = True
        count += 1
    return count



def has_restored_activations(model: nn.Module) -> bool:
    """Whether :func:`restore_backbone_activations` hooked activations into this model's backbone (which plain
    transformers, building the model from its config, would then lack)."""
    bcfg = getattr(model.config, "backbone_config", None)
    if getattr(bcfg, "model_type", None) != "timm_backbone":
        return False
    return any(getattr(m, "_kdctl_activation", False) for m in backbone_module(model).modules())


def stock_transformers_model(model: nn.Module) -> nn.Module:
    """The model as plain transformers must build it to compute what kdctl computes (for export).

    A timm backbone with restored activations (:func:`restore_backbone_activations`) is rebuilt with the timm
    backbone config option ``freeze_batch_norm_2d = True``: ``TimmBackbone`` then turns each ``BatchNormAct2d``
    into timm's ``FrozenBatchNormAct2d``, which keeps the activation and which the DETR classes do not replace
    (they only swap ``nn.BatchNorm2d``). The weights are copied (``num_batches_tracked`` counters dropped: frozen
    norms have none); the rebuilt model is in eval mode on the CPU in float32. Any other model is returned as is.
    """
    if not has_restored_activations(model):
        return model
    import copy

    config = copy.deepcopy(model.config)
    config.backbone_config.freeze_batch_norm_2d = True
    config.use_pretrained_backbone = False
    with _quiet_transformers():
        stock = type(model)(config)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KdctlError(f"cannot rebuild the {type(model).__name__} for transformers with frozen timm norms "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return stock.float().cpu().eval()


def load_backbone_file(model: nn.Module, path: Path, where: str) -> None:
    """ImageNet weights from a local file into the model's timm backbone.

    The file holds either timm's names or those of the matching torchvision classifier (e.g. torchvision's
    ``mobilenet_v2-b0353104.pth`` for timm's ``mobilenetv2_100``, the same network): torchvision names are matched
    to timm's in definition order, tensor by tensor, and every shape must agree (a classifier's head, absent from a
    features-only backbone, is ignored). Read with safetensors or ``torch.load(weights_only=True)``.
    """
    from kdctl.models.weights import read_state_file

    state = read_state_file(path)
    target = backbone_module(model)
    own = {k: v for k, v in target.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not set(own) <= set(state):  # not timm names: map torchvision's, in order
        ordered = [(k, v) for k, v in state.items() if k.startswith("features.") and
                   not k.endswith("num_batches_tracked") and isinstance(v, torch.Tensor)]
        pairs = list(zip(own.items(), ordered, strict=False))
        bad = [(a, b) for (a, va), (b, vb) in pairs if va.shape != vb.shape]
        if len(ordered) < len(own) or bad:
            raise KdctlError(f"{where}: {path} does not fit the {model.config.backbone_config.backbone!r} backbone "
                             f"({len(ordered)} feature tensors for {len(own)}; first mismatch {bad[:1]})")
        state = {a: vb for (a, _), (_, vb) in pairs}
    missing, _ = target.load_state_dict({k: state[k] for k in own}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise KdctlError(f"{where}: {path} lacks backbone weights {missing[:3]}")


def load_imagenet_backbone(model: nn.Module) -> None:
    """Copy timm's ImageNet weights into the model's timm backbone (a download unless cached)."""
    import timm

    bcfg = model.config.backbone_config
    if getattr(bcfg, "model_type", None) != "timm_backbone":
        raise KdctlError(
            "ImageNet backbone weights are only available for timm backbones (use_timm_backbone = true); "
            "pass --no-pretrained-backbone"
        )
    try:
        source = timm.create_model(
            bcfg.backbone, pretrained=True, features_only=bcfg.features_only, in_chans=bcfg.num_channels,
            out_indices=bcfg.out_indices, output_stride=bcfg.output_stride,
        )
    except Exception as e:
        raise BackboneWeightsUnavailable(
            f"the ImageNet backbone weights for {bcfg.backbone!r} could not be fetched ({_first_line(e, 120)}); "
            "pass --no-pretrained-backbone to start from random weights"
        ) from e
    target = backbone_module(model)
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KdctlError(
            f"timm {bcfg.backbone!r} weights do not fit the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
