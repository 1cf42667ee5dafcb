"""torchrun / DDP helpers. One entry point runs single-process or distributed.

``torchrun --nproc-per-node N -m detr.train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; the
process group uses NCCL on GPUs and gloo on the CPU. Multi-node: torchrun's ``--nnodes``,
``--node-rank`` and ``--rdzv-endpoint``; nothing here changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from detr.device import select_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_spec: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun, else describe a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, select_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def gather_dicts(info: DistInfo, local: dict) -> dict:
    """Merge a dict from every process (e.g. predictions by image id) on every process."""
    if not info.distributed:
        return local
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the DDP processes (a new tensor); ``x`` itself in a single process.
    The one cross-process mean: loss normalisers and logged loss values use it."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
