"""Build a :class:`DetrDetector` from a checkpoint (a transformers directory, kdctl's or the hub's) or a preset.

The variant comes from the checkpoint's ``model_type`` or the preset's transformers class name
(:mod:`kdctl.models.detr.variants`); config keys the transformers config does not know are refused, never silently
stored; weights that do not match the config are one error line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdctl.errors import KdctlError
from kdctl.io import first_line, read_json
from kdctl.models.detr.adapter import DetrDetector
from kdctl.models.detr.backbone import (
    TRAINABLE_NORM_KEY,
    load_backbone_file,
    load_imagenet_backbone,
    restore_backbone_activations,
    train_backbone_norms,
)
from kdctl.models.detr.variants import VARIANTS_BY_CLASS, VARIANTS_BY_MODEL_TYPE, quiet_transformers

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.resolved import Resolved

# config keys that are not dataclass fields of the transformers configs but are accepted by their constructors
INIT_ONLY_KEYS = {"use_timm_backbone", "backbone", "backbone_kwargs", "use_pretrained_backbone"}


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
    cfg = r.config if r.kind == "hf_dir" else read_json(path / "config.json")
    variant = VARIANTS_BY_MODEL_TYPE.get(str(cfg.get("model_type")))
    if variant is None:
        raise KdctlError(
            f"{path}: model_type {cfg.get('model_type')!r} is not a supported DETR; supported: "
            f"{', '.join(VARIANTS_BY_MODEL_TYPE)}"
        )
    _require_weights(path)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    config_cls, model_cls = getattr(transformers, variant.config_cls), getattr(transformers, variant.model_cls)
    with quiet_transformers():
        try:
            config = config_cls.from_pretrained(path, **extra)
        except Exception as e:
            raise KdctlError(f"{path / 'config.json'}: invalid {variant.config_cls} ({first_line(e)})") from e
        _apply_overrides(config, overrides, f"{path}")
        config.use_pretrained_backbone = False  # the checkpoint carries the backbone weights
        try:
            model, info = model_cls.from_pretrained(path, config=config, output_loading_info=True, **extra)
        except Exception as e:
            raise KdctlError(f"{path}: corrupt or unreadable weights ({first_line(e)})") from e
    _check_loading_info(info, path)
    if getattr(config, TRAINABLE_NORM_KEY, None) == "batchnorm":  # a from-scratch backbone keeps training its norms
        train_backbone_norms(model)
    restore_backbone_activations(model)
    variant.prepare(model)
    proc = _read_processor(path)
    imgsz = r.imgsz or _imgsz_from_processor(proc) or 640
    mean, std = proc.get("image_mean") or variant.image_mean, proc.get("image_std") or variant.image_std
    if proc.get("do_normalize") is False:  # e.g. RT-DETR: pixels in [0, 1] as they are
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return DetrDetector(model, _labels_from_config(config, path), variant.model_cls, imgsz=imgsz,
                        image_mean=tuple(mean), image_std=tuple(std))


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
    return read_json(p) if p.is_file() else {}


def _imgsz_from_processor(proc: dict[str, Any]) -> int | None:
    """kdctl imgsz (longest side) from an image processor ``size``: max_height/width, else shortest_edge."""
    size = proc.get("size") or {}
    if not isinstance(size, dict):
        return None
    for h, w in (("max_height", "max_width"), ("height", "width")):
        if size.get(h) and size.get(w):
            return int(max(size[h], size[w]))
    return int(size["shortest_edge"]) if size.get("shortest_edge") else None


def _build_preset(
    r: Resolved, *, label_names: list[str] | None, pretrained_backbone: bool, overrides: dict[str, Any]
) -> DetrDetector:
    import transformers

    variant = VARIANTS_BY_CLASS.get(r.architecture)
    if variant is None:
        raise KdctlError(f"preset {r.spec!r}: architecture must be one of {', '.join(VARIANTS_BY_CLASS)}, "
                         f"got {r.architecture!r}")
    if not label_names:
        raise KdctlError(
            f"preset {r.spec!r} builds a new model and needs the class names of the dataset or the teacher "
            "(pass --data or --teacher)"
        )
    config_cls, model_cls = getattr(transformers, variant.config_cls), getattr(transformers, variant.model_cls)
    kwargs = {**r.config, **overrides}
    weights_file = kwargs.pop("backbone_weights", None)  # a local ImageNet state dict (timm or torchvision names)
    _check_config_keys(config_cls, list(kwargs), f"preset {r.spec!r}")
    variant.check_preset(kwargs, f"preset {r.spec!r}")
    kwargs.pop("use_pretrained_backbone", None)  # ImageNet weights are loaded below, on request
    kwargs["id2label"] = dict(enumerate(label_names))
    kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    with quiet_transformers():
        try:
            config = config_cls(**kwargs)
            model = model_cls(config)
        except Exception as e:
            raise KdctlError(f"preset {r.spec!r}: cannot build {variant.model_cls} ({first_line(e)})") from e
    init_queries(model)
    if weights_file:
        load_backbone_file(model, Path(str(weights_file)).expanduser(), f"preset {r.spec!r}")
    elif pretrained_backbone:
        load_imagenet_backbone(model)
    elif train_backbone_norms(model):
        setattr(config, TRAINABLE_NORM_KEY, "batchnorm")
    restore_backbone_activations(model)
    variant.prepare(model)
    config.use_pretrained_backbone = False
    return DetrDetector(model, list(label_names), variant.model_cls, imgsz=int(r.imgsz or 640))


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
    if isinstance(getattr(inner, "query_feat", None), nn.Embedding):  # LW-DETR / RF-DETR: official init
        inner.query_feat.weight.normal_()  # nn.Embedding's default
        inner.reference_point_embed.weight.zero_()  # refined boxes start at the encoder's proposals
    refs = getattr(inner, "query_refpoint_embeddings", None)
    if isinstance(refs, nn.Embedding) and getattr(model.config, "random_refpoints_xy", False):
        xy = refs.weight[:, :2].uniform_(0, 1).clamp(1e-5, 1 - 1e-5)
        refs.weight[:, :2] = torch.log(xy / (1 - xy))


