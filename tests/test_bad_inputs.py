"""A corpus of bad and unusual inputs (tests/bad_images.py, tests/bad_datasets.py), run through the
``maskrcnn`` command.

Each case builds its input under ``tmp_path`` (nothing binary is stored in the repository) and
states what the command must do with it: either handle it (``problem=None``; the handling is
listed in the README's Troubleshooting section) or fail with exit code 2 and one line on stderr
that names the file and the problem, with no traceback. Training checks every sample's files and
sizes before the first step, and with ``--check-data`` reads every sample, so a bad sample stops
``train`` at once wherever it sits in the dataset (one that passes the cheap check stops it when
first read: tests/test_data_check.py); with ``--skip-bad`` the bad samples are skipped and listed
in RUN_DIR/skipped.txt. ``predict`` reports each bad image on its own line and writes the others.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.cli.main import main
from maskrcnn.data.io import read_label_image
from maskrcnn.data.writers import write_image, write_label_image

from bad_datasets import DATA_CASES, coco, coco_data
from bad_images import BAD_IMAGES, IMAGE_CASES, RunsCommand, marker_command, nuclei, png_bytes, write_bytes
from cli_helpers import cli
from conftest import TINY_RUN as TINY  # open thresholds: an untrained model's outputs are not all empty

FAST = ["--crop", "64", "--device", "cpu", "--no-progress"]

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # pycocotools
              pytest.mark.usefixtures("one_torch_thread")]


def check_one_line_error(code: int, err: str, named: object, problem: str) -> None:
    """Exit code 2; stderr is exactly one line naming the file and the problem; no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("maskrcnn: "), err
    assert "Traceback" not in err
    assert str(named) in err and problem in err, err


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# a case that training handles trains a step (a second or two): slow; a refused one stops before the first step
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if case.problem is None else name
                                  for name, case in DATA_CASES.items()])
def test_train_on_corpus_case(name, tiny_yaml, tmp_path, capsys):
    case = DATA_CASES[name]
    root = tmp_path / "case"
    data_args, named = case.build(root)
    config = [] if "--config" in data_args else ["--config", tiny_yaml]
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", *data_args, "--out", run, *config, "--iters", "1",
                         "--batch-size", "1", "--val-every", "1000", *FAST)
    assert not (root / "CODE_WAS_RUN").exists()
    if case.problem is None:
        assert code == 0, err
        assert "Traceback" not in err
        assert "trained 1 steps" in out
        assert load_checkpoint(run / "last.pt").step == 1
    else:
        check_one_line_error(code, err, named, case.problem)
        assert not (run / "last.pt").exists()


# --- --skip-bad: every per-sample case in one dataset ---------------------------------------------------
def merged_labels_dataset(tmp_path: Path, names: list[str], good: int = 2) -> Path:
    """One labels-layout dataset holding sample NAME for each labels-layout case, plus ``good`` good samples."""
    root = tmp_path / "merged"
    for name in names:
        case_root = tmp_path / "cases" / name
        DATA_CASES[name].build(case_root)
        for folder in ("images", "masks"):
            for file in (case_root / folder).iterdir():
                write_bytes(root / folder / f"{name}{file.suffix}", file.read_bytes())
    for i in range(good):
        image, labels = nuclei(seed=10 + i)
        write_image(root / "images" / f"good{i}.png", image)
        write_label_image(root / "masks" / f"good{i}.png", labels.astype(np.uint16))
    return root


LABELS_LAYOUT_BAD = [name for name, case in DATA_CASES.items()
                     if case.problem and case.per_sample and name.startswith(("image_", "label_", "mask_"))]


def test_train_fails_fast_on_a_bad_sample_it_has_not_reached_yet(tmp_path, tiny_yaml, capsys):
    """The --check-data scan before the first step finds the bad sample, whichever batch it would be in."""
    root = merged_labels_dataset(tmp_path, ["image_png_truncated"], good=6)
    code, _, err = cli(capsys, "train", "--data", root, "--out", tmp_path / "run", "--config", tiny_yaml,
                       "--iters", "1", "--batch-size", "1", "--check-data", *FAST)
    check_one_line_error(code, err, root / "images" / "image_png_truncated.png", "cannot read image")
    assert "--skip-bad" in err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_train_skip_bad_skips_and_lists_every_bad_sample(tmp_path, tiny_yaml, capsys):
    root = merged_labels_dataset(tmp_path, LABELS_LAYOUT_BAD)
    val = merged_labels_dataset(tmp_path / "val", ["image_tiff_truncated"], good=1)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"skipped {len(LABELS_LAYOUT_BAD)} unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", root, "--val", val, "--out", run, "--config", tiny_yaml,
                             "--iters", "1", "--batch-size", "2", "--skip-bad", "--check-data", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out and "Traceback" not in err
    listed = dict(line.split("\t", 1) for line in (run / "skipped.txt").read_text().splitlines())
    assert sorted(listed) == sorted(LABELS_LAYOUT_BAD)
    for name, line in listed.items():
        assert DATA_CASES[name].problem in line, line
    assert (run / "skipped_val.txt").read_text().startswith("image_tiff_truncated\t")
    assert load_checkpoint(run / "last.pt").step == 1


@pytest.mark.slow
def test_train_skip_bad_skips_bad_coco_images(tmp_path, tiny_yaml, capsys):
    root = tmp_path / "coco"
    data = coco_data(root)
    good = data["images"][0]
    for i, (name, change) in enumerate([("gone", {"file_name": "gone.png"}), ("short", {"height": 50}),
                                        ("good2", {})], start=2):
        if not change:
            write_image(root / "images" / "good2.png", nuclei(seed=i)[0])
        data["images"].append({**good, "id": i, "file_name": f"{name}.png", **change})
    write_image(root / "images" / "short.png", nuclei(seed=9)[0])
    bad_rle = {**data["annotations"][0], "id": 9, "image_id": 4, "segmentation": {"size": [64, 64], "counts": [5]}}
    data["annotations"].append(bad_rle)  # image 4 ("good2") now has a bad RLE
    args, _ = coco(root, data)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped 3 unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", *args, "--out", run, "--config", tiny_yaml, "--iters", "1",
                             "--batch-size", "1", "--skip-bad", "--check-data", *FAST)
    assert code == 0, err
    listed = (run / "skipped.txt").read_text()
    assert "gone\t" in listed and "no such file" in listed
    assert "short\t" in listed and "says 50x64" in listed
    assert "good2\t" in listed and "bad RLE" in listed


@pytest.mark.slow
def test_train_skip_bad_skips_and_lists_bad_dsb_samples(tmp_path, tiny_yaml, capsys):
    """A DSB folder holding every per-sample DSB case (one sample folder each) and two good ones."""
    root = tmp_path / "dsb"
    bad = [name for name, case in DATA_CASES.items() if case.problem and case.per_sample and name.startswith("dsb_")]
    assert "dsb_no_masks_folder" in bad and "dsb_mask_coloured" in bad
    root.mkdir()
    for name in bad + ["dsb_holes_and_components", "dsb_empty_masks_folder"]:
        DATA_CASES[name].build(tmp_path / "cases" / name)
        (tmp_path / "cases" / name / "x").rename(root / name)  # the sample folder is named after its case
    code, _, err = cli(capsys, "train", "--data", root, "--format", "dsb", "--out", tmp_path / "refused",
                       "--config", tiny_yaml, "--iters", "1", "--batch-size", "1", "--check-data", *FAST)
    check_one_line_error(code, err, root, "(train --skip-bad skips bad samples)")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=f"skipped {len(bad)} unreadable sample"):
        code, out, err = cli(capsys, "train", "--data", root, "--format", "dsb", "--out", run, "--config", tiny_yaml,
                             "--iters", "1", "--batch-size", "1", "--skip-bad", "--check-data", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out and "Traceback" not in err
    listed = dict(line.split("\t", 1) for line in (run / "skipped.txt").read_text().splitlines())
    assert sorted(listed) == sorted(bad)
    for name, line in listed.items():
        assert DATA_CASES[name].problem in line, line
    assert f"{root / 'dsb_no_masks_folder'}: sample has no masks/ folder" in listed["dsb_no_masks_folder"]
    assert load_checkpoint(run / "last.pt").step == 1


@pytest.mark.slow
def test_train_skip_bad_leaves_out_coco_annotations_of_unknown_categories_and_lists_them(tmp_path, tiny_yaml,
                                                                                         capsys):
    """Needs the training setup to pass skip_bad to open_dataset and list reader.left_out."""
    root = tmp_path / "coco"
    data = coco_data(root)
    data["annotations"][0]["category_id"] = 99  # annotation 1; annotation 2 stays good
    args, path = coco(root, data)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="left out 1 annotation"):
        code, out, err = cli(capsys, "train", "--data", *args, "--out", run, "--config", tiny_yaml, "--iters", "1",
                             "--batch-size", "1", "--skip-bad", *FAST)
    assert code == 0, err
    assert "trained 1 steps" in out and "Traceback" not in err
    assert (run / "skipped.txt").read_text() == f"annotation 1\t{path}: annotation 1 has unknown category_id 99\n"
    assert load_checkpoint(run / "last.pt").step == 1


# --- predict on every image case -----------------------------------------------------------------------
# torch runs the model: what these tests check (reading, skipping, one-line errors) comes before the
# engine, and a graph engine's compilation would cost each test seconds (engines: test_engines.py)
PREDICT = ["--device", "cpu", "--no-progress", "--engine", "torch"]


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_predict_on_corpus_image(name, untrained_weights, tmp_path, capsys):
    case = IMAGE_CASES[name]
    image, _ = case.write(tmp_path / "in" / name)
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "predict", image, "--weights", untrained_weights, "--out", out, *PREDICT)
    assert not (tmp_path / "in" / "CODE_WAS_RUN").exists()
    if case.problem is None:
        assert code == 0, err
        assert "Traceback" not in err and "1 image(s) segmented" in stdout
        labels = read_label_image(out / f"{name}_labels.png")
        assert labels.shape == (case.write(tmp_path / "again" / name)[1]).shape
    else:
        check_one_line_error(code, err, image, case.problem)
        assert err.startswith(f"maskrcnn: skipped {image}: ")
        assert "0 image(s) segmented" in stdout
        assert (out / "failed.txt").read_text().startswith(f"{image}\t")
        assert not list(out.glob(f"{name}_*"))


def test_predict_folder_with_the_whole_corpus_writes_the_good_and_lists_the_bad(untrained_weights, tmp_path, capsys):
    folder = tmp_path / "in"
    images = {name: case.write(folder / name)[0] for name, case in IMAGE_CASES.items()}
    code, stdout, err = cli(capsys, "predict", folder, "--weights", untrained_weights, "--out", tmp_path / "out",
                            *PREDICT)
    assert code == 2 and "Traceback" not in err
    good = [name for name in IMAGE_CASES if name not in BAD_IMAGES]
    assert f"{len(good)} image(s) segmented" in stdout
    assert sorted(err.splitlines()) == sorted(
        f"maskrcnn: skipped {images[name]}: " + next(line.split(": ", 2)[2] for line in err.splitlines()
                                                      if str(images[name]) in line) for name in BAD_IMAGES)
    for name in BAD_IMAGES:
        assert IMAGE_CASES[name].problem in next(line for line in err.splitlines() if str(images[name]) in line)
    for name in good:
        assert (tmp_path / "out" / f"{name}_labels.png").is_file(), name
    assert len((tmp_path / "out" / "failed.txt").read_text().splitlines()) == len(BAD_IMAGES)


# --- untrusted files: nothing in them is ever run ----------------------------------------------------------
def test_predict_refuses_a_checkpoint_that_would_run_a_command(tmp_path, capsys):
    command, marker = marker_command(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "maskrcnn-checkpoint/1", "config": {}, "model": {}, "hook": RunsCommand(command)}, evil)
    image = write_bytes(tmp_path / "a.png", png_bytes(nuclei()[0]))
    code, _, err = cli(capsys, "predict", image, "--weights", evil, "--out", tmp_path / "out", *PREDICT)
    check_one_line_error(code, err, evil, "refused to load")
    assert not marker.exists()


def test_train_resume_refuses_a_last_checkpoint_that_would_run_a_command(tmp_path, tiny_yaml, capsys):
    command, marker = marker_command(tmp_path)
    root = tmp_path / "data"
    image, labels = nuclei()
    write_image(root / "images" / "x.png", image)
    write_label_image(root / "masks" / "x.png", labels.astype(np.uint16))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "maskrcnn-checkpoint/1", "hook": RunsCommand(command)}, run / "last.pt")
    code, _, err = cli(capsys, "train", "--data", root, "--out", run, "--config", tiny_yaml, "--resume",
                       "--iters", "1", *FAST)
    check_one_line_error(code, err, run / "last.pt", "refused to load")
    assert not marker.exists()


def test_predict_refuses_a_fake_torchscript_archive_whose_pickles_would_run_a_command(tmp_path, capsys):
    """A zip laid out like TorchScript (``constants.pkl``) whose pickles call os.system."""
    import pickle
    import zipfile

    command, marker = marker_command(tmp_path)
    evil = tmp_path / "evil_script.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/constants.pkl", pickle.dumps((RunsCommand(command),), protocol=2))
        archive.writestr("archive/data.pkl", pickle.dumps(RunsCommand(command), protocol=2))
        archive.writestr("archive/version", "3\n")
    image = write_bytes(tmp_path / "a.png", png_bytes(nuclei()[0]))
    code, _, err = cli(capsys, "predict", image, "--weights", evil, "--out", tmp_path / "out", *PREDICT)
    check_one_line_error(code, err, evil, "")
    assert "TorchScript" in err or "checkpoint" in err
    assert not marker.exists()


# --- flags and the file system ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named, problem", [
    (["--lr", "-1"], "--lr", "must be a finite number > 0, got -1.0"),
    (["--lr", "inf"], "--lr", "must be a finite number > 0, got inf"),
    (["--iters", "ten"], "--iters", "expected a whole number >= 1, got 'ten'"),
    (["--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
    (["--format", "voc"], "--format", "invalid choice: 'voc'"),
], ids=["negative_lr", "infinite_lr", "iters_not_a_number", "zero_batch", "unknown_format"])
def test_bad_flags_are_one_line_errors(flags, named, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags])
    _, err = capsys.readouterr()
    check_one_line_error(info.value.code, err, named, problem)
    assert "maskrcnn train --help" in err


def test_an_output_folder_that_cannot_be_created_is_a_one_line_error(untrained_weights, tmp_path, capsys):
    blocker = write_bytes(tmp_path / "taken", b"a file, not a folder")
    image = write_bytes(tmp_path / "a.png", png_bytes(nuclei()[0]))
    code, _, err = cli(capsys, "predict", image, "--weights", untrained_weights, "--out", blocker / "out", *PREDICT)
    check_one_line_error(code, err, blocker, "Not a directory")
