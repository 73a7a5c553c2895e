"""A memory budget for prediction: whole image, tiles in memory, or tiles streamed to disk.

``--max-memory`` bounds the whole process (torch included). :func:`plan_inference` compares the
budget with what is already resident (the process's RSS now: torch, the model, the decoded image)
plus a measured cost model:

- **the model on a crop** of P input pixels (after ``--scale``): ``MODEL_FIXED_BYTES +
  P * model_bytes_per_pixel(cfg)``. Peak memory is dominated by the feature maps, whose size per
  input pixel is channels / stride^2: ``model_bytes_per_pixel = BYTES_PER_FEATURE_UNIT *
  feature_units(cfg)``, with ``feature_units = (fpn_channels + rpn_head_channels + 2 *
  trunk_width) / p2_stride**2`` (the FPN levels, the RPN head's output and the trunk's widest live
  activations at p2's resolution; coarser levels add a third).
- **whole-image outputs in memory** (the label image assembled, the instance table, the overlay,
  the normalised image): ``IN_MEMORY_BYTES_PER_PIXEL`` per image pixel. Images whose outputs alone
  would not fit are streamed (maskrcnn.prediction.large), which holds none of them.

Measurement behind the constants (2026-11-30, 2-core Intel Xeon, torch 2 CPU threads, float32,
one whole image of synthetic nuclei per child process, peak = VmHWM - VmRSS before the call; the
process itself sits at about 780 MiB after ``import torch`` and loading the model):

=================================================  ==============  ======  ======  =======
layout (fpn / rpn head / trunk width, p2 stride)    feature units   0.26MP  1.05MP  2.36MP
=================================================  ==============  ======  ======  =======
built-in nuclei (64 / 64 / 32, stride 2), trained         48        228     679     1133 MiB
nuclei_config (128 / 128 / 64, stride 4), random          24          -     203      459 MiB
Config() ResNet-50 (256 / 256 / 64, stride 4), random     40        144     484        - MiB
=================================================  ==============  ======  ======  =======

Slopes: built-in 574 MiB/MP between 0.26 and 1.05 MP (347 beyond: the steepest part is used),
nuclei_config 195, ResNet-50 433, i.e. 12.0, 8.1 and 10.8 MiB/MP per feature unit. A long run
needs more than one call: ``maskrcnn predict`` streaming a 6048 x 6048 mosaic of dense synthetic
nuclei (about 1000 per MP) with the built-in model in 36 tiles of 1115 x 1115 (1.24 MP) peaked
at 2091 MB (``/usr/bin/time -v``), about 830 MB resident before the tiles: 1260 MB per tile,
i.e. 17.5 MiB/MP per unit over the fixed part, from heap fragmentation across tiles (freed
memory glibc keeps; maskrcnn.prediction.large now returns it after each tile with ``malloc_trim``) and
detections denser than the single-call measurement's. With 16 MiB/MP per unit and ``malloc_trim``
the same run peaked at 1700 MB, but a lazily read 20,000 x 20,000 mosaic of the same scenes
(484 tiles of about 1030 x 1030) peaked at 2131 MB: its worst tile added about 1120 MiB over the
fixed part, 22 MiB/MP per unit (the mask stage grows with a tile's detections before their
final filtering, up to the cap of 3000, and some tiles have many more than their final count).
``BYTES_PER_FEATURE_UNIT`` = 24 MiB/MP per unit covers that tile with margin; the measurements
with it are in benchmarks/large.py's slide rows. The built-in's
intercept (about 80 MiB) is the mask stage of the tile's detections, bounded by the detection
cap: ``MODEL_FIXED_BYTES`` = 160 MiB with margin. The in-memory outputs
(``paste_label_image``'s int64 owner and relabelling, ``instance_table``'s index grids and float64
sums, the RGB overlay) peak at about 56 bytes per pixel by their dtypes; 64 is used.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass

from ..config import Config
from ..errors import UserError

MIB = 1 << 20
MAX_MEMORY_VARIABLE = "MASKRCNN_MAX_MEMORY"  # e.g. 8G: the default budget of this machine's runs
BYTES_PER_FEATURE_UNIT = 24 * MIB / 1e6  # per input pixel and feature unit (see the table above)
MODEL_FIXED_BYTES = 160 * MIB  # the mask stage of one crop's detections, allocator slack
IN_MEMORY_BYTES_PER_PIXEL = 64  # whole-image outputs assembled in memory
STREAM_BYTES_PER_PIXEL = 0.1  # a streamed image's instance records (60 B each, ~1000 per MP of dense nuclei)
SAFETY_BYTES = 150 * MIB  # left free: RSS of the moment is not the peak of what follows
MIN_TILE = 256  # smaller tiles mostly repeat their overlap

_UNITS = {"": 1e9, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'2G', '2GB', '1500M', '1.5GiB' or a bare number of gigabytes -> bytes (decimal units unless 'iB')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match[2].lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"expected a size such as 2G, 1500M or 1.5GiB, got {text!r}")
    value = float(match[1]) * _UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"must be a positive size, got {text!r}")
    return int(value)


def default_max_memory() -> int:
    """``MASKRCNN_MAX_MEMORY`` (a size as --max-memory takes it) or 2 GB: the default of
    ``--max-memory`` and of ``Predictor.max_memory``. A bad value raises UserError naming it."""
    text = os.environ.get(MAX_MEMORY_VARIABLE)
    if not text:
        return 2_000_000_000
    try:
        return parse_memory(text)
    except ValueError as err:
        raise UserError(f"{MAX_MEMORY_VARIABLE}: {err}") from None


def feature_units(cfg: Config) -> float:
    """Channels of the model's largest feature maps per input pixel (see the module docstring)."""
    stride = cfg.rpn_scales[0]
    return (cfg.fpn_channels + cfg.rpn_head_channels + 2 * cfg.trunk_width) / stride**2


def model_bytes(cfg: Config, pixels: float, scale: float = 1.0) -> float:
    """Peak bytes the model adds to process a crop of ``pixels`` input pixels resized by ``scale``."""
    return MODEL_FIXED_BYTES + pixels * scale**2 * BYTES_PER_FEATURE_UNIT * feature_units(cfg)


def _libc():
    """glibc, for its allocator controls; None elsewhere (macOS, musl without the name, Windows)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def bound_heap() -> None:
    """Serve large allocations by mmap from now on (glibc ``mallopt``; elsewhere nothing), so that
    freeing them returns them to the OS. glibc otherwise raises its mmap threshold each time such a
    block is freed (up to 32 MB), after which tensors of that size come from the heap, whose free
    fragments of one tile add up with the next tile's: a streamed 20k x 20k image then grew ~25%
    past its per-tile peak. The same setting as ``MALLOC_MMAP_THRESHOLD_=131072`` (benchmarks)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, which also ends the dynamic raising
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give back free heap tops above this


def release_free_memory() -> None:
    """Return the heap's freed pages to the OS (glibc ``malloc_trim``; elsewhere nothing): between
    tiles, so that fragments of one tile's tensors do not add up to the next tile's peak."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class Plan:
    """How one image is processed: ``mode`` "whole", "tiled" (in memory) or "stream" (maskrcnn.prediction.large),
    with ``tile`` the tile size for the last two (None for "whole")."""

    mode: str
    tile: int | None


def largest_tile(cfg: Config, available: float, scale: float, longest: int, overlap: int) -> int | None:
    """The largest square tile whose model peak fits in ``available`` bytes, at most ``longest``;
    None when not even MIN_TILE (or twice the overlap) fits."""
    per_pixel = scale**2 * BYTES_PER_FEATURE_UNIT * feature_units(cfg)
    side = int(math.sqrt(max(available - MODEL_FIXED_BYTES, 0) / per_pixel))
    smallest = max(MIN_TILE, 2 * overlap)
    return min(side, max(longest, smallest)) if side >= smallest else None


def plan_inference(cfg: Config, shape: tuple[int, int], max_memory: int, *, scale: float = 1.0,
                   overlap: int = 128, tile: int | None = None, in_memory: bool = False,
                   resident: int | None = None) -> Plan:
    """Whole, tiled or streamed for an image of ``shape`` (H, W) under ``max_memory`` bytes.

    ``tile`` forces the tile size (``--tile``); the image is still streamed when its whole-image
    outputs would not fit. ``in_memory``: the caller needs an InstanceResult (evaluate, the Python
    API), so never "stream"; the tile then fits what is left after the in-memory outputs, or
    MIN_TILE. Raises UserError when even streaming with the smallest tile does not fit.
    """
    height, width = shape
    pixels = height * width
    if tile is None and max(height, width) <= max(MIN_TILE, 2 * overlap):
        return Plan("whole", None)  # no tile is smaller than the image: tiling cannot lower the peak
    available = max_memory - (resident_bytes() if resident is None else resident) - SAFETY_BYTES
    outputs = pixels * IN_MEMORY_BYTES_PER_PIXEL
    streamed = not in_memory and outputs + model_bytes(cfg, min(pixels, MIN_TILE**2), scale) > available
    if streamed:
        available -= pixels * STREAM_BYTES_PER_PIXEL
    else:
        available -= outputs
    if tile is not None:
        return Plan("stream" if streamed else "tiled", tile)
    if not streamed and model_bytes(cfg, pixels, scale) <= available:
        return Plan("whole", None)
    fitted = largest_tile(cfg, available, scale, max(height, width), overlap)
    if fitted is None and in_memory:
        warnings.warn(f"a {width} x {height} image does not fit the memory budget of {max_memory / 1e9:.2f} GB "
                      f"(this process already holds {(max_memory - available) / 1e9:.2f} GB with its outputs): "
                      "segmenting it in the smallest tiles; raise max_memory (--max-memory) to use larger ones")
    if fitted is None and not in_memory:
        need = (max_memory - available + model_bytes(cfg, max(MIN_TILE, 2 * overlap) ** 2, scale)) / 1e9
        raise UserError(f"--max-memory {max_memory / 1e9:.2f} GB is too small for this model on a "
                        f"{width} x {height} image: give at least {need:.2f} GB")
    return Plan("stream" if streamed else "tiled", fitted or max(MIN_TILE, 2 * overlap))
