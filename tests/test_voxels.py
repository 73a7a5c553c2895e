"""A Z-stack's anisotropy from its file's voxel size: OME-TIFF, ImageJ TIFF, OME-Zarr, none."""

import json

import numpy as np
import pytest
import tifffile

from maskrcnn.data.voxels import stack_anisotropy
from maskrcnn.data.stack_reader import anisotropy_of

STACK = np.zeros((4, 8, 8), np.uint16)


def test_ome_tiff_physical_sizes_in_any_units(tmp_path):
    tifffile.imwrite(tmp_path / "a.ome.tif", STACK, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0,
                                                              "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    assert stack_anisotropy(tmp_path / "a.ome.tif") == pytest.approx(4.0)
    tifffile.imwrite(tmp_path / "b.ome.tif", STACK, metadata={"axes": "ZYX", "PhysicalSizeZ": 1.5,
                                                              "PhysicalSizeZUnit": "µm", "PhysicalSizeX": 250,
                                                              "PhysicalSizeXUnit": "nm"})
    assert stack_anisotropy(tmp_path / "b.ome.tif") == pytest.approx(6.0)


def test_imagej_spacing_against_the_x_resolution(tmp_path):
    tifffile.imwrite(tmp_path / "ij.tif", STACK, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"axes": "ZYX", "spacing": 0.6, "unit": "um"})
    assert stack_anisotropy(tmp_path / "ij.tif") == pytest.approx(3.0)


def test_ome_zarr_scale_of_the_first_dataset(tmp_path):
    zarr = pytest.importorskip("zarr")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=STACK)
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n, "type": "space", "unit": "micrometer"}
                                                              for n in "zyx"],
                                  "datasets": [{"path": "0", "coordinateTransformations": [
                                      {"type": "scale", "scale": [2.5, 0.5, 0.5]}]}]}]
    assert stack_anisotropy(tmp_path / "s.zarr") == pytest.approx(5.0)


def test_no_voxel_size_falls_back_to_the_flag_or_one(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", STACK, photometric="minisblack", metadata={"axes": "ZYX"})
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    (tmp_path / "odd.zarr").mkdir()
    (tmp_path / "odd.zarr" / ".zattrs").write_text(json.dumps({"multiscales": "nonsense"}))
    for name in ("plain.tif", "broken.tif", "odd.zarr", "missing.png"):
        assert stack_anisotropy(tmp_path / name) is None
    assert anisotropy_of(tmp_path / "plain.tif", None) == 1.0
    assert anisotropy_of(tmp_path / "plain.tif", 2.5) == 2.5
