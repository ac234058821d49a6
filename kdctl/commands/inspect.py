"""``kdctl inspect``."""

from __future__ import annotations

import json
from typing import Any

from kdctl.commands.output import console


def inspect_model(spec: str, *, as_json: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    from kdctl.models.license import checkpoint_license
    from kdctl.specs import load_detector, resolve

    r = resolve(spec)
    # a preset has no label space of its own: build it with one placeholder class to show its architecture
    placeholder = ["object"] if r.kind == "preset" else None
    det = load_detector(r, label_names=placeholder, pretrained_backbone=False, trust_remote_code=trust_remote_code)
    info = det.info()
    lic = checkpoint_license(r.path)  # what the checkpoint's card or config states, if anything
    if lic:
        info["license"] = lic
    if placeholder:
        info.update(num_labels=None, label_names=[], labels="taken from the data or teacher",
                    parameters_note="counted with a 1-class head")
    if as_json:
        print(json.dumps(info, indent=2))
        return info
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    names = info["label_names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    labels = info.get("labels") or f"{info['num_labels']}: {shown}"
    size = f"{info['parameters'] / 1e6:.2f} M ({info['parameters']:,})"
    if info.get("parameters_note"):
        size += f", {info['parameters_note']}"
    rows = [
        ("spec", info["source"]),
        ("family", f"{info['family']} ({'CNN detector' if info['family'] == 'cnn' else 'DETR family'})"),
        ("architecture", info["architecture"]),
        ("class", info["class"]),
        ("parameters", size),
        ("labels", labels),
        ("input size", f"longer side {info['imgsz']} px"),
        ("KD methods", ", ".join(info["kd_methods"]) or "none"),
    ]
    for k, v in info.items():
        if k not in {"source", "family", "architecture", "class", "parameters", "num_labels", "label_names",
                     "imgsz", "kd_methods", "labels", "parameters_note"}:
            rows.append((k.replace("_", " "), str(v)))
    for k, v in rows:
        t.add_row(k, v)
    console().print(t)
    return info
