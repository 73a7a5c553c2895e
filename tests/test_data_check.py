"""Checking the data: cheaply before the first step, fully when a sample is first read.

Before its first step ``train`` checks every sample's files and sizes from their headers, decoding
no pixel, so a large dataset starts within seconds; ``--check-data`` reads every sample instead.
A sample that passes the cheap check but cannot be read (damaged pixel data) stops the run when
training first reads it, with the same one-line error and exit code 2; with ``--skip-bad`` it is
left out of its batch instead, named in a warning, listed in RUN_DIR/skipped.txt and never read
again. DataLoader workers (``--workers``) change none of this.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

import maskrcnn.data.io as data_io
import maskrcnn.data.labels as labels_module
from maskrcnn.modeling.checkpoint import load_checkpoint
from maskrcnn.presets import nuclei_config
from maskrcnn.data.datasets import open_dataset
from maskrcnn.data.io import read_binary_mask, read_image, read_image_size, read_label_image, read_mask_size
from maskrcnn.data.writers import write_image, write_label_image
from maskrcnn.data.synthetic import write_synthetic_dataset
from maskrcnn.runtime.distributed import epoch_batches
from maskrcnn.errors import DataError
from maskrcnn.train import Trainer, TrainOptions

from cli_helpers import cli
from conftest import TINY_RUN as TINY

FAST = ["--crop", "48", "--device", "cpu", "--no-progress", "--val-every", "1000"]
SEED = 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- sizes from headers -------------------------------------------------------------------------------
def save_tiff(path: Path, array: np.ndarray, **options) -> Path:
    tifffile.imwrite(path, array, **options)
    return path


def save_png(path: Path, array: np.ndarray, **options) -> Path:
    Image.fromarray(array).save(path, **options)
    return path


SHAPES = {  # file -> how it is written; each is read with read_image and sized from its header
    "grey.png": lambda p: save_png(p, np.zeros((20, 30), np.uint8)),
    "rgba.png": lambda p: save_png(p, np.zeros((20, 30, 4), np.uint8)),
    "palette.png": lambda p: Image.fromarray(np.zeros((20, 30), np.uint8)).convert("P").save(p) or p,
    "16bit.png": lambda p: save_png(p, np.zeros((20, 30), np.uint16)),
    "rgb.jpg": lambda p: save_png(p, np.zeros((20, 30, 3), np.uint8)),
    "channels_first.tif": lambda p: save_tiff(p, np.zeros((3, 20, 30), np.uint16), photometric="rgb",
                                              planarconfig="separate"),
    "pages.tif": lambda p: save_tiff(p, np.zeros((5, 20, 30), np.float32)),
    "rgb.tif": lambda p: save_tiff(p, np.zeros((20, 30, 3), np.uint8)),
    "unit_axes.npy": lambda p: np.save(p, np.zeros((1, 20, 30, 1), np.int32)) or p,
    "stack.npy": lambda p: np.save(p, np.zeros((2, 3, 20, 30), np.uint8)) or p,
}


@pytest.mark.parametrize("name", SHAPES)
def test_sizes_from_headers_are_the_sizes_reads_give(tmp_path, name):
    path = SHAPES[name](tmp_path / name)
    assert read_image_size(path) == read_image(path).shape[:2]


@pytest.mark.parametrize("name", ["grey.png", "rgba.png", "palette.png", "16bit.png", "rgb.tif", "unit_axes.npy"])
def test_mask_sizes_from_headers_are_the_sizes_reads_give(tmp_path, name):
    path = SHAPES[name](tmp_path / name)
    assert read_mask_size(path) == read_label_image(path).shape == read_binary_mask(path).shape


def test_header_sizes_refuse_what_reads_refuse_with_the_same_message(tmp_path):
    tiff = save_tiff(tmp_path / "x.tif", np.zeros((4, 4), np.uint8)).read_bytes()
    cases = {"empty.png": b"", "text.png": b"name,area\n", "short.tif": tiff[:8]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "objects.npy", np.array([object()], dtype=object), allow_pickle=True)
    np.save(tmp_path / "line.npy", np.zeros(7, np.uint8))
    for name in [*cases, "objects.npy", "line.npy", "gone.png"]:
        with pytest.raises(DataError) as by_header:
            read_image_size(tmp_path / name)
        with pytest.raises(DataError) as by_read:
            read_image(tmp_path / name)
        assert by_header.value.path == by_read.value.path == str(tmp_path / name)
        if name == "objects.npy":  # memory-mapping refuses objects in its own words (and unpickles nothing)
            assert "cannot read image" in by_header.value.problem
        else:
            assert by_header.value.problem == by_read.value.problem, name


# --- the cheap check of a reader: no pixel decoded ---------------------------------------------------
@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Counts every file decoded (maskrcnn.data.io._load, which every read goes through)."""
    counts: Counter = Counter()
    load = data_io._load

    def counting(path, *args, **kwargs):
        counts[Path(path).name] += 1
        return load(path, *args, **kwargs)

    monkeypatch.setattr(data_io, "_load", counting)
    return counts


def labels_dataset(root: Path, count: int = 3) -> Path:
    write_synthetic_dataset(root, count, 64, seed=SEED)
    return root


def test_cheap_check_refuses_a_mask_of_another_size_without_decoding_a_pixel(tmp_path, decodes):
    root = labels_dataset(tmp_path / "data")
    labels = read_label_image(root / "masks" / "synth_0001.png")
    write_label_image(root / "masks" / "synth_0001.png", labels[:60].astype(np.uint16))
    decodes.clear()
    reader = open_dataset(root)
    reader.check_header(0)
    with pytest.raises(DataError, match="mask is 60x64 \\(HxW\\) but its image is 64x64") as info:
        reader.check_header(1)
    assert info.value.path == str(root / "masks" / "synth_0001.png")
    assert sum(decodes.values()) == 0
    with pytest.raises(DataError) as read:  # a read says the same
        reader[1]
    assert str(read.value) == str(info.value)


def test_cheap_check_of_dsb_masks_and_coco_sizes_decodes_no_pixel(tmp_path, decodes):
    image = np.zeros((64, 64), np.uint8)
    write_image(tmp_path / "dsb" / "a" / "images" / "a.png", image)
    write_image(tmp_path / "dsb" / "a" / "masks" / "m0.png", np.zeros((64, 64), np.uint8))
    write_image(tmp_path / "dsb" / "a" / "masks" / "m1.png", np.zeros((64, 50), np.uint8))
    with pytest.raises(DataError, match="mask is 64x50 \\(HxW\\) but its image is 64x64"):
        open_dataset(tmp_path / "dsb", "dsb").check_header(0)
    write_image(tmp_path / "coco" / "a.png", image)
    (tmp_path / "coco" / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 50, "width": 64},
                   {"id": 2, "file_name": "gone.png", "height": 64, "width": 64}],
        "categories": [{"id": 1, "name": "nucleus"}]}))
    coco = open_dataset(tmp_path / "coco" / "ann.json")
    with pytest.raises(DataError, match="image is 64x64 \\(HxW\\) but ann.json says 50x64"):
        coco.check_header(0)
    with pytest.raises(DataError, match="no such file"):
        coco.check_header(1)
    assert sum(decodes.values()) == 0


def truncate_pixels(path: Path) -> None:
    """Keep the header (the size is readable) but cut the pixel data short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_damaged_pixel_data_passes_the_cheap_check_and_fails_when_read(tmp_path):
    root = labels_dataset(tmp_path / "data")
    truncate_pixels(root / "images" / "synth_0002.png")
    reader = open_dataset(root)
    for index in range(len(reader)):
        reader.check_header(index)
    with pytest.raises(DataError, match="cannot read image") as info:
        reader[2]
    assert info.value.path == str(root / "images" / "synth_0002.png")


# --- train: a bad sample found when first read ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> Path:
    return labels_dataset(tmp_path_factory.mktemp("val") / "data", 1)


def late_bad_dataset(root: Path, position: int) -> tuple[Path, Path]:
    """4 samples to train on (with --val, all of them) whose sample at ``position`` of epoch 0's
    order (batch 1) has damaged pixel data: (root, the bad image)."""
    labels_dataset(root, 4)
    index = int(epoch_batches(4, 1, 0, 1, SEED, 0)[position, 0])
    bad = root / "images" / f"synth_{index:04d}.png"
    truncate_pixels(bad)
    return root, bad


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r["step"] for r in map(json.loads, lines) if "mask" in r]


def test_a_bad_sample_first_read_at_step_3_stops_train_with_its_one_line_error(tmp_path, tiny_yaml, val_data,
                                                                               capsys):
    root, bad = late_bad_dataset(tmp_path / "data", position=2)
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--data", root, "--val", val_data, "--out", run, "--config", tiny_yaml,
                         "--iters", "4", "--batch-size", "1", "--seed", SEED, *FAST)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"maskrcnn: error: {bad}: cannot read image ("), err
    assert err.endswith("(train --skip-bad skips bad samples)\n") and "Traceback" not in err
    assert logged_steps(run) == [1, 2]  # it passed the check before the first step
    assert not (run / "last.pt").exists() and not (run / "run.lock").exists()


def test_check_data_finds_it_before_the_first_step(tmp_path, tiny_yaml, val_data, capsys):
    root, bad = late_bad_dataset(tmp_path / "data", position=2)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", root, "--val", val_data, "--out", run, "--config", tiny_yaml,
                       "--iters", "4", "--batch-size", "1", "--seed", SEED, "--check-data", *FAST)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"maskrcnn: error: {bad}: cannot read image (") and "--skip-bad" in err
    assert logged_steps(run) == [] and not (run / "last.pt").exists()


@pytest.fixture
def reads(monkeypatch, tmp_path) -> Path:
    """A file that gets a line per image read by the labels reader, in any process (workers too)."""
    log = tmp_path / "reads.log"
    read = labels_module.read_image

    def logged(path, *planes):
        with open(log, "a") as f:
            f.write(f"{Path(path).name}\n")
        return read(path, *planes)

    monkeypatch.setattr(labels_module, "read_image", logged)
    return log


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_leaves_a_sample_out_when_read_lists_it_and_never_reads_it_again(workers, tmp_path, tiny_yaml,
                                                                                  val_data, reads, capsys):
    root, bad = late_bad_dataset(tmp_path / "data", position=2)
    assert epoch_batches(4, 1, 0, 1, SEED, 1)[:3].flatten().tolist().count(int(bad.stem[-4:])) == 1  # read in
    run = tmp_path / "run"  # epoch 1 before step 6: its batch is skipped again, unread
    with pytest.warns(UserWarning) as caught:
        code, out, err = cli(capsys, "train", "--data", root, "--val", val_data, "--out", run, "--config",
                             tiny_yaml, "--iters", "6", "--batch-size", "1", "--seed", SEED, "--skip-bad",
                             "--workers", workers, *FAST)
    assert code == 0, err
    assert "trained 6 steps" in out and "Traceback" not in err
    messages = [str(w.message) for w in caught]
    assert sum(f"{bad}: cannot read image" in m and f"sample {bad.stem} skipped" in m for m in messages) == 1
    # its batch had nothing else: skipped, in epoch 0 and again in epoch 1, without counting as a step
    assert sum("no readable sample in the batch, step skipped" in m for m in messages) == 2
    assert not any("non-finite" in m for m in messages)
    name, problem = (run / "skipped.txt").read_text().splitlines()[0].split("\t")
    assert (name, (run / "skipped.txt").read_text().count("\n")) == (bad.stem, 1)
    assert problem.startswith(f"{bad}: cannot read image (")
    assert Counter(reads.read_text().split())[bad.name] == 1  # epoch 1 did not read it again
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt.step, ckpt.epoch, ckpt.batch_in_epoch) == (6, 1, 4)  # 8 batches for 6 steps


def trainer(data: Path, run: Path, val: Path, **options) -> Trainer:
    opts = TrainOptions(data=str(data), val=str(val), out=str(run), config=nuclei_config(**TINY), batch_size=2,
                        crop=48, val_every=1000, device="cpu", progress=False, seed=SEED, **options)
    return Trainer(opts)


@pytest.mark.slow
def test_with_skip_bad_the_step_trains_on_the_rest_of_its_batch(tmp_path, val_data, monkeypatch):
    root, bad = late_bad_dataset(tmp_path / "data", position=2)  # batch 2: the second batch of epoch 0
    sizes = []
    usable = Trainer.usable

    def recorded(self, batch):
        result = usable(self, batch)
        sizes.append(None if result is None else len(result[0]))
        return result

    monkeypatch.setattr(Trainer, "usable", recorded)
    with pytest.warns(UserWarning, match=f"sample {bad.stem} skipped"):
        result = trainer(root, tmp_path / "run", val_data, iters=2, skip_bad=True).run()
    assert sizes == [2, 1] and result.steps == 2
    ckpt = load_checkpoint(result.last)
    assert (ckpt.step, ckpt.epoch, ckpt.batch_in_epoch) == (2, 0, 2)


@pytest.mark.slow
def test_a_bad_sample_read_in_a_worker_stops_train_with_its_one_line_error(tmp_path, tiny_yaml, val_data, capsys):
    root, bad = late_bad_dataset(tmp_path / "data", position=1)
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--data", root, "--val", val_data, "--out", run, "--config", tiny_yaml,
                       "--iters", "4", "--batch-size", "1", "--seed", SEED, "--workers", "2", *FAST)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"maskrcnn: error: {bad}: cannot read image (")
    assert err.endswith("(train --skip-bad skips bad samples)\n")
    assert logged_steps(run) == [1]


@pytest.mark.slow
def test_a_bad_validation_image_is_found_at_the_first_validation(tmp_path, tiny_yaml, capsys):
    root = labels_dataset(tmp_path / "data", 2)
    val = labels_dataset(tmp_path / "val", 2)
    truncate_pixels(val / "images" / "synth_0001.png")
    args = ["train", "--data", root, "--val", val, "--config", tiny_yaml, "--iters", "2", "--batch-size", "1", *FAST]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "refused")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"maskrcnn: error: {val / 'images' / 'synth_0001.png'}: cannot read image (")
    assert logged_steps(tmp_path / "refused") == [1, 2]  # trained; stopped when validating
    with pytest.warns(UserWarning, match="skipped 1 unreadable validation sample"):
        code, out, err = cli(capsys, *args, "--out", tmp_path / "run", "--skip-bad")
    assert code == 0, err
    assert (tmp_path / "run" / "skipped_val.txt").read_text().startswith("synth_0001\t")
    assert not (tmp_path / "run" / "skipped.txt").exists()
    assert load_checkpoint(tmp_path / "run" / "last.pt").metrics  # validated on the good image


@pytest.mark.slow
def test_skip_bad_runs_with_and_without_workers_end_with_the_same_weights(tmp_path, val_data):
    root, bad = late_bad_dataset(tmp_path / "data", position=1)
    with pytest.warns(UserWarning, match=f"sample {bad.stem} skipped"):
        inline = trainer(root, tmp_path / "inline", val_data, iters=4, skip_bad=True).run()
    with pytest.warns(UserWarning, match=f"sample {bad.stem} skipped"):
        workers = trainer(root, tmp_path / "workers", val_data, iters=4, skip_bad=True, workers=2).run()
    a, b = load_checkpoint(inline.last), load_checkpoint(workers.last)
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    assert (tmp_path / "inline" / "skipped.txt").read_text() == (tmp_path / "workers" / "skipped.txt").read_text()
