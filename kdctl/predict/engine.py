"""``predict_paths``: run a detector over images, folders, globs and videos; draw and write what it found.

The model is anything with kdctl's prediction contract (a :class:`kdctl.models.base.Detector`, or the ONNX graph
runner :class:`kdctl.predict.onnx_runner.OnnxDetector`): ``predict(batch, score_threshold, max_detections)`` ->
per image ``boxes`` [D, 4] xyxy in original pixels, ``scores``, ``labels`` (indices into ``label_names``), plus
``label_names``, ``imgsz`` and ``pad_stride``. Pictures are resized as in training (longer side ``imgsz``).

Written into ``save_dir`` (never over an existing file):

* the pictures with their boxes drawn (``NAME.jpg|png``; a video's frames as ``VIDEO/FRAME.jpg``), with ``save``;
* ``labels/NAME.txt`` in YOLO format (``class cx cy w h`` normalised, ``save_conf``: + score), with ``save_txt``;
* ``predictions.json``: COCO results (``image_id``, ``category_id`` = class index + 1, ``bbox`` xywh, ``score``)
  and ``images.json``: the images (id, file, frame, size) and categories (id, name) those ids refer to.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdctl.errors import KdctlError
from kdctl.predict.draw import coco_results, draw, yolo_lines
from kdctl.predict.sources import Frame, Source, collect_sources, frame_count, iter_frames


@dataclass
class ImageResult:
    """The detections of one picture, in its pixels: ``boxes`` xyxy, ``scores``, ``labels`` (class indices),
    ``names``; ``frame`` is the index in its video (None for an image file); ``saved`` the drawn picture."""

    image_id: int
    path: Path
    frame: int | None
    width: int
    height: int
    boxes: list[list[float]]
    scores: list[float]
    labels: list[int]
    names: list[str]
    saved: Path | None = None

    def counts(self) -> Counter[str]:
        return Counter(self.names)


@dataclass
class PredictResult:
    """What :func:`predict_paths` did: per picture results, the class names, where the files went, timing."""

    images: list[ImageResult] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    save_dir: Path | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def coco_results(self) -> list[dict[str, Any]]:
        return [e for r in self.images for e in coco_results(_tensors(r), r.image_id)]


def resolve_classes(classes: list[str | int] | None, names: list[str]) -> list[int] | None:
    """``--classes`` values (class names, case-insensitive, or indices) -> class indices; one error line for a
    class the model does not have."""
    if not classes:
        return None
    lower = {n.lower(): i for i, n in enumerate(names)}
    out = []
    for c in classes:
        s = str(c).strip()
        idx = int(s) if s.isdigit() and int(s) < len(names) else lower.get(s.lower())
        if idx is None:
            raise KdctlError(f"--classes {s!r}: the model has no such class (classes: {', '.join(names[:20])}"
                             + (", ..." if len(names) > 20 else "") + ")")
        out.append(idx)
    return sorted(set(out))


def predict_paths(model: Any, sources: list[str | Path], *, conf: float = 0.25, iou: float | None = None,
                  max_det: int = 100, imgsz: int | None = None, classes: list[str | int] | None = None,
                  batch_size: int = 4, save_dir: str | Path | None = None, save: bool = True,
                  save_txt: bool = False, save_conf: bool = False, vid_stride: int = 1,
                  progress: Callable[[int, int | None], None] | None = None) -> PredictResult:
    """Detect objects in every picture the ``sources`` name (see the module docstring for what is written when
    ``save_dir`` is given; it must exist). ``conf``: score threshold; ``iou``: class-wise NMS IoU threshold
    (torchvision CNN detectors: their own NMS at that threshold; others: ``torchvision.ops.batched_nms`` on the
    output; None: each model's default, none for DETRs); ``classes``: keep only these (names or indices);
    ``progress(done, total)`` is called after each batch (``total`` None when a video does not state its length).
    """
    srcs = collect_sources(list(sources))  # every bad SOURCE is one error line, before the model runs
    names = list(model.label_names)
    keep = resolve_classes(classes, names)
    total = _total(srcs, vid_stride)
    res = PredictResult(names=names, save_dir=Path(save_dir) if save_dir is not None else None)
    writer = _Writer(res.save_dir, save=save, save_txt=save_txt, save_conf=save_conf) if save_dir else None
    start, done = time.perf_counter(), 0
    wide = max_det * 3 if (keep is not None or iou is not None) else max_det
    with _model_nms(model, iou):
        for frames in _batches(iter_frames(srcs, vid_stride), batch_size):
            dets = _predict(model, frames, imgsz, conf, wide)
            for fr, det in zip(frames, dets, strict=True):
                det = _filter(det, keep, iou if not _has_own_nms(model) else None, max_det)
                h, w = fr.image.shape[-2:]
                r = ImageResult(len(res.images) + 1, fr.source.path, fr.frame, int(w), int(h),
                                det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                [names[i] for i in det["labels"].tolist()])
                if writer is not None:
                    r.saved = writer.picture(fr, det, r, names)
                res.images.append(r)
            done += len(frames)
            if progress is not None:
                progress(done, total)
    res.seconds = time.perf_counter() - start
    if writer is not None:
        res.files = writer.finish(res)
    return res


def _total(srcs: list[Source], stride: int) -> int | None:
    counts = [frame_count(s) for s in srcs]
    if any(c is None for c in counts):
        return None
    return sum(c if s.kind == "image" else -(-c // stride) for s, c in zip(srcs, counts, strict=True))


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _predict(model: Any, frames: list[Frame], imgsz: int | None, conf: float, max_det: int) -> list[dict]:
    """One batch through the model: resized as in training (longer side ``imgsz``), padded by ``collate``."""
    import torch
    from torchvision import tv_tensors

    from kdctl.data.batch import collate
    from kdctl.data.transforms import build_transforms

    tf = build_transforms(int(imgsz or model.imgsz), train=False)
    samples = []
    for fr in frames:
        h, w = fr.image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(torch.zeros((0, 4)), format="XYXY", canvas_size=(h, w))
        img, tgt = tf(tv_tensors.Image(fr.image), {"boxes": boxes, "labels": torch.zeros(0, dtype=torch.long)})
        samples.append((img.as_subclass(torch.Tensor), {"boxes": tgt["boxes"].as_subclass(torch.Tensor),
                                                        "labels": tgt["labels"], "orig_size": (h, w)}))
    batch = collate(samples, stride=getattr(model, "pad_stride", 32))
    params = getattr(model, "parameters", None)
    device = next(params()).device if callable(params) else "cpu"
    with torch.no_grad():
        return [{k: v.detach().cpu() for k, v in d.items()} for d in model.predict(batch.to(device), conf, max_det)]


def _filter(det: dict, keep: list[int] | None, iou: float | None, max_det: int) -> dict:
    """Classes in ``keep`` only, class-wise NMS at ``iou`` (when given), at most ``max_det``, best first."""
    import torch
    from torchvision.ops import batched_nms

    boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
    if keep is not None:
        m = torch.isin(labels, torch.as_tensor(keep, dtype=labels.dtype))
        boxes, scores, labels = boxes[m], scores[m], labels[m]
    order = batched_nms(boxes.float(), scores.float(), labels, iou) if iou is not None and len(boxes) else \
        scores.argsort(descending=True)
    order = order[:max_det]
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


def _nms_owner(model: Any) -> Any:
    """The torchvision module holding a CNN detector's NMS threshold (``roi_heads`` or the model), or None."""
    inner = getattr(model, "model", None)
    for owner in (getattr(inner, "roi_heads", None), inner):
        if owner is not None and isinstance(getattr(owner, "nms_thresh", None), float):
            return owner
    return None


def _has_own_nms(model: Any) -> bool:
    return _nms_owner(model) is not None


@contextmanager
def _model_nms(model: Any, iou: float | None) -> Iterator[None]:
    """torchvision CNN detectors: their own NMS at ``iou`` for the duration (restored after)."""
    owner = _nms_owner(model) if iou is not None else None
    if owner is None:
        yield
        return
    saved = owner.nms_thresh
    owner.nms_thresh = float(iou)
    try:
        yield
    finally:
        owner.nms_thresh = saved


def _tensors(r: ImageResult) -> dict:
    import torch

    return {"boxes": torch.tensor(r.boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(r.scores),
            "labels": torch.tensor(r.labels, dtype=torch.long)}


class _Writer:
    """Writes a run's files into ``root``, each name once (a second ``x.jpg`` from another folder is ``x_2.jpg``)."""

    def __init__(self, root: Path, *, save: bool, save_txt: bool, save_conf: bool) -> None:
        self.root, self.save, self.save_txt, self.save_conf = root, save, save_txt, save_conf
        self.used: set[str] = set()
        self.stems: dict[Path, str] = {}

    def _stem(self, path: Path) -> str:
        if path not in self.stems:
            stem, n = path.stem, 2
            while stem in self.used:
                stem, n = f"{path.stem}_{n}", n + 1
            self.used.add(stem)
            self.stems[path] = stem
        return self.stems[path]

    def picture(self, fr: Frame, det: dict, r: ImageResult, names: list[str]) -> Path | None:
        from torchvision.io import encode_jpeg, encode_png

        from kdctl.io import write_bytes

        stem = self._stem(fr.source.path)
        rel = f"{stem}/{fr.frame:06d}" if fr.frame is not None else stem
        if self.save_txt and len(det["boxes"]):
            lines = yolo_lines(det, r.width, r.height, conf=self.save_conf)
            write_bytes(self.root / "labels" / f"{rel.replace('/', '_')}.txt", ("\n".join(lines) + "\n").encode())
        if not self.save:
            return None
        png = fr.frame is None and fr.source.path.suffix.lower() == ".png"
        drawn = draw(fr.image, det, names)
        data = encode_png(drawn) if png else encode_jpeg(drawn, quality=95)
        return write_bytes(self.root / f"{rel}{'.png' if png else '.jpg'}", bytes(data.numpy().tobytes()))

    def finish(self, res: PredictResult) -> list[str]:
        from kdctl.io import write_json

        write_json(self.root / "predictions.json", res.coco_results())
        write_json(self.root / "images.json", {
            "images": [{"id": r.image_id, "file_name": str(r.path), "frame": r.frame, "width": r.width,
                        "height": r.height} for r in res.images],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(res.names)]})
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


__all__ = ["ImageResult", "PredictResult", "predict_paths", "resolve_classes"]
