"""Multi-level RoIAlign: each box is cropped from the FPN level whose anchor base size is nearest
to the box's size sqrt(w * h), as in the spec; the crops come back in the boxes' order.

torchvision's CPU ``roi_align`` kernel runs on one thread (1000 boxes of a 256 x 128 x 128 map:
~190 ms on one thread or two on a 2-core Xeon). It releases the GIL, so the boxes are split into
one chunk per intra-op thread and the chunks run on a small thread pool: 1.9x on 2 cores, the same
crops bit for bit (each box's crop depends on that box alone). Training (gradients), traces
(export) and small box counts keep the single call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import roi_align

# Fewer boxes than this per thread are cropped in one call: the pool's hand-off (~50 us) would
# cost more than the crops.
MIN_BOXES_PER_THREAD = 32


def assign_levels(boxes: Tensor, base_sizes: Tensor) -> Tensor:
    """boxes (R, 4), base_sizes (L,) -> (R,) level index with the nearest base size."""
    size = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    return (size[:, None] - base_sizes[None]).abs().argmin(dim=1)


class MultiLevelRoiAlign:
    """Crops (R, C, S, S) from features [p2..p5]: ``crop`` for a flat batch, ``__call__`` for
    per-image box lists (the training samplers' form)."""

    def __init__(self, base_sizes: list[float], strides: list[int], output_size: int,
                 sampling_ratio: int = 2) -> None:
        self.base_sizes = torch.tensor(base_sizes, dtype=torch.float32)
        self.strides = list(strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def __call__(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """features: L tensors (B, C, H_l, W_l); boxes: B tensors (R_b, 4) -> (sum R_b, C, S, S)."""
        image = torch.cat([torch.full_like(b[:, 0], i, dtype=torch.int64) for i, b in enumerate(boxes)])
        return self.crop(features, torch.cat(boxes), image)

    def crop(self, features: list[Tensor], boxes: Tensor, image: Tensor) -> Tensor:
        """features: L tensors (B, C, H_l, W_l); boxes (R, 4) of images ``image`` (R,) -> (R, C, S, S).

        The crops come level by level and are put back in the boxes' order by one gather: not
        ``out[index] = crops``, whose setitem drops leading size-1 dims, which a trace with exactly
        one box on a level would record as a fixed reshape.
        """
        crops, order = self.crop_level_order(features, boxes, image)
        return crops[torch.argsort(order)]

    def crop_level_order(self, features: list[Tensor], boxes: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """As ``crop``, without the gather -> (crops (R, C, S, S) level by level, order (R,)): crop
        ``i`` is box ``order[i]``'s. A head that treats each crop alone runs on them as they are and
        puts its much smaller outputs in the boxes' order (``[torch.argsort(order)]``): the gather of
        the crops themselves took 80 ms of OpenVINO's 1.5 s on 1252 mask crops.

        Every level runs, with no boxes too (an empty RoIAlign), so that nothing depends on the data
        and a trace holds for any box count.
        """
        rois = torch.cat([image[:, None].to(boxes.dtype), boxes], dim=1)
        levels = assign_levels(boxes, self.base_sizes.to(boxes.device))
        threads = _crop_threads(features[0], len(boxes))
        jobs, order = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.nonzero(levels == level).squeeze(1)
            # each level's boxes in `threads` chunks (one when serial); sizes are per-box work alike
            for part in (index.tensor_split(threads) if threads > 1 else (index,)):
                jobs.append(self._job(feature, rois[part], stride))
                order.append(part)
        crops = _run_parallel(jobs) if threads > 1 else [job() for job in jobs]
        return torch.cat(crops), torch.cat(order)

    def _job(self, feature: Tensor, rois: Tensor, stride: int) -> Callable[[], Tensor]:
        """The crops (R, C, S, S) of ``rois`` (R, 5) from one level, as a call for the pool."""
        # aligned=False: feature pixel x is centred at x * stride, the spec's anchor centres.
        return lambda: roi_align(feature, rois, self.output_size, spatial_scale=1.0 / stride,
                                 sampling_ratio=self.sampling_ratio, aligned=False)


def _crop_threads(feature: Tensor, boxes: int) -> int:
    """How many threads crop ``boxes`` boxes: the intra-op thread count on the CPU for inference;
    one on other devices (their kernels are parallel), in traces (a graph records one call), for
    few boxes, and when gradients flow: autograd runs the chunks' backward one after another (no
    gain there), and summing their gradients in another order would change trained weights in the
    last bits, so training keeps exactly the single call's numbers."""
    if feature.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting():
        return 1
    if torch.is_grad_enabled() and feature.requires_grad:
        return 1
    return max(1, min(torch.get_num_threads(), boxes // MIN_BOXES_PER_THREAD))


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
# a forked child (a DataLoader worker) has none of the parent's threads: it makes its own pool
os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide pool per thread count (created on first use, reused: threads are not free)."""
    with _POOL_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="roi_align")
        return _POOLS[threads]


def _run_parallel(jobs: list[Callable[[], Tensor]]) -> list[Tensor]:
    """Run ``jobs`` on the pool in the caller's grad, inference and autocast modes (thread-local
    in torch: a pool thread starts with grad on and autocast off), results in ``jobs``' order."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def in_callers_modes(job: Callable[[], Tensor]) -> Tensor:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return job()

    return list(_pool(torch.get_num_threads()).map(in_callers_modes, jobs))
