"""What a run needs before its first step: options, checked data, the train/val split, the model.

Every sample is read once here, so a bad file stops the run before the first step rather than
hours in; ``--skip-bad`` leaves bad samples out instead and lists them in the run directory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import atomic_write_text, remove_stale_temporaries
from ..config import Config, nuclei_config
from ..data.augment import Augment
from ..data.datasets import InstanceReader, open_dataset
from ..data.torch_dataset import InstanceDataset, split_train_val
from ..data.normalize import Normalizer
from ..data.views import RegionReader, SubsetReader
from ..distributed import DistContext, cpu_has_fast_bfloat16
from ..errors import DataError, UserError
from ..model import MaskRCNN


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
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    grad_clip: float = 10.0  # gradients are scaled down to this global norm: one bad batch moves little
    crop: int | None = None  # None: 128 for a p2 at stride 2 (the built-in layout), else 256
    val_every: int = 200
    checkpoint_every: int | None = None  # also write last.pt every N steps between validations
    val_fraction: float = 0.2
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    skip_bad: bool = False
    progress: bool = True
    sync_bn: bool = False
    amp: bool = False
    image_dir: str | None = None
    normalizer: Normalizer | None = None
    # the samples themselves, instead of reading ``data`` (a recipe's mix, e.g. synthetic scenes and
    # a real image): trusted as built, so not read through before the first step
    reader: InstanceReader | None = None
    init: str | None = None  # start from this checkpoint's weights (a path or a built-in name)


@dataclass
class TrainData:
    config: Config  # the options' config with the dataset's classes
    normalizer: Normalizer
    train_set: InstanceDataset
    val_reader: InstanceReader  # possibly empty: then there is nothing to validate on


def prepare_run_dir(out: str, dist: DistContext) -> Path:
    run_dir = Path(out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)  # left by a run killed while writing
    return run_dir


def build_data(opts: TrainOptions, dist: DistContext, run_dir: Path) -> TrainData:
    reader = opts.reader or checked(open_dataset(opts.data, opts.format, image_dir=opts.image_dir,
                                                 skip_bad=opts.skip_bad), opts, dist, run_dir / "skipped.txt")
    cfg = (opts.config or nuclei_config()).replace(num_classes=len(reader.class_names), class_names=list(reader.class_names))
    normalizer = opts.normalizer or Normalizer(channels=cfg.in_channels)
    train_reader, val_reader = split(reader, opts, dist, run_dir)
    crop = opts.crop or (128 if cfg.rpn_scales[0] == 2 else 256)  # the same cost per step either way
    train_set = InstanceDataset(train_reader, normalizer, Augment(crop_size=crop), seed=opts.seed)
    return TrainData(cfg, normalizer, train_set, val_reader)


def checked(reader: InstanceReader, opts: TrainOptions, dist: DistContext, listing: Path) -> InstanceReader:
    """The reader after reading every sample once. With --skip-bad, bad samples are left out
    instead of stopping the run, and listed in ``listing`` with what the reader itself left out
    as it was built (e.g. COCO annotations of an unknown category; it warned of those)."""
    good, bad = [], []
    progress = opts.progress and dist.is_main
    for index in tqdm(range(len(reader)), desc="check data", unit="img", disable=not progress, leave=False):
        try:
            reader[index]
        except DataError as err:
            if not opts.skip_bad:
                raise DataError(err.path, f"{err.problem} (train --skip-bad skips bad samples)") from None
            bad.append(f"{reader.names[index]}\t{err}\n")
            continue
        good.append(index)
    listed = [f"{name}\t{problem}\n" for name, problem in reader.left_out] + bad
    if listed and dist.is_main:
        atomic_write_text(listing, "".join(listed))
    if not good:
        raise UserError(f"{opts.data}: no readable samples (listed in {listing})")
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable sample(s), listed in {listing}")
    return SubsetReader(reader, good) if bad else reader


def split(reader: InstanceReader, opts: TrainOptions, dist: DistContext,
          run_dir: Path) -> tuple[InstanceReader, InstanceReader]:
    """(train, validation) readers: --val, else held-out images, else the right part of each
    image; ``val_fraction == 0`` validates on nothing."""
    if opts.val:
        val = open_dataset(opts.val, opts.format, image_dir=opts.image_dir, skip_bad=opts.skip_bad)
        return reader, checked(val, opts, dist, run_dir / "skipped_val.txt")
    if opts.val_fraction == 0:  # no validation: train on everything
        return reader, SubsetReader(reader, [])
    train_idx, val_idx = split_train_val(reader, opts.val_fraction, opts.seed)
    if val_idx:
        return SubsetReader(reader, train_idx), SubsetReader(reader, val_idx)
    cut = 1.0 - opts.val_fraction  # too few images to hold one out: hold out a band of each
    return RegionReader(reader, 0.0, cut), RegionReader(reader, cut, 1.0)


def build_model(cfg: Config, device: torch.device) -> MaskRCNN:
    return MaskRCNN(cfg).to(device)


def build_optimizer(model: MaskRCNN, opts: TrainOptions) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)


def build_scaler(opts: TrainOptions, device: torch.device) -> torch.amp.GradScaler:
    """AMP's loss scaler: float16 on CUDA needs it; the CPU's bfloat16 has float32's range and does not."""
    return torch.amp.GradScaler(device.type, enabled=opts.amp and device.type == "cuda")


def warn_if_slow_amp(opts: TrainOptions, device: torch.device) -> None:
    if opts.amp and device.type == "cpu" and not cpu_has_fast_bfloat16():
        warnings.warn("--amp on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast is emulated "
                      "and usually slower than float32")
