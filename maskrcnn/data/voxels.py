"""A Z-stack's anisotropy (z step / pixel size) from its file's metadata, for ``predict --3d``.

Confocal and light-sheet stacks record their voxel size: OME-TIFF and OME-Zarr in physical sizes
(OME-XML ``PhysicalSizeZ`` / ``PhysicalSizeX``; NGFF ``coordinateTransformations`` scale per
axis), ImageJ TIFF as ``spacing`` (z) beside the x resolution tag (pixels per unit). Where none is
found (or the units differ) the answer is None and the caller takes ``--anisotropy`` or 1.
Unreadable metadata is treated as absent: the stack itself is read and reported elsewhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

UNIT_SCALE = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "mm": 1e3,
              "nanometer": 1e-3, "millimeter": 1e3}


def stack_anisotropy(path: str | Path) -> float | None:
    """z step / x pixel size of the stack in ``path``, or None when its metadata do not say."""
    path = Path(path)
    try:
        if path.is_dir():
            return _zarr_anisotropy(path)
        if path.suffix.lower() in (".tif", ".tiff"):
            return _tiff_anisotropy(path)
    except Exception:  # noqa: BLE001 - metadata in any broken form mean "not recorded"
        return None
    return None


def _ratio(z: float | None, x: float | None) -> float | None:
    return z / x if z and x and z > 0 and x > 0 else None


def _tiff_anisotropy(path: Path) -> float | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.ome_metadata:
            return _ome_xml_anisotropy(tif.ome_metadata)
        if tif.imagej_metadata and "spacing" in tif.imagej_metadata:
            tag = tif.pages.first.tags.get("XResolution")
            if tag is None:
                return None
            numerator, denominator = tag.value
            return _ratio(float(tif.imagej_metadata["spacing"]), denominator / numerator if numerator else None)
    return None


def _ome_xml_anisotropy(xml: str) -> float | None:
    """From the first Pixels element: PhysicalSizeZ / PhysicalSizeX, in common units."""
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if pixels is None:
        return None
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', pixels.group(0)))

    def size(axis: str) -> float | None:
        if f"PhysicalSize{axis}" not in attrs:
            return None
        unit = attrs.get(f"PhysicalSize{axis}Unit", "µm")
        return float(attrs[f"PhysicalSize{axis}"]) * UNIT_SCALE[unit] if unit in UNIT_SCALE else None

    return _ratio(size("Z"), size("X"))


def _zarr_anisotropy(path: Path) -> float | None:
    """NGFF multiscales (0.4: .zattrs; 0.5: zarr.json under "ome"): the first dataset's scale."""
    attrs: dict = {}
    if (path / ".zattrs").is_file():
        attrs = json.loads((path / ".zattrs").read_text())
    elif (path / "zarr.json").is_file():
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    meta = attrs.get("ome", attrs)
    multiscale = meta["multiscales"][0]
    names = [a.get("name") if isinstance(a, dict) else a for a in multiscale["axes"]]
    scale = next(t["scale"] for t in multiscale["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
    units = {a.get("name"): a.get("unit") for a in multiscale["axes"] if isinstance(a, dict)}
    if "z" not in names or "x" not in names or units.get("z") != units.get("x"):
        return None
    return _ratio(float(scale[names.index("z")]), float(scale[names.index("x")]))
