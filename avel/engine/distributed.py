"""torchrun integration: process group set-up from the environment torchrun provides."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # Where reduction tensors must live: NCCL reduces only CUDA tensors, gloo only CPU ones.
    reduce_device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_writer() -> bool:
    """Whether this process writes the run folder: rank 0 of a torchrun job, or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


def init_from_env(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    backend = dist.get_backend()
    return DistInfo(rank, world, local, f"cuda:{local}" if backend == "nccl" else "cpu")


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    if info.world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(info: DistInfo, value: float) -> float:
    if info.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.reduce_device)
    dist.all_reduce(t)
    return float(t.item())


def shutdown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
