"""``torchrun ... -m maskrcnn predict``: the inputs spread over processes and machines.

Input image i (in the order ``predict`` lists them) goes to rank i mod world_size, so each image is
segmented by exactly one rank, which writes its files (their names differ by image: no two ranks
write one file). Images streamed under ``--max-memory`` are the exception: all ranks segment each
one's tiles together and rank 0 writes its files (maskrcnn.prediction.streaming); the others are
shared out as above, in input order. The run-wide files (COCO results, images.json, the Kaggle
submission, the failed list) are gathered and written by rank 0 in input order: the same bytes one
process writes. ``--skip-existing`` works per image as in one process (rank 0 decides for the
shared images), and a signal stops each rank after its image in progress; at a shared image, a
stop asked of any rank stops them all (the ranks then gather what they did).

Threads: torchrun starts every process with one thread; each rank instead takes its share of the
cores it may run on (``os.sched_getaffinity``) among the ranks of its machine (torchrun's
``LOCAL_WORLD_SIZE``), so that they neither oversubscribe nor leave cores idle.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.io import image_stem
from ..outputs.files import RunOutputs
from ..runtime.distributed import DistContext


def share_threads(dist: DistContext) -> int:
    """Set this rank's torch threads to its share of the machine's cores; returns it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, local))
    torch.set_num_threads(threads)
    return threads


def my_images(count: int, dist: DistContext, together: Collection[int] = ()) -> list[int]:
    """The 0-based indices of the inputs this rank handles, in input order: its share of those each
    segmented by one rank (every world_size-th), and every one in ``together`` (the images all ranks
    stream together: maskrcnn.prediction.streaming)."""
    alone = [i for i in range(count) if i not in together]
    mine = set(alone[dist.rank::dist.world_size])
    return [i for i in range(count) if i in mine or i in together]


@dataclass
class RankResult:
    """What one rank did, gathered to rank 0."""

    images: list[dict] = field(default_factory=list)
    coco: list[dict] = field(default_factory=list)
    kaggle: list[dict] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    written: int = 0
    skipped: list[Path] = field(default_factory=list)
    stopped_by: str | None = None
    done: int = 0


def merge_ranks(run: RunOutputs, mine: RankResult, dist: DistContext, paths: list[Path]) -> RankResult:
    """Every rank's results, in input order (rank 0 fills ``run`` with them: its ``write`` then
    writes the whole run); other ranks get their own back."""
    parts: list[RankResult] = dist.all_gather_objects(mine)
    if not dist.is_main:
        return mine
    order = {path: i for i, path in enumerate(paths)}
    stems = {image_stem(path): i for i, path in enumerate(paths)}
    run.images = sorted((e for p in parts for e in p.images), key=lambda e: e["id"])
    run.coco = sorted((r for p in parts for r in p.coco), key=lambda r: r["image_id"])  # stable: per image as made
    run.kaggle_table = sorted((r for p in parts for r in p.kaggle), key=lambda r: stems[r["ImageId"]])
    run.failed = sorted((f for p in parts for f in p.failed), key=lambda f: order[f[0]])
    stops = [p.stopped_by for p in parts if p.stopped_by]
    return RankResult(run.images, run.coco, run.kaggle_table, run.failed, sum(p.written for p in parts),
                      sorted((s for p in parts for s in p.skipped), key=order.__getitem__),
                      stops[0] if stops else None, sum(p.done for p in parts))
