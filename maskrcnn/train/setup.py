"""What a run needs before its first step: options, checked data, the train/val split, the model.

Every sample is checked here without decoding its pixels (its files exist, their headers agree on
the size), so a missing or mismatched file stops the run before the first step rather than hours
in, and a large dataset starts within seconds; ``train --check-data`` reads every sample instead.
A sample that passes the cheap check but fails when read stops the run when training first reads
it (loading.py). ``--skip-bad`` leaves bad samples out instead and lists them in the run directory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config
from ..data.augment import Augment
from ..data.datasets import InstanceReader, open_dataset
from ..data.normalize import Normalizer
from ..data.planes import Planes
from ..data.stack_reader import StackPlanesReader, stack_pairs
from ..data.torch_dataset import InstanceDataset, split_train_val
from ..data.views import RegionReader, SubsetReader
from ..errors import DataError, UserError
from ..modeling.model import MaskRCNN
from ..presets import nuclei_config
from ..runtime.atomic import atomic_write_text, remove_stale_temporaries
from ..runtime.distributed import DistContext, cpu_has_fast_bfloat16
from .loading import listed_names

# Read and normalised training samples kept in memory (per process): a few images' worth of
# masks, so a fine-tuning run on a handful of images decodes each of them once
SAMPLE_CACHE_BYTES = 1 << 30
SCRATCH_LR = 1e-3  # AdamW's base rate from random (or ImageNet-trunk) weights
FINETUNE_LR = 1e-4  # from a trained detector (train --init)


@dataclass
class TrainOptions:
    data: str
    out: str
    format: str | None = None
    val: str | None = None
    config: Config | None = None  # None: nuclei_config(), or with ``init`` that model's own layout
    iters: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    batch_size: int = 2
    lr: float | None = None  # None: SCRATCH_LR, or FINETUNE_LR with ``init`` (see __post_init__)
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    grad_clip: float = 10.0  # gradients are scaled down to this global norm: one bad batch moves little
    crop: int | None = None  # None: 128 for a p2 at stride 2 (the built-in layout), else 256
    scale_range: tuple[float, float] = (0.75, 1.33)  # each crop is resized by a log-uniform factor in this range
    val_every: int = 200
    checkpoint_every: int | None = None  # also write last.pt every N steps between validations
    val_fraction: float = 0.2
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    skip_bad: bool = False
    check_data: bool = False  # read every sample before the first step (default: files and sizes only)
    workers: int = 0  # DataLoader worker processes reading the batches; 0 reads them in the training process
    progress: bool = True
    sync_bn: bool = False
    amp: bool | None = None  # autocast; None: where the CPU has native bfloat16 (runtime.precision.training_amp)
    image_dir: str | None = None
    normalizer: Normalizer | None = None
    # the samples themselves, instead of reading ``data`` (a recipe's mix, e.g. synthetic scenes and
    # a real image): trusted as built, so not read through before the first step
    reader: InstanceReader | None = None
    init: str | None = None  # start from this checkpoint's weights (a path or a built-in name)
    planes: Planes | None = None  # --channel / --z / --t of multi-dimensional images (data and --val)
    three_d: bool = False  # data (and --val) are Z-stacks with 3-D labels, learnt from as 2-D slices
    side_views: bool = False  # three_d: also ZX and ZY slices (maskrcnn.data.stack_reader)
    anisotropy: float | None = None  # side views: z step / pixel size (None: each file's own, else 1)

    def __post_init__(self) -> None:
        # A pretrained start needs a smaller step than random weights: on the real band (benchmarks/
        # dsb_real.py, 10 min from the built-in model) 1e-3 lost what pretraining gave (AP50 0.747,
        # DSB 0.410, below zero-shot's 0.827 / 0.526) while 1e-4 gained AP50 (0.856).
        if self.lr is None:
            self.lr = FINETUNE_LR if self.init else SCRATCH_LR


@dataclass
class TrainData:
    config: Config  # the options' config with the dataset's classes
    normalizer: Normalizer
    train_set: InstanceDataset
    val_reader: InstanceReader  # possibly empty: then there is nothing to validate on
    listing: Path  # where the training samples left out are listed (RUN_DIR/skipped.txt)
    val_listing: Path  # and the validation samples: the same file, or skipped_val.txt for --val


def prepare_run_dir(out: str, dist: DistContext) -> Path:
    run_dir = Path(out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # left by a run killed while writing
    return run_dir


def build_data(opts: TrainOptions, dist: DistContext, run_dir: Path) -> TrainData:
    listing, val_listing = run_dir / "skipped.txt", run_dir / ("skipped_val.txt" if opts.val else "skipped.txt")
    if not opts.resume and dist.is_main:  # the listings are this run's (a resumed run adds to them)
        for path in {listing, val_listing}:
            path.unlink(missing_ok=True)
    if opts.three_d and opts.reader is None:
        train_reader, val_reader = split_stacks(opts, dist, listing, val_listing)
    else:
        reader = opts.reader or checked(open_dataset(opts.data, opts.format, image_dir=opts.image_dir,
                                                     skip_bad=opts.skip_bad, planes=opts.planes), opts, dist, listing)
        train_reader, val_reader = split(reader, opts, dist, val_listing)
    classes = list(train_reader.class_names)
    cfg = (opts.config or nuclei_config()).replace(num_classes=len(classes), class_names=classes)
    normalizer = opts.normalizer or Normalizer(channels=cfg.in_channels)
    crop = opts.crop or (128 if cfg.rpn_scales[0] == 2 else 256)  # the same cost per step either way
    # Not for a recipe's own reader (pretrain: scenes drawn once each, a real image repeated under
    # many indices and cached by the reader itself), nor with --workers: their processes are new
    # each epoch and read each sample once in it, so a cache there would only hold memory.
    cache = SAMPLE_CACHE_BYTES if opts.reader is None and opts.workers == 0 else 0
    augment = Augment(crop_size=crop, scale_range=opts.scale_range)
    train_set = InstanceDataset(train_reader, normalizer, augment, seed=opts.seed, cache_bytes=cache)
    return TrainData(cfg, normalizer, train_set, val_reader, listing, val_listing)


SKIP_BAD_HINT = "(train --skip-bad skips bad samples)"


def checked(reader: InstanceReader, opts: TrainOptions, dist: DistContext, listing: Path,
            full: bool | None = None, validation: bool = False) -> InstanceReader:
    """The reader after checking every sample: by reading it when ``full`` (default: --check-data),
    else by ``check_header`` (files and sizes, no pixels decoded). Under torchrun each rank checks
    its share and all agree on the result. A bad sample stops the run with its one-line error;
    with --skip-bad it is left out instead, with a warning, and listed in ``listing``, together
    with what the reader itself left out as it was built (e.g. COCO annotations of an unknown
    category; it warned of those). No readable sample is an error, except for the ``validation``
    samples read at the first validation: then there is nothing to validate on."""
    full = opts.check_data if full is None else full
    check = reader.__getitem__ if full else reader.check_header
    shard = range(dist.rank, len(reader), dist.world_size)
    progress = opts.progress and dist.is_main
    names = listed_names(reader)
    bad: list[tuple[int, str, str, str]] = []  # (index, name, path, problem)
    for index in tqdm(shard, desc="check data" if full else "check files", unit="img", disable=not progress,
                      leave=False):
        try:
            check(index)
        except DataError as err:
            bad.append((index, names[index], err.path, err.problem))
            if not opts.skip_bad:
                break  # the first bad sample stops the run: no need to look further
    bad = sorted(b for part in dist.all_gather_objects(bad) for b in part)
    if bad and not opts.skip_bad:
        raise DataError(bad[0][2], f"{bad[0][3]} {SKIP_BAD_HINT}", every_rank=dist.active)
    listed = list(reader.left_out) + [(name, f"{path}: {problem}") for _, name, path, problem in bad]
    if listed and dist.is_main:
        append_listing(listing, listed)
    dropped = {b[0] for b in bad}
    good = [index for index in range(len(reader)) if index not in dropped]
    if not good and not validation:
        raise UserError(f"{opts.data}: no readable samples (listed in {listing})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable {'validation ' if validation else ''}sample(s), "
                      f"listed in {listing}")
    return SubsetReader(reader, good) if bad else reader


def append_listing(listing: Path, entries: list[tuple[str, str]]) -> None:
    """Add ``name<TAB>problem`` lines to ``listing`` (atomically: a kill leaves the old file or the
    new one), leaving out names it lists already."""
    text = listing.read_text() if listing.is_file() else ""
    names = {line.split("\t", 1)[0] for line in text.splitlines()}
    added = []
    for name, problem in entries:
        if name not in names:
            names.add(name)
            added.append(f"{name}\t{problem}\n")
    if added:
        atomic_write_text(listing, text + "".join(added))


def split(reader: InstanceReader, opts: TrainOptions, dist: DistContext,
          val_listing: Path) -> tuple[InstanceReader, InstanceReader]:
    """(train, validation) readers: --val, else held-out images, else the right part of each
    image; ``val_fraction == 0`` validates on nothing."""
    if opts.val:
        val = open_dataset(opts.val, opts.format, image_dir=opts.image_dir, skip_bad=opts.skip_bad,
                           planes=opts.planes)
        return reader, checked(val, opts, dist, val_listing)
    if opts.val_fraction == 0:  # no validation: train on everything
        return reader, SubsetReader(reader, [])
    train_idx, val_idx = split_train_val(reader, opts.val_fraction, opts.seed)
    if val_idx:
        return SubsetReader(reader, train_idx), SubsetReader(reader, val_idx)
    cut = 1.0 - opts.val_fraction  # too few images to hold one out: hold out a band of each
    return RegionReader(reader, 0.0, cut), RegionReader(reader, cut, 1.0)


def split_stacks(opts: TrainOptions, dist: DistContext, listing: Path,
                 val_listing: Path) -> tuple[InstanceReader, InstanceReader]:
    """(train, validation) readers of Z-stacks' slices, split by stack so that no validation nucleus
    was seen in another view: --val's stacks (their z-planes), else held-out stacks, else the right
    band of each stack; the side views train only."""
    def slices(root: str, side: bool, **part) -> InstanceReader:
        return StackPlanesReader(root, opts.planes, side and opts.side_views, opts.anisotropy, **part)

    if opts.val:
        return (checked(slices(opts.data, True), opts, dist, listing),
                checked(slices(opts.val, False), opts, dist, val_listing, validation=True))
    count = len(stack_pairs(opts.data))
    train_idx, val_idx = split_train_val(count, opts.val_fraction, opts.seed)
    if val_idx or opts.val_fraction == 0:
        train = checked(slices(opts.data, True, stacks=train_idx), opts, dist, listing)
        return train, (slices(opts.data, False, stacks=val_idx) if val_idx else SubsetReader(train, []))
    cut = 1.0 - opts.val_fraction  # one stack: hold out a band of it
    return (checked(slices(opts.data, True, columns=(0.0, cut)), opts, dist, listing),
            slices(opts.data, False, columns=(cut, 1.0)))


def build_model(cfg: Config, device: torch.device) -> MaskRCNN:
    return MaskRCNN(cfg).to(device)


def build_optimizer(model: MaskRCNN, opts: TrainOptions) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters instead of a few per tensor; on a small model's CPU step
    # the per-tensor update took about a tenth of the step
    return torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay, fused=True)


def build_scaler(opts: TrainOptions, device: torch.device) -> torch.amp.GradScaler:
    """AMP's loss scaler: float16 on CUDA needs it; the CPU's bfloat16 has float32's range and does not."""
    return torch.amp.GradScaler(device.type, enabled=opts.amp and device.type == "cuda")


def warn_if_slow_amp(opts: TrainOptions, device: torch.device) -> None:
    if opts.amp and device.type == "cpu" and not cpu_has_fast_bfloat16():
        warnings.warn("--amp on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast is emulated "
                      "and usually slower than float32")
