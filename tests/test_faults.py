"""Faults: runs killed with SIGKILL, then resumed or rerun; non-finite losses.

A run killed at a random moment and resumed with ``--resume`` ends with exactly the weights and
optimizer state of a run that was never interrupted (CPU, one thread, deterministic data order
and augmentation), and a kill never leaves a corrupt ``last.pt`` or half-written predictions.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from maskrcnn.runtime.atomic import remove_stale_temporaries
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.presets import nuclei_config
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.errors import UserError
from maskrcnn.train import MAX_BAD_STEPS, TrainOptions, Trainer

from cli_helpers import cli
from conftest import TINY_RUN as TINY  # test_engine, test_signals and test_run_lock import it from here
from conftest import finish, wait_for, write_untrained_checkpoint

REPO = Path(__file__).resolve().parents[1]


def maskrcnn_process(*args, cwd: Path) -> subprocess.Popen:
    """``python -m maskrcnn ARGS`` in a child process: one thread, so its arithmetic is reproducible."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "maskrcnn", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the process ended before it was killed: nothing was tested"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(5 synthetic 64x64 images in the labels layout, tiny config YAML)."""
    root = tmp_path_factory.mktemp("faults")
    write_synthetic_dataset(root / "data", 5, 64, seed=0)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    return root / "data", config


# --- SIGKILL during training, then --resume ------------------------------------------------------------
STEPS, EVERY = 8, 3


def train_args(data: Path, config: Path, run: Path) -> list:
    # 4 training images, batch 1: 4 steps per epoch, so the run crosses an epoch and resumes mid-epoch
    return ["train", "--data", data, "--out", run, "--config", config, "--iters", STEPS, "--batch-size", 1,
            "--crop", 48, "--val-every", 100, "--checkpoint-every", EVERY, "--lr", "3e-3", "--seed", 3,
            "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(data, tmp_path, one_thread, capsys,
                                                                             replay_rng):
    images, config = data
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = maskrcnn_process(*train_args(images, config, whole), cwd=tmp_path)  # runs alongside
    victim = maskrcnn_process(*train_args(images, config, killed), cwd=tmp_path)
    wait_for(lambda: (killed / "last.pt").exists(), victim)
    time.sleep(float(replay_rng.uniform(0.0, 0.4)))  # a random point after the first checkpoint
    kill(victim)

    at_kill = load_checkpoint(killed / "last.pt")  # never corrupt, whenever the kill came
    assert at_kill.step % EVERY == 0 and 0 < at_kill.step < STEPS
    with pytest.warns(UserWarning, match="taking over the lock of a run that is gone"):  # the killed run's
        code, out, err = cli(capsys, *train_args(images, config, killed), "--resume")  # in this process: faster
    assert code == 0, err
    assert f"trained {STEPS} steps" in out
    code, _, err = finish(reference)
    assert code == 0, err

    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a.step == b.step == STEPS and (a.epoch, a.batch_in_epoch) == (b.epoch, b.batch_in_epoch)
    assert a.model_state.keys() == b.model_state.keys()
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    assert all(torch.equal(x, y) for x, y in zip(flat_tensors(a.optimizer_state), flat_tensors(b.optimizer_state)))
    assert a.metrics == pytest.approx(b.metrics, nan_ok=True) and a.best_score == b.best_score
    changed = [n for n, t in at_kill.model_state.items() if t.is_floating_point() and not torch.equal(t, b.model_state[n])]
    assert changed, "the resumed run did not train: the comparison above proves nothing"

    # the log holds each step once: what the killed run logged after its checkpoint was rewound
    steps = [r["step"] for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if "rpn_cls" in r]
    assert steps == list(range(1, STEPS + 1))
    assert not list(killed.glob(".*.tmp"))  # a temporary file the kill left behind is cleared


def flat_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in flat_tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in flat_tensors(item)]
    return [torch.tensor(float(state))] if isinstance(state, (int, float)) else []


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(data, tmp_path, capsys):
    images, config = data
    run = tmp_path / "run"
    run.mkdir()
    write_untrained_checkpoint(run / "last.pt", **TINY)
    content = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(content[: len(content) // 3])
    code, out, err = cli(capsys, *train_args(images, config, run), "--resume")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err == f"maskrcnn: error: {run / 'last.pt'}: corrupt or truncated checkpoint (RuntimeError)\n"


# --- SIGKILL while a checkpoint is being written --------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch
    from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
    from maskrcnn.presets import nuclei_config
    cfg = nuclei_config()
    value = 0
    while True:  # a 32 MB checkpoint whose every number is its step, written over and over
        value += 1
        save_checkpoint(sys.argv[1], Checkpoint(config=cfg, model_state={"w": torch.full((8_000_000,), float(value))},
                                                normalizer={}, step=value))
""")


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, replay_rng):
    last = tmp_path / "last.pt"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], env={**os.environ, "PYTHONPATH": path},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(last.exists, proc)
    time.sleep(float(replay_rng.uniform(0.05, 0.5)))  # most of the time is spent writing
    kill(proc)
    ckpt = load_checkpoint(last)
    assert ckpt.step >= 1 and torch.all(ckpt.model_state["w"] == ckpt.step)
    leftovers = list(tmp_path.glob(".*.tmp"))
    assert remove_stale_temporaries(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- SIGKILL during predict -------------------------------------------------------------------------------
N_PREDICT = 24  # enough images that the kill lands mid-run


@pytest.mark.slow
def test_a_killed_predict_leaves_only_whole_files_and_a_rerun_completes(data, tmp_path, one_thread, capsys,
                                                                       replay_rng):
    images, _ = data
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(N_PREDICT):
        (folder / f"img{i:02d}.png").write_bytes((images / "images" / f"synth_{i % 5:04d}.png").read_bytes())
    weights = write_untrained_checkpoint(tmp_path / "tiny.pt", **TINY)
    out = tmp_path / "out"
    args = ["predict", folder, "--weights", weights, "--out", out, "--device", "cpu", "--no-progress"]
    proc = maskrcnn_process(*args, cwd=tmp_path)
    wait_for(lambda: out.is_dir() and any(out.glob("*_instances.csv")), proc)
    time.sleep(float(replay_rng.uniform(0.0, 0.2)))
    kill(proc)

    written = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert written and not (out / "results_coco.json").exists()  # killed before the end
    for file in written:  # every file there is complete
        if file.suffix == ".png":
            with Image.open(file) as png:
                png.load()
                assert png.size == (64, 64), file
        else:
            with open(file, newline="") as f:
                rows = list(csv.DictReader(f))
            assert rows == [] or set(rows[0]) >= {"id", "score", "area"}, file

    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    assert f"{N_PREDICT} image(s) segmented" in stdout
    assert len(list(out.glob("*_labels.png"))) == N_PREDICT and not list(out.glob(".*"))


# --- non-finite losses -------------------------------------------------------------------------------------
class NonFiniteAt(torch.nn.Module):
    """The model, with its mask loss made NaN on the chosen forward calls (1-based)."""

    def __init__(self, model: torch.nn.Module, bad_calls):
        super().__init__()
        self.model, self.bad_calls, self.calls = model, bad_calls, 0

    def forward(self, images, targets=None):
        output = self.model(images, targets)
        self.calls += 1
        if self.calls in self.bad_calls:
            output.losses.mask = output.losses.mask * float("nan")
        return output


def trainer(data: tuple[Path, Path], run: Path, iters: int, val_every: int) -> Trainer:
    opts = TrainOptions(data=str(data[0]), out=str(run), config=nuclei_config(**TINY), iters=iters, batch_size=2,
                        crop=48, val_every=val_every, device="cpu", progress=False)
    return Trainer(opts)


@pytest.mark.slow
def test_non_finite_losses_skip_their_steps_with_a_warning(data, tmp_path, one_thread):
    t = trainer(data, tmp_path / "run", iters=4, val_every=100)
    t.net = NonFiniteAt(t.model, bad_calls={2, 3})
    with pytest.warns(UserWarning, match="non-finite loss, step skipped") as caught:
        result = t.run()
    assert sum("non-finite" in str(w.message) for w in caught) == 2
    assert result.steps == 4 and t.net.calls == 6  # two batches more than steps
    assert all(int(s["step"]) == 4 for s in t.optimizer.state_dict()["state"].values())  # 4 updates, not 6
    assert all(p.isfinite().all() for p in t.model.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "mask" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4] and all(np.isfinite(r["mask"]) for r in losses)


@pytest.mark.slow
def test_non_finite_losses_in_a_row_abort_and_keep_the_last_good_checkpoint(data, tmp_path, one_thread):
    t = trainer(data, tmp_path / "run", iters=50, val_every=2)
    t.net = NonFiniteAt(t.model, bad_calls=set(range(3, 1000)))  # steps 1 and 2, then only NaN
    with pytest.warns(UserWarning, match="non-finite loss"):
        with pytest.raises(UserError, match=f"training diverged: {MAX_BAD_STEPS} non-finite losses in a row") as info:
            t.run()
    assert "\n" not in str(info.value) and str(tmp_path / "run" / "last.pt") in str(info.value)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.step == 2 and t.step == 2
    for name, tensor in t.model.state_dict().items():  # skipped steps changed nothing
        assert torch.equal(tensor, last.model_state[name]), name


def test_atomic_writes_get_the_permissions_of_a_plain_new_file(tmp_path):
    from maskrcnn.runtime.atomic import atomic_write_text

    atomic_write_text(tmp_path / "out.csv", "id\n")
    (tmp_path / "plain.csv").write_text("id\n")
    mode = (tmp_path / "out.csv").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.csv").stat().st_mode & 0o777  # the umask's, not mkstemp's 0600
