"""The ``maskrcnn`` command's errors: exit code 2 and one line naming the file and the problem, no
traceback, nothing half-written (bad input files themselves: tests/test_bad_inputs.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskrcnn.data.synthetic import write_synthetic_dataset

from cli_helpers import check_user_error, cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--crop", "64", "--batch-size", "2", "--device", "cpu", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_errors") / "synth"
    write_synthetic_dataset(root, 2, 64, seed=0)
    return root


@pytest.fixture(scope="module")
def corrupt_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(48))
    return path


def test_error_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    code, _, err = cli(capsys, "train", "--data", missing, "--out", tmp_path / "run", *FAST)
    check_user_error(code, err, missing, "no such file or folder")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_error_missing_data_for_evaluate(untrained_weights, tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    code, _, err = cli(capsys, "evaluate", "--weights", untrained_weights, "--data", missing, "--device", "cpu")
    check_user_error(code, err, missing)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_error_missing_checkpoint(command, synth, tmp_path, capsys):
    missing = tmp_path / "nothing.pt"
    target = [synth / "images"] if command == "predict" else ["--data", synth]
    out = ["--out", tmp_path / "out"] if command == "predict" else []
    code, _, err = cli(capsys, command, *target, "--weights", missing, *out, "--device", "cpu")
    check_user_error(code, err, missing, "checkpoint not found")


def test_error_corrupt_checkpoint(synth, corrupt_weights, tmp_path, capsys):
    code, _, err = cli(capsys, "predict", synth / "images", "--weights", corrupt_weights, "--out", tmp_path,
                       "--device", "cpu")
    check_user_error(code, err, corrupt_weights, "corrupt or truncated checkpoint")


def test_error_truncated_checkpoint(untrained_weights, synth, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    with open(untrained_weights, "rb") as f:
        truncated.write_bytes(f.read(4096))
    code, _, err = cli(capsys, "evaluate", "--weights", truncated, "--data", synth, "--device", "cpu")
    check_user_error(code, err, truncated, "corrupt or truncated")


def test_error_predict_folder_without_images(untrained_weights, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, _, err = cli(capsys, "predict", empty, "--weights", untrained_weights, "--out", tmp_path / "out",
                       "--device", "cpu")
    check_user_error(code, err, empty, "no images found")


def test_error_predict_inputs_that_share_a_name(synth, untrained_weights, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(synth / "images" / "synth_0000.png", other / "synth_0000.png")
    code, _, err = cli(capsys, "predict", synth / "images" / "synth_0000.png", other / "synth_0000.png",
                       "--weights", untrained_weights, "--out", tmp_path / "out", "--device", "cpu")
    check_user_error(code, err, other / "synth_0000.png", "overwrite")


def test_error_missing_config_file(synth, tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    code, _, err = cli(capsys, "train", "--data", synth, "--out", tmp_path / "run", "--config", missing, *FAST)
    check_user_error(code, err, missing, "cannot read")


def test_error_resume_without_checkpoint(synth, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--data", synth, "--out", tmp_path / "run", "--resume", "--iters", "1", *FAST)
    check_user_error(code, err, tmp_path / "run" / "last.pt", "nothing to resume")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_error_overlap_not_below_tile(command, synth, untrained_weights, tmp_path, capsys):
    target = [synth / "images", "--out", tmp_path / "out"] if command == "predict" else ["--data", synth]
    code, _, err = cli(capsys, command, *target, "--weights", untrained_weights, "--tile", "64", "--device", "cpu")
    check_user_error(code, err, "--overlap", "--tile 64")  # the default overlap, 128, is too large


@pytest.mark.slow
@pytest.mark.parametrize("case", ["corrupt checkpoint", "missing data"])
def test_error_from_a_real_process(case, synth, corrupt_weights, tmp_path):
    """``python -m maskrcnn``: exit code 2, nothing on stdout, one line on stderr, no traceback."""
    if case == "corrupt checkpoint":
        args = ["predict", synth / "images", "--weights", corrupt_weights, "--out", tmp_path / "out"]
        named, problem = corrupt_weights, "corrupt or truncated checkpoint"
    else:
        args = ["train", "--data", tmp_path / "missing", "--out", tmp_path / "run"]
        named, problem = tmp_path / "missing", "no such file or folder"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "maskrcnn", *map(str, args), "--device", "cpu"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout == ""
    check_user_error(proc.returncode, proc.stderr, named, problem)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "out").exists()
