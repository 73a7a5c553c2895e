"""torch.distributed glue: one process per device, launched by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is gloo on CPU and nccl on CUDA.
Only rank 0 writes files and shows progress.

Each step's global batch is the same whatever the number of processes (:func:`epoch_batches`),
and the losses are means over images of per-image losses, so N processes with batch B/N train
like one process with batch B (exactly so with ``norm: group``; BatchNorm normalises with each
process's own batch unless --sync-bn on CUDA).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

DEVICES = ("auto", "cpu", "cuda")  # what --device accepts


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name not in DEVICES:
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX); elsewhere bfloat16
    autocast is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume nothing
        return False


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
        if sync_bn and self.device.type != "cuda":
            # torch's SyncBatchNorm raises on CPU tensors at the first forward; say so up front
            raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on the CPU set "
                            "`norm: group` in the config for normalisation independent of the batch split")
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

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's mean over the ranks: the losses of the global batch (every loss is a mean
        over images, so the mean over equal shares is the global batch's). Same keys everywhere."""
        if not self.active:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)  # SUM: gloo has no AVG
        return dict(zip(values, (tensor / self.world_size).tolist()))

    def from_main(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every rank: decisions that must agree (e.g. a wall-clock stop)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts them before each forward, but each rank's last training forward updates its
        own copy: without this, ranks would validate with slightly different models.
        """
        if self.active:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group; ``wait``: first meet the other ranks (after a normal end), so that
        no rank tears gloo down while another's last collective is still in flight (seen as a rank
        aborting at exit, "terminate called without an active exception", in 2 of 3 full test runs
        under load). After an error the other ranks may never arrive: no wait then, unless every rank
        raised it alike (``DataError.every_rank``: the same abort was seen at the end of a bad sample's
        error in about 1 of 8 runs)."""
        if self.active and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def epoch_batches(num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                  epoch: int) -> torch.Tensor:
    """Rank ``rank``'s batches of one epoch: (steps, batch_size) sample indices, a row per batch.

    One permutation of the samples, drawn from (seed, epoch) alike on every rank, is cut into
    global batches of ``batch_size * world_size``; rank r takes positions r, r + world_size, ...
    of each. So the global batch of every step, and the image at each position of it, is the same
    as on one process with batch ``batch_size * world_size``: that process's position p is rank
    p % world_size's. The permutation is repeated so that every rank gets full batches.
    """
    per_step = batch_size * world_size
    steps = max(1, math.ceil(num_samples / per_step))
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=gen)
    order = order.repeat(math.ceil(steps * per_step / num_samples))[: steps * per_step]
    return order.view(steps, per_step)[:, rank::world_size]  # one view: no per-batch objects for huge sets
