"""Model specs: one string names a teacher or a student.

=============================================  ==============================================================
``facebook/detr-resnet-101[@revision]``        Hugging Face Hub repo id (downloaded through huggingface_hub)
``./my-detr`` (has ``config.json``)            a transformers ``save_pretrained`` directory
``./student`` (has ``kdctl.json``)             a directory written by kdctl (safetensors + kdctl.json)
``runs/train/exp``                             a kdctl run directory (its ``best/``, else ``last/``, model)
``torchvision:fasterrcnn_resnet50_fpn[:W]``    a torchvision builder; W = weights enum (``DEFAULT``,
                                               ``COCO_V1``) or a local ``.pth``/``.safetensors`` file
``detr-r18``                                   a preset TOML from ``presets/models/``
=============================================  ==============================================================

:func:`resolve` is cheap (no torch import, no download); :func:`load_detector` builds the Detector.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdctl._compat import tomllib
from kdctl.errors import KdctlError
from kdctl.io import first_line
from kdctl.models.registry import FAMILIES, HF_MODEL_TYPES, REFUSED_MODEL_TYPES, TORCHVISION_PREFIXES, import_string
from kdctl.models.resolved import Resolved

if TYPE_CHECKING:  # pragma: no cover
    from kdctl.models.base import Detector

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
"""A Hugging Face Hub repository id, ``user/name`` (models and datasets)."""
HUB_ID = re.compile(REPO_ID.pattern.removesuffix("$") + r"(@[\w./-]+)?$")
"""A model spec naming a Hub repository, optionally at a revision: ``user/name[@revision]``."""
HUB_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.toml"]


# --------------------------------------------------------------------------- presets
def preset_dirs() -> list[Path]:
    """Where preset TOMLs are looked up: $KDCTL_PRESETS, the installed package copy, the source tree."""
    here = Path(__file__).resolve().parent
    dirs = []
    if os.environ.get("KDCTL_PRESETS"):
        dirs.append(Path(os.environ["KDCTL_PRESETS"]))
    dirs += [here / "_presets", here.parent / "presets"]
    return [d for d in dirs if d.is_dir()]


def list_presets(kind: str = "models") -> dict[str, Path]:
    """Preset name -> TOML path, for ``kind`` "models" or "recipes"."""
    found: dict[str, Path] = {}
    for d in preset_dirs():
        for p in sorted((d / kind).glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def read_preset(name: str, kind: str = "models") -> dict[str, Any]:
    presets = list_presets(kind)
    if name not in presets:
        raise KdctlError(f"unknown {kind[:-1]} preset {name!r}; available: {', '.join(presets) or 'none'}")
    try:
        return tomllib.loads(presets[name].read_text())
    except tomllib.TOMLDecodeError as e:
        raise KdctlError(f"{presets[name]}: invalid TOML ({e})") from e


# --------------------------------------------------------------------------- resolve
def resolve(spec: str, *, download: bool = True) -> Resolved:
    """Turn a spec string into a :class:`Resolved` (downloads hub repos into the huggingface_hub cache)."""
    spec = spec.strip()
    if not spec:
        raise KdctlError("empty model spec")
    if spec.startswith("torchvision:"):
        return _resolve_torchvision(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_path(spec, path)
    if spec in list_presets("models"):
        p = read_preset(spec)
        fam = p.get("family")
        if fam not in FAMILIES:
            raise KdctlError(f"preset {spec!r}: family must be one of {sorted(FAMILIES)}, got {fam!r}")
        return Resolved(
            spec=spec, kind="preset", family=fam, architecture=str(p.get("architecture", "")),
            config=dict(p.get("config", {})), imgsz=p.get("imgsz"), description=p.get("description", ""),
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        if not download:
            return Resolved(spec=spec, kind="hub", family="?", architecture="?", hub_id=spec)
        return _resolve_path(spec, _download(spec), hub_id=spec.split("@")[0])
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec
    if looks_like_path:
        raise KdctlError(f"model path {spec!r} does not exist")
    raise KdctlError(
        f"unknown model spec {spec!r}: not a local path, a preset ({', '.join(list_presets('models'))}), "
        "torchvision:NAME or a Hugging Face repo id (user/name)"
    )


def _resolve_torchvision(spec: str) -> Resolved:
    parts = spec.split(":", 2)
    name = parts[1] if len(parts) > 1 else ""
    weights = parts[2] if len(parts) > 2 and parts[2] else None
    if not name.startswith(TORCHVISION_PREFIXES):
        raise KdctlError(
            f"{spec!r}: kdctl adapts torchvision detectors starting with {', '.join(TORCHVISION_PREFIXES)} "
            "(e.g. torchvision:fasterrcnn_resnet50_fpn)"
        )
    return Resolved(spec=spec, kind="torchvision", family="cnn", architecture=name, weights=weights)


def _resolve_path(spec: str, path: Path, hub_id: str | None = None) -> Resolved:
    from kdctl.models.weights import KDCTL_CONFIG, read_kdctl_config

    if path.is_file():
        if path.name in (KDCTL_CONFIG, "config.json") or path.suffix == ".safetensors":
            return _resolve_path(spec, path.parent, hub_id)
        raise KdctlError(
            f"{path}: a single weights file does not name its architecture; pass its directory (with "
            f"{KDCTL_CONFIG} or config.json) or torchvision:NAME:{path}"
        )
    if (path / KDCTL_CONFIG).is_file():
        cfg = read_kdctl_config(path)
        if cfg["family"] not in FAMILIES:
            raise KdctlError(f"{path / KDCTL_CONFIG}: unknown family {cfg['family']!r}")
        return Resolved(
            spec=spec, kind="kdctl_dir", family=cfg["family"], architecture=str(cfg.get("architecture", "")),
            path=path, config=cfg, imgsz=cfg.get("imgsz"), hub_id=hub_id,
        )
    if (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KdctlError(f"{path / 'config.json'}: corrupt config ({e})") from e
        mt = cfg.get("model_type") if isinstance(cfg, dict) else None
        if mt in REFUSED_MODEL_TYPES:
            raise KdctlError(f"{path}: {REFUSED_MODEL_TYPES[mt]}")
        if mt not in HF_MODEL_TYPES:
            raise KdctlError(
                f"{path}: transformers model_type {mt!r} is not supported; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        arch = (cfg.get("architectures") or [""])[0]
        return Resolved(
            spec=spec, kind="hf_dir", family=HF_MODEL_TYPES[mt], architecture=arch, path=path, config=cfg,
            hub_id=hub_id,
        )
    for sub in ("best", "last"):  # a kdctl run directory
        if (path / sub).is_dir() and ((path / sub / KDCTL_CONFIG).is_file() or (path / sub / "config.json").is_file()):
            return _resolve_path(spec, path / sub, hub_id)
    raise KdctlError(
        f"{path}: not a model directory (no {KDCTL_CONFIG}, no config.json, no best/ or last/ checkpoint)"
    )


def _download(spec: str) -> Path:
    """snapshot_download a hub repo (config, safetensors and small files) through the huggingface_hub cache."""
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - dependency
        raise KdctlError(f"huggingface_hub is needed to download {spec!r}: {e}") from e
    try:
        local = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except GatedRepoError as e:
        raise KdctlError(f"{repo_id}: gated repository; log in with `hf auth login` and accept its terms") from e
    except RepositoryNotFoundError as e:
        raise KdctlError(f"{repo_id}: repository not found on the Hugging Face Hub (or private: log in)") from e
    except RevisionNotFoundError as e:
        raise KdctlError(f"{repo_id}: revision {revision!r} not found") from e
    except LocalEntryNotFoundError as e:
        raise KdctlError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub is unreachable (offline or "
            "HF_HUB_OFFLINE=1); download it once online or pass a local directory"
        ) from e
    except Exception as e:  # network errors, HTTP errors
        raise KdctlError(f"{repo_id}: download failed ({first_line(e)})") from e
    p = Path(local)
    if not (p / "config.json").is_file() and not (p / "kdctl.json").is_file():
        raise KdctlError(f"{repo_id}: the repository has no config.json or kdctl.json (not a detector checkpoint)")
    if not any(p.glob("*.safetensors")) and (p / "config.json").is_file():
        # transformers checkpoints without safetensors: fetch the .bin, which transformers reads with weights_only
        try:
            local = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS + ["*.bin"])
        except Exception as e:
            raise KdctlError(f"{repo_id}: no safetensors weights and the .bin download failed ({e})") from e
        p = Path(local)
    return p


# --------------------------------------------------------------------------- load
def load_detector(
    spec: str | Resolved,
    *,
    label_names: list[str] | None = None,
    pretrained_backbone: bool = True,
    trust_remote_code: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Detector:
    """Build the Detector a spec names.

    Args:
        spec: a spec string or an already resolved spec.
        label_names: the label space for models created from scratch (presets, torchvision builders without
            weights); checkpoints keep their own labels (map with ``Detector.set_classes``).
        pretrained_backbone: for presets, initialise the backbone from ImageNet weights (needs a download).
        trust_remote_code: allow transformers checkpoints with custom code (explicit opt-in only).
        overrides: preset config values to override (e.g. ``{"num_queries": 50}``).
    """
    r = resolve(spec) if isinstance(spec, str) else spec
    loader = import_string(FAMILIES[r.family])
    det = loader(
        r, label_names=label_names, pretrained_backbone=pretrained_backbone, trust_remote_code=trust_remote_code,
        overrides=overrides or {},
    )
    det.source = r.spec
    return det
