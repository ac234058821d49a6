"""Backbone surgery of DETR-family models: where the backbone is, trainable norms, the activations transformers
drops from timm backbones, ImageNet / local backbone weights, and the stock-transformers rebuild for export.

Backbone weights: transformers ignores ``use_pretrained_backbone`` (backbones are always built without weights, so
loading a checkpoint never downloads). For presets with ``pretrained_backbone=True`` kdctl copies timm's ImageNet
weights into the timm backbone itself (a Hugging Face Hub download unless cached, :func:`load_imagenet_backbone`),
or a local file's (:func:`load_backbone_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdctl.errors import BackboneWeightsUnavailable, KdctlError
from kdctl.io import first_line
from kdctl.models.detr.variants import quiet_transformers, variant_for
from kdctl.models.weights import read_state_file


def backbone_module(model: nn.Module) -> nn.Module:
    """The timm / HF backbone network inside a DETR-family model."""
    net = variant_for(model).conv_encoder(model).model
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
    enc = variant_for(model).conv_encoder(model)
    root = enc if isinstance(enc, nn.Module) else enc.model  # a ViT behind a namespace (LW-DETR, DEIMv2 on DINOv3)
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("FrozenBatchNorm2d"):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=1e-5).to(child.weight.device)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, key).copy_(getattr(child, key))
                setattr(parent, name, bn)
                count += 1
    return count




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
    with quiet_transformers():
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
        raise BackboneWeightsUnavailable(  # RT-DETR's ResNet-vd, D-FINE's HGNetv2: no ImageNet weights in kdctl yet
            f"kdctl has ImageNet weights for timm backbones only, not for this {getattr(bcfg, 'model_type', '?')} "
            "backbone; pass --no-pretrained-backbone"
        )
    try:
        source = timm.create_model(
            bcfg.backbone, pretrained=True, features_only=bcfg.features_only, in_chans=bcfg.num_channels,
            out_indices=bcfg.out_indices, output_stride=bcfg.output_stride,
        )
    except Exception as e:
        raise BackboneWeightsUnavailable(
            f"the ImageNet backbone weights for {bcfg.backbone!r} could not be fetched ({first_line(e, 120)}); "
            "pass --no-pretrained-backbone to start from random weights"
        ) from e
    target = backbone_module(model)
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KdctlError(
            f"timm {bcfg.backbone!r} weights do not fit the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def scratch_backbone(model: nn.Module) -> bool:
    """True when the backbone started from random weights (kdctl made its norms trainable,
    :func:`train_backbone_norms`, and says so in the config); False for ImageNet / checkpoint backbones."""
    return getattr(model.config, TRAINABLE_NORM_KEY, None) == "batchnorm"


def early_stage_prefix(net: nn.Module, stages: int) -> str | None:
    """The parameter-name prefix of the ``stages``-th stage (1: the stride-4 one) of a timm or HF backbone."""
    info = getattr(net, "feature_info", None)
    if info is not None and hasattr(info, "get_dicts"):  # timm features_only: stages by reduction
        names = [d["module"] for d in info.get_dicts() if d["reduction"] == 2 ** (stages + 1)]
        return names[-1].replace("_", ".") + "." if names else None
    if hasattr(net, "encoder") and hasattr(net.encoder, "stages"):  # transformers' ResNet / ConvNeXt ...
        return f"encoder.stages.{stages - 1}."
    if hasattr(net, "embeddings") and not hasattr(net, "encoder"):  # a ViT (DEIMv2's DINOv3): its patch embedding
        return "embeddings."
    return None


def freeze_backbone_stages(model: nn.Module, stages: int) -> int:
    """The DETR recipes' rule for a pretrained backbone: its stem and first ``stages`` stages frozen, the rest of
    the backbone trainable; a backbone from random weights (:func:`scratch_backbone`) or ``stages == 0``: all of it
    trains. Sets ``requires_grad`` on every backbone parameter (0 stages: leaves the model as it is); returns how
    many parameters were frozen."""
    if stages <= 0:
        return 0
    net = backbone_module(model)
    params = list(net.named_parameters())
    for _, p in params:
        p.requires_grad_(True)
    if scratch_backbone(model):
        return 0
    prefix = early_stage_prefix(net, stages)
    if prefix is None:
        raise KdctlError(f"freeze_backbone_stages = {stages}: the stages of backbone {type(net).__name__} are not "
                         "known; set it to 0")
    last = max((i for i, (n, _) in enumerate(params) if n.startswith(prefix)), default=-1)
    if last < 0:
        raise KdctlError(f"freeze_backbone_stages = {stages}: no {prefix!r} in backbone {type(net).__name__}")
    for _, p in params[: last + 1]:
        p.requires_grad_(False)
    return sum(p.numel() for _, p in params[: last + 1])
