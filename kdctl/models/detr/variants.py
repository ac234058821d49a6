"""What each DETR architecture is: one :class:`DetrVariant` subclass per transformers class.

A variant says where the architecture keeps its learned queries and in which format ("query kind"), how new queries
enter its decoder and how its heads read the decoder's output, which loss terms it optimises and with which weights
(read from the transformers config), how its backbone is reached, how its input is normalised, and how it exports
to ONNX. Variants register themselves (:meth:`DetrVariant.__init_subclass__`) by transformers class name and
``model_type``: adding an architecture of the DETR family is one subclass here plus one line in
:data:`kdctl.models.registry.HF_MODEL_TYPES`.

Variants are stateless: every method takes the transformers model it describes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VARIANTS_BY_CLASS: dict[str, DetrVariant] = {}
"""transformers class name (``DetrForObjectDetection``) -> its variant."""
VARIANTS_BY_MODEL_TYPE: dict[str, DetrVariant] = {}
"""transformers ``model_type`` (config.json) -> its variant."""


def normalize_pixels(images: Tensor, mask: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(images - mean) / std``, zero on the padding (``mask`` [N, H, W] 0), as the HF image processors do."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s * mask[:, None].to(images.dtype)


@contextmanager
def quiet_transformers() -> Iterator[None]:
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


class DetrVariant:
    """One DETR architecture (see the module docstring); subclasses set the class attributes and register."""

    model_cls: ClassVar[str]
    config_cls: ClassVar[str]
    processor_cls: ClassVar[str] = "DetrImageProcessor"
    model_type: ClassVar[str]
    logit_kind: ClassVar[str] = "sigmoid"
    onnx_kind: ClassVar[str | None] = "dynamic"  # "dynamic" | "fixed-size" | None (no ONNX export)
    image_mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    image_std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    # decoder kwargs with a leading batch dimension (repeated when query groups are folded into the batch)
    batch_keys: ClassVar[tuple[str, ...]] = ()
    # loss_dict keys transformers logs but does not optimise
    logged_terms: ClassVar[tuple[str, ...]] = ("cardinality_error",)
    # loss_dict entries are already weighted by transformers (RT-DETR): kdctl sums them per term, never re-weights
    loss_weighted: ClassVar[bool] = False
    # the model ignores the pixel mask: feed a square input (the batch padded to max(H, W)), boxes relative to it
    square_input: ClassVar[bool] = False
    # the model honours the pixel mask but its backbone needs a square input (RF-DETR's windowed ViT): pad to a square
    square_pad: ClassVar[bool] = False
    recipe: ClassVar[str] = "detr"  # the recipe (presets/recipes) a model of this architecture trains with by default
    # tap name -> submodule path whose output the normal forward records (taps["recorded"])
    record_modules: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_cls" in cls.__dict__:
            VARIANTS_BY_CLASS[cls.model_cls] = VARIANTS_BY_MODEL_TYPE[cls.model_type] = cls()

    # ------------------------------------------------------------------ losses
    def loss_weights(self, model: nn.Module) -> dict[str, float]:
        """Loss term -> weight, as the model's own loss function weights them (auxiliary layers alike)."""
        cfg = model.config
        return {"loss_ce": 1.0, "loss_bbox": float(cfg.bbox_loss_coefficient),
                "loss_giou": float(cfg.giou_loss_coefficient)}

    def aux_suffixes(self, model: nn.Module) -> set[str]:
        """Suffixes of the auxiliary layers' loss terms (``loss_ce_0`` ...)."""
        cfg = model.config
        return {str(i) for i in range(cfg.decoder_layers - 1)} if cfg.auxiliary_loss else set()

    # ------------------------------------------------------------------ queries
    def query_kind(self, model: nn.Module) -> str:
        return "embed"

    def query_dim(self, model: nn.Module) -> int:
        return int(self.learned_queries(model).shape[-1])

    def num_queries(self, model: nn.Module) -> int:
        return int(model.config.num_queries)

    def queries_image_dependent(self, model: nn.Module) -> bool:
        return False

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
        """How many independent embeddings one query concatenates."""
        return 1

    def denoising_prefix(self, model: nn.Module, kw: dict[str, Any]) -> int:
        """How many training-only (denoising) queries precede the model's own in the recorded decoder pass."""
        return 0

    def tap_slice(self, model: nn.Module, kw: dict[str, Any]) -> slice:
        """The model's own queries among those of the recorded decoder pass (the taps keep only them): after the
        denoising queries (RT-DETR), or the first query group of a Group-DETR model in training (LW-DETR)."""
        return slice(self.denoising_prefix(model, kw), None)

    def used_index(self, model: nn.Module, recorded: dict[str, Tensor]) -> Tensor | None:
        """[N, Q] encoder-memory positions of the model's own queries, where its query content comes from there."""
        return None

    def memory_layout(self, kw: dict[str, Any]) -> tuple[tuple[int, int], ...] | None:
        """Feature-map sizes of the flattened encoder memory, where a query's content is read from it."""
        return None

    def memory_mask(self, model: nn.Module, kw: dict[str, Any]) -> Tensor:
        return kw["memory_key_padding_mask" if "memory_key_padding_mask" in kw else "encoder_attention_mask"]

    def query_content(self, model: nn.Module, taps: dict[str, Any], q: Tensor, index: Tensor | None) -> Tensor | None:
        """Query content [N, G, D] read from the model's own encoder memory (RT-DETR), else None."""
        return None

    # ------------------------------------------------------------------ decoder
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model.decoder

    def forward_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward needed to read every decoder layer."""
        return {}

    def check_decodable(self, model: nn.Module) -> None:
        return None

    def decode_context(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Entered around every decoder call on custom queries (Group-DETR models: attention as in eval mode)."""
        return nullcontext()

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:  # pragma: no cover
        """Decoder kwargs that replace the model's queries by ``q`` [N, G, D]."""
        raise NotImplementedError

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Decoder output -> (logits [L, N, G, C'], boxes [L, N, G, 4] normalised cxcywh)."""
        raise NotImplementedError

    def head_extras(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> dict[str, Tensor]:
        """Further per-layer outputs [L, N, G, ...] beside logits and boxes (D-FINE's edge distributions)."""
        return {}

    # ------------------------------------------------------------------ backbone, presets
    def conv_encoder(self, model: nn.Module) -> nn.Module:
        """The module holding the backbone network as ``.model``."""
        return model.model.backbone

    def check_preset(self, kwargs: dict[str, Any], where: str) -> None:
        """Refuse preset config values the architecture cannot build."""
        return None

    def onnx_context(self, model: nn.Module, size: int) -> AbstractContextManager[Any]:
        """Entered around the ONNX trace at ``size`` x ``size`` (RF-DETR: its position embeddings as constants)."""
        return nullcontext()

    def input_multiple(self, model: nn.Module) -> int:
        """Input height and width must be multiples of this (a windowed ViT's patch x windows); 1: any size."""
        return 1

    def min_input_side(self, model: nn.Module) -> int:
        """The smallest square input side the model runs at (probes use at least this)."""
        return 1

    def check_input_size(self, model: nn.Module, height: int, width: int) -> None:
        """One KdctlError line for a (padded) input size the model cannot run (too few positions for its top-k)."""
        return None

    def prepare(self, model: nn.Module) -> None:
        """Adjust a freshly loaded or built model for kdctl (in place)."""
        return None

    def processor_kwargs(self, imgsz: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
        """Keyword arguments of the image processor saved with the model."""
        return {"size": {"max_height": imgsz, "max_width": imgsz}, "image_mean": list(mean), "image_std": list(std)}


class Detr(DetrVariant):
    """DETR: softmax classes, learned position queries (content starts at zero), DETR's decoder and heads."""

    model_cls = "DetrForObjectDetection"
    config_cls = "DetrConfig"
    model_type = "detr"
    logit_kind = "softmax"
    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "spatial_position_embeddings")
    query_key: ClassVar[str] = "object_queries_position_embeddings"  # decoder kwarg of the query positions

    def learned_queries(self, model: nn.Module) -> Tensor:
        return model.model.query_position_embeddings.weight

    def forward_kwargs(self, model: nn.Module) -> dict[str, Any]:
        # without auxiliary_loss the decoder does not return its intermediate states: record the layer outputs
        return {} if model.config.auxiliary_loss else {"output_hidden_states": True}

    def query_kwargs(self, model: nn.Module, kw: dict[str, Any], q: Tensor) -> dict[str, Any]:
        return {"inputs_embeds": torch.zeros_like(q), self.query_key: q, "attention_mask": None}

    def states(self, model: nn.Module, out: Any) -> Tensor:
        """[L, N, G, D] normalised decoder states, the last one being the decoder's final output."""
        if model.config.auxiliary_loss:
            inter = list(out.intermediate_hidden_states[:-1])
        else:  # hidden_states = (input, layer 1, ..., layer L-1, final)
            inter = [self.decoder(model).layernorm(h) for h in out.hidden_states[1:-1]]
        return torch.stack([*inter, out.last_hidden_state])

    def heads(self, model: nn.Module, out: Any, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        s = self.states(model, out)
        return model.class_labels_classifier(s), model.bbox_predictor(s).sigmoid()


class ConditionalDetr(Detr):
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


class DabDetr(DetrVariant):
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

    def conv_encoder(self, model: nn.Module) -> nn.Module:
        return model.model.backbone.conv_encoder  # DAB-DETR wraps it once more


class DeformableDetr(DetrVariant):
    model_cls = "DeformableDetrForObjectDetection"
    config_cls = "DeformableDetrConfig"
    processor_cls = "DeformableDetrImageProcessor"
    model_type = "deformable_detr"
    onnx_kind = "fixed-size"  # batch dynamic, height/width = the traced size
    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "valid_ratios")

    def query_kind(self, model: nn.Module) -> str:
        return "anchor4" if model.config.two_stage else "embed2"

    def query_dim(self, model: nn.Module) -> int:
        return 4 if model.config.two_stage else 2 * model.config.d_model

    def num_queries(self, model: nn.Module) -> int:
        cfg = model.config
        return int(cfg.two_stage_num_proposals if cfg.two_stage else cfg.num_queries)

    def queries_image_dependent(self, model: nn.Module) -> bool:
        return bool(model.config.two_stage)

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

    def check_preset(self, kwargs: dict[str, Any], where: str) -> None:
        if int(kwargs.get("decoder_layers", 6)) < 2:
            raise KdctlError(f"{where}: Deformable DETR needs decoder_layers >= 2 (transformers ties its heads)")


class TableTransformer(Detr):
    """Table Transformer: DETR with the older decoder keyword names (``object_queries`` is the spatial position
    embedding, ``query_position_embeddings`` the learned queries)."""

    model_cls = "TableTransformerForObjectDetection"
    config_cls = "TableTransformerConfig"
    model_type = "table-transformer"
    batch_keys = ("encoder_hidden_states", "encoder_attention_mask", "object_queries")
    query_key = "query_position_embeddings"


def recipe_for(architecture: str) -> str | None:
    """The default recipe of a DETR-family model class name (``RTDetrForObjectDetection`` -> rtdetr); None when
    the name is no DETR variant."""
    v = VARIANTS_BY_CLASS.get(architecture)
    return v.recipe if v is not None else None


def variant_for(model: nn.Module) -> DetrVariant:
    """The variant of a transformers model instance; one KdctlError line for an unsupported class."""
    name = type(model).__name__
    if name not in VARIANTS_BY_CLASS:
        raise KdctlError(f"{name} is not a supported DETR class; supported: {', '.join(VARIANTS_BY_CLASS)}")
    return VARIANTS_BY_CLASS[name]
