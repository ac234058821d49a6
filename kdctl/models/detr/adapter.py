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
* ``"box"`` [N, Q, 4]: LW-DETR / RF-DETR plain normalised boxes; each model decodes point j with its own learned
  content of slot ``j mod Q`` (:mod:`kdctl.models.detr.lw_detr`).

Parity (tests/test_detr_adapter.py): ``decode(taps, queries_used)`` reproduces the normal forward's final AND
auxiliary logits/boxes (max abs diff < 1e-5) for DETR (with and without ``auxiliary_loss``), Table Transformer,
Conditional DETR, DAB-DETR and Deformable DETR plain, with box refine and two-stage (LW-DETR, RF-DETR, RT-DETR:
their own test files). Measured: exactly 0
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
from kdctl.models.detr.outputs import loss_terms, sigmoid_detections, softmax_detections
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
        # the mask covers any padding; only the square-input variants (RT-DETR: its FPN halves and doubles) need 32
        self.pad_stride = max(32 if self.variant.square_input else 1, self.variant.input_multiple(model))
        self.min_side = self.variant.min_input_side(model)  # e.g. LW-DETR: enough positions for its top-k
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
        """(pixel_values [N, 3, H, W] normalised and zero on padding, pixel_mask [N, H, W] int64); a square
        [N, 3, S, S], S = max(H, W), for the variants that ignore the mask (:meth:`frame_sizes`)."""
        images, mask = batch.images, batch.pixel_mask()
        h, w = images.shape[-2:]
        if self.variant.square_input or self.variant.square_pad:
            h = w = max(h, w)
        m = self.variant.input_multiple(self.model)  # a windowed ViT: multiples of patch x windows
        h, w = -(-h // m) * m, -(-w // m) * m
        self.variant.check_input_size(self.model, h, w)
        if (h, w) != tuple(images.shape[-2:]):
            pad = (0, w - images.shape[-1], 0, h - images.shape[-2])
            images, mask = torch.nn.functional.pad(images, pad), torch.nn.functional.pad(mask, pad)
        return self.normalize(images, mask), mask

    def frame_sizes(self, batch: Batch) -> list[tuple[int, int]]:
        """Per image the (h, w) the model's normalised boxes are relative to: the unpadded image, or the square
        input (:attr:`~kdctl.models.detr.variants.DetrVariant.square_input`) for models that ignore the mask."""
        if not self.variant.square_input:
            return list(batch.sizes)
        side = max(batch.images.shape[-2:])
        return [(side, side)] * len(batch)

    def hf_labels(self, batch: Batch) -> list[dict[str, Tensor]]:
        """Per image ``{"class_labels" [K], "boxes" [K, 4] cxcywh normalised by the unpadded size}``."""
        if len(batch.targets) != len(batch):
            raise KdctlError("a training batch needs one target dict per image")
        out = []
        for (h, w), t in zip(self.frame_sizes(batch), batch.targets, strict=True):
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

        def keep(name: str) -> Any:
            return lambda module, args, output: rec.setdefault("recorded", {}).__setitem__(name, output)

        handles = [self.variant.decoder(self.model).register_forward_hook(hook, with_kwargs=True)]
        handles += [self.model.get_submodule(path).register_forward_hook(keep(name))
                    for name, path in self.variant.record_modules.items()]
        try:
            yield rec
        finally:
            for handle in handles:
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
        kw, recorded = rec["kwargs"], rec.get("recorded", {})
        logits, boxes = v.heads(self.model, rec["output"], kw)
        own = v.tap_slice(self.model, kw)  # denoising queries, Group-DETR's training groups never enter the taps
        extras = {k: t[:, :, own] for k, t in v.head_extras(self.model, rec["output"], kw).items()}
        taps = {
            **extras,
            "logits": logits[..., own, :],
            "boxes": boxes[..., own, :],
            "queries": v.used_queries(self.model, kw),
            "reference_points": v.used_reference_points(self.model, kw),
            "query_index": v.used_index(self.model, recorded),
            "memory": kw["encoder_hidden_states"],
            "memory_mask": v.memory_mask(self.model, kw),
            "memory_layout": v.memory_layout(kw),
            "recorded": recorded,
            "decoder_kwargs": kw,
        }
        return out, taps

    def _forward_train(self, batch: Batch, taps: bool = True) -> TrainOutput:
        if taps:
            out, recorded = self._run(batch, self.hf_labels(batch))
        else:  # plain training: the model's own forward, no hooks (#22)
            pixel_values, pixel_mask = self.pixel_inputs(batch)
            out, recorded = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=self.hf_labels(batch),
                                       **self.variant.forward_kwargs(self.model)), {}
        return TrainOutput(losses=loss_terms(self.variant, self.model, out.loss_dict, self.architecture),
                           taps=recorded)

    def forward_taps(self, batch: Batch) -> dict[str, Any]:
        return self._run(batch, None)[1]

    # ------------------------------------------------------------------ custom queries
    def decode(self, taps: dict[str, Any], queries: Tensor, memory_index: Tensor | None = None) -> dict[str, Tensor]:
        """Decode G queries over the recorded encoder memory, in their own decoder pass.

        queries: [G, D] shared by the batch or [N, G, D] per image, in :attr:`query_kind` format.
        memory_index ("proposal" queries, RT-DETR): [N, G] memory positions to read the query content at (this
        model's ``taps["query_index"]``, or another model's when the memory layouts match); None samples this model's
        memory at the box centres.
        Returns ``{"logits": [L, N, G, C'], "boxes": [L, N, G, 4]}`` (every decoder layer, last = final), plus the
        variant's :meth:`~kdctl.models.detr.variants.DetrVariant.head_extras` (D-FINE: ``corners``, ``initial_boxes``).
        Gradients flow through this model's decoder, heads and (for a training pass) its encoder.
        """
        return self.decode_groups(taps, [queries], memory_index=[memory_index])[0]

    def decode_groups(
        self, taps: dict[str, Any], groups: list[Tensor], reference_points: list[Tensor | None] | None = None,
        memory_index: list[Tensor | None] | None = None,
    ) -> list[dict[str, Tensor]]:
        """:meth:`decode` several query groups at once; groups never attend to each other.

        Groups of equal size are folded into the batch dimension (one decoder call); others run one by one.
        reference_points (Deformable "embed2" only): per group None (the model's own ``reference_points`` head on
        the query's position part) or the [G, 2] / [N, G, 2] normalised points to decode the group at, e.g. another
        model's ``taps["reference_points"]`` for its own queries (KD-DETR's specific points).
        memory_index ("proposal" only): per group None or the [N, G] memory positions of the content (:meth:`decode`).
        """
        self.check_decodable()
        kw = taps["decoder_kwargs"]
        n = kw["encoder_hidden_states"].shape[0]
        qs = [self._batched_queries(q, n, kw["encoder_hidden_states"]) for q in groups]
        refs = self._batched_reference_points(reference_points, qs)
        index = memory_index or [None] * len(qs)
        contents = [self.variant.query_content(self.model, taps, q, i) for q, i in zip(qs, index, strict=True)]
        if len(qs) > 1 and len({q.shape[1] for q in qs}) == 1:
            k = len(qs)
            folded = {key: self._repeat(key, v, k) for key, v in kw.items()}
            content = None if contents[0] is None else torch.cat(contents, dim=0)  # type: ignore[arg-type]
            out = self._decode_once(folded, torch.cat(qs, dim=0), refs, content)
            return [{key: t[:, i * n : (i + 1) * n] for key, t in out.items()} for i in range(k)]
        return [self._decode_once(kw, q, [r], c) for q, r, c in zip(qs, refs, contents, strict=True)]

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

    def _decode_once(self, kw: dict[str, Any], q: Tensor, refs: list[Tensor | None],
                     content: Tensor | None = None) -> dict[str, Tensor]:
        """q: the groups [k * N, G, D] folded into the batch; refs: per group None (own points) or [N, G, 2];
        content: [k * N, G, d_model] query content read from the encoder memory ("proposal" queries) or None."""
        call = {**kw, **self.variant.query_kwargs(self.model, kw, q)}
        if content is not None:
            call["inputs_embeds"] = content
        if any(r is not None for r in refs):
            own = call["reference_points"].chunk(len(refs))
            call["reference_points"] = torch.cat([o if r is None else r for o, r in zip(own, refs, strict=True)])
        with self.variant.decode_context(self.model):
            out = self.variant.decoder(self.model)(**call)
        logits, boxes = self.variant.heads(self.model, out, call)
        return {"logits": logits, "boxes": boxes, **self.variant.head_extras(self.model, out, call)}

    # ------------------------------------------------------------------ inference
    def _predict_raw(self, batch: Batch, score_threshold: float, max_detections: int) -> list[dict[str, Tensor]]:
        pixel_values, pixel_mask = self.pixel_inputs(batch)
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        dets = []
        for logits, boxes, (h, w) in zip(out.logits, out.pred_boxes, self.frame_sizes(batch), strict=True):
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
            m = self.variant.input_multiple(self.model)
            processor = getattr(transformers, self.variant.processor_cls)(
                **self.variant.processor_kwargs(-(-self.imgsz // m) * m, self.image_mean, self.image_std))
            processor.save_pretrained(directory)
        return directory

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(
            query_kind=self.query_kind, query_dim=self.query_dim, logit_kind=self.logit_kind,
            num_queries=self.num_queries, decoder_layers=self.num_decoder_layers, hidden_size=self.hidden_size,
        )
        return out
