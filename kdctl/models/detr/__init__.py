"""transformers DETR family behind one Detector: DETR, Table Transformer, Conditional DETR, DAB-DETR, Deformable
DETR (plain, ``with_box_refine`` and ``two_stage``), RT-DETR and RT-DETRv2.

The adapter reuses transformers' own modules (decoder, class/box heads, losses); it copies none of their code.

==============  ===========================================================================================
``variants``    what each architecture is: one class per transformers class (queries, losses, backbone,
                normalisation, ONNX kind), registered by class name and ``model_type``
``rt_detr``     the RT-DETR / RT-DETRv2 variants (image-dependent "proposal" queries, denoising, square input)
``d_fine``      the D-FINE / DEIMv2 variants (RT-DETR queries, edge distributions, eval_idx-only eval outputs)
``lw_detr``     the LW-DETR / RF-DETR variants ("box" queries with learned slot contents, Group DETR)
``outputs``     loss terms and detections from a model's outputs
``adapter``     :class:`DetrDetector`, the Detector over any variant (taps, decode, predict, save)
``loading``     :func:`load`: checkpoints (transformers directories) and presets
``backbone``    backbone surgery: trainable norms, restored timm activations, ImageNet / local weights
``onnx``        ONNX graph and stock-transformers export (called by :mod:`kdctl.export`)
==============  ===========================================================================================

Adding an architecture of this family: one :class:`~kdctl.models.detr.variants.DetrVariant` subclass plus one line in
:data:`kdctl.models.registry.HF_MODEL_TYPES`.
"""

from kdctl.boxes import cxcywh_to_xyxy
from kdctl.models.detr import d_fine, lw_detr, rt_detr  # noqa: F401  (register the RT-DETR, D-FINE, DEIMv2, LW-/RF-DETR variants)
from kdctl.models.detr.adapter import DetrDetector
from kdctl.models.detr.backbone import (
    TRAINABLE_NORM_KEY,
    backbone_module,
    freeze_backbone_stages,
    has_restored_activations,
    load_backbone_file,
    load_imagenet_backbone,
    restore_backbone_activations,
    stock_transformers_model,
    train_backbone_norms,
)
from kdctl.models.detr.loading import init_queries, load
from kdctl.models.detr.variants import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VARIANTS_BY_CLASS,
    VARIANTS_BY_MODEL_TYPE,
    DetrVariant,
    variant_for,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "TRAINABLE_NORM_KEY", "VARIANTS_BY_CLASS", "VARIANTS_BY_MODEL_TYPE",
    "DetrDetector", "DetrVariant", "backbone_module", "cxcywh_to_xyxy", "freeze_backbone_stages",
    "has_restored_activations", "init_queries",
    "load", "load_backbone_file", "load_imagenet_backbone", "restore_backbone_activations",
    "stock_transformers_model", "train_backbone_norms", "variant_for",
]
