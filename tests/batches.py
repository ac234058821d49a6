"""Helpers shared by the real-time DETR tests (RT-DETR, D-FINE, LW-DETR): a padded batch, saving a tiny model."""

import torch

from kdctl.data.batch import Batch


def padded_batch(n: int = 2) -> Batch:
    """``n`` (<= 3) images of sizes 128x96, 80x128, 128x128 padded to 128x128, two boxes each (labels 0 and 2)."""
    g = torch.Generator().manual_seed(0)
    sizes = [(128, 96), (80, 128), (128, 128)][:n]
    images = torch.zeros(n, 3, 128, 128)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60], [30, 40, 90, 70]]), "labels": torch.tensor([0, 2])}] * n
    return Batch(images=images, sizes=sizes, orig_sizes=[(2 * h, 2 * w) for h, w in sizes], targets=targets)


def save_tiny(model: torch.nn.Module, out, rich: bool = False) -> str:
    """``model.save_pretrained(out)``; ``rich``: first redraw every weight matrix N(0, 1 / fan_in) (random inits
    whose outputs do not tie)."""
    if rich:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
    model.save_pretrained(out)
    return str(out)
