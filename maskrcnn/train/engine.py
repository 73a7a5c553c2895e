"""The training engine: a short loop that steps the model and calls hooks for everything else.

``Trainer(opts)`` builds a run (setup.py) and, with --resume, restores it from last.pt;
``run()`` then steps until --iters or --epochs is reached or a hook asks to stop. Around the
loop and each step the hooks (hooks.py) do the rest, in this order:

    TimeBudget     --max-minutes: stop when the time is up; fit the decay to the steps left
    SkipNonFinite  undo a skipped step's BatchNorm statistics; abort after MAX_BAD_STEPS in a row
    ProgressBar    the bar with the loss parts (rank 0)
    MetricsLog     a metrics.jsonl record per step (and the validations', written by Validation)
    Validation     every --val-every steps and at the end: score, log, save last/best.pt, plot
    Checkpointer   last.pt every --checkpoint-every steps, and at an interrupted stop
    SignalStop     SIGINT/SIGTERM/SIGUSR1: stop after the step in progress (signals.py)

A hook that must end the run after the current step (as SignalStop does) registers after the
Checkpointer and calls ``trainer.request_stop(reason, interrupted=True)`` in ``after_step``: the
loop ends, the final validation is left out and the Checkpointer writes last.pt at that step,
before the later hook's ``after_train`` runs.

Each step's samples are read by a ``BatchLoader`` (loading.py): in this process, or with
--workers N in DataLoader worker processes, with the same batches and results. A sample that
cannot be read stops the run with its one-line error, or with --skip-bad is left out of its batch
(``usable``); a batch left with no sample is skipped like a non-finite step, but counts as none.

``train()`` is the whole run: it holds the run directory's lock (maskrcnn/runtime/runlock.py) and, until
the loop starts, lets these signals stop it at once, so that the lock is released.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import DataError, UserError
from ..runtime.distributed import DistContext, epoch_batches, resolve_device
from ..runtime.precision import training_amp
from ..runtime.runlock import run_lock
from ..runtime.signals import StopSignals
from .hooks import Checkpointer, HookBase, MetricsLog, ProgressBar, SkipNonFinite, TimeBudget, Validation
from .init import initialise, load_init, with_init_layout
from .loading import BadSample, Batch, BatchLoader
from .schedule import learning_rate, time_budget
from .setup import (SKIP_BAD_HINT, TrainOptions, append_listing, build_data, build_model, build_optimizer, build_scaler,
                    prepare_run_dir, warn_if_slow_amp)
from .signal_hook import SignalStop

# Epochs shorter than this many steps: DataLoader workers, started anew each epoch, cost more than they save
WORKER_MIN_EPOCH_STEPS = 20


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    last: Path
    best: Path | None
    final_metrics: dict[str, float]
    stopped_by: str  # "iterations", "epochs", "time", or the reason a hook gave (a signal's name)
    interrupted: bool = False  # cut short (a signal): resumable with --resume, not validated at the end
    precision: str = "float32"  # what the steps computed in: "float32", "bfloat16 autocast" or "float16 autocast"


class Trainer:
    """One run's state and its loop; ``run()`` trains until the first of iterations, epochs or time."""

    def __init__(self, opts: TrainOptions, dist: DistContext | None = None) -> None:
        init = load_init(opts.init) if opts.init and not opts.resume else None  # --resume has its weights
        if init is not None:
            opts = with_init_layout(opts, init)
        if opts.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {opts.workers}")
        self.dist = dist or DistContext.single()
        self.device = self.dist.device if dist else resolve_device(opts.device)
        self.opts = opts = replace(opts, amp=training_amp(opts.amp, self.device))
        self.run_dir = prepare_run_dir(opts.out, self.dist)
        data = build_data(opts, self.dist, self.run_dir)
        self.cfg, self.normalizer, self.train_set, self.val_reader = (data.config, data.normalizer,
                                                                      data.train_set, data.val_reader)
        self.listing, self.val_listing = data.listing, data.val_listing
        self.val_checked = opts.check_data or opts.reader is not None  # else read at the first validation
        self.loader = BatchLoader(self.train_set, opts.workers, pin_memory=self.device.type == "cuda")
        self.global_batch = opts.batch_size * self.dist.world_size  # images per optimizer step
        self.batches_per_epoch = max(1, math.ceil(len(self.train_set) / self.global_batch))
        self.total_steps = opts.iters or (opts.epochs * self.batches_per_epoch if opts.epochs else None)
        if opts.workers and self.batches_per_epoch < WORKER_MIN_EPOCH_STEPS and self.dist.is_main:
            # fine-tuning on one image with --workers 1 made 66 steps in 1.5 minutes, inline 217
            warnings.warn(f"--workers {opts.workers}: an epoch here is {self.batches_per_epoch} step(s) and the "
                          "worker processes start anew every epoch; with this few images, reading them in the "
                          "training process (--workers 0) is faster")
        self.schedule_steps = self.total_steps  # what the learning rate decays over; TimeBudget fits it

        torch.manual_seed(opts.seed)  # the initial weights come from --seed
        self.model = build_model(self.cfg, self.device)
        if init is not None:
            initialise(self.model, init, self.cfg, opts.init)
        self.optimizer = build_optimizer(self.model, opts)
        self.scaler = build_scaler(opts, self.device)
        self.step = self.epoch = self.batch_in_epoch = 0  # where the run is: checkpoints carry these
        self.best_score: float | None = None  # the best validation mask AP so far
        self.metrics: dict[str, float] = {}  # the latest validation's scores
        self.losses: dict[str, float] | None = None  # the latest step's; None when it was skipped
        self.skip_reason: str | None = None  # why it was: "loss", "gradients" or "data" (no readable sample)
        self.stop_reason: str | None = None
        self.interrupted = False
        self._batches: tuple[int, torch.Tensor] | None = None  # (epoch, its batches): see next_batch

        self.hooks: list[HookBase] = []
        self.log = MetricsLog(self.run_dir, self.dist.is_main)
        self.checkpoints = Checkpointer(self.run_dir, opts.checkpoint_every)
        self.register(TimeBudget(opts.max_minutes), SkipNonFinite(), ProgressBar(opts.progress and self.dist.is_main),
                      self.log, Validation(opts.val_every, self.log, self.checkpoints), self.checkpoints,
                      SignalStop())
        if opts.resume:
            self.checkpoints.resume()  # may rebuild the model with the checkpoint's config
            self.log.rewind(self.step)
        self.net = self.dist.wrap(self.model, sync_bn=opts.sync_bn)  # what steps call: DDP under torchrun
        warn_if_slow_amp(opts, self.device)

    def register(self, *hooks: HookBase) -> None:
        """Add hooks after those registered already: at every point they run in this order."""
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def request_stop(self, reason: str, interrupted: bool = False) -> None:
        """End the run before the next step (from ``before_step``: before this one). ``interrupted``:
        the run is cut short (e.g. a signal) and skips its final validation; last.pt is still
        written at the step reached."""
        self.stop_reason, self.interrupted = reason, interrupted

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            return self._loop()
        finally:
            self.loader.close()
            for hook in self.hooks:
                hook.close()

    def _loop(self) -> TrainResult:
        for hook in self.hooks:
            hook.before_train()
        while not self.length_reached():
            for hook in self.hooks:
                hook.before_step()
            if self.stop_reason:
                break
            lr = learning_rate(self.step, self.opts.lr, self.opts.warmup_iters, self.schedule_steps)
            self.losses = self.train_step(self.next_batch(), lr)
            self.batch_in_epoch += 1
            if self.losses is not None:  # a skipped step used up its batch but is no step
                self.step += 1
            for hook in self.hooks:
                hook.after_step()
            if self.stop_reason:
                break
        for hook in self.hooks:
            hook.after_train()
        best = self.checkpoints.best
        return TrainResult(self.run_dir, self.step, self.checkpoints.last, best if best.exists() else None,
                           self.metrics, self.stop_reason, self.interrupted, self.precision)

    def length_reached(self) -> bool:
        """Whether --epochs or --iters is reached (``stop_reason`` says which). A used-up epoch gives
        way to the next only after the check: a run that ends with its epoch stays at that epoch's
        end, in its last checkpoint and log."""
        self.stop_reason = self._length_stop()
        if self.stop_reason is None and self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.stop_reason = self._length_stop()  # --epochs counts the epoch begun
        return self.stop_reason is not None

    def _length_stop(self) -> str | None:
        if self.opts.epochs and self.epoch >= self.opts.epochs:
            return "epochs"
        if self.total_steps is not None and self.step >= self.total_steps:  # with --epochs: epochs' worth
            return "epochs" if self.opts.epochs else "iterations"
        return None

    def next_batch(self) -> list[int]:
        """This rank's samples for the step: a permutation drawn from (seed, epoch), dealt to ranks."""
        self.train_set.set_epoch(self.epoch)  # augmentations come from (seed, epoch, index)
        if self._batches is None or self._batches[0] != self.epoch:  # drawn once per epoch, not per step
            self._batches = (self.epoch, epoch_batches(len(self.train_set), self.opts.batch_size, self.dist.rank,
                                                       self.dist.world_size, self.opts.seed, self.epoch))
        return self._batches[1][self.batch_in_epoch].tolist()

    def train_step(self, indices: list[int], lr: float) -> dict[str, float] | None:
        """One optimizer step on the samples at ``indices``; None (and no update) when the loss, or
        with AMP off the gradients, are not finite, or no sample could be read (``skip_reason``
        says which)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.skip_reason = None
        usable = self.usable(self.read_batch(indices))
        if usable is None:
            self.skip_reason = "data"
            return None
        images, targets = usable
        self.net.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.opts.amp):
            losses = self.net(images, targets).losses
        # The global batch's losses: what one process would log, and one skip decision for all
        # ranks (a rank skipping backward alone would leave the others waiting in DDP's all-reduce).
        logged = self.dist.mean_floats(losses.as_floats())
        self.optimizer.zero_grad(set_to_none=True)
        if not all(math.isfinite(v) for v in logged.values()):
            self.skip_reason = "loss"
            return None
        self.scaler.scale(losses.total).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.grad_clip)
        # DDP averaged the gradients, so every rank sees the same norm and skips alike. With loss
        # scaling the scaler skips such a step itself (and lowers the scale).
        if not self.scaler.is_enabled() and not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skip_reason = "gradients"
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logged | {"lr": lr}

    def read_batch(self, indices: list[int]) -> Batch:
        """The samples at ``indices``: with workers, from the DataLoader when they are this step's
        batch (they are in the loop; a caller may ask for others, which are read here)."""
        table = self._batches[1] if self._batches is not None and self._batches[0] == self.epoch else None
        current = (table is not None and self.batch_in_epoch < len(table)
                   and table[self.batch_in_epoch].tolist() == list(indices))
        return self.loader.load(indices, self.epoch, self.batch_in_epoch, table if current else None)

    def usable(self, batch: Batch) -> tuple[list[torch.Tensor], list] | None:
        """The batch's readable (images, targets); None when some rank has none (every rank then
        skips the step). A sample that could not be read stops the run with its one-line error, or
        with --skip-bad is left out: a warning names it, RUN_DIR/skipped.txt lists it (rank 0
        writes) and it is not read again. Under torchrun the ranks share what they found, so all
        stop, or all know the sample, alike: one small all-reduce per step."""
        found = list({b.index: b for b in batch.bad if not b.known}.values())
        empty = not batch.images
        if self.dist.active:
            counts = self.dist.mean_floats({"bad": float(len(found)), "empty": float(empty)})
            empty = counts["empty"] > 0
            if counts["bad"] > 0:
                found = list({b.index: b for part in self.dist.all_gather_objects(found) for b in part}.values())
        found = [b for b in found if not self.loader.bad[b.index]]  # a worker may have read it before it was known
        if found:
            self.leave_out(sorted(found, key=lambda b: b.index))
        return None if empty else (batch.images, batch.targets)

    def leave_out(self, found: list[BadSample]) -> None:
        """Stop on the first of samples found bad, or with --skip-bad never read them again."""
        if not self.opts.skip_bad:
            raise DataError(found[0].path, f"{found[0].problem} {SKIP_BAD_HINT}", every_rank=self.dist.active)
        for bad in found:
            self.loader.bad[bad.index] = True
        if self.dist.is_main:
            append_listing(self.listing, [(b.name, f"{b.path}: {b.problem}") for b in found])
            for bad in found:
                warnings.warn(f"{bad.path}: {bad.problem}; sample {bad.name} skipped (listed in {self.listing})")

    @property
    def precision(self) -> str:
        """What the training steps compute in, as train's closing line names it."""
        return f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.opts.amp else "float32"

    @property
    def amp_dtype(self) -> torch.dtype:
        # float16 needs loss scaling and is CUDA's fast path; CPUs autocast to bfloat16.
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    def budget(self, total: int | None, deadline: float | None,
               started: tuple[float, int]) -> tuple[bool, int | None]:
        """(out of time?, steps the schedule decays over) at the current step: schedule.time_budget."""
        return time_budget(self.step, self.dist, total, deadline, started)


def train(opts: TrainOptions, dist: DistContext | None = None, command: str | None = None) -> TrainResult:
    """Train one run into ``opts.out``, holding its lock (``command`` is recorded in it; default:
    this process's command line). SIGINT, SIGTERM and SIGUSR1 raise KeyboardInterrupt during the
    setup and stop gracefully once the loop runs (``TrainResult.interrupted``)."""
    with StopSignals(graceful=False), run_lock(opts.out, dist or DistContext.single(), command):
        return Trainer(opts, dist).run()
