"""Instance outlines for Fiji/ImageJ and QuPath: what ``predict --rois`` and ``--geojson`` write.

Both hold, per instance of an image's label image, its outline from :mod:`maskrcnn.outputs.polygons`:
polygons along pixel edges, in pixel coordinates (x right, y down, vertices at pixel corners), so
that the pixels whose centres they enclose are the instance's pixels (its holes included).

NAME_rois.zip (``--rois``): ImageJ ROIs, one per instance, for Fiji's ROI Manager (drag the zip
onto Fiji, or ROI Manager > More > Open). Each is named by the instance's id in NAME_labels.png
and NAME_instances.csv, zero-padded to at least four digits ("0001", "0002", ...; as many digits
as the largest id needs past 9999), so the ROI Manager lists them in id order; the zip's entries
are NAME.roi. An instance is a polygon ROI; one in several pieces (split by a better-scoring
neighbour) is a composite ROI of one polygon per piece, as ImageJ's own "Create Selection" makes.

NAME.geojson (``--geojson``): a GeoJSON FeatureCollection, one Feature per instance in id order,
in the form QuPath imports by drag and drop (or File > Import objects) as detections::

    {"type": "Feature",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ..., [x, y]]]},
     "properties": {"objectType": "detection", "name": "0001",
                    "classification": {"name": "nucleus"},
                    "measurements": {"id": 1, "score": 0.98, "area": 112, "x0": ..., "mean_intensity": ...}}}

The ring is closed (its first vertex repeated last) and runs counter-clockwise in x-y terms
(RFC 7946's right-hand rule); an instance in several pieces is a MultiPolygon. "name" is the ROI's
name; the measurements are the instance's row of NAME_instances.csv (``outputs.instance_table``)
less its class, which is the classification.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..runtime.atomic import atomic_write_bytes, atomic_write_text
from .polygons import closed

ROIS_SUFFIX, GEOJSON_SUFFIX = "_rois.zip", ".geojson"


def roi_name(instance_id: int, count: int) -> str:
    """The name of instance ``instance_id`` of ``count``: its id, zero-padded to at least 4 digits."""
    return f"{instance_id:0{max(4, len(str(count)))}d}"


def imagej_roi(name: str, rings: list[np.ndarray]):
    """An ImageJ ROI (roifile.ImagejRoi) of one instance's rings ((N, 2) x, y each): a polygon for one
    ring, a composite (ImageJ's ShapeRoi: a path of moves, lines and closes) for several."""
    from roifile import ROI_TYPE, ImagejRoi

    if len(rings) == 1:
        roi = ImagejRoi.frompoints(rings[0], name=name)
        roi.roitype = ROI_TYPE.POLYGON  # frompoints makes a freehand ROI: same outline, but it is a polygon
        return roi
    path = []
    for ring in rings:  # MOVETO x y, LINETO x y ..., CLOSE: in image coordinates, as ImageJ writes them
        path += [0, *ring[0]] + [v for x, y in ring[1:] for v in (1, x, y)] + [4]
    corners = np.concatenate(rings)
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    return ImagejRoi(roitype=ROI_TYPE.RECT, name=name, multi_coordinates=np.array(path, np.float32),
                     shape_roi_size=len(path), left=int(left), top=int(top), right=int(right),
                     bottom=int(bottom))


def write_roi_zip(path: Path, outlines: dict[int, list[np.ndarray]], count: int) -> None:
    """Write the ``count`` instances' outlines ({id: rings}, ids 1..count) as an ImageJ ROI zip."""
    from roifile import roiwrite

    rois = [imagej_roi(roi_name(i, count), outlines[i]) for i in sorted(outlines)]
    with tempfile.TemporaryDirectory() as folder:  # roiwrite writes files; ours are written atomically
        scratch = Path(folder) / path.name
        roiwrite(scratch, rois, mode="w")  # no ROIs: an empty zip, so the image's files are all there
        atomic_write_bytes(path, scratch.read_bytes())


def geojson_collection(outlines: dict[int, list[np.ndarray]], rows: list[dict]) -> dict:
    """A GeoJSON FeatureCollection of the instances: ``rows`` are the instance table's (one per id,
    ``outputs.instance_table``), ``outlines`` their rings ({id: [(N, 2) x, y]})."""
    features = []
    for row in rows:
        rings = [closed(ring).tolist() for ring in outlines.get(row["id"], [])]
        if not rings:  # every id of a label image has pixels; a table row without them gets no shape
            continue
        geometry = ({"type": "Polygon", "coordinates": rings} if len(rings) == 1
                    else {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]})
        features.append({"type": "Feature", "geometry": geometry, "properties": {
            "objectType": "detection", "name": roi_name(row["id"], len(rows)),
            "classification": {"name": row["class"]},
            "measurements": {key: value for key, value in row.items() if key != "class"}}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, outlines: dict[int, list[np.ndarray]], rows: list[dict]) -> None:
    """Write :func:`geojson_collection` as compact JSON."""
    atomic_write_text(path, json.dumps(geojson_collection(outlines, rows), separators=(",", ":")))
