"""``maskrcnn demo`` (what ``make demo`` runs), end to end on a few seconds of fine-tuning."""

from __future__ import annotations

import json
import re

import pytest

from cli_helpers import cli

pytestmark = [pytest.mark.slow,  # creates a dataset, trains, evaluates and predicts
              pytest.mark.usefixtures("one_torch_thread")]


def test_demo_writes_data_run_report_and_overlays(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = cli(capsys, "demo", "--out", out, "--minutes", "0.05", "--device", "cpu")
    assert code == 0
    assert len(list((out / "data" / "train" / "images").iterdir())) == 40
    assert len(list((out / "data" / "held_out" / "images").iterdir())) == 8
    assert (out / "run" / "last.pt").is_file() and (out / "run" / "curves.png").is_file()
    report = json.loads((out / "held_out_report.json").read_text())
    printed = re.search(r"held-out mask AP50 ([0-9.]+), DSB2018 score ([0-9.]+)", stdout)
    assert printed, stdout
    assert float(printed.group(1)) == pytest.approx(report["summary"]["mask_ap50"], abs=5e-4)
    overlays = sorted((out / "predictions").glob("*_overlay.png"))
    assert len(overlays) == 8
    assert f"overlays: {out / 'predictions'}" in stdout
    # it starts from the built-in model: scored and drawn before any training, then beside the fine-tuned one
    assert re.search(r"zero-shot: mask AP50 [0-9.]+, DSB2018 score [0-9.]+", stdout), stdout
    assert len(list((out / "zero_shot").glob("*_overlay.png"))) == 8
    assert (out / "comparison.png").stat().st_size > 0
