"""``torchrun ... -m maskrcnn predict``: 2 gloo processes on one machine write the same files as one.

The ranks are launched as torchrun launches them (tests/test_distributed.py's ``launch``); the
reference is the same command in one process with the thread count each rank takes (its share of
the cores), so that both compute alike. Every file of both output folders is compared byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from maskrcnn.data.synthetic_scenes import synth_scene
from maskrcnn.data.writers import write_image
from maskrcnn.prediction.ranks import my_images
from maskrcnn.runtime.distributed import DistContext

from test_distributed import launch

PLAIN_WORKER = "import sys; from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))"


def test_each_image_goes_to_exactly_one_rank():
    shares = [list(my_images(7, DistContext(rank, 3, None))) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(7))
    assert shares[0] == [0, 3, 6]


@pytest.mark.slow
def test_two_processes_write_the_files_one_process_writes(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(5):
        write_image(inputs / f"img{seed}.png", synth_scene(96, np.random.default_rng(seed))[0])
    (inputs / "broken.png").write_bytes(b"not a png")  # a failed image: listed by rank 0 for both
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = ["predict", inputs, "--weights", "nuclei", "--device", "cpu", "--no-progress", "--kaggle", "--geojson"]
    one = launch(1, [*common, "--out", tmp_path / "one"], threads=max(1, cores // 2), worker=PLAIN_WORKER)
    two = launch(2, [*common, "--out", tmp_path / "two"], worker=PLAIN_WORKER)
    assert [r.returncode for r in one] == [2] and [r.returncode for r in two] == [2, 0], [r.stderr for r in two]
    assert "5 image(s) segmented" in one[0].stdout and "5 image(s) segmented" in two[0].stdout
    assert two[1].stdout == ""  # rank 1 says nothing: rank 0 reports the run

    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert {"results_coco.json", "images.json", "submission.csv", "failed.txt"} <= {f.name for f in files}
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    entries = json.loads((tmp_path / "two" / "images.json").read_text())
    assert [e["id"] for e in entries] == [2, 3, 4, 5, 6]  # input order: broken.png is image 1
