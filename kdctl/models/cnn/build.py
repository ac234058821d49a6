"""Building and loading CNN detectors: :func:`load`, dispatched on ``Resolved.kind``.

* ``torchvision:NAME[:W]``: a builder of ``torchvision.models.detection`` (``fasterrcnn_resnet50_fpn``, ...);
  ``W`` is a weights enum member (``DEFAULT``, ``COCO_V1``: a download) or a local ``.pth``/``.safetensors``
  state dict. Backbone weights are never downloaded implicitly (``weights_backbone=None``).
* a preset (``presets/models/*.toml``): kdctl's own builders (:mod:`kdctl.models.cnn.presets`).
* a kdctl directory written by :meth:`TorchvisionDetector.save` (``kdctl.json`` + ``model.safetensors``), rebuilt
  without a download.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from kdctl.errors import KdctlError
from kdctl.io import first_line
from kdctl.models.cnn.adapter import WEIGHTS_FILE, TorchvisionDetector
from kdctl.models.cnn.architectures import ARCHITECTURES
from kdctl.models.cnn.heads import head_classes, replace_class_head, resize_head_state
from kdctl.models.cnn.presets import build_preset, check_saved_config, resolve_preset_config
from kdctl.models.weights import KDCTL_CONFIG, load_safetensors_state, load_state_strict, read_state_file

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.resolved import Resolved

STATE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


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
    """``torchvision:NAME:/file.pth``: build without weights at the file's class count, then load it strictly.

    Labels: ``label_names`` when the file's head has that many classes, else COCO's when it has COCO's 91, else
    ``class1`` ... when ``label_names`` are given (a new head for the data's classes is the engine's business,
    :mod:`kdctl.models.labels`)."""
    name = r.architecture
    state = read_state_file(path)
    names = _file_labels(state, name, label_names)
    config = {"num_classes": len(names) + 1, **overrides}
    model = _call_builder(name, None, config)
    _load_adapted(model, state, str(path), hint="; pass the label names it was trained on" if not label_names else "")
    return TorchvisionDetector(model, names, name, _default_imgsz(model), builder="torchvision", config=config)


def _file_labels(state: dict[str, Tensor], name: str, label_names: list[str] | None) -> list[str]:
    classes, coco = head_classes(state), _coco_names(name)
    if label_names and (classes is None or classes == len(label_names) + 1):
        return list(label_names)
    if label_names and classes != len(coco) + 1:
        return [f"class{i}" for i in range(1, classes)]  # unknown names: the engine gives it a new head
    return coco  # without label names, a head of another size is a load error asking for them


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

    prefixes = tuple(ARCHITECTURES)
    return [n for n in torchvision.models.list_models(torchvision.models.detection) if n.startswith(prefixes)]


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
        raise KdctlError(f"torchvision:{name}: invalid options {sorted(kwargs)} ({first_line(e)})") from e
    except Exception as e:
        if member is None:
            raise
        if served is not None:
            raise KdctlError(f"{served}: weights do not match torchvision:{name}:{member.name} ({first_line(e)})") from e
        raise _weights_error(name, member, e) from e


def _weights_error(name: str, member: Any, e: Exception) -> KdctlError:
    """One line naming the weights file that could not be fetched or read, and where to put it."""
    filename = member.url.rsplit("/", 1)[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    what = "download" if isinstance(e, OSError) else "load"  # URLError, HTTPError, socket errors are OSErrors
    return KdctlError(
        f"torchvision:{name}:{member.name}: could not {what} {filename} from {member.url} ({first_line(e)}); "
        f"put the file in {cache}/ or pass torchvision:{name}:/path/to/{filename}"
    )


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
        check_saved_config(arch, config, where)
        model = build_preset(arch, config, len(names) + 1, pretrained=False, spec=str(path))
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
    classes = config.get("num_classes")  # a new head (kdctl.models.labels): built as the weights', then replaced
    config = {k: v for k, v in config.items() if k != "num_classes"}
    own = len(_categories(member)) + 1
    served = state if classes is None else resize_head_state(state, int(classes), own)
    with _serve_state(member, served):
        model = _call_builder(name, member, config, served=where)
    if classes is not None:
        replace_class_head(model, int(classes), {})
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
    config = resolve_preset_config(r.architecture, config, pretrained, r.spec)
    model = build_preset(r.architecture, config, len(label_names) + 1, pretrained=pretrained, spec=r.spec)
    saved = {k: v for k, v in config.items() if k != "backbone_weights"}  # the weights travel in the model file
    return TorchvisionDetector(model, list(label_names), r.architecture, int(r.imgsz or 640), builder="preset",
                               config=saved)


__all__ = ["STATE_SUFFIXES", "load"]
