"""kdctl's own CNN builders (``presets/models/*.toml``): ``fasterrcnn`` / ``retinanet`` / ``fcos`` on a
ResNet-18/34/50/101 or MobileNet-V2 body (any ``width_mult``) with a ``BackboneWithFPN`` of any width.

What differs per architecture (detector class, FPN levels, options) is read from its declaration in
:mod:`kdctl.models.cnn.architectures`.

Norm layers (config key ``norm``, default ``"auto"``): a pretrained backbone uses ``FrozenBatchNorm2d`` (ImageNet
statistics, as torchvision's detection builders); a backbone trained from scratch uses ``GroupNorm`` (32 groups,
fewer where the width is not a multiple of 32). BatchNorm with 2 images per step, as on a CPU, normalises with
noisy statistics and trains poorly; GroupNorm does not depend on the batch and behaves the same in train and eval
mode. ``norm = "bn"`` or ``"frozen_bn"`` forces a choice.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from kdctl.errors import BackboneWeightsUnavailable, KdctlError
from kdctl.io import first_line
from kdctl.models.cnn.architectures import ARCHITECTURES
from kdctl.models.weights import read_state_file

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
NORMS = ("auto", "frozen_bn", "bn", "gn")
# config keys read by kdctl's builders; every other key is a keyword of the detector class
BACKBONE_KEYS = ("backbone", "fpn_channels", "trainable_layers", "backbone_weights", "norm", "representation_size",
                 "width_mult", "head_norm")


def resolve_preset_config(arch: str, config: dict[str, Any], pretrained: bool, spec: str) -> dict[str, Any]:
    """Validate a preset config and fix ``norm`` and ``trainable_layers`` so that a rebuild is identical."""
    if arch not in ARCHITECTURES:
        raise KdctlError(f"{spec}: architecture must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    out = dict(config)
    out.setdefault("backbone", "resnet50")
    out.setdefault("fpn_channels", 256)
    if out["backbone"] not in BACKBONES:
        raise KdctlError(f"{spec}: backbone must be one of {', '.join(BACKBONES)}, got {out['backbone']!r}")
    norm = out.get("norm", "auto")
    if norm not in NORMS:
        raise KdctlError(f"{spec}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "auto":
        norm = "frozen_bn" if pretrained else "gn"
    if norm == "gn" and pretrained:
        raise KdctlError(f"{spec}: norm = 'gn' cannot take ImageNet BatchNorm weights; use 'frozen_bn' or 'bn'")
    out["norm"] = norm
    width = float(out.get("width_mult", 1.0))
    if width != 1.0 and out["backbone"] != "mobilenet_v2":
        raise KdctlError(f"{spec}: width_mult applies to the mobilenet_v2 backbone only")
    if width != 1.0 and pretrained:
        if config.get("backbone_weights"):
            raise KdctlError(f"{spec}: --backbone-weights cannot load into mobilenet_v2 at width_mult {width:g} "
                             "(ImageNet weights exist for width 1.0 only)")
        # train / distill catch this, say it in one line and build the backbone from scratch
        raise BackboneWeightsUnavailable(f"{spec}: there are no ImageNet weights for mobilenet_v2 at width_mult "
                                         f"{width:g}; pass --no-pretrained-backbone")
    layers = int(out.get("trainable_layers", 3)) if pretrained else 5  # from scratch: train everything
    if not 0 <= layers <= 5:
        raise KdctlError(f"{spec}: trainable_layers must be in 0..5, got {layers}")
    out["trainable_layers"] = layers
    channels = int(out["fpn_channels"])
    if channels < 1 or channels % ARCHITECTURES[arch].fpn_channel_multiple:
        raise KdctlError(f"{spec}: fpn_channels must be positive ({_multiples()}), got {channels}")
    _check_detector_keys(arch, out, spec)
    return out


def check_saved_config(arch: str, config: dict[str, Any], where: str) -> None:
    """A saved preset config is already resolved: check it names things this builder knows."""
    if arch not in ARCHITECTURES or config.get("backbone") not in BACKBONES or config.get("norm") not in NORMS:
        raise KdctlError(f"{where}: kdctl.json has an unknown architecture/backbone/norm ({arch}, {config.get('backbone')})")
    if "fpn_channels" not in config or "trainable_layers" not in config:
        raise KdctlError(f"{where}: kdctl.json config lacks fpn_channels or trainable_layers")
    _check_detector_keys(arch, config, where)


def _multiples() -> str:
    """E.g. "a multiple of 32 for fcos": the architectures whose FPN width must be a multiple of something."""
    return ", ".join(f"a multiple of {a.fpn_channel_multiple} for {a.name}" for a in ARCHITECTURES.values()
                     if a.fpn_channel_multiple > 1)


def _detector_class(arch: str) -> type[nn.Module]:
    """The torchvision detection class the architecture's declaration names."""
    import torchvision.models.detection

    return getattr(torchvision.models.detection, ARCHITECTURES[arch].detector)


def _check_detector_keys(arch: str, config: dict[str, Any], spec: str) -> None:
    """Every non-backbone key must be a keyword of the detector class (torchvision ignores unknown ones)."""
    params = set(inspect.signature(_detector_class(arch).__init__).parameters) - {"self", "backbone", "kwargs"}
    allowed = params - {"num_classes", "min_size", "max_size"}
    options = ARCHITECTURES[arch].options
    unknown = [k for k in config if k not in BACKBONE_KEYS and k not in allowed]
    if unknown or ("representation_size" in config and "representation_size" not in options):
        bad = unknown or ["representation_size"]
        raise KdctlError(f"{spec}: unknown config key(s) {', '.join(bad)} for {arch}")
    if config.get("head_norm", "none") not in ("none", "gn") or ("head_norm" in config and "head_norm" not in options):
        raise KdctlError(f"{spec}: head_norm is \"none\" or \"gn\" (RetinaNet only), got {config['head_norm']!r}")


def build_preset(arch: str, config: dict[str, Any], num_classes: int, *, pretrained: bool, spec: str) -> nn.Module:
    """kdctl's builder: ``BackboneWithFPN`` + the detector class, from a config that
    :func:`resolve_preset_config` resolved (``norm`` and ``trainable_layers`` are taken literally)."""
    backbone = _fpn_backbone(arch, config, pretrained, spec)
    kwargs = {k: v for k, v in config.items() if k not in BACKBONE_KEYS}
    options = ARCHITECTURES[arch].options
    if "representation_size" in options and "representation_size" in config:
        kwargs.update(_box_head(backbone.out_channels, int(config["representation_size"]), num_classes))
        return _detector_class(arch)(backbone, num_classes=None, **kwargs)
    if "head_norm" in options and config.get("head_norm") == "gn":  # torchvision's v2 head: GroupNorm in both towers
        from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen

        anchors = kwargs.setdefault("anchor_generator", _default_anchorgen())
        kwargs["head"] = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes,
                                       norm_layer=_group_norm)
    return _detector_class(arch)(backbone, num_classes=num_classes, **kwargs)


def _box_head(channels: int, size: int, num_classes: int) -> dict[str, nn.Module]:
    """A narrower Faster R-CNN box head: TwoMLPHead(C*7*7 -> size -> size) + FastRCNNPredictor."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    return {"box_head": TwoMLPHead(channels * 7 * 7, size), "box_predictor": FastRCNNPredictor(size, num_classes)}


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    return _group_norm


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of 32 that divides ``channels``."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _fpn_backbone(arch: str, config: dict[str, Any], pretrained: bool, spec: str) -> nn.Module:
    """Body (ResNet / MobileNet-V2) + FPN. Faster R-CNN: C2..C5 + max-pool P6 (strides 4..64);
    RetinaNet / FCOS: C3..C5 + P6, P7 from P5 (strides 8..128)."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    name, channels = config["backbone"], int(config["fpn_channels"])
    norm = _norm_layer(config["norm"])
    if name.startswith("resnet"):
        body, return_layers, in_channels = _resnet_body(name, norm)
    else:
        body, return_layers, in_channels = _mobilenet_body(norm, float(config.get("width_mult", 1.0)))
    if pretrained:
        _load_backbone_weights(body, name, config.get("backbone_weights"), spec)
    _freeze_stages(body, name, int(config["trainable_layers"]))
    if ARCHITECTURES[arch].fpn == "c2-p6":
        extra: nn.Module = LastLevelMaxPool()
    else:
        return_layers, in_channels = dict(list(return_layers.items())[1:]), in_channels[1:]
        return_layers = {k: str(i) for i, k in enumerate(return_layers)}
        extra = LastLevelP6P7(channels, channels)
    return BackboneWithFPN(body, return_layers, in_channels, channels, extra_blocks=extra)


def _resnet_body(name: str, norm: Callable[[int], nn.Module]) -> tuple[nn.Module, dict[str, str], list[int]]:
    """A torchvision ResNet (random init) and its C2..C5 return layers / channels."""
    import torchvision

    body = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
    base = body.inplanes // 8  # 64 for ResNet-18/34, 256 for ResNet-50/101
    return body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [base * 2 ** (i - 1) for i in range(1, 5)]


def _mobilenet_body(norm: Callable[[int], nn.Module], width_mult: float = 1.0
                    ) -> tuple[nn.Module, dict[str, str], list[int]]:
    """MobileNet-V2 ``features`` (channels scaled by ``width_mult``) and the last block of each stride
    (4, 8, 16, 32: blocks 3, 6, 13, 17)."""
    import torchvision

    features = torchvision.models.mobilenet_v2(weights=None, norm_layer=norm, width_mult=width_mult).features
    ends = _mobilenet_stage_ends(features)
    return features, {str(e): str(i) for i, e in enumerate(ends)}, [features[e].out_channels for e in ends]


def _mobilenet_stage_ends(features: nn.Sequential) -> list[int]:
    """Index of the last inverted-residual block at strides 4, 8, 16, 32 (the 1280-ch 1x1 conv is not used)."""
    starts = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]  # first block of each stride
    last_block = max(i for i, b in enumerate(features) if hasattr(b, "_is_cn"))
    return [s - 1 for s in starts[1:]] + [last_block]


def _stages(body: nn.Module, name: str) -> list[list[str]]:
    """Parameter-name prefixes of the 5 stages, shallow to deep (stem, then strides 4, 8, 16, 32)."""
    if name.startswith("resnet"):
        return [["conv1.", "bn1."], ["layer1."], ["layer2."], ["layer3."], ["layer4."]]
    starts = [i for i, b in enumerate(body) if getattr(b, "_is_cn", False)]
    bounds = [0, *starts, len(body)]
    return [[f"{i}." for i in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _freeze_stages(body: nn.Module, name: str, trainable: int) -> None:
    """requires_grad=False for all but the ``trainable`` deepest stages."""
    frozen = [p for stage in _stages(body, name)[: 5 - trainable] for p in stage]
    for pname, param in body.named_parameters():
        if pname.startswith(tuple(frozen)):
            param.requires_grad_(False)


def _imagenet_weights(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]


def _load_backbone_weights(body: nn.Module, name: str, path: str | None, spec: str) -> None:
    """ImageNet weights into the body: a local file (``backbone_weights``) or the torchvision download."""
    if path:
        state = read_state_file(Path(path).expanduser())
        where = path
    else:
        member = _imagenet_weights(name)
        filename = member.url.rsplit("/", 1)[-1]
        try:
            state = member.get_state_dict(progress=False, check_hash=True)
        except Exception as e:
            raise BackboneWeightsUnavailable(
                f"{spec}: could not download the ImageNet weights of {name} ({filename}: {first_line(e)}); pass "
                f"--no-pretrained-backbone to train from scratch, or set backbone_weights = \"/path/{filename}\""
            ) from e
        where = filename
    _load_body_state(body, name, state, where)


def _load_body_state(body: nn.Module, name: str, state: dict[str, Tensor], where: str) -> None:
    """Load an ImageNet classifier state into the detection body (classifier and BN counters ignored)."""
    if not name.startswith("resnet"):  # mobilenet_v2: the body is `features`
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    own = body.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if missing or bad:
        raise KdctlError(f"{where}: not ImageNet weights of {name} (missing {missing[:3]}, wrong shape {bad[:3]})")
    body.load_state_dict(state, strict=False)

__all__ = ["BACKBONES", "BACKBONE_KEYS", "NORMS", "build_preset", "check_saved_config", "resolve_preset_config"]
