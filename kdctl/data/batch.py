"""The Batch every model in kdctl receives: images once, in one frame, shared by teacher and student."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch of (already augmented and resized) images with their targets.

    Attributes:
        images: float32 [N, 3, H, W], RGB in [0, 1], NOT normalised; image i occupies
            ``images[i, :, :h_i, :w_i]`` and the rest is zero padding (H, W are multiples of ``stride``).
        sizes: per image (h_i, w_i) after resizing, the valid region of ``images[i]``.
        orig_sizes: per image (h, w) of the original file, the frame detections are returned in.
        targets: per image ``{"boxes": float32 [K, 4] xyxy in the RESIZED frame (pixels of ``images``),
            "labels": int64 [K] dataset class indices (0..C-1)}``.
        image_ids: per image the COCO image id (-1 for images without one).
    """

    images: Tensor
    sizes: list[tuple[int, int]]
    orig_sizes: list[tuple[int, int]]
    targets: list[dict[str, Tensor]] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move images and targets to ``device`` (returns a new Batch)."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            sizes=list(self.sizes),
            orig_sizes=list(self.orig_sizes),
            targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
            image_ids=list(self.image_ids),
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return Batch(
            images=self.images.pin_memory(),
            sizes=self.sizes,
            orig_sizes=self.orig_sizes,
            targets=[{k: v.pin_memory() for k, v in t.items()} for t in self.targets],
            image_ids=self.image_ids,
        )

    def pixel_mask(self) -> Tensor:
        """int64 [N, H, W]: 1 on valid pixels, 0 on padding (the DETR ``pixel_mask``)."""
        n, _, h, w = self.images.shape
        mask = torch.zeros((n, h, w), dtype=torch.long, device=self.images.device)
        for i, (hi, wi) in enumerate(self.sizes):
            mask[i, :hi, :wi] = 1
        return mask

    def scales(self) -> Tensor:
        """float32 [N, 2]: (sx, sy) = resized / original size; original = resized / scale."""
        return torch.tensor(
            [[w / ow, h / oh] for (h, w), (oh, ow) in zip(self.sizes, self.orig_sizes, strict=True)],
            dtype=torch.float32,
        )


def collate(samples: list[tuple[Tensor, dict]], stride: int = 32) -> Batch:
    """Pad a list of ``(image [3, h, w] float 0-1, target)`` samples into a Batch.

    ``target`` holds ``boxes`` (xyxy, resized frame), ``labels``, ``image_id`` and ``orig_size`` (h, w).
    Images are padded at the bottom/right to a common size rounded up to a multiple of ``stride``.
    """
    hs = [img.shape[-2] for img, _ in samples]
    ws = [img.shape[-1] for img, _ in samples]
    H = -(-max(hs) // stride) * stride
    W = -(-max(ws) // stride) * stride
    images = samples[0][0].new_zeros((len(samples), 3, H, W))
    for i, (img, _) in enumerate(samples):
        images[i, :, : img.shape[-2], : img.shape[-1]] = img
    targets = []
    for _, t in samples:
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
        targets.append({"boxes": boxes, "labels": labels})
    return Batch(
        images=images,
        sizes=list(zip(hs, ws, strict=True)),
        orig_sizes=[tuple(int(v) for v in t["orig_size"]) for _, t in samples],
        targets=targets,
        image_ids=[int(t.get("image_id", -1)) for _, t in samples],
    )
