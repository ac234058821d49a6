"""The Detector contract shared by every detector family (torchvision CNNs, transformers DETRs).

A Detector wraps the family's own ``nn.Module`` (``self.model``) and speaks kdctl's language:

* input is a :class:`kdctl.data.batch.Batch` (0-1 RGB pixels, resized once for teacher and student alike);
* labels inside kdctl are *dataset class indices*; each Detector maps them to its own label ids through
  :meth:`Detector.set_classes`, built from class names;
* :meth:`forward_train` returns the model's own losses AND the internals ("taps") a KD method needs, from the
  same single pass; :meth:`forward_taps` returns the taps alone (teacher side, no losses);
* :meth:`predict` returns xyxy boxes in ORIGINAL image pixels, scores and labels (dataset indices when
  :meth:`set_classes` was called, else indices into :attr:`label_names`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdctl.data.batch import Batch
from kdctl.errors import KdctlError
from kdctl.models.labels import match_classes, norm_name


@dataclass
class TrainOutput:
    """What :meth:`Detector.forward_train` returns.

    losses: the model's own detection losses, each a scalar tensor (summed by the engine).
    taps: family-specific internals for KD (see the family's adapter docstring), e.g.
        CNN: ``{"features": {stride: [N, C, h, w]}, "image_sizes": [(h, w)], "boxes": [[K_i, 4]]}``;
        DETR: ``{"memory": ..., "outputs": {...}}`` plus what :meth:`DetrDetector.decode` needs.
    """

    losses: dict[str, Tensor]
    taps: dict[str, Any] = field(default_factory=dict)


class Detector(nn.Module):
    """Base class of all detector adapters.

    Subclasses set ``family`` ("cnn" or "detr") and implement ``_forward_train``, ``forward_taps``,
    ``_predict_raw`` and ``save``.
    """

    family: ClassVar[str] = "?"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's ``save`` leaves its weight files with the process umask's permissions."""
        super().__init_subclass__(**kwargs)
        save = cls.__dict__.get("save")
        if save is not None and not getattr(save, "_kdctl_umask", False):
            cls.save = _with_umask(save)

    def __init__(self, model: nn.Module, label_names: list[str], architecture: str, imgsz: int = 640) -> None:
        super().__init__()
        self.model = model
        self.label_names = list(label_names)
        self.architecture = architecture
        self.imgsz = int(imgsz)
        self.pad_stride = 32  # what the collated batch is padded to a multiple of (1: the model needs none)
        self.source = ""  # the spec string it was loaded from, for reports
        # dataset class index -> index into label_names (None until set_classes is called)
        self._to_model: Tensor | None = None
        self._dataset_names: list[str] | None = None

    # ------------------------------------------------------------------ labels
    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def set_classes(self, dataset_names: list[str], label_map: dict[str, str] | None = None, hint: str = "") -> None:
        """Map dataset classes to this model's labels by name (case-insensitive).

        ``label_map`` maps a dataset class name to a model label name and overrides the name match.
        A dataset class the model lacks raises :class:`KdctlError` naming it (``hint`` appended to the advice).
        """
        rows = map_classes(dataset_names, self.label_names, label_map, hint)
        self._to_model = torch.as_tensor(rows, dtype=torch.long)
        self._dataset_names = list(dataset_names)

    def replace_head(self, names: list[str], keep: dict[int, int], keep_background: bool = True) -> None:
        """Give the model a new class head for ``names`` (every class head it has, and its config).

        Row ``i`` of the new head is copied from row ``keep[i]`` of the current one (per-class box deltas and
        per-anchor channels included); the others start as the architecture's own init does.
        ``keep_background``: copy the background / no-object row too (False: ``--head new``, nothing copied).
        The dataset mapping is cleared: call :meth:`set_classes` again. See :mod:`kdctl.models.labels`.
        """
        names = [str(n) for n in names]
        if not names:
            raise KdctlError("a new head needs at least one class")
        bad = {int(k): int(v) for k, v in keep.items() if not (0 <= k < len(names) and 0 <= v < self.num_classes)}
        if bad:
            raise KdctlError(f"head rows out of range: {bad}")
        self._replace_head(names, {int(k): int(v) for k, v in keep.items()}, keep_background)
        self.label_names = names
        self._to_model, self._dataset_names = None, None

    def _replace_head(self, names: list[str], keep: dict[int, int], keep_background: bool) -> None:
        raise KdctlError(f"{self.architecture}: kdctl cannot replace this model's class head")  # pragma: no cover

    @property
    def dataset_names(self) -> list[str] | None:
        return self._dataset_names

    def model_labels(self, labels: Tensor) -> Tensor:
        """Dataset class indices -> indices into ``label_names`` (identity before :meth:`set_classes`)."""
        if self._to_model is None:
            return labels
        return self._to_model.to(labels.device)[labels]

    def dataset_labels(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Indices into ``label_names`` -> (dataset indices, keep mask); labels with no dataset class are dropped."""
        if self._to_model is None:
            return labels, torch.ones_like(labels, dtype=torch.bool)
        inv = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        inv[self._to_model.to(labels.device)] = torch.arange(len(self._to_model), device=labels.device)
        out = inv[labels]
        return out, out >= 0

    # ------------------------------------------------------------------ contract
    def forward_train(self, batch: Batch, taps: bool = True) -> TrainOutput:
        """Training forward: losses and KD taps from one pass (the model must be in train mode); ``taps=False``
        (plain ``kdctl train``) records none and returns empty taps."""
        return self._forward_train(batch, taps)

    def _forward_train(self, batch: Batch, taps: bool = True) -> TrainOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_taps(self, batch: Batch) -> dict[str, Any]:  # pragma: no cover - abstract
        """Teacher-side forward: the KD internals only (call under no_grad / inference_mode, eval mode)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: Batch, score_threshold: float = 0.001, max_detections: int = 100) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` float [D, 4] xyxy in ORIGINAL pixels, ``scores`` [D], ``labels`` [D].

        Labels are dataset class indices after :meth:`set_classes` (detections of classes the dataset lacks are
        dropped), otherwise indices into :attr:`label_names`. Sorted by descending score.
        """
        was_training = self.training
        self.eval()
        try:
            raw = self._predict_raw(batch, score_threshold, max_detections)
        finally:
            self.train(was_training)
        out = []
        scales = batch.scales().to(batch.device)
        for det, (sx, sy), (oh, ow) in zip(raw, scales, batch.orig_sizes, strict=True):
            boxes = det["boxes"].float() / torch.stack([sx, sy, sx, sy])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
            labels, keep = self.dataset_labels(det["labels"])
            scores = det["scores"].float()
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            order = scores.argsort(descending=True)[:max_detections]
            out.append({"boxes": boxes[order], "scores": scores[order], "labels": labels[order]})
        return out

    @torch.no_grad()
    def predict_images(self, images: list, imgsz: int | None = None, score_threshold: float = 0.25,
                       max_detections: int = 100) -> list[dict[str, Any]]:
        """Detect objects in image files, PIL images or uint8 [3, H, W] tensors (the convenience API).

        Returns per image ``{"boxes": [[x0, y0, x1, y1], ...] in original pixels, "scores": [...],
        "labels": [...] (indices), "names": [...]}``.
        """
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        from kdctl.data.batch import collate
        from kdctl.data.images import decode
        from kdctl.data.transforms import build_transforms

        tf = build_transforms(imgsz or self.imgsz, train=False)
        samples = []
        for im in images:
            if isinstance(im, (str, Path)):
                t = decode(Path(im), apply_exif=True)  # a photo as viewers show it (EXIF orientation applied)
            elif isinstance(im, Tensor):
                t = im
            else:  # PIL: as viewers show it
                from PIL import ImageOps

                t = F.pil_to_tensor(ImageOps.exif_transpose(im).convert("RGB"))
            h, w = t.shape[-2:]
            boxes = tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(h, w))
            img, tgt = tf(tv_tensors.Image(t), {"boxes": boxes, "labels": torch.zeros(0, dtype=torch.long)})
            samples.append((img.as_subclass(Tensor), {"boxes": tgt["boxes"].as_subclass(Tensor),
                                                      "labels": tgt["labels"], "orig_size": (h, w)}))
        device = next(self.parameters()).device
        dets = self.predict(collate(samples, stride=self.pad_stride).to(device), score_threshold, max_detections)
        names = self._dataset_names or self.label_names
        return [{"boxes": d["boxes"].tolist(), "scores": d["scores"].tolist(), "labels": d["labels"].tolist(),
                 "names": [names[i] for i in d["labels"].tolist()]} for d in dets]

    def predict_paths(self, sources: list[str | Path], **kwargs: Any):
        """Detect objects in images, folders, glob patterns and video files, optionally drawing them and writing
        COCO results and YOLO labels into ``save_dir``: :func:`kdctl.predict.engine.predict_paths` (its options:
        ``conf``, ``iou``, ``max_det``, ``imgsz``, ``classes``, ``batch_size``, ``save_dir``, ``save``,
        ``save_txt``, ``save_conf``, ``vid_stride``, ``progress``). Returns a ``PredictResult``.

        >>> res = kdctl.load("runs/distill/exp").predict_paths(["images/"], conf=0.3)  # doctest: +SKIP
        >>> res.images[0].names, res.images[0].boxes                                # doctest: +SKIP
        """
        from kdctl.predict.engine import predict_paths

        return predict_paths(self, sources, **kwargs)

    def _predict_raw(self, batch: Batch, score_threshold: float, max_detections: int) -> list[dict[str, Tensor]]:
        """Per image ``boxes`` xyxy in the RESIZED frame (pixels of ``batch.images``), ``scores``, ``labels``
        (indices into ``label_names``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def save(self, directory: str | Path) -> Path:  # pragma: no cover - abstract
        """Write the model so that ``kdctl.load(directory)`` gives it back (weights in safetensors)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ info
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def kd_methods(self) -> list[str]:
        from kdctl.models.registry import methods_for_family

        return methods_for_family(self.family)

    def info(self) -> dict[str, Any]:
        """What ``kdctl inspect`` prints."""
        return {
            "source": self.source,
            "family": self.family,
            "architecture": self.architecture,
            "class": type(self.model).__name__,
            "parameters": self.num_parameters(),
            "num_labels": self.num_classes,
            "label_names": self.label_names,
            "imgsz": self.imgsz,
            "kd_methods": self.kd_methods(),
        }


def process_umask() -> int:
    """The process umask (from /proc where available: reading it with ``os.umask`` briefly changes it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path, pattern: str = "*.safetensors") -> None:
    """Give the files ``pattern`` matches in ``directory`` the mode a plain ``open()`` would (0666 minus the
    umask): safetensors writes them 0600 (a private temp file renamed into place), unlike every other file."""
    mode = 0o666 & ~process_umask()
    for path in Path(directory).glob(pattern):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _with_umask(save: Any) -> Any:
    @functools.wraps(save)
    def wrapper(self: Detector, directory: str | Path, *args: Any, **kwargs: Any) -> Path:
        out = save(self, directory, *args, **kwargs)
        apply_umask(Path(out if out is not None else directory))
        return out

    wrapper._kdctl_umask = True  # type: ignore[attr-defined]
    return wrapper


def map_classes(dataset_names: list[str], label_names: list[str], label_map: dict[str, str] | None = None,
                hint: str = "") -> list[int]:
    """For each dataset class, the index of the model label with the same name (case-insensitive).

    ``label_map`` (dataset name -> model name) overrides the match. Raises KdctlError naming every dataset class
    the model lacks (``hint``: what else the caller offers, appended to the advice).
    """
    rows = match_classes(dataset_names, label_names, label_map)
    user = {norm_name(k): v for k, v in (label_map or {}).items()}
    missing = []
    for name, idx in zip(dataset_names, rows, strict=True):
        target = user.get(norm_name(name), name)
        if idx is None:
            missing.append(name if target == name else f"{name} -> {target}")
    if missing:
        shown = ", ".join(repr(m) for m in missing)
        have = ", ".join(label_names[:12]) + (", ..." if len(label_names) > 12 else "")
        raise KdctlError(
            f"the model has no label for dataset class(es) {shown} (model labels: {have}); "
            "map them with --label-map FILE (JSON {\"dataset name\": \"model name\"})" + hint
        )
    out = [int(r) for r in rows if r is not None]
    if len(set(out)) != len(out):
        raise KdctlError("two dataset classes map to the same model label; check --label-map")
    return out
