"""``maskrcnn predict --3d``: Z-stacks segmented into 3-D nuclei, and their files.

Each input is read with every z-slice (``--channel`` and ``--t`` pick as for 2-D; a 2-D image is a
stack of one plane), segmented plane by plane and stitched (maskrcnn.prediction.volume), and
written as ``NAME_labels.tif`` (the 3-D label image, ZYX, 16-bit or 32-bit past 65535 nuclei,
zlib-compressed), ``NAME_instances.csv`` (id, volume in voxels, 3-D centroid and bounding box) and
``NAME_overlay.png`` (the maximum projection with the outlines of every plane's instances); the
run writes ``images.json`` (per stack: size, nuclei, scale). Files are written atomically; a stack
that cannot be read is listed in ``failed.txt`` and skipped.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.io import read_image
from ..data.planes import STACK, Planes
from ..data.voxels import stack_anisotropy
from ..errors import DataError
from ..outputs.files import FAILED_TXT, IMAGES_JSON, write_csv, write_png
from ..outputs.plots import display_image, instance_edges
from ..runtime.atomic import atomic_write_bytes, atomic_write_text
from .volume import STITCH_THRESHOLD, VolumeResult, segment_stack, volume_table

TABLE_FIELDS = ["id", "volume", "centroid_z", "centroid_y", "centroid_x", "z0", "y0", "x0", "z1", "y1", "x1"]


@dataclass
class StackRun:
    written: list[Path] = field(default_factory=list)  # the label images
    failed: list[tuple[Path, str]] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)


def read_stack(path: Path, planes: Planes | None = None) -> np.ndarray:
    """(Z, H, W) or (Z, H, W, C) of a file: every z-slice of the channel and time point chosen."""
    planes = planes or Planes()
    stack = read_image(path, Planes(planes.channel, STACK, planes.t))
    flat = stack.ndim == 2 or (stack.ndim == 3 and stack.shape[-1] <= 4)  # no Z axis: one plane
    return stack[None] if flat else stack


def anisotropy_of(path: Path, given: float | None) -> float:
    """The z step / pixel size a stack is segmented with: ``given`` (--anisotropy), else its file's
    voxel size (maskrcnn.data.voxels), else 1."""
    return given if given is not None else stack_anisotropy(path) or 1.0


def predict_stacks(predictor, paths: list[Path], out_dir: str | Path, planes: Planes | None = None,
                   threshold: float = STITCH_THRESHOLD, progress: bool = False, method: str = "stitch",
                   anisotropy: float | None = None) -> StackRun:
    """Segment each stack of ``paths`` in 3-D (``method`` and ``anisotropy`` as in
    maskrcnn.prediction.volume.segment_stack; None: each file's own, see ``anisotropy_of``) and
    write its files (see the module)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = StackRun()
    for image_id, path in enumerate(tqdm(paths, desc="predict 3-D", unit="stack", disable=not progress), start=1):
        try:
            stack = read_stack(path, planes)
        except DataError as err:
            run.failed.append((path, err.problem))
            continue
        model, chosen = predictor.for_image(stack.max(axis=0))
        voxels = anisotropy_of(path, anisotropy)
        result = segment_stack(chosen, stack, threshold, method=method, anisotropy=voxels)
        run.written.append(write_stack_files(out, path.stem, stack, result, chosen.normalizer))
        run.entries.append({"id": image_id, "file_name": str(path), "depth": stack.shape[0],
                            "height": stack.shape[1], "width": stack.shape[2], "nuclei": int(result.labels.max()),
                            "anisotropy": round(voxels, 4),
                            **result.scaling.to_dict(), **({"model": model} if model else {})})
    atomic_write_text(out / IMAGES_JSON, json.dumps(run.entries, indent=1))
    failed = out / FAILED_TXT
    if run.failed:
        atomic_write_text(failed, "".join(f"{p}\t{why}\n" for p, why in run.failed))
    else:
        failed.unlink(missing_ok=True)
    return run


def write_stack_files(out: Path, name: str, stack: np.ndarray, result: VolumeResult, normalizer) -> Path:
    """NAME_labels.tif, NAME_instances.csv and NAME_overlay.png of one stack; returns the label image."""
    import tifffile

    labels = result.labels
    target = out / f"{name}_labels.tif"
    buffer = io.BytesIO()
    dtype = np.uint16 if labels.max() < 2**16 else np.uint32
    tifffile.imwrite(buffer, labels.astype(dtype), metadata={"axes": "ZYX"}, compression="zlib")
    atomic_write_bytes(target, buffer.getvalue())
    write_csv(out / f"{name}_instances.csv", volume_table(labels), TABLE_FIELDS)
    write_png(out / f"{name}_overlay.png", projection_overlay(stack, labels, normalizer))
    return target


def projection_overlay(stack: np.ndarray, labels: np.ndarray, normalizer) -> np.ndarray:
    """The stack's maximum projection (H, W, 3) uint8 with every plane's instance outlines in green."""
    picture = display_image(normalizer(stack.max(axis=0)))
    edge = np.zeros(labels.shape[1:], bool)
    for plane in labels:  # an outline in any plane: the projection of the 3-D outlines
        edge |= instance_edges(plane)
    picture[edge] = (0, 255, 0)
    return picture
