"""The adapter: a torchvision FasterRCNN / RetinaNet / FCOS behind the kdctl Detector contract.

How models are built and loaded: :mod:`kdctl.models.cnn.build`; kdctl's own builders: :mod:`kdctl.models.cnn.presets`.

Pixels: a :class:`~kdctl.data.batch.Batch` is already resized; the model's ``GeneralizedRCNNTransform`` keeps
its normalisation but never resizes again (teacher and student see exactly the batch's pixels). The model gets
the UNPADDED images ``batch.images[i, :, :h_i, :w_i]`` and pads them itself to a multiple of 32.

KD taps (:meth:`TorchvisionDetector.forward_train` / :meth:`TorchvisionDetector.forward_taps`)::

    {"features": {stride: Tensor [N, C, h, w]},   # FPN levels, e.g. 4..64 (Faster R-CNN), 8..128 (RetinaNet/FCOS)
     "image_sizes": [(h_i, w_i)],                 # the valid region of image i in the model's input (= batch.sizes)
     "boxes": [Tensor [K_i, 4]],                  # GT xyxy in that frame (= batch.targets boxes)
     "labels": [Tensor [K_i]]}                    # GT dataset class indices (teacher and student agree on them)

and, from a training pass only, what the student's own loss on other targets needs (prediction distillation,
:mod:`kdctl.distill.pred_kd`)::

    {"fpn": OrderedDict[str, Tensor],             # the backbone's output as the heads take it
     "head_outputs": {"cls_logits": [N, A, K], "bbox_regression": [N, A, 4], ...},   # RetinaNet / FCOS
     "anchors": [Tensor [A, 4]],                  # RetinaNet / FCOS, per image
     "proposals": [Tensor [P_i, 4]]}              # Faster R-CNN: the RPN's proposals (detached)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from kdctl.data.batch import Batch
from kdctl.models.base import Detector, TrainOutput
from kdctl.models.weights import write_kdctl_config

WEIGHTS_FILE = "model.safetensors"
PROBE_SIZE = 256  # input side used once to measure the FPN strides (exact for strides <= 256)


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
        self.outputs: dict[str, Any] = {}  # "head_outputs", "anchors", "proposals": whichever the model has
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        self._handles = [
            self.model.transform.register_forward_hook(self._on_transform),
            self.model.backbone.register_forward_hook(self._on_backbone),
        ]
        for name, attr in (("head_outputs", "head"), ("anchors", "anchor_generator"), ("proposals", "rpn")):
            module = getattr(self.model, attr, None)
            if isinstance(module, nn.Module):
                self._handles.append(module.register_forward_hook(self._keep(name)))
        return self

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[name] = output[0] if name == "proposals" else output  # the RPN returns (boxes, losses)

        return hook

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
        self.pad_stride = 1  # the unpadded images go in; torchvision's transform pads to its own size_divisible

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
    def _forward_train(self, batch: Batch, taps: bool = True) -> TrainOutput:
        """One training pass: the model's own losses and the FPN taps recorded by hooks (one backbone pass);
        ``taps=False``: the losses only, no hooks."""
        if not self.model.training:
            raise RuntimeError("forward_train needs the model in train mode (call .train())")
        if not taps:
            return TrainOutput(losses=dict(self.model(self._images(batch), self._targets(batch))))
        with _Recorder(self.model) as rec:
            losses = self.model(self._images(batch), self._targets(batch))
        taps = self._taps(rec.features, rec.image_list.image_sizes, batch)
        return TrainOutput(losses=dict(losses), taps={**taps, "fpn": rec.features, **rec.outputs})

    def forward_taps(self, batch: Batch) -> dict[str, Any]:
        """Teacher side: transform + backbone/FPN only (the caller sets eval() and no_grad)."""
        image_list, _ = self.model.transform(self._images(batch))
        features = self.model.backbone(image_list.tensors)
        return self._taps(features, image_list.image_sizes, batch)

    @contextmanager
    def postprocessing(self, score_threshold: float, max_detections: int) -> Iterator[None]:
        """While in the block, ``self.model`` keeps detections scoring at least ``score_threshold``, at most
        ``max_detections`` per image, and never a background one (what :meth:`predict` and ONNX export use)."""
        owner = self.model.roi_heads if hasattr(self.model, "roi_heads") else self.model  # holds score_thresh
        with (
            _attributes(owner, score_thresh=float(score_threshold), detections_per_img=int(max_detections)),
            _no_background(self.model),
        ):
            yield

    def _predict_raw(self, batch: Batch, score_threshold: float, max_detections: int) -> list[dict[str, Tensor]]:
        """Eval forward: per image boxes [D, 4] xyxy in the batch frame, scores [D], labels [D] (label_names)."""
        with self.postprocessing(score_threshold, max_detections):
            detections = self.model(self._images(batch))
        return [_drop_background(d) for d in detections]

    def _replace_head(self, names: list[str], keep: dict[int, int], keep_background: bool) -> None:
        """Faster R-CNN's box predictor or RetinaNet's / FCOS' class conv (:mod:`kdctl.models.cnn.heads`); the
        saved config records the new class count (a weights-enum model is rebuilt with its own head, then this)."""
        from kdctl.models.cnn.heads import replace_class_head

        rows = {j + 1: i + 1 for j, i in keep.items()}
        if keep_background:
            rows[0] = 0
        replace_class_head(self.model, len(names) + 1, rows)
        if self.builder == "torchvision":
            self.config["num_classes"] = len(names) + 1

    def info(self) -> dict[str, Any]:
        return {**super().info(), "fpn_strides": self.fpn_strides, "fpn_channels": self.fpn_channels}

    # ------------------------------------------------------------------ save
    def kdctl_config(self) -> dict[str, Any]:
        """The ``kdctl.json`` contents that let :func:`kdctl.models.cnn.load` rebuild this model without a download."""
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


__all__ = ["PROBE_SIZE", "WEIGHTS_FILE", "TorchvisionDetector"]
