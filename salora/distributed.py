"""Data parallel training across processes started by `torchrun` (gloo on CPU, NCCL on GPU).

Every process holds the whole model; the adapter's gradients are summed across processes once per
optimizer step (they are small, so one flat all-reduce, no DDP wrapper; gradient checkpointing and
accumulation need no special care). Rank 0 alone writes to disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from salora.errors import SaLoRAError


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def refuse_distributed(command: str) -> None:
    """Commands other than `train` run in one process."""
    if world_size_from_env() > 1:
        raise SaLoRAError(f"`salora {command}` runs in one process; start it without torchrun (only `salora train` is data parallel)")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def agree(self, ok: bool) -> bool:
        """True on every process only if it is true on every process (a failed check anywhere stops all)."""
        if self.size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @property
    def device(self) -> torch.device:
        if self.size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()


def init_world(device: torch.device) -> World:
    """The process group torchrun describes in the environment (one process without it)."""
    size = world_size_from_env()
    if size <= 1:
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), started_here=True)
