"""Signals stop ``maskrcnn predict`` after an image with its outputs whole, and ``--skip-existing``
completes the run with the outputs of a run never stopped (train's signals: test_signals.py).
The moment the signal is sent is drawn from ``replay_rng`` (conftest), whose seed is printed.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from maskrcnn.cli.main import EXIT_STOPPED

from cli_helpers import cli
from conftest import TINY_RUN as TINY
from conftest import finish, wait_for, write_untrained_checkpoint
from test_signals import data, process  # noqa: F401 (data: a fixture)

N_IMAGES = 24  # enough that the signal lands mid-run


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained tiny model: with the test thresholds at 0 it still finds (random) instances."""
    return write_untrained_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", **TINY)


def image_folder(data: tuple[Path, Path], folder: Path, count: int) -> list[str]:
    """``count`` images img00.png ... in ``folder``; returns their names, in predict's order."""
    folder.mkdir()
    for i in range(count):
        (folder / f"img{i:02d}.png").write_bytes((data[0] / "images" / f"synth_{i % 5:04d}.png").read_bytes())
    return [f"img{i:02d}" for i in range(count)]


def assert_whole(out: Path, name: str) -> None:
    """NAME's three files are there and complete."""
    for suffix in ("_labels.png", "_overlay.png"):
        with Image.open(out / f"{name}{suffix}") as png:
            png.load()
            assert png.size == (64, 64)
    with open(out / f"{name}_instances.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames[:3] == ["id", "class", "score"]


def assert_same_run_files(kept: Path, fresh: Path, exact: bool = True) -> None:
    """The run files of a run that kept earlier outputs equal a fresh run's, byte for byte when the
    earlier run's results_coco.json was there; without it, COCO boxes and scores of kept images
    come back from the instance tables, to 0.1 pixel and 4 decimals."""
    assert (kept / "images.json").read_text() == (fresh / "images.json").read_text()
    assert (kept / "submission.csv").read_text() == (fresh / "submission.csv").read_text()
    if exact:
        assert (kept / "results_coco.json").read_text() == (fresh / "results_coco.json").read_text()
    a, b = (json.loads((d / "results_coco.json").read_text()) for d in (kept, fresh))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"], x["segmentation"]) == (y["image_id"], y["category_id"],
                                                                         y["segmentation"])
        assert x["bbox"] == pytest.approx(y["bbox"], abs=0.11) and x["score"] == pytest.approx(y["score"], abs=6e-5)


@pytest.mark.slow
def test_a_signal_stops_predict_after_an_image_and_skip_existing_completes_the_run(data, weights, tmp_path, capsys,
                                                                                    one_thread, replay_rng):
    names = image_folder(data, tmp_path / "in", N_IMAGES)
    out = tmp_path / "out"
    args = ["predict", tmp_path / "in", "--weights", weights, "--out", out, "--kaggle", "--device", "cpu",
            "--no-progress"]
    after, delay = int(replay_rng.integers(1, 4)), float(replay_rng.uniform(0.0, 0.1))
    proc = process(args, cwd=tmp_path)
    wait_for(lambda: len(list(out.glob("*_instances.csv"))) >= after, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code, stdout, err = finish(proc)

    assert code == EXIT_STOPPED and stdout == "" and "Traceback" not in err, err
    match = re.fullmatch(rf"maskrcnn: stopped by SIGTERM after (\d+) of {N_IMAGES} images \(their outputs are "
                         rf"complete; (.+) lists them\); rerun with --skip-existing to continue", err.splitlines()[-1])
    assert match and match[2] == str(out / "images.json"), err
    done = int(match[1])
    assert after <= done < N_IMAGES
    for name in names[:done]:
        assert_whole(out, name)
    assert not [p for name in names[done:] for p in out.glob(f"{name}_*")]  # nothing of the others
    assert not list(out.glob(".*"))
    assert [Path(e["file_name"]).stem for e in json.loads((out / "images.json").read_text())] == names[:done]

    code, stdout, err = cli(capsys, *args, "--skip-existing")
    assert code == 0, err
    assert f"{N_IMAGES - done} image(s) segmented, {done} skipped (outputs already there)" in stdout
    code, _, err = cli(capsys, *args[:5], tmp_path / "fresh", *args[6:])
    assert code == 0, err
    assert_same_run_files(out, tmp_path / "fresh")


@pytest.mark.slow
def test_skip_existing_keeps_whole_outputs_and_predicts_the_rest_again(data, weights, tmp_path, capsys,
                                                                       one_thread):
    names = image_folder(data, tmp_path / "in", 5)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = ["predict", tmp_path / "in", "--weights", weights, "--kaggle", "--device", "cpu", "--no-progress"]
    assert cli(capsys, *args, "--out", fresh)[0] == 0
    assert cli(capsys, *args, "--out", out)[0] == 0
    tables = {name: (out / f"{name}_instances.csv").read_text() for name in names}
    found = [name for name in names if ",nucleus," in tables[name]]
    assert len(found) >= 2, "the model found too little to compare"
    (out / f"{found[0]}_overlay.png").unlink()  # incomplete: predicted again
    table = out / f"{found[1]}_instances.csv"
    table.write_text(tables[found[1]].replace(",nucleus,", ",cell,"))  # another model's classes: again
    (out / "results_coco.json").unlink()
    kept = next(name for name in names if name not in found[:2])
    labels_before = (out / f"{kept}_labels.png").stat().st_mtime_ns

    code, stdout, err = cli(capsys, *args, "--out", out, "--skip-existing")
    assert code == 0, err
    assert stdout.startswith("2 image(s) segmented, 3 skipped (outputs already there);")
    assert (out / f"{kept}_labels.png").stat().st_mtime_ns == labels_before  # kept, not rewritten
    assert table.read_text() == tables[found[1]]
    assert_same_run_files(out, fresh, exact=False)  # its results_coco.json was deleted
