"""Model files on disk: ``kdctl.json`` beside the weights, safetensors and plain state-dict files, strict loading.

Weights are never unpickled blindly: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdctl.errors import KdctlError
from kdctl.io import first_line, read_json

KDCTL_CONFIG = "kdctl.json"
"""Name of the small JSON file that kdctl writes next to the weights of a model it saves."""


def read_kdctl_config(directory: Path) -> dict[str, Any]:
    """Read ``kdctl.json`` from a kdctl model directory (one clear error when it is unreadable)."""
    path = Path(directory) / KDCTL_CONFIG
    if not path.is_file():
        raise KdctlError(f"{directory}: no {KDCTL_CONFIG} (not a kdctl model directory)")
    cfg = read_json(path, "kdctl config", expect=None)
    if not isinstance(cfg, dict) or "family" not in cfg or "label_names" not in cfg:
        raise KdctlError(f"{path}: kdctl config lacks 'family' or 'label_names'")
    return cfg


def write_kdctl_config(directory: Path, cfg: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KDCTL_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def load_safetensors_state(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file; a corrupt or truncated file is one clear KdctlError."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except FileNotFoundError as e:
        raise KdctlError(f"{path}: weights file not found") from e
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt files
        raise KdctlError(f"{path}: corrupt or unreadable safetensors file ({e})") from e


def load_state_strict(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` whose mismatch is a KdctlError naming a few keys."""
    missing, unexpected = [], []
    own = module.state_dict()
    for k in own:
        if k not in state:
            missing.append(k)
    for k in state:
        if k not in own:
            unexpected.append(k)
    if missing or unexpected:
        raise KdctlError(
            f"{where}: weights do not match the architecture (missing {len(missing)}: {missing[:3]}, "
            f"unexpected {len(unexpected)}: {unexpected[:3]})"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise KdctlError(f"{where}: weight shapes do not match the architecture ({len(bad)} tensors, e.g. {bad[0]})")
    module.load_state_dict(state, strict=True)


def read_state_file(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (weights_only; {"model": sd} unwrapped)."""
    if not path.is_file():
        raise KdctlError(f"{path}: weights file not found")
    if path.suffix.lower() == ".safetensors":
        return load_safetensors_state(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise KdctlError(f"{path}: corrupt or unsafe weights file, not a plain state dict ({first_line(e)})") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise KdctlError(f"{path}: not a state dict (expected a dict of tensors)")
    return obj
