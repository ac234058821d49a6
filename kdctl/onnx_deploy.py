"""Make an exported ONNX graph deployable: fp16, its own metadata, simplification.

* :func:`to_half`: ``"full"`` converts weights, activations and the float inputs/outputs to float16 with
  onnxruntime's converter (``onnxruntime.transformers.float16``; ops without fp16 kernels stay float32 behind
  casts); ``"weights"`` stores the float weights as float16 and casts them back to float32 at load (half the
  file, float32 compute and I/O): the CNN graphs, whose post-processing subgraphs (``If``/``Loop`` of the
  batched NMS) the converter cannot type, and any graph whose full conversion onnxruntime refuses.
* :func:`write_metadata`: class names, input size, normalisation, box format (everything a runtime needs to use
  the graph without the side JSON) as the file's own ``metadata_props``; :func:`read_metadata` reads them back.
* :func:`simplify`: onnxslim, else onnx-simplifier, when installed (:func:`simplifier` says which).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError

META_PREFIX = "kdctl."
SIMPLIFIERS = ("onnxslim", "onnxsim")
SIMPLIFY_HINT = "pip install onnxslim (or onnxsim), or the extra: pip install 'kdctl[onnx-tools]'"


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def _save(model: Any, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def to_half(path: Path, mode: str) -> str:
    """Rewrite the float32 graph at ``path`` in float16 (``mode`` "full" or "weights", see the module docstring);
    returns a one-line description of what is float16."""
    model = _load(path)
    if mode == "full":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=False)
        del model.graph.value_info[:]  # the converter's per-tensor type annotations: file size, not needed
        _save(model, path)
        return "float16 weights, activations and float inputs/outputs (ops without fp16 kernels behind casts)"
    n = weights_to_half(model)
    _save(model, path)
    return f"float16 weights ({n} tensors, cast to float32 at load); float32 compute, inputs and outputs"


def weights_to_half(model: Any) -> int:
    """Store every float32 initializer of the main graph as float16 with a Cast back to float32 under its old name
    (subgraphs that read it by name keep working). Returns how many were converted."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts, kept, n = [], [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        arr = numpy_helper.to_array(init)
        half_name = f"{init.name}__fp16"
        kept.append(numpy_helper.from_array(np.clip(arr, -65504, 65504).astype(np.float16), half_name))
        casts.append(helper.make_node("Cast", [half_name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__cast"))
        n += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return n


def metadata_props(meta: dict[str, Any]) -> dict[str, str]:
    """The ``metadata_props`` of a graph described by ``meta`` (``model.onnx.json`` without the parity report)."""
    norm = meta.get("normalization", {})
    props = {
        "names": json.dumps(dict(enumerate(meta["label_names"]))),
        "imgsz": json.dumps(meta["imgsz"]),
        "image_mean": json.dumps(norm.get("image_mean")),
        "image_std": json.dumps(norm.get("image_std")),
        "normalization": norm.get("applied", ""),
        "box_format": meta.get("box_format", ""),
        "scores": meta.get("scores", ""),
        "shapes": meta.get("shapes", ""),
        "precision": meta.get("precision", "float32"),
        "family": meta["family"],
        "architecture": meta["architecture"],
        META_PREFIX + "json": json.dumps({k: v for k, v in meta.items() if k != "parity"}),
    }
    return props


def write_metadata(path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """Write :func:`metadata_props` into the graph at ``path`` (replacing earlier ones); returns them."""

    model = _load(path)
    props = metadata_props(meta)
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "kdctl"
    _save(model, path)
    return props


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The description kdctl wrote into the graph's ``metadata_props`` (what ``model.onnx.json`` holds, without
    the parity report), or None for a graph kdctl did not write."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    raw = props.get(META_PREFIX + "json")
    return json.loads(raw) if raw else None


def simplifier() -> str | None:
    """The installed simplifier's module name (onnxslim first), or None."""
    return next((m for m in SIMPLIFIERS if importlib.util.find_spec(m) is not None), None)


def require_simplifier() -> str:
    """The installed simplifier, or one KdctlError line saying how to install one (before anything is written)."""
    name = simplifier()
    if name is None:
        raise KdctlError(f"--simplify needs onnxslim or onnxsim, and neither is installed ({SIMPLIFY_HINT}); "
                         "or export without --simplify")
    return name


def simplify(path: Path) -> str:
    """Simplify the graph at ``path`` in place (constant folding, dead and duplicate node removal); returns a
    one-line note with the node counts before and after."""
    name = require_simplifier()
    model = _load(path)
    before = len(model.graph.node)
    try:
        if name == "onnxslim":
            import onnxslim

            out = onnxslim.slim(model)
        else:
            import onnxsim

            out, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified graph")
    except Exception as e:  # the simplifier's own failure: keep the plain graph, say so
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"{name} could not simplify the graph ({e.__class__.__name__}: {first}); kept it as exported"
    _save(out, path)
    return f"simplified with {name}: {before} -> {len(out.graph.node)} nodes"


__all__ = ["SIMPLIFY_HINT", "metadata_props", "read_metadata", "require_simplifier", "simplifier", "simplify",
           "to_half", "weights_to_half", "write_metadata"]
