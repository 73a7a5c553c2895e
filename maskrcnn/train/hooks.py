"""The hooks of a training run: each owns one concern, and the engine calls them at fixed points.

The engine (engine.py) calls every hook's ``before_train`` once, ``before_step`` and
``after_step`` around each step, ``after_train`` once when the loop ends, and ``close`` once
however the run ended; in each of these the hooks run in the order they were registered. A
hook may end the run with ``trainer.request_stop``. A step skipped for a non-finite loss or
gradient reaches ``after_step`` with ``trainer.losses`` None: the hooks below treat it as no step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.normalize import Normalizer
from ..errors import UserError
from ..modeling.checkpoint import Checkpoint, get_rng_states, load_checkpoint, save_checkpoint, set_rng_states
from ..outputs.plots import plot_training_curves
from ..prediction.evaluate import evaluate_model
from ..runtime.atomic import atomic_write_text
from .setup import build_model, build_optimizer, checked
from .state import TrainerState

MAX_BAD_STEPS = 5  # non-finite losses or gradients in a row before the run is aborted


class HookBase:
    """Does nothing at every point; a hook overrides the points it needs. ``trainer`` is set
    when the hook is registered (``Trainer.register``); hooks see it as a ``TrainerState``."""

    trainer: TrainerState

    def before_train(self) -> None:
        """Once, before the first step."""

    def before_step(self) -> None:
        """Before each step; a stop requested here ends the run before the step."""

    def after_step(self) -> None:
        """After each step, skipped ones included; a stop requested here ends the run after it."""

    def after_train(self) -> None:
        """Once, when the loop has ended (not when a step raised)."""

    def close(self) -> None:
        """Once, last, however the run ended (also when a step or hook raised): give back what
        ``before_train`` took, e.g. signal handlers. It may run without ``before_train``."""


class TimeBudget(HookBase):
    """--max-minutes: stops the run when the time is up, and meanwhile fits the learning rate's
    decay to the steps left (``trainer.schedule_steps``). Does nothing without a budget."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes = minutes

    def before_train(self) -> None:
        now = time.monotonic()
        self.deadline = now + self.minutes * 60 if self.minutes else None
        self.started = (now, self.trainer.step)

    def before_step(self) -> None:
        t = self.trainer
        out_of_time, t.schedule_steps = t.budget(t.total_steps, self.deadline, self.started)
        if out_of_time:
            t.request_stop("time")


class SkipNonFinite(HookBase):
    """A step that ``train_step`` skipped (non-finite loss, or with AMP off non-finite gradients)
    changes nothing: its forward pass's BatchNorm statistics are undone. The run is aborted
    after MAX_BAD_STEPS such steps in a row, pointing at the last good checkpoint. A step skipped
    because no sample of its batch could be read (--skip-bad) ran nothing and counts as neither."""

    def before_train(self) -> None:
        self.in_row: list[str] = []

    def before_step(self) -> None:
        self.saved = [b.detach().clone() for b in self.trainer.model.buffers()]

    def after_step(self) -> None:
        t = self.trainer
        if t.losses is not None:
            self.in_row = []
            return
        if t.skip_reason == "data":
            warnings.warn(f"step {t.step}: no readable sample in the batch, step skipped")
            return
        warnings.warn(f"step {t.step}: non-finite {t.skip_reason}, step skipped")
        with torch.no_grad():
            for buffer, saved in zip(t.model.buffers(), self.saved):
                buffer.copy_(saved)
        self.in_row.append("losses" if t.skip_reason == "loss" else t.skip_reason)
        if len(self.in_row) >= MAX_BAD_STEPS:
            what = " or ".join(dict.fromkeys(self.in_row))
            raise UserError(f"training diverged: {MAX_BAD_STEPS} non-finite {what} in a row at step {t.step}; "
                            f"the last good checkpoint is {t.run_dir / 'last.pt'}. Try a lower --lr.")


class ProgressBar(HookBase):
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def before_train(self) -> None:
        t = self.trainer
        self.bar = tqdm(total=t.total_steps, initial=t.step, disable=not self.enabled, desc="train", unit="it",
                        dynamic_ncols=True)

    def after_step(self) -> None:
        if self.trainer.losses is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in self.trainer.losses.items()}, refresh=False)

    def after_train(self) -> None:
        self.bar.close()


class MetricsLog(HookBase):
    """RUN_DIR/metrics.jsonl, one JSON record a line: each step's losses and learning rate, and
    (written by Validation) each validation's scores; curves.png is drawn from it. Only rank 0
    writes."""

    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path, self.curves, self.is_main = run_dir / "metrics.jsonl", run_dir / "curves.png", is_main

    def after_step(self) -> None:
        t = self.trainer
        if t.losses is not None:
            self.write({"step": t.step, "epoch": t.epoch, **t.losses})

    def write(self, record: dict) -> None:
        if self.is_main:
            # NaN (a metric undefined on this validation set) is not JSON: write null, as reports do
            record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if self.is_main:
            plot_training_curves(self.path, self.curves)

    def rewind(self, step: int) -> None:
        """Drop the records of steps after ``step``, and a line cut short by a kill: a run killed
        after its last checkpoint logged steps that the resumed run repeats."""
        if not (self.is_main and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))


class Validation(HookBase):
    """Every ``every`` steps and once at the end: score the model on the validation images, log
    the scores, save last.pt (and best.pt when mask AP improved) and redraw the curves. The first
    time, each validation image is read once beforehand (unless --check-data read it before the
    first step): a bad one stops the run, or with --skip-bad is left out and listed."""

    def __init__(self, every: int, log: MetricsLog, checkpoints: Checkpointer) -> None:
        self.every, self.log, self.checkpoints = every, log, checkpoints

    def before_train(self) -> None:
        self.validated_at: int | None = None

    def after_step(self) -> None:
        t = self.trainer
        if t.losses is not None and t.step % self.every == 0:
            self.validate_and_save()

    def after_train(self) -> None:
        # not when the last step was just validated, nor after a stop that interrupted the run
        if not self.trainer.interrupted and self.validated_at != self.trainer.step:
            self.validate_and_save()

    def validate_and_save(self) -> None:
        t = self.trainer
        t.metrics, self.validated_at = self.validate(), t.step
        score = t.metrics.get("mask_ap", 0.0)  # the same on every rank: the report is over all images
        improved = t.best_score is None or score > t.best_score
        if improved:
            t.best_score = score
        # logged first: a resume rewinds the log to the checkpoint's step, so a kill between the
        # two never leaves a validation without its record or a record counted twice
        self.log.write({"step": t.step, "epoch": t.epoch, **{f"val_{k}": v for k, v in t.metrics.items()}})
        self.checkpoints.save(t.metrics, best=improved)
        self.log.plot()

    def validate(self) -> dict[str, float]:
        t = self.trainer
        if not t.val_checked:  # only files and sizes were checked before the first step: read them now
            t.val_reader = checked(t.val_reader, t.opts, t.dist, t.val_listing, full=True, validation=True)
            t.val_checked = True
        if len(t.val_reader) == 0:
            return {}
        t.dist.broadcast_buffers(t.model)  # every rank validates the model rank 0 saves
        report = evaluate_model(t.model, t.normalizer, t.val_reader, device=t.device, progress=False, dist=t.dist)
        return report.summary()


class Checkpointer(HookBase):
    """RUN_DIR/last.pt, all a run needs to continue exactly (model, optimizer, loss scale,
    counters, RNG states), and best.pt, for prediction. Saves every ``every`` steps (besides the
    validations' saves) and at the end when no validation saved the last step (a stop that
    interrupted the run); ``resume`` restores a run from last.pt. Only rank 0 writes."""

    def __init__(self, run_dir: Path, every: int | None) -> None:
        self.last, self.best, self.every = run_dir / "last.pt", run_dir / "best.pt", every
        self.saved_at: int | None = None

    def after_step(self) -> None:
        t = self.trainer
        if self.every and t.losses is not None and t.step % self.every == 0 and self.saved_at != t.step:
            self.save({})

    def after_train(self) -> None:
        if self.saved_at != self.trainer.step:
            self.save({})

    def save(self, metrics: dict[str, float], best: bool = False) -> None:
        self.saved_at = self.trainer.step
        if not self.trainer.dist.is_main:
            return
        ckpt = self.checkpoint(metrics)
        save_checkpoint(self.last, ckpt)
        if best:
            # best.pt is for prediction: without the optimizer state it is a third of the size.
            save_checkpoint(self.best, dataclasses.replace(ckpt, optimizer_state=None))

    def checkpoint(self, metrics: dict[str, float]) -> Checkpoint:
        t = self.trainer
        return Checkpoint(config=t.cfg, model_state=t.model.state_dict(), normalizer=t.normalizer.to_dict(),
                          step=t.step, epoch=t.epoch, batch_in_epoch=t.batch_in_epoch, global_batch=t.global_batch,
                          optimizer_state=t.optimizer.state_dict(), rng_state=torch.get_rng_state(),
                          rng_states=get_rng_states(t.device), scaler_state=t.scaler.state_dict() or None,
                          metrics=metrics, best_score=t.best_score)

    def resume(self) -> None:
        """Restore the run saved in last.pt into the trainer, so that it continues exactly as if it
        had never stopped."""
        t = self.trainer
        if not self.last.is_file():
            raise UserError(f"{self.last}: nothing to resume (no last checkpoint in {t.run_dir})")
        ckpt = load_checkpoint(self.last, map_location=t.device)
        if ckpt.config.to_dict() != t.cfg.to_dict():
            warnings.warn("resuming with the checkpoint's configuration; options given now are ignored")
            t.cfg = ckpt.config
            # the weights come from the checkpoint, not from the ImageNet file training started from
            t.model = build_model(t.cfg.replace(backbone_weights=None), t.device)
            t.optimizer = build_optimizer(t.model, t.opts)
        t.model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            t.optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.scaler_state and t.scaler.is_enabled():
            t.scaler.load_state_dict(ckpt.scaler_state)
        t.normalizer = Normalizer.from_dict(ckpt.normalizer)
        t.train_set.normalizer = t.normalizer
        self.restore_position(ckpt)
        t.best_score = ckpt.best_score
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state.cpu())
        set_rng_states(ckpt.rng_states, t.device)

    def restore_position(self, ckpt: Checkpoint) -> None:
        t = self.trainer
        t.step, t.epoch, t.batch_in_epoch = ckpt.step, ckpt.epoch, ckpt.batch_in_epoch
        if ckpt.global_batch and ckpt.global_batch != t.global_batch:
            # resumed with another batch size or number of processes: continue after the same images
            t.batch_in_epoch = math.ceil(ckpt.batch_in_epoch * ckpt.global_batch / t.global_batch)
