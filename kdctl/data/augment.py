"""The recipe's ``[augment]`` table: RT-DETR-style training augmentation with ``torchvision.transforms.v2``.

Without an ``[augment]`` table a run uses :func:`kdctl.data.transforms.build_transforms` exactly as before. With one,
each training sample goes through (the order of the official RT-DETRv2 ``dataloader.yml``)::

    RandomPhotometricDistort(p) -> RandomZoomOut(fill, side_range, p) -> RandomIoUCrop (with probability p)
    -> SanitizeBoundingBoxes(min_size=1) -> RandomHorizontalFlip(--hflip) -> Resize (longer side = the batch's size)
    -> ToDtype(float32) -> SanitizeBoundingBoxes(min_size=1)

From the stop epoch on, the first three and multi-scale are off (the official ``stop_epoch`` policy).

Multi-scale: every sample of a batch must have the same target size, so the size is drawn per BATCH by
:class:`AugmentBatchSampler` (in the main process) from ``(seed, epoch, batch number)`` and travels to the dataset
with each sample's ``(index, seed)``, as the epoch does. The size is therefore the same with any number of loader
workers, in a resumed run and on every rank, and resuming stays bit-exact; the samples themselves are resized once,
from the decoded image (not the collated batch interpolated, as the official collate function does).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from kdctl.errors import KdctlError

KEYS = ("photometric", "zoom_out", "iou_crop", "multiscale", "multiscale_base", "stop_epoch")
"""The keys of an ``[augment]`` table."""


@dataclass(frozen=True)
class AugmentPlan:
    """A parsed ``[augment]`` table (see :func:`parse_augment`)."""

    photometric: float = 0.0
    zoom_out: dict[str, Any] | None = None  # v2.RandomZoomOut keyword arguments
    iou_crop: dict[str, Any] | None = None  # {"p": ...} plus v2.RandomIoUCrop keyword arguments
    multiscale: tuple[int, ...] = ()
    stop_epoch: int | float | None = None
    multiscale_base: int | None = None  # the image size the multiscale list is given for (None: absolute sizes)

    def sizes(self, imgsz: int) -> tuple[int, ...]:
        """The multi-scale sizes at ``imgsz``: the list scaled by ``imgsz / multiscale_base`` and rounded to
        multiples of 32 (the official list 480-800 is for 640 px; at 320 px it is 224-416)."""
        if not self.multiscale or not self.multiscale_base or imgsz == self.multiscale_base:
            return self.multiscale
        f = imgsz / self.multiscale_base
        return tuple(max(32, round(s * f / 32) * 32) for s in self.multiscale)


def _prob_table(name: str, value: Any, defaults: dict[str, Any]) -> dict[str, Any] | None:
    """``false``/0 -> off; a number -> its probability ``p``; ``true`` -> defaults; a table -> over the defaults."""
    if value is False or value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                           and float(value) <= 0):
        return None
    out = dict(defaults)
    if isinstance(value, dict):
        out.update(value)
    elif not isinstance(value, bool):
        if not isinstance(value, (int, float)):
            raise KdctlError(f"[augment] {name} = {value!r}: use true/false, a probability or a table")
        out["p"] = float(value)
    if not 0 < float(out.get("p", 1.0)) <= 1:
        raise KdctlError(f"[augment] {name}: p must be in (0, 1], not {out.get('p')}")
    return out


def parse_augment(table: dict[str, Any] | None) -> AugmentPlan | None:
    """The plan of an ``[augment]`` table; None for a missing or empty one (the plain pipeline)."""
    if not table:
        return None
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise KdctlError(f"[augment] has unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    photometric = table.get("photometric", 0.0)
    photometric = 0.5 if photometric is True else float(photometric or 0.0)
    if not 0 <= photometric <= 1:
        raise KdctlError(f"[augment] photometric must be a probability in [0, 1], not {photometric}")
    scales = table.get("multiscale") or ()
    if not isinstance(scales, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in scales):
        raise KdctlError(f"[augment] multiscale must be a list of image sizes in pixels, not {scales!r}")
    stop = table.get("stop_epoch")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, float))
                             or (isinstance(stop, float) and not 0 <= stop <= 1)):
        raise KdctlError(f"[augment] stop_epoch must be an epoch (int; negative counts from the end) or a "
                         f"fraction of training in [0, 1], not {stop!r}")
    zoom = _prob_table("zoom_out", table.get("zoom_out"), {"fill": 0, "side_range": [1.0, 4.0], "p": 0.5})
    crop = _prob_table("iou_crop", table.get("iou_crop"), {"p": 0.8})
    base = table.get("multiscale_base")
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base <= 0):
        raise KdctlError(f"[augment] multiscale_base must be an image size in pixels, not {base!r}")
    return AugmentPlan(photometric=photometric, zoom_out=zoom, iou_crop=crop, multiscale=tuple(scales),
                       stop_epoch=stop, multiscale_base=base)


def resolve_stop_epoch(stop: int | float | None, epochs: int) -> int | None:
    """The first epoch (0-based) without the stoppable augmentations: an int as given (the official ``epoch: 71``
    of a 72-epoch schedule), a negative int counted from the end (-1 = the last epoch), a float the fraction of
    ``epochs`` (rounded); None = never."""
    if stop is None:
        return None
    if isinstance(stop, float):
        return int(round(stop * epochs))
    return epochs + stop if stop < 0 else stop


class RandomIoUCropP(v2.RandomIoUCrop):
    """``v2.RandomIoUCrop`` applied with probability ``p`` (the official RT-DETR wrapper); an image without boxes is
    left as it is (it has nothing to crop around)."""

    def __init__(self, p: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.p = float(p)

    def forward(self, *inputs: Any) -> Any:
        skip = bool(torch.rand(1) >= self.p)
        target = inputs[-1] if isinstance(inputs[-1], dict) else {}
        if skip or ("boxes" in target and target["boxes"].numel() == 0):
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)


class AugmentPipeline:
    """The v2 pipeline of an :class:`AugmentPlan` for ``(tv_tensors.Image uint8, {"boxes", "labels"})``.

    ``pipeline(img, target, active, size)``: ``active`` False = past the stop epoch (photometric, zoom-out and
    IoU crop off); ``size`` the longer side after resizing (None = ``imgsz``). Output as
    :func:`kdctl.data.transforms.build_transforms`: float32 image in [0, 1], boxes in the resized frame.
    """

    def __init__(self, plan: AugmentPlan, imgsz: int, hflip: float = 0.5) -> None:
        self.plan, self.imgsz, self.hflip = plan, int(imgsz), float(hflip)
        self._cache: dict[tuple[bool, int], v2.Compose] = {}

    def ops(self, active: bool, size: int) -> v2.Compose:
        key = (bool(active), int(size))
        if key not in self._cache:
            p, ops = self.plan, []
            if active and p.photometric > 0:
                ops.append(v2.RandomPhotometricDistort(p=p.photometric))
            if active and p.zoom_out:
                z = dict(p.zoom_out)
                ops.append(v2.RandomZoomOut(fill=z.pop("fill", 0), side_range=tuple(z.pop("side_range", (1.0, 4.0))),
                                            **z))
            if active and p.iou_crop:
                ops += [RandomIoUCropP(**p.iou_crop), v2.SanitizeBoundingBoxes(min_size=1.0)]
            if self.hflip > 0:
                ops.append(v2.RandomHorizontalFlip(p=self.hflip))
            ops += [v2.Resize(size=None, max_size=int(size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                    v2.SanitizeBoundingBoxes(min_size=1.0)]
            self._cache[key] = v2.Compose(ops)
        return self._cache[key]

    def __call__(self, img: tv_tensors.Image, target: dict[str, Any], active: bool = True,
                 size: int | None = None) -> tuple[Any, dict[str, Any]]:
        return self.ops(active, size or self.imgsz)(img, target)


def batch_size_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed the multi-scale size of batch ``batch`` of ``epoch`` is drawn from (the same on every rank)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_037 + int(batch)) % (2**63)


class AugmentBatchSampler(Sampler[list[tuple[int, int, bool, int | None]]]):
    """Batches of a :class:`kdctl.engine.sampler.ResumableSampler` whose items carry the batch's augmentation:
    ``(index, sample_seed, active, size)``.

    ``active``: the epoch is before ``stop_epoch``; ``size``: one of ``scales`` drawn from
    :func:`batch_size_seed` while active, else None (the dataset's ``imgsz``). The wrapped sampler's ``epoch`` and
    ``start`` (a multiple of ``batch_size`` when resuming) are read at each iteration, in the main process.
    """

    def __init__(self, sampler: Any, batch_size: int, scales: tuple[int, ...] = (),
                 stop_epoch: int | None = None) -> None:
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.scales, self.stop_epoch = tuple(scales), stop_epoch
        self.drop_last = False

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def plan(self, epoch: int, batch: int) -> tuple[bool, int | None]:
        """``(active, size)`` of batch number ``batch`` of ``epoch``."""
        active = self.stop_epoch is None or epoch < self.stop_epoch
        if not (active and self.scales):
            return active, None
        g = torch.Generator().manual_seed(batch_size_seed(getattr(self.sampler, "seed", 0), epoch, batch))
        return active, int(self.scales[int(torch.randint(len(self.scales), (1,), generator=g))])

    def __iter__(self) -> Iterator[list[tuple[int, int, bool, int | None]]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        number = int(getattr(self.sampler, "start", 0)) // self.batch_size
        batch: list[tuple[int, int, bool, int | None]] = []
        active, size = self.plan(epoch, number)
        for index, seed in self.sampler:
            batch.append((index, seed, active, size))
            if len(batch) == self.batch_size:
                yield batch
                batch, number = [], number + 1
                active, size = self.plan(epoch, number)
        if batch:
            yield batch
