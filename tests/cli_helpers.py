"""Helpers shared by the tests that run the command line in-process (test_cli*.py), and the one
tiny trained model that test_cli.py and test_cli_predict.py each train once per module (a few
steps on 64x64 synthetic images). Its config lowers the test-time score thresholds so that even an
untrained model returns instances, which makes the output checks non-trivial."""

from __future__ import annotations

import csv
import json
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import yaml

from maskrcnn.cli.main import main
from maskrcnn.data.synthetic import write_synthetic_dataset

from conftest import OPEN, tiny_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_DSB = SHARED_DATA / "dsb2018-kaggle-layout"
REAL_LABELS = SHARED_DATA / "dsb2018-labels"
REAL_ID = "0ea221716cf13710214dcd331a61cea48308c3940df1d28cfc7fd817c83714e1"
REAL_INSTANCES = 369

# an untrained model scores ~0.5: keep its detections, but few of them
TINY_CONFIG = tiny_config(**OPEN, rpn_test_post_nms_top_k=200, mask_test_nms_overlap_threshold=0.3,
                          rcnn_test_max_detections=50)
FAST = ["--crop", "64", "--batch-size", "2", "--device", "cpu", "--no-progress"]
N_SYNTH = 5

needs_real_data = pytest.mark.skipif(not (REAL_DSB.is_dir() and REAL_LABELS.is_dir()),
                                     reason=f"real DSB2018 sample not present in {SHARED_DATA}")


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``maskrcnn ARGV`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_user_error(code: int, err: str, *names: object) -> None:
    """Exit code 2, one line on stderr naming each of ``names``, no traceback."""
    assert code == 2
    assert err.startswith("maskrcnn: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- one tiny trained model per module that imports these fixtures ----------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_yaml(workspace) -> Path:
    path = workspace / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def synth(workspace) -> Path:
    root = workspace / "synth"
    write_synthetic_dataset(root, N_SYNTH, 64, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(workspace, synth, tiny_yaml) -> tuple[Path, str]:
    """(run dir, stdout) of ``maskrcnn train`` for 4 steps, validating every 2."""
    run = workspace / "run"
    stdout = StringIO()
    with redirect_stdout(stdout):
        code = main(["train", "--data", str(synth), "--out", str(run), "--config", str(tiny_yaml),
                     "--iters", "4", "--val-every", "2", *FAST])
    assert code == 0
    return run, stdout.getvalue()


@pytest.fixture(scope="module")
def weights(trained) -> Path:
    return trained[0] / "last.pt"

