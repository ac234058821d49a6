"""The DETR-family :class:`DetrDetector`: one Detector over any registered :mod:`~kdctl.models.detr.variants`.

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

* ``"embed"`` [Q, d_model]: DETR, Table Transformer and Conditional DETR positional query embeddings (content
  starts at zero);
* ``"anchor4"`` [Q, 4]: DAB-DETR anchor boxes before sigmoid; two-stage Deformable DETR uses the same format
  for its image-dependent proposals (so DAB anchors and two-stage proposals are interchangeable);
* ``"embed2"`` [Q, 2 * d_model]: Deformable DETR (plain / box refine) ``[position | content]`` embeddings; the
  reference points come from the model's own ``reference_points`` head unless :meth:`DetrDetector.decode_groups`
  is given others (``reference_points``).

Parity (tests/test_detr_adapter.py): ``decode(taps, queries_used)`` reproduces the normal forward's final AND
auxiliary logits/boxes (max abs diff < 1e-5) for DETR (with and without ``auxiliary_loss``), Table Transformer,
Conditional DETR, DAB-DETR and Deformable DETR plain, with box refine and two-stage. Measured: exactly 0
everywhere except two-stage (~1e-7: its proposals are recovered as ``logit(sigmoid(x))`` from the recorded
reference points). Not supported for decoding: DAB-DETR with ``num_patterns > 0`` (loads and predicts, but
:meth:`decode` raises).

Losses: ``_forward_train`` returns the variant's weighted loss terms (``{"loss_ce", "loss_bbox", "loss_giou"}``
for every variant today), each with the auxiliary layers folded in, so that their sum equals the model's own
``outputs.loss`` ("loss_ce" is the focal loss for the sigmoid models, as in transformers). A term the variant does
not know is an error, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.boxes import cxcywh_to_xyxy
from kdctl.data.batch import Batch
from kdctl.errors import KdctlError
from kdctl.models.base import Detector, TrainOutput
from kdctl.models.detr.variants import DetrVariant, normalize_pixels, quiet_transformers, variant_for


class DetrDetector(Detector):
    """A transformers DETR-family detector (see the module docstring for taps, queries and parity).

    Implements :class:`kdctl.distill.kd_detr.KDDetrModel`, what KD-DETR needs from a DETR.
    """

    family: ClassVar[str] = "detr"

    def __init__(
        self,
        model: nn.Module,
        label_names: list[str],
        architecture: str,
        imgsz: int = 640,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(model, label_names, architecture, imgsz)
        self.variant: DetrVariant = variant_for(model)
        self.image_mean = tuple(float(v) for v in (image_mean or self.variant.image_mean))
        self.image_std = tuple(float(v) for v in (image_std or self.variant.image_std))

    # ------------------------------------------------------------------ query format
    @property
    def query_kind(self) -> str:
        """"embed" [Q, d_model] (DETR, Table Transformer, Conditional), "anchor4" [Q, 4] pre-sigmoid boxes (DAB,
        two-stage Deformable), "embed2" [Q, 2 d_model] (Deformable)."""
        return self.variant.query_kind(self.model)

    @property
    def query_dim(self) -> int:
        return self.variant.query_dim(self.model)

    @property
    def query_parts(self) -> int:
        """How many independent embeddings one query concatenates (Deformable's [position | content]: 2)."""
        return self.variant.query_parts(self.model)

    @property
    def queries_image_dependent(self) -> bool:
        """True when the model picks its queries per image (two-stage): use ``taps["queries"]``."""
        return self.variant.queries_image_dependent(self.model)

    @property
    def logit_kind(self) -> str:
        """"softmax" (DETR: C' = num_labels + 1, no-object last) or "sigmoid" (C' = num_labels)."""
        return self.variant.logit_kind

    @property
    def num_queries(self) -> int:
        return self.variant.num_queries(self.model)

    @property
    def num_decoder_layers(self) -> int:
        return int(self.model.config.decoder_layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    def learned_queries(self) -> Tensor:
        """The model's own query parameters [Q, D] (feeding them to :meth:`decode` reproduces the forward)."""
        return self.variant.learned_queries(self.model)

    def check_decodable(self) -> None:
        """One KdctlError line when this model cannot decode custom queries (DAB-DETR with patterns)."""
        self.variant.check_decodable(self.model)

    # ------------------------------------------------------------------ batch -> model
    def normalize(self, images: Tensor, mask: Tensor) -> Tensor:
        """0-1 RGB images [N, 3, H, W] -> the model's ``pixel_values`` (normalised, zero where ``mask`` is 0)."""
        return normalize_pixels(images, mask, self.image_mean, self.image_std)

    def pixel_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(pixel_values [N, 3, H, W] normalised and zero on padding, pixel_mask [N, H, W] int64)."""
        mask = batch.pixel_mask()
        return self.normalize(batch.images, mask), mask

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

        handle = self.variant.decoder(self.model).register_forward_hook(hook, with_kwargs=True)
        try:
            yield rec
        finally:
            handle.remove()

    def _run(self, batch: Batch, labels: list[dict[str, Tensor]] | None) -> tuple[Any, dict[str, Any]]:
        """One model forward -> (model outputs, taps)."""
        pixel_values, pixel_mask = self.pixel_inputs(batch)
        v = self.variant
        with self._record_decoder() as rec:
            out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels,
                             **v.forward_kwargs(self.model))
        if "kwargs" not in rec:  # pragma: no cover - would mean transformers changed its call structure
            raise KdctlError(f"{type(self.model).__name__}: the decoder was not called with keyword arguments")
        kw = rec["kwargs"]
        logits, boxes = v.heads(self.model, rec["output"], kw)
        mask_key = "memory_key_padding_mask" if "memory_key_padding_mask" in kw else "encoder_attention_mask"
        taps = {
            "logits": logits,
            "boxes": boxes,
            "queries": v.used_queries(self.model, kw),
            "reference_points": v.used_reference_points(self.model, kw),
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
        weights = self.variant.loss_weights(self.model)
        aux = self.variant.aux_suffixes(self.model)
        losses: dict[str, Tensor] = {}
        for key, value in loss_dict.items():
            base, _, suffix = key.rpartition("_")
            if key in weights or key in self.variant.logged_terms:
                base = key
            elif not (suffix in aux and (base in weights or base in self.variant.logged_terms)):
                raise KdctlError(f"{self.architecture}: unknown loss term {key!r} from transformers (known: "
                                 f"{', '.join([*weights, *self.variant.logged_terms])}); its variant must weight it")
            if base in self.variant.logged_terms:
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
        self.check_decodable()
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
        if key in self.variant.batch_keys and isinstance(value, Tensor):
            return value.repeat(k, *([1] * (value.dim() - 1)))
        return value

    def _decode_once(self, kw: dict[str, Any], q: Tensor, refs: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        """q: the groups [k * N, G, D] folded into the batch; refs: per group None (own points) or [N, G, 2]."""
        call = {**kw, **self.variant.query_kwargs(self.model, kw, q)}
        if any(r is not None for r in refs):
            own = call["reference_points"].chunk(len(refs))
            call["reference_points"] = torch.cat([o if r is None else r for o, r in zip(own, refs, strict=True)])
        out = self.variant.decoder(self.model)(**call)
        return self.variant.heads(self.model, out, call)

    # ------------------------------------------------------------------ inference
    def _predict_raw(self, batch: Batch, score_threshold: float, max_detections: int) -> list[dict[str, Tensor]]:
        pixel_values, pixel_mask = self.pixel_inputs(batch)
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        dets = []
        for logits, boxes, (h, w) in zip(out.logits, out.pred_boxes, batch.sizes, strict=True):
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            xyxy = cxcywh_to_xyxy(boxes) * scale
            if self.logit_kind == "softmax":
                det = softmax_detections(logits, xyxy, score_threshold, max_detections)
            else:
                det = sigmoid_detections(logits, xyxy, score_threshold, max_detections)
            dets.append(det)
        return dets

    def _replace_head(self, names: list[str], keep: dict[int, int], keep_background: bool) -> None:
        """Every class head and the config (:mod:`kdctl.models.detr.heads`)."""
        from kdctl.models.detr.heads import replace_class_heads

        replace_class_heads(self.model, names, keep, self.logit_kind, keep_no_object=keep_background)

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
        with quiet_transformers():
            self.model.save_pretrained(directory, safe_serialization=True)
            processor = getattr(transformers, self.variant.processor_cls)(
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
