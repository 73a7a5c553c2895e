"""torch.distributed glue: one process per device, launched by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is gloo on CPU and nccl on CUDA.
Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | None = None) -> "DistContext":
        return cls(0, 1, device or torch.device("cpu"))

    @classmethod
    def from_environment(cls, device: str = "auto") -> "DistContext":
        """Join the process group torchrun describes; a plain single process when not launched by it."""
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls.single(resolve_device(device))
        use_cuda = device != "cpu" and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), target)

    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        if not self.active:
            return model
        if sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_gather_objects(self, value: object) -> list[object]:
        """Every rank's ``value``, in rank order (just [value] in a single process)."""
        if not self.active:
            return [value]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
