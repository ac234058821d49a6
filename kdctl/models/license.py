"""The licence a checkpoint states: its model card's front matter (``README.md``, ``license:``) or its config.

Torch-free. RF-DETR, for one, licenses its sizes differently (Nano to Large Apache-2.0, XLarge and 2XLarge PML 1.0),
so ``kdctl inspect`` shows what the checkpoint itself says and nothing when it says nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KEYS = ("license", "licence")
CONFIGS = ("config.json", "kdctl.json")


def checkpoint_license(path: Path | None) -> str | None:
    """``license`` (and ``license_name`` / ``license_link`` when the card adds them) from ``path/README.md``'s YAML
    front matter, else a ``license`` key of ``config.json`` / ``kdctl.json`` (top level or the backbone's); None
    when neither states one. An unreadable card or config counts as stating none."""
    if path is None or not path.is_dir():
        return None
    return _from_card(path / "README.md") or next((v for c in CONFIGS if (v := _from_config(path / c))), None)


def _from_card(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    try:
        from huggingface_hub.repocard import metadata_load

        meta = metadata_load(readme) or {}
    except Exception:  # a malformed card states nothing we can read
        return None
    value = _first(meta)
    if value is None:
        return None
    extra = [str(meta[k]) for k in ("license_name", "license_link") if meta.get(k)]
    return f"{value} ({', '.join(extra)})" if extra else value


def _from_config(config: Path) -> str | None:
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return _first(data) or _first(data.get("backbone_config") or {})


def _first(d: dict[str, Any]) -> str | None:
    for k in KEYS:
        v = d.get(k) if isinstance(d, dict) else None
        if isinstance(v, list) and v:
            return ", ".join(str(x) for x in v)
        if v:
            return str(v)
    return None


__all__ = ["checkpoint_license"]
