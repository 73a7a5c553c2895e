"""``maskrcnn predict --3d``: Z-stacks segmented into 3-D nuclei, and their files.

Each input is read with every z-slice (``--channel`` and ``--t`` pick as for 2-D; a 2-D image is a
stack of one plane; a stack past LAZY_SHARE of the memory budget a plane at a time, where
maskrcnn.data.lazy_stack can), segmented plane by plane and stitched (maskrcnn.prediction.volume), and
written as ``NAME_labels.tif`` (the 3-D label image, ZYX, 16-bit or 32-bit past 65535 nuclei,
zlib-compressed), with ``zarr`` also as ``NAME_labels.ome.zarr`` (OME-Zarr, NGFF 0.5: chunks of one
plane by at most 1024 x 1024, for viewers that read large volumes a chunk at a time),
``NAME_instances.csv`` (id, volume in voxels, 3-D centroid and bounding box) and
``NAME_overlay.png`` (the maximum projection with the outlines of every plane's instances); the
run writes ``images.json`` (per stack: size, nuclei, scale). Label volumes are written a plane at
a time (a large stack's labels are never all in memory). Files are written atomically; a stack
that cannot be read is listed in ``failed.txt`` and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.planes import Planes
from ..data.io import image_stem
from ..data.lazy_stack import LazyStack, max_projection, open_stack
from ..data.stack_reader import anisotropy_of
from ..errors import DataError
from ..outputs.files import FAILED_TXT, IMAGES_JSON, write_csv, write_png
from ..outputs.plots import display_image, instance_edges
from ..runtime.atomic import atomic_folder, atomic_output, atomic_write_text, remove_stale_temporaries
from .plane_store import PlaneStore
from .volume import STITCH_THRESHOLD, VolumeResult, choice_plane, segment_stack, volume_table

TABLE_FIELDS = ["id", "volume", "centroid_z", "centroid_y", "centroid_x", "z0", "y0", "x0", "z1", "y1", "x1"]
ZARR_CHUNK = 1024  # the largest chunk side of the OME-Zarr labels in y and x (one plane deep)
LAZY_SHARE = 0.25  # stacks past this share of the memory budget are read a plane at a time


@dataclass
class StackRun:
    written: list[Path] = field(default_factory=list)  # the label images
    failed: list[tuple[Path, str]] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)


def predict_stacks(predictor, paths: list[Path], out_dir: str | Path, planes: Planes | None = None,
                   threshold: float = STITCH_THRESHOLD, progress: bool = False, method: str = "stitch",
                   anisotropy: float | None = None, zarr: bool = False, lazy_from: int | None = None) -> StackRun:
    """Segment each stack of ``paths`` in 3-D (``method`` and ``anisotropy`` as in
    maskrcnn.prediction.volume.segment_stack; None: each file's own, see ``anisotropy_of``) and
    write its files (see the module; ``zarr``: the OME-Zarr labels too). Stacks of more than
    ``lazy_from`` bytes (default: LAZY_SHARE of the memory budget) are read a plane at a time
    where they can be (maskrcnn.data.lazy_stack)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # a killed run's half-written files and label stores
    run = StackRun()
    lazy_from = int(predictor.max_memory * LAZY_SHARE) if lazy_from is None else lazy_from
    for image_id, path in enumerate(tqdm(paths, desc="predict 3-D", unit="stack", disable=not progress), start=1):
        try:
            stack = open_stack(path, planes, lazy_from)
        except DataError as err:
            run.failed.append((path, err.problem))
            continue
        try:
            written, entry = _predict_stack(predictor, path, stack, out, image_id, threshold=threshold, method=method,
                                            anisotropy=anisotropy, zarr=zarr)
            run.written.append(written)
            run.entries.append(entry)
        except DataError as err:  # a plane that cannot be decoded, read only now
            run.failed.append((path, err.problem))
        finally:
            if isinstance(stack, LazyStack):
                stack.close()
    atomic_write_text(out / IMAGES_JSON, json.dumps(run.entries, indent=1))
    failed = out / FAILED_TXT
    if run.failed:
        atomic_write_text(failed, "".join(f"{p}\t{why}\n" for p, why in run.failed))
    else:
        failed.unlink(missing_ok=True)
    return run


def _predict_stack(predictor, path: Path, stack, out: Path, image_id: int, *, threshold: float, method: str,
                   anisotropy: float | None, zarr: bool) -> tuple[Path, dict]:
    """Segment one stack and write its files -> (its label image, its images.json entry)."""
    model, chosen = predictor.for_image(choice_plane(stack))
    voxels = anisotropy_of(path, anisotropy)
    result = segment_stack(chosen, stack, threshold, method=method, anisotropy=voxels, spill=out)
    try:
        name = image_stem(path)
        target = write_stack_files(out, name, stack, result, chosen.normalizer)
        if zarr:
            write_label_zarr(out / f"{name}_labels.ome.zarr", result.labels, voxels)
        return target, {"id": image_id, "file_name": str(path), "depth": stack.shape[0], "height": stack.shape[1],
                        "width": stack.shape[2], "nuclei": int(result.labels.max()), "anisotropy": round(voxels, 4),
                        "labels_on_disk": isinstance(result.labels, PlaneStore),
                        "read_by_plane": isinstance(stack, LazyStack),
                        **result.scaling.to_dict(), **({"model": model} if model else {})}
    finally:
        if isinstance(result.labels, PlaneStore):
            result.labels.close()


def write_stack_files(out: Path, name: str, stack: np.ndarray, result: VolumeResult, normalizer) -> Path:
    """NAME_labels.tif, NAME_instances.csv and NAME_overlay.png of one stack; returns the label image."""
    labels = result.labels
    target = out / f"{name}_labels.tif"
    write_label_volume(target, labels)
    write_csv(out / f"{name}_instances.csv", volume_table(labels), TABLE_FIELDS)
    write_png(out / f"{name}_overlay.png", projection_overlay(stack, labels, normalizer))
    return target


def write_label_volume(path: Path, labels) -> None:
    """A (Z, H, W) label volume (an array or a PlaneStore) as a zlib-compressed ZYX TIFF (16-bit, or
    32-bit past 65535 ids; BigTIFF past 4 GB), written a plane at a time (each plane one tile) and
    atomically."""
    import tifffile

    depth, height, width = labels.shape
    dtype = np.dtype(np.uint16 if labels.max() < 2**16 else np.uint32)
    tile = (-(-height // 16) * 16, -(-width // 16) * 16)  # TIFF tiles are multiples of 16: one covers a plane
    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, data=(np.asarray(plane).astype(dtype) for plane in labels), shape=labels.shape,
                         dtype=dtype, tile=tile, metadata={"axes": "ZYX"}, compression="zlib",
                         bigtiff=depth * height * width * dtype.itemsize > 2**32 - 2**25)


def write_label_zarr(path: Path, labels, anisotropy: float = 1.0) -> None:
    """A (Z, H, W) label volume (an array or a PlaneStore) as an OME-Zarr label image (NGFF 0.5,
    zarr v3; the z scale is ``anisotropy``), written a plane at a time and atomically. Needs zarr
    >= 3 (the ``slides`` extra)."""
    import zarr

    depth, height, width = labels.shape
    dtype = np.dtype(np.uint16 if labels.max() < 2**16 else np.uint32)
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    scale = [{"type": "scale", "scale": [float(anisotropy), 1.0, 1.0]}]
    with atomic_folder(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs["ome"] = {"version": "0.5", "image-label": {"version": "0.5"},
                             "multiscales": [{"name": path.name, "axes": axes,
                                              "datasets": [{"path": "0", "coordinateTransformations": scale}]}]}
        array = root.create_array("0", shape=(depth, height, width), dtype=dtype, fill_value=0,
                                  chunks=(1, min(height, ZARR_CHUNK), min(width, ZARR_CHUNK)),
                                  dimension_names=("z", "y", "x"))
        for z, plane in enumerate(labels):
            array[z] = np.asarray(plane).astype(dtype)


def projection_overlay(stack: np.ndarray, labels: np.ndarray, normalizer) -> np.ndarray:
    """The stack's maximum projection (H, W, 3) uint8 with every plane's instance outlines in green."""
    picture = display_image(normalizer(max_projection(stack)))
    edge = np.zeros(labels.shape[1:], bool)
    for plane in labels:  # an outline in any plane: the projection of the 3-D outlines
        edge |= instance_edges(plane)
    picture[edge] = (0, 255, 0)
    return picture
