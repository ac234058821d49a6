"""A torch Dataset over a validated COCO split, and the DataLoader kdctl trains and evaluates with."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from kdctl.data.augment import AugmentPipeline
from kdctl.data.batch import collate
from kdctl.data.coco import CocoData
from kdctl.data.images import decode
from kdctl.data.transforms import build_transforms
from kdctl.errors import KdctlError, worker_message


class CocoDetection(Dataset):
    """Items are ``(image float32 [3, h, w] in [0, 1], target)`` after the v2 transforms.

    ``target``: ``boxes`` float32 [K, 4] xyxy in the resized frame, ``labels`` int64 [K] dataset class
    indices, ``image_id`` int, ``orig_size`` (h, w) of the annotation (the file's pixels, with its EXIF orientation
    applied for the images in ``data.apply_exif``). Crowd annotations are not training targets.
    """

    def __init__(self, data: CocoData, imgsz: int, train: bool, hflip: float = 0.5,
                 augment: AugmentPipeline | None = None) -> None:
        self.data = data
        self.imgsz = imgsz
        self.train = train
        self.transforms = build_transforms(imgsz, train=train, hflip=hflip)
        self.augment = augment  # the recipe's [augment] pipeline (kdctl.data.augment), used instead when set
        self._cls = data.class_index()

    def __len__(self) -> int:
        return len(self.data.images)

    def load_image(self, index: int) -> torch.Tensor:
        """uint8 [3, H, W] RGB of image ``index`` in the frame of its annotation (a corrupt file, or one whose size
        is not the annotation's, is a one-line KdctlError)."""
        im = self.data.images[index]
        path = self.data.image_dir / im["file_name"]
        img = decode(path, apply_exif=im["id"] in self.data.apply_exif)
        H, W = img.shape[-2:]
        if (H, W) != (round(float(im["height"])), round(float(im["width"]))):
            raise KdctlError(f"{path} is {W}x{H} pixels but its annotation says {im['width']:g}x{im['height']:g} "
                             "(was it changed after validation?)")
        return img

    def __getitem__(self, index: int | tuple) -> tuple[torch.Tensor, dict[str, Any]]:
        """``index``, ``(index, seed)`` or ``(index, seed, active, size)``: with a seed (from
        :class:`kdctl.engine.sampler.ResumableSampler`) the random augmentation of this sample is a function of the
        seed alone, whatever worker loads it, which makes training resumable bit for bit. ``active`` and ``size``
        (from :class:`kdctl.data.augment.AugmentBatchSampler`) select the ``[augment]`` pipeline of the batch."""
        seed, plan = None, ()
        if isinstance(index, tuple):
            index, seed, *plan = index
        if seed is None:
            return self._load(index, tuple(plan))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._load(index, tuple(plan))

    def _load(self, index: int, plan: tuple = ()) -> tuple[torch.Tensor, dict[str, Any]]:
        im = self.data.images[index]
        img = self.load_image(index)
        H, W = img.shape[-2:]
        anns = [a for a in self.data.anns_by_image.get(im["id"], []) if not a.get("iscrowd", 0)]
        # load_image returns the annotation's frame: the boxes need no rescaling
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        labels = torch.tensor([self._cls[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
            "labels": labels,
        }
        if self.augment is not None:
            img, target = self.augment(tv_tensors.Image(img), target, *plan)
        else:
            img, target = self.transforms(tv_tensors.Image(img), target)
        return img.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "labels": target["labels"],
            "image_id": im["id"],
            "orig_size": (int(im["height"]), int(im["width"])),
        }


class DetectionLoader(DataLoader):
    """A DataLoader whose worker processes' KdctlErrors reach the caller with their own one-line message.

    torch re-raises an exception of a worker with its type but with the worker's traceback as its message;
    this gives back the message the dataset raised, as with ``workers=0``.
    """

    def __iter__(self):
        return _OwnMessages(super().__iter__())


class _OwnMessages:
    def __init__(self, it) -> None:
        self.it = it

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.it)

    def __next__(self):
        try:
            return next(self.it)
        except KdctlError as e:
            msg = worker_message(str(e))
            if msg == str(e):
                raise
            raise type(e)(msg) from None


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    generator: torch.Generator | None = None,
    sampler: torch.utils.data.Sampler | None = None,
    pin_memory: bool = False,
    drop_last: bool = False,
    batch_sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A DataLoader that collates into :class:`kdctl.data.batch.Batch` (see :class:`DetectionLoader`); with a
    ``batch_sampler`` (e.g. :class:`kdctl.data.augment.AugmentBatchSampler`) it replaces ``batch_size``,
    ``sampler`` and ``shuffle``."""
    if batch_sampler is not None:
        return DetectionLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                               generator=generator, pin_memory=pin_memory, persistent_workers=workers > 0)
    return DetectionLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )


def shutdown_workers(loader: DataLoader | None) -> None:
    """Stop a loader's persistent worker processes now, in this process (not at garbage collection, possibly in a
    fork)."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None
