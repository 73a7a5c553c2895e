"""The training engine's contract with its hooks: call order, stop requests, skipped steps.

A hook registered after the defaults sees the trainer as the defaults left it; a stop it
requests after a step ends the run there with last.pt written at that step, and a run resumed
from that checkpoint ends with exactly the weights of one that was never stopped. DataLoader
workers (``workers``) read the same batches as the training process itself, so they change
neither the weights nor an exact resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import maskrcnn.runtime.precision as precision
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.presets import nuclei_config
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.runtime.distributed import epoch_batches
from maskrcnn.errors import UserError
from maskrcnn.train import MAX_BAD_STEPS, HookBase, TrainOptions, Trainer

from conftest import TINY_RUN as TINY
from test_faults import flat_tensors

pytestmark = pytest.mark.slow  # every test trains through the engine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """5 synthetic 64x64 images: 4 to train on (batch 2: 2 steps an epoch), 1 to validate on."""
    root = tmp_path_factory.mktemp("engine") / "data"
    write_synthetic_dataset(root, 5, 64, seed=0)
    return root


def trainer(data: Path, run: Path, iters: int, val_every: int, resume: bool = False, **options) -> Trainer:
    opts = TrainOptions(data=str(data), out=str(run), config=nuclei_config(**TINY), iters=iters, batch_size=2,
                        val_every=val_every, device="cpu", progress=False, resume=resume, **{"crop": 48, **options})
    return Trainer(opts)


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold exactly the same model and optimizer state."""
    a, b = load_checkpoint(a), load_checkpoint(b)
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    assert all(torch.equal(x, y) for x, y in zip(flat_tensors(a.optimizer_state), flat_tensors(b.optimizer_state)))


def log_steps(run: Path) -> tuple[list[int], list[int]]:
    """(steps with a loss record, steps with a validation record) of RUN/metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r["step"] for r in records if "mask" in r],
            [r["step"] for r in records if any(k.startswith("val_") for k in r)])


class StopAt(HookBase):
    """Records the points the engine calls; asks to stop at ``step``, before or after it."""

    def __init__(self, step: int, point: str, interrupted: bool) -> None:
        self.step, self.point, self.interrupted, self.calls = step, point, interrupted, []

    def before_train(self) -> None:
        self.calls.append("before_train")

    def before_step(self) -> None:
        self.calls.append("before_step")
        if self.point == "before_step" and self.trainer.step == self.step:
            self.trainer.request_stop("test", interrupted=self.interrupted)

    def after_step(self) -> None:
        self.calls.append(f"after_step {self.trainer.step}")
        if self.point == "after_step" and self.trainer.step == self.step:
            self.trainer.request_stop("test", interrupted=self.interrupted)

    def after_train(self) -> None:
        # the default hooks ran theirs first: last.pt is written at the step the run stopped at
        self.calls.append(f"after_train, last.pt at {load_checkpoint(self.trainer.run_dir / 'last.pt').step}")


def test_a_stop_after_a_step_ends_the_run_there_with_last_pt_and_resumes_exactly(data, tmp_path, one_thread):
    stopped = trainer(data, tmp_path / "stopped", iters=6, val_every=2)
    hook = StopAt(3, "after_step", interrupted=True)
    stopped.register(hook)
    result = stopped.run()
    assert hook.calls == ["before_train", "before_step", "after_step 1", "before_step", "after_step 2",
                          "before_step", "after_step 3", "after_train, last.pt at 3"]
    assert (result.steps, result.stopped_by) == (3, "test")
    ckpt = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (ckpt.step, ckpt.epoch, ckpt.batch_in_epoch) == (3, 1, 1) and ckpt.metrics == {}
    assert log_steps(tmp_path / "stopped") == ([1, 2, 3], [2])  # interrupted: no final validation

    resumed = trainer(data, tmp_path / "stopped", iters=6, val_every=2, resume=True).run()
    whole = trainer(data, tmp_path / "whole", iters=6, val_every=2).run()
    assert resumed.steps == whole.steps == 6
    a, b = load_checkpoint(resumed.last), load_checkpoint(whole.last)
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    assert all(torch.equal(x, y) for x, y in zip(flat_tensors(a.optimizer_state), flat_tensors(b.optimizer_state)))
    assert log_steps(tmp_path / "stopped") == log_steps(tmp_path / "whole") == ([1, 2, 3, 4, 5, 6], [2, 4, 6])


def test_a_stop_before_a_step_still_validates_and_saves_at_the_end(data, tmp_path, one_thread):
    t = trainer(data, tmp_path / "run", iters=6, val_every=100)
    hook = StopAt(2, "before_step", interrupted=False)  # as the time budget stops a run
    t.register(hook)
    result = t.run()
    assert hook.calls == ["before_train", "before_step", "after_step 1", "before_step", "after_step 2",
                          "before_step", "after_train, last.pt at 2"]
    assert (result.steps, result.stopped_by) == (2, "test") and result.final_metrics
    assert log_steps(tmp_path / "run") == ([1, 2], [2])
    assert load_checkpoint(result.last).metrics == pytest.approx(result.final_metrics, nan_ok=True)


# --- a finite loss with non-finite gradients ---------------------------------------------------------------
def poison_gradients(t: Trainer, bad_backwards: set[int]) -> None:
    """Make one RPN weight's gradient infinite on the chosen backward passes (1-based)."""
    weight = next(p for n, p in t.model.named_parameters() if n.startswith("rpn") and p.requires_grad)
    calls = [0]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return torch.full_like(grad, float("inf")) if calls[0] in bad_backwards else grad

    weight.register_hook(hook)


class Watch(HookBase):
    """For each step: did it change the weights, and did it change the BatchNorm statistics?"""

    def __init__(self) -> None:
        self.changed: list[tuple[bool, bool, bool]] = []  # (skipped, weights changed, buffers changed)

    def before_step(self) -> None:
        self.params = [p.detach().clone() for p in self.trainer.model.parameters()]
        self.buffers = [b.detach().clone() for b in self.trainer.model.buffers()]

    def after_step(self) -> None:
        model = self.trainer.model
        self.changed.append((self.trainer.losses is None,
                             any(not torch.equal(a, b) for a, b in zip(self.params, model.parameters())),
                             any(not torch.equal(a, b) for a, b in zip(self.buffers, model.buffers()))))


def test_a_finite_loss_with_non_finite_gradients_skips_the_step(data, tmp_path, one_thread):
    t = trainer(data, tmp_path / "run", iters=3, val_every=100, amp=False)  # float32: no loss scaler either
    assert not t.opts.amp
    poison_gradients(t, bad_backwards={2})
    watch = Watch()
    t.register(watch)
    with pytest.warns(UserWarning, match="step 1: non-finite gradients, step skipped") as caught:
        result = t.run()
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    # the skipped step changed neither weights nor BatchNorm statistics, which the others change
    assert watch.changed == [(False, True, True), (True, False, False), (False, True, True), (False, True, True)]
    assert result.steps == 3
    assert all(int(s["step"]) == 3 for s in t.optimizer.state_dict()["state"].values())  # 3 updates, not 4
    assert all(p.isfinite().all() for p in t.model.parameters())
    assert log_steps(tmp_path / "run")[0] == [1, 2, 3]


def test_non_finite_gradients_in_a_row_abort_like_non_finite_losses(data, tmp_path, one_thread):
    t = trainer(data, tmp_path / "run", iters=50, val_every=2)
    poison_gradients(t, bad_backwards=set(range(3, 1000)))  # steps 1 and 2, then only infinite gradients
    with pytest.warns(UserWarning, match="non-finite gradients, step skipped"):
        with pytest.raises(UserError, match=f"training diverged: {MAX_BAD_STEPS} non-finite gradients in a row "
                                            "at step 2") as info:
            t.run()
    assert str(tmp_path / "run" / "last.pt") in str(info.value)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.step == 2 and t.step == 2
    for name, tensor in t.model.state_dict().items():  # skipped steps changed nothing
        assert torch.equal(tensor, last.model_state[name]), name


# --- DataLoader workers ------------------------------------------------------------------------------------
def test_workers_read_the_batches_and_augmentations_the_training_process_reads(data, tmp_path):
    """Epoch by epoch, from the start and from a position (a resume), with torch on two threads in
    this process: a 128-pixel crop of 3 channels is large enough for torch to split the intensity
    jitter's mean over threads, as it never does in a worker."""
    from maskrcnn.train.loading import BatchLoader

    t = trainer(data, tmp_path / "run", iters=6, val_every=100, crop=128)
    inline, workers = BatchLoader(t.train_set), BatchLoader(t.train_set, workers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for epoch, start in [(0, 0), (1, 0), (2, 1)]:
            t.train_set.set_epoch(epoch)
            table = epoch_batches(len(t.train_set), 2, 0, 1, 0, epoch)
            for position in range(start, len(table)):
                indices = table[position].tolist()
                a = inline.load(indices)
                b = workers.load(indices, epoch, position, table)
                assert a.indices == b.indices == indices and not a.bad and not b.bad
                for x, y in zip(a.images, b.images):
                    assert x.shape == (3, 128, 128) and torch.equal(x, y)
                for x, y in zip(a.targets, b.targets):
                    assert x.seed == y.seed and torch.equal(x.masks, y.masks) and torch.equal(x.boxes, y.boxes)
    finally:
        torch.set_num_threads(threads)
        workers.close()


def test_workers_on_epochs_of_a_few_steps_warn_that_reading_inline_is_faster(data, tmp_path, recwarn):
    with pytest.warns(UserWarning, match=r"--workers 2: an epoch here is 2 step\(s\).*--workers 0\) is faster"):
        trainer(data, tmp_path / "workers", iters=1, val_every=100, workers=2).loader.close()
    recwarn.clear()
    trainer(data, tmp_path / "inline", iters=1, val_every=100)
    assert not [w for w in recwarn if "--workers" in str(w.message)]


def test_training_with_workers_ends_with_the_weights_of_training_without(data, tmp_path, one_thread):
    inline = trainer(data, tmp_path / "inline", iters=5, val_every=100).run()
    workers = trainer(data, tmp_path / "workers", iters=5, val_every=100, workers=2).run()
    assert inline.steps == workers.steps == 5
    assert_same_weights(inline.last, workers.last)
    assert log_steps(tmp_path / "inline") == log_steps(tmp_path / "workers")


def test_a_run_with_workers_stopped_mid_epoch_resumes_exactly(data, tmp_path, one_thread):
    stopped = trainer(data, tmp_path / "stopped", iters=6, val_every=2, workers=2)
    stopped.register(StopAt(3, "after_step", interrupted=True))
    stopped.run()
    ckpt = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (ckpt.step, ckpt.epoch, ckpt.batch_in_epoch) == (3, 1, 1)  # the resume starts mid-epoch
    resumed = trainer(data, tmp_path / "stopped", iters=6, val_every=2, resume=True, workers=2).run()
    whole = trainer(data, tmp_path / "whole", iters=6, val_every=2).run()  # no workers
    assert resumed.steps == whole.steps == 6
    assert_same_weights(resumed.last, whole.last)


@pytest.mark.parametrize("native", [True, False])
def test_the_default_precision_is_bfloat16_autocast_where_the_cpu_computes_it_natively(native, data, tmp_path,
                                                                                          monkeypatch, one_thread):
    monkeypatch.setattr(precision, "cpu_has_fast_bfloat16", lambda: native)
    seen = []
    forward = MaskRCNN.forward

    def recording(model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(MaskRCNN, "forward", recording)
    run = trainer(data, tmp_path / "run", iters=1, val_every=10)
    assert run.opts.amp is native
    run.run()
    assert seen and seen[0] is native  # the training step's forward
