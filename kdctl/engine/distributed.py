"""torchrun-style distributed setup: DDP with nccl on GPU, gloo on CPU; only rank 0 writes and prints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False  # a process group is initialised (torchrun, also with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.group


def setup(device: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (also ``--nproc-per-node 1``: DDP and nccl then run
    as with several processes); no-op otherwise.

    Returns the rank information. On CUDA, each process uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local, group=True)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (ranks agree on skipping a step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (as a list, on every rank)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def merge_by_image(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-rank COCO results as one list; an image that several ranks evaluated (the sampler pads the last
    batch with repeats) is kept from the first rank that has it."""
    seen: set[int] = set()
    results: list[dict[str, Any]] = []
    for rank_results in parts:
        ids = {r["image_id"] for r in rank_results}
        results += [r for r in rank_results if r["image_id"] not in seen]
        seen |= ids
    return results


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
