"""The data pipeline's throughput, beside the training step rate: does data or compute bound training?

One DataLoader worker (or ``train`` without ``--workers``) runs exactly what this times: read an
image and its label image from disk (PNG decode), normalise, augment (random scale + 256x256 crop,
flips, quarter turns, brightness/contrast) and build the target, on one intra-op thread (as the
workers run: see maskrcnn/train/loading.py). Images per second per worker; N workers give about N
times that while cores are free. Also timed: the same reads once ``train``'s memory cache holds the
decoded, normalised images (augmentation and target only). Called by run.py (the report's
throughput section).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskrcnn.data import Augment, InstanceDataset, Normalizer, open_dataset, write_image, write_label_image
from maskrcnn.data.synthetic import synth_nuclei
from maskrcnn.train.setup import SAMPLE_CACHE_BYTES

IMAGE_SIZE = 512  # files on disk, as DSB2018-like images are
CROP = 256
IMAGES = 8
SAMPLES = 48  # timed reads (each image read several times, with different augmentations)


def bench_loader(log) -> dict:
    """{"images_per_s_per_worker", "ms_per_image", ...} for 256 crops of 512x512 PNG nuclei images."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("images", "masks"):
            (root / folder).mkdir()
        for i in range(IMAGES):
            image, labels = synth_nuclei(IMAGE_SIZE, np.random.default_rng([7, i]))
            write_image(root / "images" / f"n{i}.png", image)
            write_label_image(root / "masks" / f"n{i}.png", labels)
        reader = open_dataset(root, "labels")
        data = InstanceDataset(reader, Normalizer(), Augment(crop_size=CROP), seed=0)
        # what train reads once the samples are in its memory cache (SAMPLE_CACHE_BYTES): augmentation only
        cached = InstanceDataset(reader, Normalizer(), Augment(crop_size=CROP), seed=0, cache_bytes=SAMPLE_CACHE_BYTES)
        log(f"loader: {SAMPLES} samples, {CROP}x{CROP} crops of {IMAGE_SIZE}x{IMAGE_SIZE} PNGs, one thread")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what one DataLoader worker (or train's inline reading) uses
        try:
            data[0]  # warm-up: imports, first decode
            seconds, instances = _timed(data)
            for i in range(len(cached)):
                cached[i]
            seconds_cached, _ = _timed(cached)
        finally:
            torch.set_num_threads(threads)
    return {"image_size": IMAGE_SIZE, "crop": CROP, "samples": SAMPLES, "instances_per_crop": instances / SAMPLES,
            "ms_per_image": seconds / SAMPLES * 1e3, "images_per_s_per_worker": SAMPLES / seconds,
            "ms_per_image_cached": seconds_cached / SAMPLES * 1e3}


def _timed(data: InstanceDataset) -> tuple[float, int]:
    """(seconds, instances) for SAMPLES reads cycling over the images."""
    start = time.perf_counter()
    instances = sum(len(data[i % len(data)][1]) for i in range(SAMPLES))
    return time.perf_counter() - start, instances


def markdown(loader: dict, step_images_per_s: dict[str, float]) -> list[str]:
    """The throughput lines: the loader's rate and each training step rate it has to feed."""
    feeds = ", ".join(f"{name} {rate:.2f} images/s" for name, rate in step_images_per_s.items())
    return [f"Data loading, one worker (one thread): **{loader['images_per_s_per_worker']:.1f} images/s** "
            f"({loader['ms_per_image']:.0f} ms per {loader['crop']}x{loader['crop']} crop of a "
            f"{loader['image_size']}x{loader['image_size']} PNG: decode, normalise, augment, target; "
            f"{loader['instances_per_crop']:.0f} instances per crop; "
            f"{loader.get('ms_per_image_cached', float('nan')):.0f} ms once the image is in train's memory cache: "
            f"augment and target only). Training consumes: {feeds}. "
            "Where the loader's rate is below the step's, `train --workers N` (N worker processes) "
            "keeps the step fed; above it, compute bounds training."]
