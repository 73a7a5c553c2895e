"""Z-stacks read a plane at a time: the planes equal the whole stack's, for multi-page TIFF,
OME-TIFF with channels and OME-Zarr, and predict --3d writes the same files either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from maskrcnn.data.planes import Planes
from maskrcnn.data.stack_reader import read_stack

pytest.importorskip("zarr")

from maskrcnn.data.lazy_stack import LazyStack, max_projection, open_stack  # noqa: E402


def check_same(lazy, whole):
    assert isinstance(lazy, LazyStack)
    assert lazy.shape == whole.shape and lazy.dtype == whole.dtype and lazy.ndim == whole.ndim and len(lazy) == len(whole)
    assert all(np.array_equal(a, b) for a, b in zip(lazy, whole))
    assert np.array_equal(lazy[-1], whole[-1]) and np.array_equal(max_projection(lazy), whole.max(axis=0))
    with pytest.raises(IndexError):
        lazy[len(whole)]


def test_a_multipage_tiff_is_read_a_plane_at_a_time(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, (7, 30, 40), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, metadata={"axes": "ZYX"})
    lazy = open_stack(tmp_path / "s.tif", lazy_from=0)
    check_same(lazy, read_stack(tmp_path / "s.tif"))
    lazy.close()
    small = open_stack(tmp_path / "s.tif")  # under the default size: read whole
    assert isinstance(small, np.ndarray) and np.array_equal(small, stack)


def test_an_ome_tiff_channel_and_an_ome_zarr_are_read_a_plane_at_a_time(tmp_path):
    from maskrcnn.prediction.stacks import write_label_zarr

    stack = np.random.default_rng(1).integers(0, 255, (5, 2, 24, 20), dtype=np.uint8)  # ZCYX
    tifffile.imwrite(tmp_path / "c.ome.tif", stack, ome=True, metadata={"axes": "ZCYX", "Channel": {"Name": ["a", "b"]}})
    lazy = open_stack(tmp_path / "c.ome.tif", Planes(channel="b"), lazy_from=0)
    check_same(lazy, read_stack(tmp_path / "c.ome.tif", Planes(channel="b")))
    assert np.array_equal(lazy[2], stack[2, 1])
    lazy.close()
    labels = np.random.default_rng(2).integers(0, 9, (6, 20, 30)).astype(np.int32)
    write_label_zarr(tmp_path / "l.ome.zarr", labels)
    lazy = open_stack(tmp_path / "l.ome.zarr", lazy_from=0)
    check_same(lazy, read_stack(tmp_path / "l.ome.zarr"))
    lazy.close()


@pytest.mark.slow
def test_predict_3d_writes_the_same_files_from_a_stack_read_a_plane_at_a_time(tmp_path):
    from maskrcnn.data.synthetic_3d import Stack, synth_stack
    from maskrcnn.prediction.predict import Predictor
    from maskrcnn.prediction.stacks import predict_stacks

    image, _ = synth_stack((8, 64, 64), np.random.default_rng(4), Stack(count=5, diameter=18.0))
    tifffile.imwrite(tmp_path / "s.tif", image, metadata={"axes": "ZYX"})
    predictor = Predictor.from_weights("nuclei", device="cpu")
    for name, lazy_from in (("whole", None), ("planes", 0)):
        predict_stacks(predictor, [tmp_path / "s.tif"], tmp_path / name, lazy_from=lazy_from)
    entries = {n: json.loads((tmp_path / n / "images.json").read_text())[0] for n in ("whole", "planes")}
    assert not entries["whole"]["read_by_plane"] and entries["planes"]["read_by_plane"]
    whole, planes = (tifffile.imread(tmp_path / n / "s_labels.tif") for n in ("whole", "planes"))
    assert whole.max() > 0 and np.array_equal(whole, planes)
    for name in ("s_instances.csv", "s_overlay.png"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "planes" / name).read_bytes()
