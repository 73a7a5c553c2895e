"""Region-by-region reading of tiled/pyramidal TIFF, OME-TIFF and OME-Zarr (maskrcnn.data.lazy)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tifffile.zarr

zarr = pytest.importorskip("zarr")
ome_writer = pytest.importorskip("ome_zarr.writer")

from maskrcnn.data.io import read_image  # noqa: E402
from maskrcnn.data.lazy import is_lazy_candidate, open_regions  # noqa: E402
from maskrcnn.data.planes import Planes  # noqa: E402
from maskrcnn.data.regions import RegionSource, sample_step  # noqa: E402
from maskrcnn.errors import DataError  # noqa: E402

RNG = np.random.default_rng(0)
METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def smooth(shape: tuple[int, ...], dtype=np.uint16) -> np.ndarray:
    """A cheap image that is not constant in any tile (fast to write and to compress)."""
    grids = np.indices(shape, sparse=True)
    return (sum((i + 1) * g for i, g in enumerate(grids)) % 251).astype(dtype)


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 block means of the last two axes: a pyramid level that differs from striding."""
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    blocks = image[..., :h, :w].reshape(*image.shape[:-2], h // 2, 2, w // 2, 2)
    return blocks.mean(axis=(-3, -1)).astype(image.dtype)


def pyramid_tiff(path: Path, base: np.ndarray, levels: int, **kwargs) -> list[np.ndarray]:
    """A tiled BigTIFF with ``levels`` - 1 reduced levels in SubIFDs; returns the levels written."""
    pyramid = [base]
    for _ in range(levels - 1):
        pyramid.append(halve(pyramid[-1]))
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(base, tile=(256, 256), subifds=levels - 1, compression="zlib", **kwargs)
        for level in pyramid[1:]:
            tif.write(level, tile=(256, 256), subfiletype=1, compression="zlib")
    return pyramid


def chunk_reads(monkeypatch, store_class) -> list[str]:
    """The chunk keys read through ``store_class.get`` from now on (metadata keys left out)."""
    keys: list[str] = []
    original = store_class.get

    async def get(self, key, *args, **kwargs):
        value = await original(self, key, *args, **kwargs)
        if value is not None and not key.endswith(METADATA_KEYS):
            keys.append(key)
        return value

    monkeypatch.setattr(store_class, "get", get)
    return keys


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A 4096 x 4096 uint16 tiled (256 x 256) pyramidal BigTIFF: 256 tiles at full resolution."""
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    return path, pyramid_tiff(path, smooth((4096, 4096)), 3)


# --- TIFF ---------------------------------------------------------------------------------------------
def test_tiled_pyramid_regions_equal_the_full_image(slide):
    path, pyramid = slide
    source = open_regions(path)
    assert isinstance(source, RegionSource)
    assert source.shape == (4096, 4096) and source.channels == 0 and source.dtype == np.uint16
    for y0, y1, x0, x1 in ((0, 256, 0, 256), (1000, 1300, 3900, 4096), (4000, 4096, 0, 4096), (17, 18, 5, 9)):
        region = source.read(y0, y1, x0, x1)
        assert region.dtype == np.uint16
        np.testing.assert_array_equal(region, pyramid[0][y0:y1, x0:x1])
    with pytest.raises(ValueError, match="outside the image"):
        source.read(0, 4097, 0, 10)


def test_a_region_decodes_only_the_tiles_it_touches(slide, monkeypatch):
    path, pyramid = slide
    source = open_regions(path)
    keys = chunk_reads(monkeypatch, tifffile.zarr.ZarrTiffStore)
    source.read(1024, 1280, 2048, 2304)  # one tile exactly
    assert len(keys) == 1
    keys.clear()
    source.read(1000, 1256, 2000, 2256)  # across a tile corner: 4 of the 256 tiles
    assert len(keys) == 4
    tracemalloc.start()
    try:
        region = source.read(3000, 3256, 100, 356)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(region, pyramid[0][3000:3256, 100:356])
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB read for a 128 KiB region of a 32 MiB image"


def test_sample_reads_the_pyramid_level_that_fits(slide, monkeypatch):
    path, pyramid = slide
    source = open_regions(path)
    keys = chunk_reads(monkeypatch, tifffile.zarr.ZarrTiffStore)
    np.testing.assert_array_equal(source.sample(1024 * 1024), pyramid[2])  # level 2: 1024 x 1024, 16 tiles
    assert len(keys) == 16
    small = source.sample(10_000)  # smaller than every level: the coarsest, strided
    step = sample_step((1024, 1024), 10_000)
    np.testing.assert_array_equal(small, pyramid[2][::step, ::step])
    assert small.size <= 10_000


def test_striped_and_rgb_tiffs_read_by_regions_as_read_image_reads_them(tmp_path):
    striped = smooth((600, 500), np.uint8)
    tifffile.imwrite(tmp_path / "striped.tif", striped, rowsperstrip=16, compression="zlib")
    rgb = RNG.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", tile=(64, 64))
    stack = RNG.integers(0, 256, (7, 90, 80), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    for name in ("striped.tif", "rgb.tif", "stack.tif"):
        source = open_regions(tmp_path / name)
        eager = read_image(tmp_path / name)
        assert source.shape == eager.shape[:2] and source.channels == (eager.shape[2] if eager.ndim == 3 else 0)
        np.testing.assert_array_equal(source.read(0, source.shape[0], 0, source.shape[1]), eager)
        np.testing.assert_array_equal(source.read(30, 61, 10, 77), eager[30:61, 10:77])
    np.testing.assert_array_equal(open_regions(tmp_path / "stack.tif", Planes(z="max")).read(5, 50, 5, 50),
                                  stack.max(axis=0)[5:50, 5:50])


def test_ome_tiff_planes_and_projection_read_only_their_region(tmp_path, monkeypatch):
    """A Z C Y X OME-TIFF with tiled pages: a max-projection region reads that tile of each z-slice."""
    stack = smooth((3, 2, 1024, 768))
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, stack, tile=(256, 256), compression="zlib", ome=True,
                     metadata={"axes": "ZCYX", "Channel": {"Name": ["DAPI", "GFP"]}})
    source = open_regions(path, Planes(channel="GFP", z="max"))
    assert source.shape == (1024, 768) and source.dtype == np.uint16
    keys = chunk_reads(monkeypatch, tifffile.zarr.ZarrTiffStore)
    np.testing.assert_array_equal(source.read(256, 512, 512, 768), stack[:, 1, 256:512, 512:768].max(axis=0))
    assert len(keys) == 3  # one tile in each of the 3 z-slices of GFP
    mean = open_regions(path, Planes(z="mean")).read(0, 100, 0, 100)
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, stack[:, 0, :100, :100].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(open_regions(path, Planes("GFP", 2)).read(0, 1024, 0, 768),
                                  read_image(path, Planes("GFP", 2)))
    with pytest.raises(DataError, match=r"cells\.ome\.tif: no channel 'RFP'; the file has: DAPI, GFP"):
        open_regions(path, Planes("RFP"))


# --- OME-Zarr ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ome_zarr(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """An NGFF image (C Y X, channels DAPI and GFP) with 3 levels, chunks of 128 x 128."""
    path = tmp_path_factory.mktemp("zarr") / "cells.ome.zarr"
    pyramid = [smooth((2, 1024, 768))]
    for _ in range(2):
        pyramid.append(halve(pyramid[-1]))
    root = zarr.open_group(str(path), mode="w")
    ome_writer.write_multiscale(pyramid, root, axes="cyx", storage_options={"chunks": (1, 128, 128)})
    root.attrs["ome"] = {**root.attrs["ome"], "omero": {"channels": [{"label": "DAPI"}, {"label": "GFP"}]}}
    return path, pyramid


def test_ome_zarr_regions_planes_and_sample(ome_zarr, monkeypatch):
    path, pyramid = ome_zarr
    assert is_lazy_candidate(path)
    source = open_regions(path, Planes(channel="GFP"))
    assert source.shape == (1024, 768) and source.channels == 0 and source.dtype == np.uint16
    keys = chunk_reads(monkeypatch, zarr.storage.LocalStore)
    np.testing.assert_array_equal(source.read(100, 300, 200, 250), pyramid[0][1, 100:300, 200:250])
    assert len(keys) == 3  # rows 100..300 span chunks 0, 1, 2; columns 200..250 chunk 1
    keys.clear()
    np.testing.assert_array_equal(source.sample(256 * 192), pyramid[2][1])
    level = source.levels[2].path  # 256 x 192: 2 x 2 chunks of channel 1, and nothing of the finer levels
    assert sorted(keys) == [f"{level}/c/1/{y}/{x}" for y in (0, 1) for x in (0, 1)]
    np.testing.assert_array_equal(open_regions(path).read(0, 10, 0, 10), pyramid[0][0, :10, :10])  # DAPI
    with pytest.raises(DataError, match=r"cells\.ome\.zarr: no channel 'RFP'; the file has: DAPI, GFP"):
        open_regions(path, Planes("RFP"))


def test_plain_zarr_array_and_ngff_0_4_metadata(tmp_path):
    image = RNG.integers(0, 256, (5, 64, 48), dtype=np.uint8)
    zarr.save_array(str(tmp_path / "plain.zarr"), image)
    np.testing.assert_array_equal(open_regions(tmp_path / "plain.zarr", Planes(z=3)).read(0, 64, 0, 48), image[3])
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    old.create_array("0", data=image, chunks=(1, 32, 32))
    old.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "z", "type": "space"}, {"name": "y"},
                                                            {"name": "x"}], "datasets": [{"path": "0"}]}]
    source = open_regions(tmp_path / "old.zarr", Planes(z="max"))
    np.testing.assert_array_equal(source.read(10, 40, 0, 48), image.max(axis=0)[10:40])


# --- errors ---------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_data_errors_naming_the_file(tmp_path, slide):
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    (tmp_path / "notzarr.zarr").mkdir()
    cases = {
        tmp_path / "missing.tif": "no such file or folder",
        tmp_path / "junk.tif": "cannot open image (",
        tmp_path / "image.png": "cannot read by regions: expected a TIFF file",
        tmp_path / "empty.zarr": "zarr folder without OME-Zarr 'multiscales' metadata",
        tmp_path / "notzarr.zarr": "cannot open image (",
    }
    for path, problem in cases.items():
        with pytest.raises(DataError) as caught:
            open_regions(path)
        assert caught.value.path == str(path) and caught.value.problem.startswith(problem), caught.value
        assert "\n" not in str(caught.value)
    truncated = tmp_path / "truncated.tif"
    with tifffile.TiffFile(slide[0]) as tif:
        last_tile = max(tif.pages[0].dataoffsets)  # the bottom-right tile: cut inside it
    truncated.write_bytes(slide[0].read_bytes()[: last_tile + 10])
    source = open_regions(truncated)
    with pytest.raises(DataError, match=r"truncated\.tif: cannot read region \[3840:4096, 3840:4096\] \("):
        source.read(3840, 4096, 3840, 4096)


def test_is_lazy_candidate(tmp_path, slide):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    assert is_lazy_candidate(slide[0]) and not is_lazy_candidate(tmp_path / "a.png")
    assert not is_lazy_candidate(tmp_path / "folder") and not is_lazy_candidate(tmp_path / "none.tif")
