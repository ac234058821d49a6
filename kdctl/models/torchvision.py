"""torchvision CNN detectors (Faster R-CNN, RetinaNet, FCOS) behind the kdctl Detector contract.

Three ways in (:func:`load`, dispatched on ``Resolved.kind``):

* ``torchvision:NAME[:W]``: a builder of ``torchvision.models.detection`` (``fasterrcnn_resnet50_fpn``, ...);
  ``W`` is a weights enum member (``DEFAULT``, ``COCO_V1``: a download) or a local ``.pth``/``.safetensors``
  state dict. Backbone weights are never downloaded implicitly (``weights_backbone=None``).
* a preset (``presets/models/*.toml``): kdctl's own builders ``fasterrcnn`` / ``retinanet`` / ``fcos`` on a
  ResNet-18/34/50/101 or MobileNet-V2 body with a ``BackboneWithFPN`` of any width.
* a kdctl directory written by :meth:`TorchvisionDetector.save` (``kdctl.json`` + ``model.safetensors``).

Pixels: a :class:`~kdctl.data.batch.Batch` is already resized; the model's ``GeneralizedRCNNTransform`` keeps
its normalisation but never resizes again (teacher and student see exactly the batch's pixels). The model gets
the UNPADDED images ``batch.images[i, :, :h_i, :w_i]`` and pads them itself to a multiple of 32.

Norm layers of kdctl's builders (config key ``norm``, default ``"auto"``): a pretrained backbone uses
``FrozenBatchNorm2d`` (ImageNet statistics, as torchvision's detection builders); a backbone trained from scratch
uses ``GroupNorm`` (32 groups, fewer where the width is not a multiple of 32). BatchNorm with 2 images per step,
as on a CPU, normalises with noisy statistics and trains poorly; GroupNorm does not depend on the batch and
behaves the same in train and eval mode. ``norm = "bn"`` or ``"frozen_bn"`` forces a choice.

KD taps (:meth:`TorchvisionDetector.forward_train` / :meth:`TorchvisionDetector.forward_taps`)::

    {"features": {stride: Tensor [N, C, h, w]},   # FPN levels, e.g. 4..64 (Faster R-CNN), 8..128 (RetinaNet/FCOS)
     "image_sizes": [(h_i, w_i)],                 # the valid region of image i in the model's input (= batch.sizes)
     "boxes": [Tensor [K_i, 4]],                  # GT xyxy in that frame (= batch.targets boxes)
     "labels": [Tensor [K_i]]}                    # GT dataset class indices (teacher and student agree on them)
"""

from __future__ import annotations

import inspect
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from kdctl.data.batch import Batch
from kdctl.errors import BackboneWeightsUnavailable, KdctlError
from kdctl.models.base import Detector, TrainOutput
from kdctl.models.weights import (
    KDCTL_CONFIG,
    load_safetensors_state,
    load_state_strict,
    read_state_file,
    write_kdctl_config,
)

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.specs import Resolved

WEIGHTS_FILE = "model.safetensors"
PRESET_ARCHITECTURES = ("fasterrcnn", "retinanet", "fcos")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
NORMS = ("auto", "frozen_bn", "bn", "gn")
# config keys read by kdctl's builders; every other key is a keyword of the detector class
BACKBONE_KEYS = ("backbone", "fpn_channels", "trainable_layers", "backbone_weights", "norm", "representation_size",
                 "width_mult", "head_norm")
STATE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
PROBE_SIZE = 256  # input side used once to measure the FPN strides (exact for strides <= 256)


# =========================================================================== the adapter
class _FixedSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without the resize: normalise, then pad to a multiple of ``size_divisible``."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict | None]:
        return image, target


def _disable_resize(model: nn.Module) -> None:
    """Swap ``model.transform`` for a :class:`_FixedSizeTransform` with the same mean/std/padding."""
    t = model.transform
    if isinstance(t, _FixedSizeTransform):
        return
    model.transform = _FixedSizeTransform(
        t.min_size, t.max_size, list(t.image_mean), list(t.image_std), size_divisible=t.size_divisible,
        fixed_size=t.fixed_size,
    )


class _Recorder:
    """Forward hooks that keep what ``model.transform`` and ``model.backbone`` return during one model call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.image_list: Any = None  # torchvision ImageList: tensors [N, 3, Hp, Wp], image_sizes [(h, w)]
        self.targets: list[dict[str, Tensor]] | None = None
        self.features: OrderedDict[str, Tensor] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        self._handles = [
            self.model.transform.register_forward_hook(self._on_transform),
            self.model.backbone.register_forward_hook(self._on_backbone),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _on_transform(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self.image_list, self.targets = output

    def _on_backbone(self, module: nn.Module, args: tuple, output: OrderedDict[str, Tensor]) -> None:
        self.features = output


class TorchvisionDetector(Detector):
    """A torchvision FasterRCNN / RetinaNet / FCOS (``self.model``) speaking the kdctl Detector contract.

    Model label ids are ``index into label_names + 1`` (0 is torchvision's background).

    Args:
        model: the torchvision detector; its transform is replaced by one that does not resize.
        label_names: class names without background (``label_names[i]`` is model label ``i + 1``).
        architecture: torchvision builder name or kdctl builder (``fasterrcnn``, ``retinanet``, ``fcos``).
        builder: ``"torchvision"`` or ``"preset"`` (how :meth:`save` records the rebuild recipe).
        config: builder keyword arguments (torchvision) or the resolved preset config.
        weights: the torchvision weights enum member name the model was built from, if any.
    """

    family = "cnn"

    def __init__(
        self, model: nn.Module, label_names: list[str], architecture: str, imgsz: int = 640, *,
        builder: str = "torchvision", config: dict[str, Any] | None = None, weights: str | None = None,
    ) -> None:
        super().__init__(model, label_names, architecture, imgsz)
        _disable_resize(model)
        self.builder = builder
        self.config = dict(config or {})
        self.weights = weights
        self._strides = _probe_strides(model.backbone)

    # ------------------------------------------------------------------ KD geometry
    @property
    def fpn_strides(self) -> list[int]:
        """Strides of the FPN levels in the taps, fine to coarse (e.g. [4, 8, 16, 32, 64]).

        A backbone whose levels share a stride (``fasterrcnn_mobilenet_v3_large_fpn``: two at 32) contributes the
        first of them, which already holds the deeper one through the FPN's top-down path.
        """
        return list(dict.fromkeys(self._strides))

    @property
    def fpn_channels(self) -> int:
        return int(self.model.backbone.out_channels)

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _images(batch: Batch) -> list[Tensor]:
        """The unpadded images: ``batch.images[i, :, :h_i, :w_i]``, each [3, h_i, w_i]."""
        return [batch.images[i, :, :h, :w] for i, (h, w) in enumerate(batch.sizes)]

    def _targets(self, batch: Batch) -> list[dict[str, Tensor]]:
        """torchvision targets: boxes [K, 4] (degenerate ones dropped), labels [K] = model label + 1."""
        out = []
        for t in batch.targets:
            boxes = t["boxes"].reshape(-1, 4).float()
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            labels = self.model_labels(t["labels"].reshape(-1)) + 1
            out.append({"boxes": boxes[keep], "labels": labels[keep]})
        return out

    def _taps(self, features: OrderedDict[str, Tensor], image_sizes: list, batch: Batch) -> dict[str, Any]:
        """Assemble the KD taps (see the module docstring) from the backbone output of one pass."""
        levels = list(features.values())
        if len(levels) != len(self._strides):
            raise RuntimeError(f"backbone returned {len(levels)} levels, expected {len(self._strides)}")
        n = len(batch)
        boxes = [t["boxes"].reshape(-1, 4) for t in batch.targets] or [batch.images.new_zeros((0, 4))] * n
        labels = [t["labels"].reshape(-1) for t in batch.targets] or [
            torch.zeros(0, dtype=torch.long, device=batch.device)
        ] * n
        by_stride: dict[int, Tensor] = {}
        for stride, level in zip(self._strides, levels, strict=True):
            by_stride.setdefault(stride, level)
        return {
            "features": by_stride,
            "image_sizes": [(int(h), int(w)) for h, w in image_sizes],
            "boxes": boxes,
            "labels": labels,
        }

    # ------------------------------------------------------------------ contract
    def _forward_train(self, batch: Batch) -> TrainOutput:
        """One training pass: the model's own losses and the FPN taps recorded by hooks (one backbone pass)."""
        if not self.model.training:
            raise RuntimeError("forward_train needs the model in train mode (call .train())")
        with _Recorder(self.model) as rec:
            losses = self.model(self._images(batch), self._targets(batch))
        return TrainOutput(losses=dict(losses), taps=self._taps(rec.features, rec.image_list.image_sizes, batch))

    def forward_taps(self, batch: Batch) -> dict[str, Any]:
        """Teacher side: transform + backbone/FPN only (the caller sets eval() and no_grad)."""
        image_list, _ = self.model.transform(self._images(batch))
        features = self.model.backbone(image_list.tensors)
        return self._taps(features, image_list.image_sizes, batch)

    def _postprocess_owner(self) -> nn.Module:
        """The module whose ``score_thresh`` / ``detections_per_img`` control the detections."""
        return self.model.roi_heads if hasattr(self.model, "roi_heads") else self.model

    def _predict_raw(self, batch: Batch, score_threshold: float, max_detections: int) -> list[dict[str, Tensor]]:
        """Eval forward: per image boxes [D, 4] xyxy in the batch frame, scores [D], labels [D] (label_names)."""
        owner = self._postprocess_owner()
        with (
            _attributes(owner, score_thresh=float(score_threshold), detections_per_img=int(max_detections)),
            _no_background(self.model),
        ):
            detections = self.model(self._images(batch))
        return [_drop_background(d) for d in detections]

    def info(self) -> dict[str, Any]:
        return {**super().info(), "fpn_strides": self.fpn_strides, "fpn_channels": self.fpn_channels}

    # ------------------------------------------------------------------ save
    def kdctl_config(self) -> dict[str, Any]:
        """The ``kdctl.json`` contents that let :func:`load` rebuild this model without a download."""
        return {
            "format": "kdctl", "version": 1, "family": self.family, "architecture": self.architecture,
            "builder": self.builder, "config": dict(self.config), "weights": self.weights,
            "label_names": list(self.label_names), "imgsz": self.imgsz,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``kdctl.json`` + ``model.safetensors`` into ``directory`` and return it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        write_kdctl_config(directory, self.kdctl_config())
        # clone: safetensors refuses tensors that share storage (and non-contiguous views)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return directory


def _probe_strides(backbone: nn.Module, size: int = PROBE_SIZE) -> list[int]:
    """FPN strides measured once on a zero image [1, 3, size, size] (eval mode, no grad: no state changes)."""
    p = next(iter(backbone.parameters()))
    x = torch.zeros((1, 3, size, size), dtype=p.dtype, device=p.device)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            features = backbone(x)
    finally:
        backbone.train(was_training)
    return [size // f.shape[-2] for f in features.values()]


@contextmanager
def _attributes(obj: object, **values: Any) -> Iterator[None]:
    """Set attributes for the duration of a block, then restore them."""
    saved = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(obj, k, v)


@contextmanager
def _no_background(model: nn.Module) -> Iterator[None]:
    """RetinaNet / FCOS score class 0 (background) like any class: give it -inf logits while predicting, so it
    never takes one of the ``detections_per_img`` slots. (Faster R-CNN drops background itself.)"""
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is None:
        yield
        return

    def hook(module: nn.Module, args: tuple, logits: Tensor) -> Tensor:  # logits [N, HWA, K]
        logits = logits.clone()
        logits[..., 0] = float("-inf")
        return logits

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _drop_background(det: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model labels (background 0) -> indices into label_names; RetinaNet/FCOS can emit label 0: drop it."""
    keep = det["labels"] > 0
    return {"boxes": det["boxes"][keep], "scores": det["scores"][keep], "labels": det["labels"][keep] - 1}


# =========================================================================== load
def load(
    r: Resolved, *, label_names: list[str] | None = None, pretrained_backbone: bool = True,
    trust_remote_code: bool = False, overrides: dict[str, Any] | None = None,
) -> TorchvisionDetector:
    """Build a :class:`TorchvisionDetector` from a resolved spec (kinds "torchvision", "preset", "kdctl_dir")."""
    overrides = dict(overrides or {})
    if r.kind == "torchvision":
        return _load_torchvision(r, label_names, overrides)
    if r.kind == "preset":
        return _load_preset(r, label_names, pretrained_backbone, overrides)
    if r.kind == "kdctl_dir":
        return _load_kdctl_dir(r)
    raise KdctlError(f"{r.spec}: the torchvision adapter cannot load a {r.kind!r} spec")


# --------------------------------------------------------------------------- torchvision builders
def _load_torchvision(r: Resolved, label_names: list[str] | None, overrides: dict[str, Any]) -> TorchvisionDetector:
    name = r.architecture
    if r.weights and _is_file_spec(r.weights):
        return _load_torchvision_file(r, Path(r.weights).expanduser(), label_names, overrides)
    member = _weights_member(name, r.weights) if r.weights else None
    if member is not None:
        names = _categories(member)
        model = _call_builder(name, member, overrides)
    else:
        names = list(label_names) if label_names else _coco_names(name)
        model = _call_builder(name, None, {"num_classes": len(names) + 1, **overrides})
    config = dict(overrides) if member is not None else {"num_classes": len(names) + 1, **overrides}
    return TorchvisionDetector(
        model, names, name, _default_imgsz(model), builder="torchvision", config=config,
        weights=member.name if member is not None else None,
    )


def _load_torchvision_file(
    r: Resolved, path: Path, label_names: list[str] | None, overrides: dict[str, Any]
) -> TorchvisionDetector:
    """``torchvision:NAME:/file.pth``: build without weights, then load the file strictly."""
    name = r.architecture
    state = read_state_file(path)
    names = list(label_names) if label_names else _coco_names(name)
    config = {"num_classes": len(names) + 1, **overrides}
    model = _call_builder(name, None, config)
    _load_adapted(model, state, str(path), hint="; pass the label names it was trained on" if not label_names else "")
    return TorchvisionDetector(model, names, name, _default_imgsz(model), builder="torchvision", config=config)


def _is_file_spec(weights: str) -> bool:
    p = Path(weights).expanduser()
    return p.suffix.lower() in STATE_SUFFIXES or os.sep in weights or "/" in weights or p.exists()


def _weights_enum(name: str) -> Any:
    """The torchvision weights enum class of builder ``name`` (KdctlError for an unknown builder)."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise KdctlError(f"torchvision:{name}: unknown detection builder; available: {', '.join(_builders())}") from e


def _builders() -> list[str]:
    import torchvision

    from kdctl.models.registry import TORCHVISION_PREFIXES

    return [n for n in torchvision.models.list_models(torchvision.models.detection) if n.startswith(TORCHVISION_PREFIXES)]


def _weights_member(name: str, weights: str) -> Any:
    enum = _weights_enum(name)
    try:
        return enum[weights]
    except KeyError as e:
        raise KdctlError(
            f"torchvision:{name}: unknown weights {weights!r}; available: {', '.join(enum.__members__)} "
            "or a local .pth/.safetensors file"
        ) from e


def _categories(member: Any) -> list[str]:
    """Label names of a weights enum member: its meta categories without ``__background__``."""
    cats = list(member.meta.get("categories") or [])
    if not cats or cats[0] != "__background__":
        raise KdctlError(f"{member}: weights meta has no detection categories")
    return cats[1:]


def _coco_names(name: str) -> list[str]:
    """The 90 COCO labels (with "N/A" placeholders) of builder ``name`` (no download: meta only)."""
    import torchvision

    try:
        return _categories(_weights_enum(name).DEFAULT)
    except (KdctlError, AttributeError):
        return _categories(torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn").DEFAULT)


def _default_imgsz(model: nn.Module) -> int:
    """The short side torchvision trained the builder at (its transform's min_size), e.g. 800 or 320."""
    return int(max(model.transform.min_size))


def _call_builder(name: str, member: Any, kwargs: dict[str, Any], served: str | None = None) -> nn.Module:
    """``builder(weights=member, weights_backbone=None, **kwargs)``; user and download errors -> KdctlError.

    ``served``: the file whose state :func:`_serve_state` hands the builder (its load errors name that file).
    """
    import torchvision

    _weights_enum(name)  # unknown builder -> KdctlError
    builder = torchvision.models.get_model_builder(name)
    try:
        return builder(weights=member, weights_backbone=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise KdctlError(f"torchvision:{name}: invalid options {sorted(kwargs)} ({_line(e)})") from e
    except Exception as e:
        if member is None:
            raise
        if served is not None:
            raise KdctlError(f"{served}: weights do not match torchvision:{name}:{member.name} ({_line(e)})") from e
        raise _weights_error(name, member, e) from e


def _weights_error(name: str, member: Any, e: Exception) -> KdctlError:
    """One line naming the weights file that could not be fetched or read, and where to put it."""
    filename = member.url.rsplit("/", 1)[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    what = "download" if isinstance(e, OSError) else "load"  # URLError, HTTPError, socket errors are OSErrors
    return KdctlError(
        f"torchvision:{name}:{member.name}: could not {what} {filename} from {member.url} ({_line(e)}); "
        f"put the file in {cache}/ or pass torchvision:{name}:/path/to/{filename}"
    )


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:200]}" if text else e.__class__.__name__


def _load_adapted(model: nn.Module, state: dict[str, Tensor], where: str, hint: str = "") -> None:
    """Strictly load ``state``; BatchNorm2d layers the file stores frozen (no num_batches_tracked) become frozen."""
    _freeze_bn_like(model, state)
    try:
        load_state_strict(model, state, where)
    except KdctlError as e:
        raise KdctlError(f"{e}{hint}") from e


def _freeze_bn_like(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Replace each BatchNorm2d whose stats are in ``state`` without ``num_batches_tracked`` by FrozenBatchNorm2d.

    torchvision's pretrained detectors use FrozenBatchNorm2d, whose state has no ``num_batches_tracked``.
    """
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and f"{name}.running_mean" in state:
            if f"{name}.num_batches_tracked" not in state:
                model.set_submodule(name, FrozenBatchNorm2d(module.num_features, eps=module.eps))


@contextmanager
def _serve_state(member: Any, state: dict[str, Tensor]) -> Iterator[None]:
    """Make ``member.get_state_dict()`` return ``state``: the builder then builds exactly as for those weights
    (FrozenBatchNorm2d, frozen layers, eps) without a download."""
    enum = type(member)
    previous = enum.__dict__.get("get_state_dict")
    enum.get_state_dict = lambda self, *a, **k: state
    try:
        yield
    finally:
        if previous is None:
            del enum.get_state_dict
        else:
            enum.get_state_dict = previous


# --------------------------------------------------------------------------- kdctl directories
def _load_kdctl_dir(r: Resolved) -> TorchvisionDetector:
    cfg, path = r.config, Path(r.path or ".")
    where = str(path / WEIGHTS_FILE)
    if cfg.get("format") != "kdctl" or cfg.get("family") != "cnn":
        raise KdctlError(f"{path / KDCTL_CONFIG}: not a kdctl CNN detector config")
    names, arch, config = list(cfg["label_names"]), str(cfg.get("architecture", "")), dict(cfg.get("config") or {})
    imgsz = int(cfg.get("imgsz") or 640)
    state = load_safetensors_state(path / WEIGHTS_FILE)
    builder = cfg.get("builder")
    if builder == "preset":
        _check_saved_config(arch, config, where)
        model = _build_preset(arch, config, len(names) + 1, pretrained=False, spec=str(path))
        load_state_strict(model, state, where)
        return TorchvisionDetector(model, names, arch, imgsz, builder="preset", config=config)
    if builder == "torchvision":
        model = _rebuild_torchvision(arch, cfg.get("weights"), config, state, where)
        return TorchvisionDetector(
            model, names, arch, imgsz, builder="torchvision", config=config, weights=cfg.get("weights"),
        )
    raise KdctlError(f"{path / KDCTL_CONFIG}: unknown builder {builder!r} (expected 'torchvision' or 'preset')")


def _rebuild_torchvision(
    name: str, weights: str | None, config: dict[str, Any], state: dict[str, Tensor], where: str
) -> nn.Module:
    """Rebuild a torchvision builder's model as it was saved, weights from ``state`` (no download)."""
    if weights is None:
        model = _call_builder(name, None, config)
        _load_adapted(model, state, where)
        return model
    member = _weights_member(name, weights)
    with _serve_state(member, state):
        model = _call_builder(name, member, config, served=where)
    load_state_strict(model, state, where)
    return model


# --------------------------------------------------------------------------- kdctl presets
def _load_preset(
    r: Resolved, label_names: list[str] | None, pretrained_backbone: bool, overrides: dict[str, Any]
) -> TorchvisionDetector:
    if not label_names:
        raise KdctlError(f"preset {r.spec!r} builds a new detector: it needs the dataset's label names")
    config = {**r.config, **overrides}
    pretrained = bool(pretrained_backbone or config.get("backbone_weights"))
    config = _resolve_preset_config(r.architecture, config, pretrained, r.spec)
    model = _build_preset(r.architecture, config, len(label_names) + 1, pretrained=pretrained, spec=r.spec)
    saved = {k: v for k, v in config.items() if k != "backbone_weights"}  # the weights travel in the model file
    return TorchvisionDetector(model, list(label_names), r.architecture, int(r.imgsz or 640), builder="preset",
                               config=saved)


def _resolve_preset_config(arch: str, config: dict[str, Any], pretrained: bool, spec: str) -> dict[str, Any]:
    """Validate a preset config and fix ``norm`` and ``trainable_layers`` so that a rebuild is identical."""
    if arch not in PRESET_ARCHITECTURES:
        raise KdctlError(f"{spec}: architecture must be one of {', '.join(PRESET_ARCHITECTURES)}, got {arch!r}")
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
    if channels < 1 or (arch == "fcos" and channels % 32):
        raise KdctlError(f"{spec}: fpn_channels must be positive (a multiple of 32 for fcos), got {channels}")
    _check_detector_keys(arch, out, spec)
    return out


def _check_saved_config(arch: str, config: dict[str, Any], where: str) -> None:
    """A saved preset config is already resolved: check it names things this builder knows."""
    if arch not in PRESET_ARCHITECTURES or config.get("backbone") not in BACKBONES or config.get("norm") not in NORMS:
        raise KdctlError(f"{where}: kdctl.json has an unknown architecture/backbone/norm ({arch}, {config.get('backbone')})")
    if "fpn_channels" not in config or "trainable_layers" not in config:
        raise KdctlError(f"{where}: kdctl.json config lacks fpn_channels or trainable_layers")
    _check_detector_keys(arch, config, where)


def _detector_class(arch: str) -> type[nn.Module]:
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    return {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}[arch]


def _check_detector_keys(arch: str, config: dict[str, Any], spec: str) -> None:
    """Every non-backbone key must be a keyword of the detector class (torchvision ignores unknown ones)."""
    params = set(inspect.signature(_detector_class(arch).__init__).parameters) - {"self", "backbone", "kwargs"}
    allowed = params - {"num_classes", "min_size", "max_size"}
    unknown = [k for k in config if k not in BACKBONE_KEYS and k not in allowed]
    if unknown or (arch != "fasterrcnn" and "representation_size" in config):
        bad = unknown or ["representation_size"]
        raise KdctlError(f"{spec}: unknown config key(s) {', '.join(bad)} for {arch}")
    if config.get("head_norm", "none") not in ("none", "gn") or ("head_norm" in config and arch != "retinanet"):
        raise KdctlError(f"{spec}: head_norm is \"none\" or \"gn\" (RetinaNet only), got {config['head_norm']!r}")


def _build_preset(arch: str, config: dict[str, Any], num_classes: int, *, pretrained: bool, spec: str) -> nn.Module:
    """kdctl's builder: ``BackboneWithFPN`` + the detector class, from a config that
    :func:`_resolve_preset_config` resolved (``norm`` and ``trainable_layers`` are taken literally)."""
    backbone = _fpn_backbone(arch, config, pretrained, spec)
    kwargs = {k: v for k, v in config.items() if k not in BACKBONE_KEYS}
    if arch == "fasterrcnn" and "representation_size" in config:
        kwargs.update(_box_head(backbone.out_channels, int(config["representation_size"]), num_classes))
        return _detector_class(arch)(backbone, num_classes=None, **kwargs)
    if arch == "retinanet" and config.get("head_norm") == "gn":  # torchvision's v2 head: GroupNorm in both towers
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
    if arch == "fasterrcnn":
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
                f"{spec}: could not download the ImageNet weights of {name} ({filename}: {_line(e)}); pass "
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


__all__ = ["TorchvisionDetector", "load"]
