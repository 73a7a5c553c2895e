"""Shared test pieces: the tiny model's config, a training helper, a replayable generator for
fault timings, hand-drawn square instances and one torch thread for tiny-image runs.

Test modules import the constants and helpers (``from conftest import TINY, tiny_config``); the
fixtures need no import.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from maskrcnn.structures import Target

# --- the tiny model ---------------------------------------------------------------------------------
TINY = dict(backbone="resnet18", fpn_channels=32, rpn_head_channels=32, rcnn_fc_channels=64,
            mask_head_channels=32, rcnn_train_batch_size=16, mask_train_batch_size=8)
"""A narrow ResNet-18 Mask R-CNN: CPU-fast on 64 x 64 images. Config fields, for ``Config(**...)``,
``nuclei_config(**...)`` or a YAML file; build variants with :func:`tiny_config`."""

OPEN = dict(rpn_test_nms_pre_score_threshold=0.0, rcnn_test_nms_pre_score_threshold=0.0,
            mask_test_nms_pre_score_threshold=0.0)
"""Test thresholds at zero: an untrained model scores ~0.5, and these keep its detections."""


def tiny_config(width: int = 32, **changes) -> dict:
    """:data:`TINY` with ``width`` channels in the FPN, RPN head and mask head (twice that in the
    RCNN head), then ``changes`` on top: the fields a test needs, spelled out where it uses them."""
    widths = dict(fpn_channels=width, rpn_head_channels=width, rcnn_fc_channels=2 * width,
                  mask_head_channels=width)
    return {**TINY, **widths, **changes}


TINY_RUN = tiny_config(16, **OPEN, rpn_test_post_nms_top_k=50, rcnn_test_max_detections=10)
"""16 channels, open thresholds and few detections: the command-line and engine runs (faults,
engine, bad inputs, signals) that build and train many models."""


def write_untrained_checkpoint(path: Path, **config) -> Path:
    """An untrained model (seed 0) of ``nuclei_config(**config)`` saved as a checkpoint at ``path``:
    with :data:`OPEN` thresholds it still finds (random) instances, enough to run a command end to end."""
    from maskrcnn.data.normalize import Normalizer
    from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
    from maskrcnn.modeling.model import MaskRCNN
    from maskrcnn.presets import nuclei_config

    cfg = nuclei_config(**config)
    torch.manual_seed(0)
    save_checkpoint(path, Checkpoint(config=cfg, model_state=MaskRCNN(cfg).state_dict(),
                                     normalizer=Normalizer(channels=cfg.in_channels).to_dict()))
    return path


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory) -> Path:
    """:func:`write_untrained_checkpoint` of :data:`TINY_RUN`, once per module."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", **TINY_RUN)


# --- training ---------------------------------------------------------------------------------------
Batch = tuple[Sequence[torch.Tensor], Sequence[Target]]


def consecutive_pairs(images: Sequence[torch.Tensor], targets: Sequence[Target]) -> list[Batch]:
    """Batches of two neighbouring samples, wrapping around: (0, 1), (1, 2), ..., (n - 1, 0)."""
    n = len(images)
    return [([images[i], images[(i + 1) % n]], [targets[i], targets[(i + 1) % n]]) for i in range(n)]


def train_steps(model: torch.nn.Module, batches: Sequence[Batch], steps: int, lr: float = 1e-3,
                weight_decay: float = 1e-4) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps (constant ``lr``) on ``batches`` of
    (images, targets), taken in turn and cycled; leaves it in train mode. Returns each step's
    total loss. Seed torch before building the model: the helper draws nothing itself."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    totals = []
    for step in range(steps):
        images, targets = batches[step % len(batches)]
        losses = model(list(images), list(targets)).losses
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        totals.append(losses.total.item())
    return totals


# --- replayable randomness --------------------------------------------------------------------------
# The test process holds many models and libraries (napari, Qt, onnxruntime): its resident memory
# is not a `maskrcnn predict` process's, so the default budget (2 GB for the whole process) would
# tile or refuse images for that reason alone. Tests of the budget pass --max-memory / max_memory.
os.environ.setdefault("MASKRCNN_MAX_MEMORY", "1T")

# --- parallel runs (make test: pytest-xdist) ----------------------------------------------------------
# Under xdist each worker process gets its share of the cores as torch threads, so N workers do not
# run N x cores threads. Tests that need several threads set them themselves.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _XDIST_WORKERS))

SEED_VARIABLE = "MASKRCNN_TEST_SEED"
DEFAULT_SEED = 0


@pytest.fixture
def replay_rng() -> np.random.Generator:
    """A generator for what a test draws at random (e.g. when to kill a process), seeded from
    $MASKRCNN_TEST_SEED or 0. The seed is printed, so a failing test's captured output says how to
    replay it: ``MASKRCNN_TEST_SEED=<seed> pytest <test id>``."""
    seed = int(os.environ.get(SEED_VARIABLE, DEFAULT_SEED))
    print(f"random draws seeded with {SEED_VARIABLE}={seed}")
    return np.random.default_rng(seed)


# --- instances and threads --------------------------------------------------------------------------
def _squares_target(height: int, width: int, squares: list[tuple[int, int, int]],
                    labels: list[int] | None = None) -> Target:
    masks = torch.zeros(len(squares), height, width, dtype=torch.bool)
    for k, (x0, y0, side) in enumerate(squares):
        masks[k, y0:y0 + side, x0:x0 + side] = True
    return Target.from_masks(masks, None if labels is None else torch.tensor(labels))


@pytest.fixture
def squares():
    """``squares(height, width, [(x0, y0, side), ...], labels=None) -> Target`` of axis-aligned squares."""
    return _squares_target


@contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch intra-op threads (a training fixture's result depends on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny images gain nothing from intra-op threads; on a busy machine they cost 10x or more.
    (Child processes get the same with OMP_NUM_THREADS=1.) For a module: ``usefixtures``."""
    with torch_threads(1):
        yield


@pytest.fixture
def one_thread():
    """The same, for one test."""
    with torch_threads(1):
        yield


# --- child processes --------------------------------------------------------------------------------
def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a child ``maskrcnn`` process: (exit code, stdout, stderr); a hang fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"process {proc.args[:4]} did not end in {timeout} s")
    return proc.returncode, out, err


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll ``condition()`` until true; fail if ``proc`` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended (code {proc.returncode}) before the condition: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting")
        time.sleep(0.01)
