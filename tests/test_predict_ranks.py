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
import tifffile

from maskrcnn.data.synthetic_scenes import synth_scene
from maskrcnn.data.writers import write_image
from maskrcnn.prediction.ranks import my_images
from maskrcnn.runtime.distributed import DistContext

from test_distributed import launch

PLAIN_WORKER = "import sys; from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))"
# predict with images over 500 px streamed in tiles of 256 whatever the ranks' memory (the memory
# plan depends on each process's resident size; what is tested here is what the ranks do with it)
STREAM_WORKER = ("import sys; from maskrcnn.prediction.predict import Predictor; "
                 "from maskrcnn.runtime.memory import Plan; "
                 "Predictor.plan = lambda self, shape, *a, in_memory=False, **k: "
                 "Plan('stream', 256) if max(shape) > 500 and not in_memory else Plan('whole', None); "
                 "from maskrcnn.cli.main import main; sys.exit(main(sys.argv[1:]))")
TESTS = str(Path(__file__).resolve().parent)
# predict_streamed on the perfect model of test_tiling, twice in the same two ranks: first with rank 1
# asked to stop before its third round (then the folder's files are listed), then to the end
STOP_WORKER = f"""
import os, sys
sys.path.insert(0, {TESTS!r})
from maskrcnn.data.regions import ArraySource
from maskrcnn.prediction.large import StreamStopped, predict_streamed
from maskrcnn.runtime.distributed import DistContext
from test_large import disc_image, oracle_predictor
dist = DistContext.from_environment("cpu")
for stop_at in (3, None):
    asked = []
    def stop():
        asked.append(1)
        return dist.rank == 1 and len(asked) == stop_at
    try:
        predict_streamed(oracle_predictor(), ArraySource(disc_image()), sys.argv[1], "discs", 128, 48,
                         should_stop=stop, dist=dist)
        print("finished", len(asked), end=" ")
    except StreamStopped:
        dist.barrier()  # every rank has left the image (rank 0 has removed its label store)
        print("stopped", len(asked), len(os.listdir(sys.argv[1])), end=" ")
dist.close()
"""


def test_each_image_goes_to_exactly_one_rank():
    shares = [list(my_images(7, DistContext(rank, 3, None))) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(7))
    assert shares[0] == [0, 3, 6]


def test_images_streamed_together_go_to_every_rank_and_the_rest_are_shared_out():
    together = {1: 256, 4: 256}
    shares = [my_images(7, DistContext(rank, 2, None), together) for rank in range(2)]
    assert shares == [[0, 1, 3, 4, 6], [1, 2, 4, 5]]
    assert my_images(3, DistContext.single(), {}) == [0, 1, 2]


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


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_stream_one_image_together_and_write_what_one_process_writes(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a_small.png", synth_scene(64, np.random.default_rng(0))[0])  # rank 0's
    write_image(inputs / "b_large.tif", synth_scene(520, np.random.default_rng(1))[0])  # 3 x 3 tiles of 256
    write_image(inputs / "c_small.png", synth_scene(64, np.random.default_rng(2))[0])  # rank 1's
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    common = ["predict", inputs, "--weights", "nuclei", "--device", "cpu", "--no-progress", "--overlap", "64",
              "--engine", "torch"]  # what is compared is the ranks' work; engines have their own tests
    one = launch(1, [*common, "--out", tmp_path / "one"], threads=max(1, cores // 2), worker=STREAM_WORKER)
    two = launch(2, [*common, "--out", tmp_path / "two"], worker=STREAM_WORKER)
    assert [r.returncode for r in one + two] == [0, 0, 0], [r.stderr for r in one + two]
    assert "3 image(s) segmented" in one[0].stdout and "3 image(s) segmented" in two[0].stdout
    assert "streamed in tiles of 256" in two[0].stderr and "streamed" not in two[1].stderr  # rank 0 says it
    files = tree(tmp_path / "one")
    assert "b_large_labels.tif" in files and "b_large_instances.csv" in files
    assert files == tree(tmp_path / "two")
    labels = tifffile.imread(tmp_path / "two" / "b_large_labels.tif")
    assert labels.shape == (520, 520) and labels.max() > 20  # a scene of nuclei, found across the seams
    # run again: rank 0 finds the streamed image's files, and every rank keeps them
    again = launch(2, [*common, "--out", tmp_path / "two", "--skip-existing"], worker=STREAM_WORKER)
    assert [r.returncode for r in again] == [0, 0], [r.stderr for r in again]
    assert "0 image(s) segmented, 3 skipped" in again[0].stdout and tree(tmp_path / "two") == files


@pytest.mark.slow
def test_a_stop_asked_of_one_rank_between_tiles_stops_both_leaving_no_file(tmp_path):
    out = launch(2, [tmp_path], worker=STOP_WORKER)
    assert [r.returncode for r in out] == [0, 0], [r.stderr for r in out]
    # 400 px in tiles of 128 overlapping by 48: 25 tiles, 13 rounds; rank 1 asks to stop before round
    # 3, and both stop there with no file in the folder; run again, both go through the 13 rounds
    assert [r.stdout.split() for r in out] == [["stopped", "3", "0", "finished", "13"]] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["discs_instances.csv", "discs_labels.tif",
                                                          "discs_overlay.png"]


class RankZeroOfTwo(DistContext):
    """Rank 0 of 2 in one process: the other rank's side of each gather is scripted."""

    def __init__(self, other: list) -> None:
        super().__init__(0, 2, None)
        self.other = other

    def all_gather_objects(self, value):
        return [value, self.other.pop(0)]


def test_an_image_streamed_together_stops_when_any_rank_was_asked_to_and_is_kept_as_rank_0_says(tmp_path):
    from types import SimpleNamespace

    from maskrcnn.outputs.files import RunOutputs
    from maskrcnn.prediction.streaming import predict_together

    calm = SimpleNamespace(received=None)
    run = RunOutputs(tmp_path)
    never = SimpleNamespace()  # no model: neither outcome below may segment anything
    args = (never, run, 1, tmp_path / "slide.tif", 256, 64, None)
    # the other rank was signalled: both stop before the image, nothing of it recorded or written
    assert predict_together(*args, calm, False, RankZeroOfTwo([(True, False)]), False) is False
    # rank 0 found its files from an earlier run: every rank keeps them, whatever the others found
    assert predict_together(*args, calm, False, RankZeroOfTwo([(False, False)]), True) is True
    assert predict_together(*args, SimpleNamespace(received="SIGTERM"), False, RankZeroOfTwo([(False, True)]),
                            False) is False
    assert run.images == [] and run.failed == [] and list(tmp_path.iterdir()) == []
