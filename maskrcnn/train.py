"""Training: the loop behind ``maskrcnn train``.

Reproducible and resumable: the sample order comes from (seed, epoch), augmentations from
(seed, epoch, index), and checkpoints carry the model, optimizer, counters and RNG state, so a
run resumed from ``last.pt`` continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_write_text, remove_stale_temporaries
from .checkpoint import Checkpoint, get_rng_states, load_checkpoint, save_checkpoint, set_rng_states
from .config import Config, nuclei_config
from .data.augment import Augment
from .data.datasets import InstanceReader, open_dataset
from .data.loader import InstanceDataset, collate, split_train_val
from .data.normalize import Normalizer
from .data.views import RegionReader, SubsetReader
from .distributed import DistContext, cpu_has_fast_bfloat16, epoch_batches, resolve_device
from .errors import DataError, UserError
from .evaluate import evaluate_model
from .model import MaskRCNN
from .plots import plot_training_curves

MAX_BAD_STEPS = 5  # non-finite losses in a row before the run is aborted


@dataclass
class TrainOptions:
    data: str
    out: str
    format: str | None = None
    val: str | None = None
    config: Config = field(default_factory=nuclei_config)
    iters: int | None = None
    epochs: int | None = None
    max_minutes: float | None = None
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    crop: int = 256
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


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    last: Path
    best: Path | None
    final_metrics: dict[str, float]
    stopped_by: str  # "iterations", "epochs" or "time"


def learning_rate(step: int, base: float, warmup: int, total: int | None) -> float:
    """Linear warm-up, then cosine decay to 5% of ``base`` over ``total`` steps (flat if unknown)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if not total or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Holds one run's state; ``run()`` trains until the first of iterations, epochs or time."""

    def __init__(self, opts: TrainOptions, dist: DistContext | None = None) -> None:
        self.opts = opts
        self.dist = dist or DistContext.single()
        self.device = self.dist.device if dist else resolve_device(opts.device)
        self.run_dir = Path(opts.out)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.run_dir)  # left by a run killed while writing
        self._build_data()
        self._build_model()
        if opts.amp and self.device.type == "cpu" and not cpu_has_fast_bfloat16():
            warnings.warn("--amp on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast is emulated "
                          "and usually slower than float32")

    # --- setup ------------------------------------------------------------------------------
    def _build_data(self) -> None:
        opts = self.opts
        reader = self._checked(open_dataset(opts.data, opts.format, image_dir=opts.image_dir), "skipped.txt")
        self.cfg = opts.config.replace(num_classes=len(reader.class_names), class_names=list(reader.class_names))
        self.normalizer = opts.normalizer or Normalizer(channels=self.cfg.in_channels)
        train_reader, self.val_reader = self._split(reader)
        self.train_set = InstanceDataset(train_reader, self.normalizer, Augment(crop_size=opts.crop), seed=opts.seed)
        self.global_batch = opts.batch_size * self.dist.world_size  # images per optimizer step
        self.batches_per_epoch = max(1, math.ceil(len(self.train_set) / self.global_batch))

    def _checked(self, reader: InstanceReader, listing_name: str) -> InstanceReader:
        """The reader after reading every sample once, before the first step: a bad file stops
        the run now, not hours in. With --skip-bad, bad samples are left out instead and listed
        in RUN_DIR/``listing_name``."""
        good, bad = [], []
        progress = self.opts.progress and self.dist.is_main
        for index in tqdm(range(len(reader)), desc="check data", unit="img", disable=not progress, leave=False):
            try:
                reader[index]
            except DataError as err:
                if not self.opts.skip_bad:
                    raise DataError(err.path, f"{err.problem} (train --skip-bad skips bad samples)") from None
                bad.append(f"{reader.names[index]}\t{err}\n")
                continue
            good.append(index)
        listing = self.run_dir / listing_name
        if bad and self.dist.is_main:
            atomic_write_text(listing, "".join(bad))
        if not good:
            raise UserError(f"{self.opts.data}: no readable samples (listed in {listing})")
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable sample(s), listed in {listing}")
        return SubsetReader(reader, good) if bad else reader

    def _split(self, reader: InstanceReader) -> tuple[InstanceReader, InstanceReader]:
        """(train, validation) readers: --val, else held-out images, else the right part of each
        image; ``val_fraction == 0`` validates on nothing."""
        opts = self.opts
        if opts.val:
            return reader, self._checked(open_dataset(opts.val, opts.format, image_dir=opts.image_dir),
                                         "skipped_val.txt")
        if opts.val_fraction == 0:  # no validation: train on everything
            return reader, SubsetReader(reader, [])
        train_idx, val_idx = split_train_val(reader, opts.val_fraction, opts.seed)
        if val_idx:
            return SubsetReader(reader, train_idx), SubsetReader(reader, val_idx)
        cut = 1.0 - opts.val_fraction  # too few images to hold one out: hold out a band of each
        return RegionReader(reader, 0.0, cut), RegionReader(reader, cut, 1.0)

    def _build_model(self) -> None:
        opts = self.opts
        torch.manual_seed(opts.seed)
        self.model = MaskRCNN(self.cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_score: float | None = None
        last, ckpt = self.run_dir / "last.pt", None
        if opts.resume:
            if not last.is_file():
                raise UserError(f"{last}: nothing to resume (no last checkpoint in {self.run_dir})")
            ckpt = load_checkpoint(last, map_location=self.device)
            self._restore(ckpt)
        self.net = self.dist.wrap(self.model, sync_bn=opts.sync_bn)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=opts.amp and self.device.type == "cuda")
        if ckpt is not None and ckpt.scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.scaler_state)

    def _restore(self, ckpt: Checkpoint) -> None:
        if ckpt.config.to_dict() != self.cfg.to_dict():
            warnings.warn("resuming with the checkpoint's configuration; options given now are ignored")
            self.cfg = ckpt.config
            # the weights come from the checkpoint, not from the ImageNet file training started from
            self.model = MaskRCNN(self.cfg.replace(backbone_weights=None)).to(self.device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.opts.lr,
                                               weight_decay=self.opts.weight_decay)
        self.model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.normalizer = Normalizer.from_dict(ckpt.normalizer)
        self.train_set.normalizer = self.normalizer
        self.step, self.epoch, self.batch_in_epoch = ckpt.step, ckpt.epoch, ckpt.batch_in_epoch
        if ckpt.global_batch and ckpt.global_batch != self.global_batch:
            # resumed with another batch size or number of processes: continue after the same images
            self.batch_in_epoch = math.ceil(ckpt.batch_in_epoch * ckpt.global_batch / self.global_batch)
        self.best_score = ckpt.best_score
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state.cpu())
        set_rng_states(ckpt.rng_states, self.device)
        self._rewind_log(ckpt.step)

    # --- loop -------------------------------------------------------------------------------
    def total_steps(self) -> int | None:
        if self.opts.iters:
            return self.opts.iters
        if self.opts.epochs:
            return self.opts.epochs * self.batches_per_epoch
        return None

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's batches of an epoch: a permutation drawn from (seed, epoch), dealt to ranks."""
        return epoch_batches(len(self.train_set), self.opts.batch_size, self.dist.rank, self.dist.world_size,
                             self.opts.seed, epoch)

    def budget(self, total: int | None, deadline: float | None, started: tuple[float, int]) -> tuple[bool, int | None]:
        """(out of time?, steps the schedule decays over). With only a wall-clock budget, the
        cosine decay is fitted to the steps that the budget allows at the rate measured so far, so
        a --max-minutes run ends at a low learning rate too. Rank 0 decides for every rank."""
        if deadline is None:
            return False, total
        now = time.monotonic()
        if total is None and self.step > started[1]:
            per_step = (now - started[0]) / (self.step - started[1])
            total = self.step + int(max(0.0, deadline - now) / per_step)
        out_of_time, total_f = self.dist.from_main([float(now >= deadline), float(total or 0)])
        return bool(out_of_time), int(total_f) or None

    def run(self) -> TrainResult:
        opts, fixed_total = self.opts, self.total_steps()
        deadline = time.monotonic() + opts.max_minutes * 60 if opts.max_minutes else None
        started = (time.monotonic(), self.step)
        total = fixed_total
        bar = tqdm(total=total, initial=self.step, disable=not (opts.progress and self.dist.is_main),
                   desc="train", unit="it", dynamic_ncols=True)
        bad_in_row, stopped_by = 0, "iterations"
        last_metrics: dict[str, float] = {}
        validated_at: int | None = None
        while True:
            if opts.epochs and self.epoch >= opts.epochs:
                stopped_by = "epochs"
                break
            if fixed_total is not None and self.step >= fixed_total:  # with --epochs: epochs' worth of steps
                stopped_by = "epochs" if opts.epochs else "iterations"
                break
            out_of_time, total = self.budget(fixed_total, deadline, started)
            if out_of_time:
                stopped_by = "time"
                break
            batches = self.epoch_batches(self.epoch)
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            self.train_set.set_epoch(self.epoch)
            indices = batches[self.batch_in_epoch].tolist()
            losses = self.train_step(indices, learning_rate(self.step, opts.lr, opts.warmup_iters, total))
            self.batch_in_epoch += 1
            if losses is None:
                bad_in_row += 1
                if bad_in_row >= MAX_BAD_STEPS:
                    raise UserError(f"training diverged: {MAX_BAD_STEPS} non-finite losses in a row at step "
                                    f"{self.step}; the last good checkpoint is {self.run_dir / 'last.pt'}. "
                                    "Try a lower --lr.")
                continue
            bad_in_row = 0
            self.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            self._log({"step": self.step, "epoch": self.epoch, **losses})
            if self.step % opts.val_every == 0:
                last_metrics, validated_at = self.validate_and_save(), self.step
            elif opts.checkpoint_every and self.step % opts.checkpoint_every == 0 and self.dist.is_main:
                save_checkpoint(self.run_dir / "last.pt", self.checkpoint({}))
        bar.close()
        if validated_at != self.step:  # not when the last step was just validated and saved
            last_metrics = self.validate_and_save()
        best = self.run_dir / "best.pt"
        return TrainResult(self.run_dir, self.step, self.run_dir / "last.pt", best if best.exists() else None,
                           last_metrics, stopped_by)

    def train_step(self, indices: list[int], lr: float) -> dict[str, float] | None:
        """One optimizer step; None (and no update) when the loss is not finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, targets = collate([self.train_set[i] for i in indices])
        self.net.train()
        # the forward pass updates BatchNorm statistics: kept to undo if the step is skipped
        buffers = [b.detach().clone() for b in self.model.buffers()]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.opts.amp):
            losses = self.net(images, targets).losses
        # The global batch's losses: what one process would log, and one skip decision for all
        # ranks (a rank skipping backward alone would leave the others waiting in DDP's all-reduce).
        logged = self.dist.mean_floats(losses.as_floats())
        self.optimizer.zero_grad(set_to_none=True)
        if not all(math.isfinite(v) for v in logged.values()):
            warnings.warn(f"step {self.step}: non-finite loss, step skipped")
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
            return None
        self.scaler.scale(losses.total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logged | {"lr": lr}

    @property
    def amp_dtype(self) -> torch.dtype:
        # float16 needs loss scaling and is CUDA's fast path; CPUs autocast to bfloat16.
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    # --- validation, checkpoints, logs ---------------------------------------------------------
    def validate_and_save(self) -> dict[str, float]:
        metrics = self.validate()
        if self.dist.is_main:
            score = metrics.get("mask_ap", 0.0)
            improved = self.best_score is None or score > self.best_score
            if improved:
                self.best_score = score
            # logged first: a resume rewinds the log to the checkpoint's step, so a kill between
            # the two never leaves a validation without its record or a record counted twice
            self._log({"step": self.step, "epoch": self.epoch, **{f"val_{k}": v for k, v in metrics.items()}})
            ckpt = self.checkpoint(metrics)
            save_checkpoint(self.run_dir / "last.pt", ckpt)
            if improved:
                # best.pt is for prediction: without the optimizer state it is a third of the size.
                save_checkpoint(self.run_dir / "best.pt", dataclasses.replace(ckpt, optimizer_state=None))
            plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        return metrics

    def validate(self) -> dict[str, float]:
        if len(self.val_reader) == 0:
            return {}
        self.dist.broadcast_buffers(self.model)  # every rank validates the model rank 0 saves
        report = evaluate_model(self.model, self.normalizer, self.val_reader, device=self.device,
                                progress=False, dist=self.dist)
        return report.summary()

    def checkpoint(self, metrics: dict[str, float]) -> Checkpoint:
        return Checkpoint(config=self.cfg, model_state=self.model.state_dict(), normalizer=self.normalizer.to_dict(),
                          step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                          global_batch=self.global_batch,
                          optimizer_state=self.optimizer.state_dict(), rng_state=torch.get_rng_state(),
                          rng_states=get_rng_states(self.device), scaler_state=self.scaler.state_dict() or None,
                          metrics=metrics, best_score=self.best_score)

    def _rewind_log(self, step: int) -> None:
        """Drop the records of steps after ``step`` from metrics.jsonl, and a line cut short by a kill:
        a run killed after its last checkpoint logged steps that the resumed run repeats."""
        path = self.run_dir / "metrics.jsonl"
        if not (self.dist.is_main and path.is_file()):
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            # NaN (a metric undefined on this validation set) is not JSON: write null, as reports do
            record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def train(opts: TrainOptions, dist: DistContext | None = None) -> TrainResult:
    return Trainer(opts, dist).run()
