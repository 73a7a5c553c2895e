"""Distributed training: 2 CPU processes (gloo) train like 1 process on the same global batch.

The two workers are launched the way torchrun launches them (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and run the real ``maskrcnn train`` command; the
reference is the same command in one process with the whole global batch. The config uses
``norm: group``: BatchNorm would normalise each process's half batch on its own.

Both sides run with oneDNN and NNPACK off. oneDNN picks different convolution kernels for a
batch of 2 and a batch of 1, whose rounding (~1e-6) flips a few ReLUs near zero; on the 2x2 maps
of the last stage one flip changes a weight's gradient visibly. NNPACK is chosen by PyTorch for
convolutions of 16 or more inputs: the mask head's 16 crops of a batch of 2 (8 per image) would
go through it while each rank's 8 go through PyTorch's own kernel, a gradient difference of ~1e-4
that AdamW grows past the loss tolerance within 4 steps. PyTorch's own kernels compute every
image of a batch alike, so what is compared is the training arithmetic, not kernel rounding.
For the same reason both train in float32 (``--amp off``; by default ``train`` autocasts to
bfloat16 on CPUs with native bfloat16, whose rounding moves the losses by ~1e-3).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml

from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.cli.main import main
from maskrcnn.config import Config
from maskrcnn.data.datasets import open_dataset
from maskrcnn.data.torch_dataset import split_train_val
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.data.views import SubsetReader
from maskrcnn.runtime.distributed import cpu_has_fast_bfloat16, epoch_batches
from maskrcnn.prediction.evaluate import evaluate_model
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.prediction.predict import Predictor
from maskrcnn.train import Trainer, TrainOptions

from conftest import OPEN, tiny_config

pytestmark = pytest.mark.slow  # two ranks and a one-process reference, each training a model

STEPS = 4
SEED = 0
# an untrained model scores ~0.5: keep its detections, but few of them
TINY_CONFIG = tiny_config(norm="group", **OPEN, rpn_test_post_nms_top_k=200, rcnn_test_max_detections=50)
# 8 images: 2 held out for validation (one per rank), 6 to train on, 64-pixel crops of 80x96.
COMMON = ["--crop", "64", "--device", "cpu", "--no-progress", "--val-every", str(STEPS), "--seed", str(SEED),
          "--amp", "off"]
WORKER = ("import sys, torch; torch.backends.mkldnn.enabled = False; "
          "torch.backends.nnpack.set_flags(False); "
          "from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))")
RUN_FILES = {"last.pt", "best.pt", "metrics.jsonl", "curves.png"}
LOSS_PARTS = ("rpn_cls", "rpn_reg", "rcnn_cls", "rcnn_reg", "mask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, argv: list[str], timeout: float = 120, threads: int = 1,
           worker: str | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``maskrcnn ARGV`` in ``world_size`` processes with the environment torchrun gives them
    (``threads``: its OMP_NUM_THREADS; ``worker``: the Python code each runs, default WORKER)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads))
        procs.append(subprocess.Popen([sys.executable, "-c", worker or WORKER, *map(str, argv)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:  # a hung rank: end it, the test has already failed
                proc.kill()
                proc.wait()
    return results


@contextmanager
def no_onednn():
    """One thread, oneDNN and NNPACK off, as in the workers."""
    threads, enabled = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = enabled
        torch.set_num_threads(threads)


def in_process(argv: list[str]) -> str:
    """``maskrcnn ARGV`` in this process, set up like the workers; its stdout."""
    stdout = StringIO()
    with no_onednn(), redirect_stdout(stdout):
        assert main([str(a) for a in argv]) == 0
    return stdout.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "rpn_cls" in r]


def initial_weights(cfg) -> dict[str, torch.Tensor]:
    """The weights every run starts from (the trainer seeds torch with --seed, then builds the model)."""
    torch.manual_seed(SEED)
    return MaskRCNN(cfg).state_dict()


def training_difference(run_a: Path, run_b: Path) -> tuple[float, float]:
    """(|change_a - change_b| / |change_a| over all weights, largest weight difference) of two runs'
    last.pt, where change is what training moved the weights from their common start.

    Why the changes and not the weights: with warm-up the weights move ~1e-3 of themselves in a
    few steps, so any two runs agree to ~1e-5 of the weights. And why not exactly: AdamW divides
    each gradient by its own running size, so a weight whose gradient is ~1e-9 (within float32
    rounding of zero) moves by a full +-lr step whose sign is rounding noise; and the 2x2 maps of
    the last ResNet stage turn 1e-7 changes in the activations into a different ReLU here and
    there. The two agree to ~1e-7 after one step and drift apart with each step (measured:
    0.00002%, 0.001%, 0.06%, 0.7% over steps 1-4; with NNPACK on, 0.7%, 1.7%, 2.5%, 3.9%);
    weighting the two images 55:45 instead of 50:50 gives 18-28%, different sampled boxes 76-95%.
    """
    a, b = load_checkpoint(run_a / "last.pt"), load_checkpoint(run_b / "last.pt")
    start = initial_weights(a.config)
    names = [n for n, v in start.items() if v.is_floating_point()]
    flat = lambda state: torch.cat([state[n].flatten() for n in names])  # noqa: E731
    wa, wb, w0 = flat(a.model_state), flat(b.model_state), flat(start)
    return ((wa - wb).norm() / (wa - w0).norm()).item(), (wa - wb).abs().max().item()


def assert_same_losses(rows_a: list[dict], rows_b: list[dict], rel: float) -> None:
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for part in LOSS_PARTS:
            assert ra[part] == pytest.approx(rb[part], rel=rel, abs=1e-7), (ra["step"], part)


# --- the runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    write_synthetic_dataset(root / "data", 8, (80, 96), seed=0)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    return root


def train_argv(workspace: Path, run: Path, batch_size: int, steps: int = STEPS) -> list:
    return ["train", "--data", workspace / "data", "--config", workspace / "tiny.yaml", "--out", run,
            "--iters", steps, "--batch-size", batch_size, *COMMON]


@pytest.fixture(scope="module")
def two_processes(workspace) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """2 ranks x batch 1."""
    run = workspace / "run2"
    results = launch(2, train_argv(workspace, run, batch_size=1))
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stderr[-3000:]}"
    return run, results


@pytest.fixture(scope="module")
def one_process(workspace) -> Path:
    """1 process x batch 2: the same global batch."""
    run = workspace / "run1"
    in_process(train_argv(workspace, run, batch_size=2))
    return run


# --- tests ----------------------------------------------------------------------------------------
def test_two_processes_train_like_one_process_on_the_global_batch(two_processes, one_process):
    run2, _ = two_processes
    rows2, rows1 = train_rows(run2), train_rows(one_process)
    assert [r["step"] for r in rows2] == list(range(1, STEPS + 1))
    # Rank 0 logs the global batch's losses (the mean over ranks). Step 1 starts from the same
    # weights, so its losses agree to rounding: same images, same sampled boxes, same normalisation.
    assert_same_losses(rows2[:1], rows1[:1], rel=1e-6)
    assert_same_losses(rows2, rows1, rel=1e-4)
    relative, largest = training_difference(run2, one_process)
    print(f"after {STEPS} steps: weight changes differ by {relative:.2%}, weights by at most {largest:.3g}")
    assert relative < 0.1


def test_only_rank_zero_writes_one_checkpoint_set(two_processes):
    run, results = two_processes
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no per-rank copies, no temporary files
    assert "trained 4 steps" in results[0].stdout and results[1].stdout == ""
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "rpn_cls" in r] == [1, 2, 3, 4]  # each step logged once
    val_rows = [r for r in records if "val_mask_ap" in r]
    assert [r["step"] for r in val_rows] == [STEPS]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.step == STEPS and ckpt.global_batch == 2


def test_validation_gathers_the_images_of_both_ranks(two_processes, workspace):
    """Each rank predicts one of the 2 held-out images; the logged metrics are those of both,
    exactly what one process evaluating the same weights on both images reports."""
    run = two_processes[0]
    reader = open_dataset(workspace / "data")
    _, val_indices = split_train_val(reader, 0.2, SEED)
    assert len(val_indices) == 2
    predictor = Predictor.from_checkpoint(run / "last.pt", "cpu", engine="torch")  # the engine validation ran
    with no_onednn():
        expected = evaluate_model(predictor.model, predictor.normalizer, SubsetReader(reader, val_indices),
                                  progress=False).summary()
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "val_mask_ap" in r][-1]
    assert logged["step"] == STEPS
    for key, value in expected.items():
        if math.isnan(value):
            assert logged[f"val_{key}"] is None, key
        else:
            assert logged[f"val_{key}"] == pytest.approx(value, abs=1e-9), key


def test_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, workspace):
    """Different world size, same global batch: continues where the single-process run continues."""
    resumed, continued = workspace / "resumed2", workspace / "continued1"
    for source, run in ((two_processes[0], resumed), (one_process, continued)):
        run.mkdir()
        for name in ("last.pt", "metrics.jsonl"):
            shutil.copy(source / name, run / name)
    for run in (resumed, continued):
        stdout = in_process([*train_argv(workspace, run, batch_size=2, steps=STEPS + 2), "--resume"])
        assert f"trained {STEPS + 2} steps" in stdout
    assert [r["step"] for r in train_rows(resumed)] == list(range(1, STEPS + 3))
    # the same images at steps 5 and 6 (another sample order would change the losses by percents)
    assert_same_losses(train_rows(resumed)[STEPS:], train_rows(continued)[STEPS:], rel=1e-3)
    assert training_difference(resumed, continued)[0] < 0.15


def test_resume_with_another_global_batch_continues_after_the_same_images(two_processes, workspace):
    """4 steps of 2 images into epoch 1 (3 steps an epoch) = 2 images of epoch 1 seen: with a
    global batch of 1 the run continues at batch 2 of epoch 1, not batch 1."""
    run = workspace / "regrouped"
    run.mkdir()
    shutil.copy(two_processes[0] / "last.pt", run / "last.pt")
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt.epoch, ckpt.batch_in_epoch, ckpt.global_batch) == (1, 1, 2)
    opts = TrainOptions(data=str(workspace / "data"), out=str(run), config=ckpt.config, iters=STEPS + 1,
                        batch_size=1, crop=64, device="cpu", seed=SEED, resume=True, progress=False)
    trainer = Trainer(opts)
    assert (trainer.step, trainer.epoch, trainer.batch_in_epoch) == (STEPS, 1, 2)


def test_sync_bn_on_cpu_is_a_one_line_error(workspace, tmp_path, capsys):
    code = main([str(a) for a in train_argv(workspace, tmp_path / "run", batch_size=1)] + ["--sync-bn"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--sync-bn needs CUDA" in err and "norm: group" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_amp_on_cpu_autocasts_to_bfloat16_and_keeps_the_losses_in_float32(workspace, tmp_path):
    opts = TrainOptions(data=str(workspace / "data"), out=str(tmp_path / "run"),
                        config=Config.from_yaml(workspace / "tiny.yaml"), iters=1, batch_size=2, crop=64,
                        device="cpu", amp=True, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(opts)
    slow = [w for w in caught if "without native bfloat16" in str(w.message)]
    assert len(slow) == (0 if cpu_has_fast_bfloat16() else 1)  # said once, up front, where it is slower
    seen = {}

    def record_head(module, inputs, output) -> None:
        seen["head"] = output[0].dtype

    def record_losses(module, inputs, output) -> None:
        seen["losses"] = {n: getattr(output.losses, n).dtype for n in LOSS_PARTS}

    trainer.model.rcnn.head.register_forward_hook(record_head)
    trainer.model.register_forward_hook(record_losses)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    logged = trainer.train_step([0, 1], 1e-4)
    assert seen["head"] == torch.bfloat16                             # autocast is on
    assert seen["losses"] == {n: torch.float32 for n in LOSS_PARTS}   # the losses are not
    assert logged is not None and all(math.isfinite(logged[n]) for n in LOSS_PARTS)
    after = list(trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in after)               # master weights stay float32
    assert sum(not torch.equal(b, p) for b, p in zip(before, after)) > 0.9 * len(after)


def test_a_sample_found_bad_on_one_rank_stops_every_rank_or_is_skipped_by_all(workspace, tmp_path):
    """The sample rank 1 reads at step 2 passes the check before the first step (its pixel data
    is cut short, its header whole). Both ranks stop with its one-line error (rank 0 never read
    it), or with --skip-bad both train on: no rank is left waiting for the other."""
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    reader = open_dataset(data)
    train_indices, _ = split_train_val(reader, 0.2, SEED)
    position = int(epoch_batches(len(train_indices), 1, 1, 2, SEED, 0)[1, 0])  # rank 1, step 2
    bad = data / "images" / f"{reader.names[train_indices[position]]}.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    argv = lambda run, *more: ["train", "--data", data, "--config", workspace / "tiny.yaml", "--out", run,  # noqa: E731
                               "--iters", STEPS, "--batch-size", 1, *COMMON, *more]

    results = launch(2, argv(tmp_path / "refused"), timeout=300)
    for result in results:
        assert result.returncode == 2, result.stderr[-3000:]
        line = result.stderr.splitlines()[-1]
        assert line.startswith(f"maskrcnn: error: {bad}: cannot read image (") and "--skip-bad" in line, line
    assert [r["step"] for r in train_rows(tmp_path / "refused")] == [1]

    results = launch(2, argv(tmp_path / "run", "--skip-bad"), timeout=300)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stderr[-3000:]}"
    assert f"{bad}: cannot read image" in results[0].stderr and bad.stem not in results[1].stderr  # rank 0 says it
    assert (tmp_path / "run" / "skipped.txt").read_text().startswith(f"{bad.stem}\t{bad}: cannot read image (")
    assert [r["step"] for r in train_rows(tmp_path / "run")] == list(range(1, STEPS + 1))
