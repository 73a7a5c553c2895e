"""Images larger than memory: the streaming tiled prediction's equivalence with predict_tiled, its
bounded memory, its outputs and its stops, and predict's and evaluate's automatic choice among
whole, tiled and streamed (the memory plan itself: test_memory_plan.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import maskrcnn.prediction.segment
import maskrcnn.prediction.large
import maskrcnn.runtime.memory
from cli_helpers import cli
from conftest import OPEN, tiny_config
from maskrcnn.modeling.checkpoint import Checkpoint, save_checkpoint
from maskrcnn.config import Config
from maskrcnn.data.normalize import Normalizer
from maskrcnn.data.regions import ArraySource, sample_step
from maskrcnn.errors import UserError
from maskrcnn.prediction.diameter import AutoScale
from maskrcnn.prediction.labelstore import LabelStore
from maskrcnn.prediction.large import paint_tile, predict_streamed
from maskrcnn.runtime.memory import Plan, plan_inference
from maskrcnn.modeling.model import MaskRCNN
from maskrcnn.outputs.files import instance_table
from maskrcnn.prediction.predict import Predictor, predict_files
from maskrcnn.prediction.tiling import Tile, predict_tiled, tile_grid
from test_tiling import ID_SCALE, OracleModel, discs_across_seams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MB = 10**6


def oracle_predictor() -> Predictor:
    """The perfect model of test_tiling, with the identity normalisation its pixel values need."""
    return Predictor(OracleModel(), Normalizer(method="fixed", fixed_range=(0.0, 1.0), channels=1),
                     torch.device("cpu"))


def disc_image(size: int = 400, tile: int = 128, overlap: int = 48) -> np.ndarray:
    """(size, size) float32 whose pixel values are instance ids / ID_SCALE (discs on every seam)."""
    return discs_across_seams(size, tile, overlap).numpy().astype(np.float32) / ID_SCALE


class SpySource(ArraySource):
    """An ArraySource that records every region read and every sample taken."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array, "spy.tif")
        self.reads: list[tuple[int, int, int, int]] = []
        self.samples: list[int] = []

    def read(self, y0, y1, x0, x1):
        self.reads.append((y0, y1, x0, x1))
        return super().read(y0, y1, x0, x1)

    def sample(self, max_pixels):
        self.samples.append(max_pixels)
        return super().sample(max_pixels)


# --- regions ---------------------------------------------------------------------------------
def test_array_source_regions_and_sample():
    array = np.arange(30 * 50 * 3, dtype=np.uint16).reshape(30, 50, 3)
    source = ArraySource(array)
    assert source.shape == (30, 50) and source.channels == 3 and source.dtype == np.uint16
    assert np.array_equal(source.read(2, 5, 10, 20), array[2:5, 10:20])
    sample = source.sample(100)
    assert sample.shape[0] * sample.shape[1] <= 100 and sample.dtype == np.uint16
    assert np.array_equal(sample, array[::sample_step((30, 50), 100), ::sample_step((30, 50), 100)])
    assert ArraySource(array[..., :1]).channels == 0
    with pytest.raises(ValueError, match="outside"):
        source.read(0, 31, 0, 5)


# --- streaming = predict_tiled ---------------------------------------------------------------
def test_streamed_labels_and_table_equal_predict_tiled(tmp_path):
    """The contract of maskrcnn.prediction.large: no two tiles keep overlapping instances here, so the
    label image is the same pixel for pixel and id for id, and the table the same row for row."""
    image = disc_image()
    predictor = oracle_predictor()
    reference = predict_tiled(predictor.model, predictor.normalizer(image), 128, 48)
    files = predict_streamed(predictor, ArraySource(image), tmp_path, "discs", 128, 48)
    labels = tifffile.imread(files.label_image)
    assert files.instances == len(reference) > 30
    assert np.array_equal(labels, reference.label_image.numpy())
    with open(files.table, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = instance_table(reference, image, predictor.class_names)
    assert rows == [{k: str(v) for k, v in row.items()} for row in expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["discs_instances.csv", "discs_labels.tif",
                                                          "discs_overlay.png"]


@pytest.mark.slow
def test_streaming_reads_regions_and_holds_no_full_size_array(tmp_path, monkeypatch):
    monkeypatch.setattr(maskrcnn.prediction.large, "THUMBNAIL_SIDE", 64)
    monkeypatch.setattr(maskrcnn.prediction.large, "SAMPLE_PIXELS", 4096)  # statistics of a bounded sample
    size, tile, overlap = 2048, 256, 48
    image = np.zeros((size, size), np.float32)
    image[::97, ::89] = 0.005  # a few one-pixel instances; reading and pasting is what is measured
    source = SpySource(image)
    predictor = oracle_predictor()
    tracemalloc.start()
    try:
        files = predict_streamed(predictor, source, tmp_path, "big", tile, overlap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one sample for the intensity range, then reads of one tile each
    assert source.samples == [4096]
    grid = tile_grid(size, size, tile, overlap)
    assert source.reads == [(t.y0, t.y1, t.x0, t.x1) for t in grid]  # each tile once, nothing else
    assert all(y1 - y0 <= tile and x1 - x0 <= tile for y0, y1, x0, x1 in source.reads)
    # numpy arrays (traced): tiles, store chunks; an (H, W) int32 label image would be 16 MB
    assert peak < size * size * 4 / 4, peak
    assert tifffile.imread(files.label_image).shape == (size, size)


def test_output_bigtiff_is_tiled_and_overlay_is_a_thumbnail(tmp_path, monkeypatch):
    monkeypatch.setattr(maskrcnn.prediction.large, "THUMBNAIL_SIDE", 100)
    image = disc_image()
    files = predict_streamed(oracle_predictor(), ArraySource(image), tmp_path, "discs", 128, 48)
    with tifffile.TiffFile(files.label_image) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.shape == (400, 400) and page.dtype == np.uint16
        assert page.asarray().max() == files.instances
    assert Image.open(files.overlay).size == (100, 100)  # every 4th pixel of 400


def test_paint_drops_an_instance_an_earlier_tile_mostly_painted(tmp_path):
    cfg = Config()
    m = cfg.mask_size
    with LabelStore((64, 64), tmp_path, "s", chunk=16) as store:
        earlier = np.zeros((64, 64), np.int32)
        earlier[10:30, 10:30] = 1  # painted by an earlier tile
        store.write(0, 0, earlier)
        # a duplicate (81% of it painted) and an instance touching the painted one (10% of it)
        boxes = torch.tensor([[12.0, 12.0, 32.0, 32.0], [28.0, 10.0, 48.0, 30.0]])
        kept = (boxes, torch.tensor([0.9, 0.8]), torch.ones(2, dtype=torch.long), torch.ones(2, m, m))
        tile = Tile(0, 64, 0, 64, (0.0, 64.0, 0.0, 64.0))
        found = paint_tile(store, tile, kept, (64, 64), 0.5, cfg.mask_test_nms_overlap_threshold, 2,
                           np.ones((64, 64)))
        labels = store.read(0, 64, 0, 64)
    assert found.scores.tolist() == [pytest.approx(0.8)]  # the duplicate is dropped
    assert (labels[10:30, 10:30] == 1).all()  # earlier pixels are never repainted
    assert (labels[10:30, 30:48] == 2).all() and (labels == 2).sum() == found.area.item() == 20 * 18


def test_label_store_round_trips_regions_across_chunks(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.zeros((70, 45), np.int32)
    with LabelStore(truth.shape, tmp_path, "s", chunk=16) as store:
        for y0, x0, h, w in [(0, 0, 70, 45), (5, 7, 30, 20), (60, 40, 10, 5), (17, 0, 1, 45)]:
            block = rng.integers(0, 1000, (h, w), dtype=np.int32)
            store.write(y0, x0, block)
            truth[y0:y0 + h, x0:x0 + w] = block
            assert np.array_equal(store.read(0, 70, 0, 45), truth)
        assert np.array_equal(store.read(3, 50, 9, 44), truth[3:50, 9:44])
        path = store.path
        assert path.exists()
    assert not path.exists()


# --- predict: automatic choice, streaming, stops --------------------------------------------
@pytest.fixture
def tiny_weights(tmp_path) -> str:
    """A random-weight tiny model with open thresholds (it finds its cap of boxes anywhere)."""
    torch.manual_seed(0)
    cfg = Config(**tiny_config(16, **OPEN, rcnn_test_max_detections=20))
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, Checkpoint(cfg, MaskRCNN(cfg).state_dict(), Normalizer().to_dict()))
    return str(path)


@pytest.fixture
def tiles_used(monkeypatch) -> list:
    """The tile size of every segment call that tiled (maskrcnn.prediction.segment's predict_tiled)."""
    calls, original = [], maskrcnn.prediction.segment.predict_tiled

    def spy(model, image, tile, *args, **kwargs):
        calls.append(tile)
        return original(model, image, tile, *args, **kwargs)

    monkeypatch.setattr(maskrcnn.prediction.segment, "predict_tiled", spy)
    monkeypatch.setattr(maskrcnn.runtime.memory, "resident_bytes", lambda: 300 * MB)  # a fixed process size
    return calls


def noise_png(path, size: int) -> str:
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return str(path)


def smallest_budget(cfg: Config, shape: tuple[int, int], mode: str) -> tuple[int, Plan]:
    """The smallest budget in MB (5 MB steps) for which the plan of ``shape`` is ``mode``, and that plan
    (the tests' process sits at 300 MB: see tiles_used)."""
    for mb in range(300, 3000, 5):
        try:
            plan = plan_inference(cfg, shape, mb * MB, overlap=32, resident=300 * MB)
        except UserError:  # not even streaming fits
            continue
        if plan.mode == mode:
            return mb, plan
    raise AssertionError(f"no budget gives {mode}")


@pytest.mark.slow
def test_predict_tiles_automatically_like_an_explicit_tile(tiny_weights, tiles_used, tmp_path, capsys):
    image = noise_png(tmp_path / "noise.png", 384)
    cfg = Predictor.from_weights(tiny_weights, "cpu").model.cfg
    budget, plan = smallest_budget(cfg, (384, 384), "tiled")
    assert plan.tile < 384
    flags = ["--weights", tiny_weights, "--overlap", "32", "--no-progress", "--device", "cpu"]
    assert cli(capsys, "predict", image, "--out", tmp_path / "whole", "--max-memory", "100G", *flags)[0] == 0
    assert tiles_used == []
    assert cli(capsys, "predict", image, "--out", tmp_path / "auto", "--max-memory", f"{budget}M", *flags)[0] == 0
    assert tiles_used == [plan.tile]
    assert cli(capsys, "predict", image, "--out", tmp_path / "forced", "--tile", str(plan.tile), *flags)[0] == 0
    assert tiles_used == [plan.tile, plan.tile]
    auto, forced = (np.array(Image.open(tmp_path / d / "noise_labels.png")) for d in ("auto", "forced"))
    assert auto.max() > 0 and np.array_equal(auto, forced)
    assert (tmp_path / "auto" / "noise_instances.csv").read_text() == \
        (tmp_path / "forced" / "noise_instances.csv").read_text()


@pytest.mark.slow
def test_predict_streams_an_image_over_the_budget(tiny_weights, tiles_used, tmp_path, capsys):
    image = noise_png(tmp_path / "big.png", 640)
    budget, plan = smallest_budget(Predictor.from_weights(tiny_weights, "cpu").model.cfg, (640, 640), "stream")
    assert plan.tile < 640
    code, out, err = cli(capsys, "predict", image, "--out", tmp_path / "o", "--weights", tiny_weights,
                         "--max-memory", f"{budget}M", "--overlap", "32", "--no-progress", "--device", "cpu")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert files == ["big_instances.csv", "big_labels.tif", "big_overlay.png", "images.json", "results_coco.json"]
    assert tiles_used == []  # not the in-memory tiled path
    entry, = json.loads((tmp_path / "o" / "images.json").read_text())
    assert entry["streamed"] is True and (entry["height"], entry["width"]) == (640, 640)
    labels = tifffile.imread(tmp_path / "o" / "big_labels.tif")
    with open(tmp_path / "o" / "big_instances.csv") as f:
        assert labels.max() == sum(1 for _ in f) - 1 > 0
    # continuing the run keeps the streamed image without reading its labels back
    code, out, err = cli(capsys, "predict", image, "--out", tmp_path / "o", "--weights", tiny_weights,
                         "--max-memory", f"{budget}M", "--overlap", "32", "--skip-existing", "--no-progress",
                         "--device", "cpu")
    assert code == 0 and "1 skipped" in out


def test_a_signal_stops_a_streamed_image_between_tiles_leaving_no_file(tmp_path, monkeypatch):
    image = tmp_path / "discs.tif"
    tifffile.imwrite(image, disc_image())
    predictor = oracle_predictor()
    monkeypatch.setattr(Predictor, "plan", lambda self, *a, **k: Plan("stream", 128))
    forward = OracleModel.forward

    def interrupted(self, crop):  # Ctrl-C while the first tile is segmented
        if not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, crop)

    monkeypatch.setattr(OracleModel, "forward", interrupted)
    run = predict_files(predictor, [str(image)], tmp_path / "o", overlap=48, progress=False)
    assert run.stopped_by == "SIGINT" and run.done == 0 and run.written == []
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["images.json", "results_coco.json"]


@pytest.mark.slow
def test_evaluate_tiles_to_fit_its_budget_and_scores_as_an_explicit_tile(tiny_weights, tiles_used):
    from maskrcnn.data.synthetic_scenes import SceneReader
    from maskrcnn.prediction.evaluate import evaluate_model

    predictor = Predictor.from_weights(tiny_weights, "cpu")
    reader = SceneReader(1, 384, seed=3)
    budget, plan = smallest_budget(predictor.model.cfg, (384, 384), "tiled")
    common = dict(device="cpu", progress=False, overlap=32)
    evaluate_model(predictor.model, predictor.normalizer, reader, **common)  # no budget (validation): whole
    assert tiles_used == []
    auto = evaluate_model(predictor.model, predictor.normalizer, reader, max_memory=budget * MB, **common)
    assert tiles_used == [plan.tile]
    forced = evaluate_model(predictor.model, predictor.normalizer, reader, tile=plan.tile, **common)
    assert tiles_used == [plan.tile, plan.tile]
    # the same predictions, so the same scores (NaN where a score is undefined compares by repr)
    assert repr(auto) == repr(forced)


def test_a_streamed_image_is_sized_by_its_central_window(tmp_path, monkeypatch):
    """--diameter auto on a streamed image: one estimate from the central window (normalised as the
    tiles are), every tile segmented at its scale, and images.json records it."""
    image = tmp_path / "discs.tif"
    tifffile.imwrite(image, disc_image())
    predictor = dataclasses.replace(oracle_predictor(), scale=AutoScale(trained_diameter=11.0))
    monkeypatch.setattr(Predictor, "plan", lambda self, *a, **k: Plan("stream", 128))
    scales = []
    planned = Predictor.predict_planned

    def spy(self, crop, tile, overlap=48, scale=None, floor=None):
        scales.append(scale)
        return planned(self, crop, tile, overlap, 1.0, floor)  # the oracle reads ids off pixels: not resized

    monkeypatch.setattr(Predictor, "predict_planned", spy)
    run = predict_files(predictor, [str(image)], tmp_path / "o", overlap=48, progress=False)
    assert len(run.written) == 1
    window = predictor.normalizer(disc_image()[:400, :400])  # the whole image is the window here
    expected = predictor.scale.choose(window)
    assert expected.source == "objects" and expected.scale == pytest.approx(0.5, rel=0.1)  # discs of 20 px
    assert len(scales) > 1 and set(scales) == {expected.scale}
    (entry,) = json.loads((tmp_path / "o" / "images.json").read_text())
    assert entry["streamed"] and entry["diameter_from"] == "objects"
    assert entry["diameter"] == pytest.approx(expected.diameter, abs=0.01) and run.diameters == [entry["diameter"]]
